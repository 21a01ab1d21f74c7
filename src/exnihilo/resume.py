"""Resumable outputs: rerun the same command and it continues; rerun a different one and it
refuses instead of mixing.

Every command that appends to its output as it goes (Magpie, documents, tags, generate,
judge, pairwise) opens it through `ResumableOutput`:

1. the output must not be an input (`outputs.check_output`), and it is locked for the whole
   run (`outputs.OutputLock`): a second writer fails at once, naming the first;
2. a torn last line from a killed run is repaired (`outputs.repair_torn_tail`);
3. the settings that change the output (model, seed, sampling, prompts, ...) are recorded
   in a side file `.exnihilo/<out>.settings.json` when the output is started, and compared on every
   rerun: a difference is an error naming each setting, before anything is written (and,
   when the CLI calls `check_resumable` first, before any model loads). An output that holds
   rows but no settings record (another command's file, a hand-made one) is refused too:
   resuming it could only mix or lose data;
4. rows are matched by `row_key`: the record id, or for a row without one its content id
   (the same hash `records.make_record` gives), so rows without ids are never lost or
   duplicated.

`process_resumable` is the chunked map-with-resume that `evaluate._resumable` does, plus the
settings record; it takes the same positional arguments, so evaluate can switch with
`from exnihilo.resume import process_resumable as _resumable`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from exnihilo import outputs
from exnihilo.errors import ExnihiloError
from exnihilo.records import JsonlAppender, Record, content_id

SETTINGS_VERSION = 1


def settings_path(out: str | Path) -> Path:
    return outputs.side_file(out, "settings.json")


def row_key(row: Any) -> str:
    """A row's identity for resume: its id, else its content id, else a hash of the row."""
    if isinstance(row, dict):
        rid = row.get("id")
        if isinstance(rid, str) and rid:
            return rid
        if isinstance(rid, int) and not isinstance(rid, bool):
            return str(rid)
        messages = row.get("messages")
        if isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in messages):
            return content_id(messages, row.get("chosen"), row.get("rejected"))
    blob = json.dumps(row, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return "row:" + hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _plain(value: Any) -> Any:
    """Settings as JSON would store them (tuples → lists), so comparisons are like for like."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def settings_difference(recorded: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """One "name: recorded → wanted" phrase per setting that differs."""
    recorded, wanted = _plain(dict(recorded)), _plain(dict(wanted))
    diffs = []
    for name in sorted(set(recorded) | set(wanted)):
        a, b = recorded.get(name, "(unset)"), wanted.get(name, "(unset)")
        if a != b:
            diffs.append(f"{name}: {_short(a)} → {_short(b)}")
    return diffs


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def _has_rows(path: Path) -> bool:
    if not path.exists() or outputs.is_special(path):
        return False
    with path.open("rb") as f:
        return any(line.strip() for line in f)


class ResumableOutput:
    """An appended JSONL output, opened for a resumable run (see the module docstring).

    Usage: `with ResumableOutput(out, "synth magpie", settings, inputs=[...]) as ro:` then
    `ro.rows` (what is already there), `ro.keys`, `ro.append(row)`. `sidecars` are side
    files of the same run (e.g. the skipped-candidates log): their rows count as "the
    output holds state" for the settings check.
    """

    def __init__(self, out: str | Path, command: str, settings: Mapping[str, Any] | None,
                 *, inputs: Iterable[str | Path] = (), sidecars: Sequence[str | Path] = (),
                 key: Callable[[Any], str] = row_key):
        self.out = Path(out)
        self.command = command
        self.settings = dict(settings) if settings is not None else None
        self.inputs = [Path(p) for p in inputs if p is not None]
        self.sidecars = [Path(p) for p in sidecars]
        self.key = key
        self.rows: list[Any] = []
        self.keys: set[str] = set()
        self._appender: JsonlAppender | None = None
        self._lock: outputs.OutputLock | None = None
        self._wrote_settings = False

    # -- opening

    def open(self) -> ResumableOutput:
        for path in (self.out, *self.sidecars):
            outputs.check_output(path, self.inputs)
        self._lock = outputs.OutputLock(self.out).acquire()
        try:
            self._appender = JsonlAppender(self.out)
            for path in self.sidecars:
                outputs.repair_torn_tail(path)
            self.check_settings()
            self.rows = self._appender.existing()
            for lineno, row in enumerate(self.rows, start=1):
                if not isinstance(row, dict):
                    raise ExnihiloError(f"{self.out}:{lineno}: not a JSON object; this is not "
                                        f"a `{self.command}` output (nothing was changed)")
            self.keys = {self.key(r) for r in self.rows}
            if self.settings is not None:
                self._record_settings()
        except BaseException:
            self.close()
            raise
        return self

    def has_state(self) -> bool:
        return any(_has_rows(p) for p in (self.out, *self.sidecars))

    def check_settings(self, partial: bool = False) -> None:
        """Refuse an output made with other settings, or not made by this command at all.
        `partial`: compare only the settings given (those known before a model loads)."""
        if self.settings is None or not self.has_state():
            return
        path = settings_path(self.out)
        if not path.exists():
            raise ExnihiloError(
                f"{self.out}: already holds data but has no {path.name} record of the settings "
                f"it was made with, so `{self.command}` cannot resume it safely; choose "
                f"another -o, or move the file away (nothing was changed)")
        try:
            recorded = json.loads(outputs.resolved(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ExnihiloError(f"{path}: unreadable settings record ({e}); choose another "
                                f"-o (nothing was changed)") from None
        if not isinstance(recorded, dict) or recorded.get("command") != self.command:
            other = recorded.get("command") if isinstance(recorded, dict) else None
            raise ExnihiloError(f"{self.out}: made by `{other}`, not `{self.command}`; choose "
                                f"another -o (nothing was changed)")
        old = recorded.get("settings") or {}
        if partial:
            old = {k: v for k, v in old.items() if k in self.settings}
        diffs = settings_difference(old, self.settings)
        if diffs:
            raise ExnihiloError(
                f"{self.out}: made with other settings ({'; '.join(diffs)}); rerun with the "
                f"same settings to resume, or choose another -o (nothing was changed)")

    def _record_settings(self) -> None:
        path = settings_path(self.out)
        if self.has_state() and path.exists():
            return  # the same settings (checked): keep the original record
        if outputs.is_special(self.out):
            return
        body = {"command": self.command, "version": SETTINGS_VERSION,
                "settings": _plain(self.settings)}
        outputs.write_text_atomic(path, json.dumps(body, indent=1, ensure_ascii=False) + "\n")
        self._wrote_settings = True

    # -- writing

    def append(self, row: Any) -> None:
        assert self._appender is not None, "open() first"
        self._appender.append(row)
        self.rows.append(row)
        self.keys.add(self.key(row))

    def close(self) -> None:
        if self._appender is not None:
            self._appender.close()
            self._appender = None
        if self._wrote_settings and not self.has_state():
            settings_path(self.out).unlink(missing_ok=True)  # a run that wrote nothing
            self._wrote_settings = False
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> ResumableOutput:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_resumable(out: str | Path, command: str, settings: Mapping[str, Any] | None, *,
                    inputs: Iterable[str | Path] = (), sidecars: Sequence[str | Path] = ()
                    ) -> None:
    """Every check `ResumableOutput.open` makes (input clash, lock free, settings match),
    writing nothing: the CLI calls it before loading a model so a doomed run fails in
    milliseconds, not after minutes of loading. `settings` may be the subset known before
    loading (e.g. without the chat template's text): only those are compared."""
    ro = ResumableOutput(out, command, settings, inputs=inputs, sidecars=sidecars)
    for path in (ro.out, *ro.sidecars):
        outputs.check_output(path, ro.inputs)
    with outputs.OutputLock(ro.out):  # free now (it is taken again when the run opens it)
        ro.check_settings(partial=True)


def process_resumable(items: list[Record], key: Callable[[Record], str],
                      process: Callable[[list[Record]], list[Record]], out: str | Path | None,
                      chunk_size: int, mismatch: Callable[[Record], str | None] | None = None,
                      *, command: str | None = None, settings: Mapping[str, Any] | None = None,
                      inputs: Iterable[str | Path] = ()) -> tuple[list[Record], int]:
    """Run `process` over `items` in chunks, appending each result to `out` as it comes.

    `key` must give the same value for an input and for its result. Results already in
    `out` (same key) are reused after `mismatch` (per row: a reason, or None) and the
    recorded `settings` (whole file) confirm they came from the same settings; otherwise
    this refuses rather than mixing. An input listed twice is processed once. Returns the
    results in input order and how many were reused. (A superset of `evaluate._resumable`.)
    """
    done: dict[str, Record] = {}
    output = None
    if out is not None:
        # rows are keyed by `key` only after `mismatch` vouched for them (a foreign row may
        # not even have the fields `key` reads)
        output = ResumableOutput(out, command or "resumable", settings, inputs=inputs).open()
        for lineno, old in enumerate(output.rows, start=1):
            reason = mismatch(old) if mismatch is not None else None
            if reason:
                output.close()
                raise ExnihiloError(f"{out}:{lineno}: {reason}; choose another output file or "
                                    f"remove it (nothing was overwritten)")
            done[key(old)] = old
    reused = sum(1 for item in items if key(item) in done)
    if reused:
        from exnihilo.progress import note

        note(f"resuming: {reused} of {len(items)} already in {out}")
    todo, queued = [], set(done)
    for item in items:
        if key(item) not in queued:
            queued.add(key(item))
            todo.append(item)
    try:
        for start in range(0, len(todo), chunk_size):
            for result in process(todo[start:start + chunk_size]):
                done[key(result)] = result
                if output is not None:
                    output.append(result)
    finally:
        if output is not None:
            output.close()
    return [done[key(item)] for item in items], reused
