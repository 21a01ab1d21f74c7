"""One record schema, content-hash ids, JSONL input/output and format converters.

A record is a plain dict (so it round-trips through `datasets.load_dataset("json")`):

    {"id": "...", "messages": [{"role": "user", "content": "..."}, ...], "meta": {...}}

Preference records add "chosen" and "rejected" assistant messages. The id is a hash of the
conversation's content only (never of `meta`), so "have I already got this id?" answers
both resume and exact dedup.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from exnihilo import outputs
from exnihilo.errors import ExnihiloError

Message = dict[str, str]
Record = dict[str, Any]

ROLES = ("system", "user", "assistant")


def content_id(messages: list[Message], chosen: Message | None = None,
               rejected: Message | None = None) -> str:
    """A stable 16-hex-digit id from the roles and texts of a conversation."""
    payload: dict[str, Any] = {"messages": [[m["role"], m["content"]] for m in messages]}
    if chosen is not None:
        payload["chosen"] = [chosen["role"], chosen["content"]]
    if rejected is not None:
        payload["rejected"] = [rejected["role"], rejected["content"]]
    blob = json.dumps(payload, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def make_record(messages: list[Message], meta: dict[str, Any] | None = None,
                chosen: Message | None = None, rejected: Message | None = None) -> Record:
    """Build a schema record with its content id."""
    record: Record = {"id": content_id(messages, chosen, rejected), "messages": messages}
    if chosen is not None:
        record["chosen"] = chosen
    if rejected is not None:
        record["rejected"] = rejected
    record["meta"] = meta or {}
    return record


def validate_record(obj: Any, where: str) -> Record:
    """Check one parsed line against the schema; `where` is "file:line" for the error."""
    if not isinstance(obj, dict):
        raise ExnihiloError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ExnihiloError(f"{where}: record has no 'messages' list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(
                m.get("content"), str):
            raise ExnihiloError(
                f"{where}: messages[{i}] must be {{'role': system|user|assistant, "
                f"'content': str}}, got {json.dumps(m)[:80]}")
    for key in ("chosen", "rejected"):
        m = obj.get(key)
        if m is not None and not (isinstance(m, dict) and m.get("role") in ROLES
                                  and isinstance(m.get("content"), str)):
            raise ExnihiloError(f"{where}: '{key}' must be {{'role': ..., 'content': str}}, "
                                f"got {json.dumps(m)[:80]}")
    if obj.get("meta") is None:
        obj["meta"] = {}
    elif not isinstance(obj["meta"], dict):
        raise ExnihiloError(f"{where}: 'meta' must be an object, got "
                            f"{type(obj['meta']).__name__}")
    # A row without a usable id gets its content id, so resume can always match it.
    if isinstance(obj.get("id"), int) and not isinstance(obj.get("id"), bool):
        obj["id"] = str(obj["id"])
    if not isinstance(obj.get("id"), str) or not obj["id"]:
        obj["id"] = content_id(messages, obj.get("chosen"), obj.get("rejected"))
    return obj


# ---------------------------------------------------------------------------------- reading

def _check_input(path: Path) -> None:
    if not path.exists():
        raise ExnihiloError(f"{path}: no such file")
    if path.is_dir():
        raise ExnihiloError(f"{path}: is a directory, expected a data file")


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield (line_number, parsed_object) for each non-blank line; errors name file:line."""
    path = Path(path)
    _check_input(path)
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ExnihiloError(f"{path}:{lineno}: not UTF-8 text (byte {e.start + 1} of "
                                    f"the line); convert the file to UTF-8") from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise ExnihiloError(f"{path}:{lineno}: malformed JSON ({e.msg} at column "
                                    f"{e.colno})") from None


def read_text(path: str | Path) -> str:
    """A whole UTF-8 file; a folder, a missing file or undecodable bytes are one-line errors
    naming the line."""
    path = Path(path)
    _check_input(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ExnihiloError(f"{path}:{line}: not UTF-8 text; convert the file to UTF-8") from None


def read_records(path: str | Path) -> list[Record]:
    """Read a JSONL file of schema records, validating each line."""
    return [validate_record(obj, f"{path}:{n}") for n, obj in iter_jsonl(path)]


def read_any(path: str | Path) -> list[Record]:
    """Read any supported data source into schema records.

    Sources: a JSONL file (one record a line), a `.json` file (a JSON array, or JSON lines as
    `datasets.Dataset.to_json` writes them), a `.parquet` file (needs pyarrow), or
    `hf:org/name[:split]`, a dataset in the local Hugging Face hub cache. Every row goes
    through `to_record`, so formats may be mixed; a row that cannot become a record is an
    error naming its file and line (or row), never a quiet skip.
    """
    return [to_record(obj, where) for where, obj in iter_source_rows(path)]


def iter_source_rows(source: str | Path) -> Iterator[tuple[str, Any]]:
    """(where, parsed object) for every row of a data source: a JSONL/JSON/parquet file or
    `hf:org/name[:split]` from the local hub cache. The one reader behind every command's
    input (training data, preference pairs, eval sets), so each accepts every source."""
    if str(source).startswith(HF_PREFIX):
        for path in hf_split_files(str(source)):
            yield from iter_rows(path)
        return
    yield from iter_rows(source)


def source_sha256(source: str | Path) -> str:
    """A content hash of a data source: a file's sha256; for `hf:org/name[:split]`, the
    sha256 over its cached split files (relative name and content), so a changed or
    re-downloaded dataset is a different run."""
    if not str(source).startswith(HF_PREFIX):
        return _file_sha256(Path(source))
    repo_id, split = parse_hf_source(str(source))
    h = hashlib.sha256(f"{repo_id}:{split}".encode())  # hf:org/x and hf:org/x:train agree
    for path in hf_split_files(str(source)):
        h.update(b"\0" + path.name.encode() + b"\0" + _file_sha256(path).encode())
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """The file's SHA-256 (hex), read in 1 MiB blocks; a missing file is a one-line error.
    The one hash every results file, run identity and export card uses."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except FileNotFoundError:
        raise ExnihiloError(f"{path}: no such file") from None
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    _check_input(path)
    return file_sha256(path)


def iter_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield ("file:line" or "file[row]", parsed object) for every row of a data file."""
    path = Path(path)
    _check_input(path)
    if path.suffix == ".parquet":
        yield from _parquet_rows(path)
        return
    with path.open("rb") as f:
        text_head = f.read(4096).lstrip()[:1]
    if text_head == b"[":
        try:
            rows = json.loads(read_text(path))
        except json.JSONDecodeError as e:
            raise ExnihiloError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(rows, list):
            raise ExnihiloError(f"{path}: expected a JSON array of records")
        yield from ((f"{path}[{i}]", r) for i, r in enumerate(rows))
    else:
        # JSON lines, whatever the suffix: `Dataset.to_json` writes them to "x.json".
        yield from ((f"{path}:{n}", r) for n, r in iter_jsonl(path))


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """Rows of a parquet file as dicts, numbered from 1 like lines."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ExnihiloError(f"{path}: reading parquet needs pyarrow: pip install "
                            f"'exnihilo[parquet]'") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow's own errors for a corrupt or non-parquet file
        raise ExnihiloError(f"{path}: not a readable parquet file ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None
    for i, row in enumerate(table.to_pylist(), start=1):
        # A column a row does not have reads back as null: drop it, as JSON would omit it.
        yield f"{path}:row {i}", {k: v for k, v in row.items() if v is not None}


# ------------------------------------------------------------------ Hugging Face hub cache

HF_PREFIX = "hf:"
DATA_SUFFIXES = (".parquet", ".jsonl", ".json")


def hub_cache() -> Path:
    """The Hugging Face hub cache folder, read from the environment at call time
    (HF_HUB_CACHE, then HF_HOME/hub, then huggingface_hub's default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def cached_snapshot(repo_id: str, repo_type: str) -> Path | None:
    """The cached snapshot folder of a hub repo, or None; never touches the network.

    huggingface_hub's `snapshot_download(local_files_only=True)` does exactly this lookup
    (refs/main → snapshots/<commit>), so it is used rather than re-deriving the layout.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = snapshot_download(repo_id, repo_type=repo_type, cache_dir=hub_cache(),
                                   local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        return None
    return Path(folder)


def parse_hf_source(source: str) -> tuple[str, str]:
    """"hf:org/name[:split]" → (repo id, split); the split defaults to "train"."""
    body = source[len(HF_PREFIX):]
    repo_id, _, split = body.partition(":")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ExnihiloError(f"{source}: expected hf:org/name or hf:org/name:split")
    return repo_id, split or "train"


def split_files(snapshot: Path, split: str) -> list[Path]:
    """The data files of one split in a dataset snapshot, in name order.

    The hub's own convention (what `datasets` infers without a loading script): a file
    belongs to split S when a path component or the file name starts with S followed by a
    separator or the suffix ("train.jsonl", "data/train-00000-of-00001.parquet", "train/x").
    """
    pattern = re.compile(rf"(^|[/_.-]){re.escape(split)}([/_.-]|$)")
    files = [p for p in sorted(snapshot.rglob("*"))
             if p.suffix in DATA_SUFFIXES and p.is_file() and not p.name.startswith(".")]
    return [p for p in files
            if pattern.search(p.relative_to(snapshot).with_suffix("").as_posix())]


def read_hf_dataset(source: str) -> list[Record]:
    """Records of `hf:org/name[:split]` from the local hub cache only (never downloaded)."""
    return [to_record(obj, where) for where, obj in iter_source_rows(source)]


def hf_split_files(source: str) -> list[Path]:
    """The cached data files of `hf:org/name[:split]`, in name order; a dataset that is not
    in the local cache, or a split with no files, is an error naming the source."""
    repo_id, split = parse_hf_source(source)
    snapshot = cached_snapshot(repo_id, "dataset")
    if snapshot is None:
        raise ExnihiloError(f"{source}: dataset {repo_id} is not in the local Hugging Face "
                            f"cache ({hub_cache()}); exnihilo never downloads it: fetch it "
                            f"with `hf download {repo_id} --repo-type dataset` first")
    files = split_files(snapshot, split)
    if not files:
        found = sorted({p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*")
                        if p.suffix in DATA_SUFFIXES})
        raise ExnihiloError(f"{source}: no data files for split {split!r} in {snapshot} "
                            f"(data files there: {', '.join(found[:8]) or 'none'})")
    return files


# ------------------------------------------------------------------------- formats in

PLAIN_TEXT_HINT = ("a plain-text record ('text'): this command needs conversations; plain "
                   "text trains with `exnihilo train pretrain`")


def to_record(obj: Any, where: str) -> Record:
    """Convert one object in any supported format to a schema record.

    Formats: ours (`messages`), Alpaca (`instruction`/`input`/`output`), ShareGPT
    (`conversations`), TRL prompt-completion (`prompt` + `completion`, strings or message
    lists), TRL preference (`chosen`/`rejected`, read by `train.preference_data`, so the
    two readers agree), and prompt-only (`prompt`, a string or messages). A TRL/axolotl
    plain-text record (`text`) is an error here: it has no roles to train a chat model on.
    """
    if not isinstance(obj, dict):
        raise ExnihiloError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if _is_preference(obj):
        from exnihilo.train.preference_data import to_preference_record

        if "conversations" in obj and "messages" not in obj:  # LLaMA-Factory's ranking rows
            obj = {"id": obj.get("id"), "messages": from_sharegpt(obj, where)["messages"],
                   "chosen": _sharegpt_answer(obj.get("chosen")),
                   "rejected": _sharegpt_answer(obj.get("rejected"))}
            if obj["id"] is None:
                del obj["id"]
        return to_preference_record(obj, where)
    if "messages" in obj:
        if isinstance(obj["messages"], list) and obj["messages"] and all(
                isinstance(m, dict) and "from" in m for m in obj["messages"]):
            return from_sharegpt({"conversations": obj["messages"]}, where)  # axolotl style
        return validate_record(obj, where)
    if "instruction" in obj:
        return from_alpaca(obj, where)
    if "conversations" in obj:
        return from_sharegpt(obj, where)
    if "prompt" in obj and "completion" in obj:
        return from_prompt_completion(obj, where)
    if "prompt" in obj:
        return from_prompt_only(obj, where)
    if "text" in obj:
        raise ExnihiloError(f"{where}: {PLAIN_TEXT_HINT}")
    raise ExnihiloError(f"{where}: not a record (expected 'messages', Alpaca 'instruction', "
                        f"ShareGPT 'conversations', TRL 'prompt'/'completion' or "
                        f"'chosen'/'rejected'); keys: {', '.join(sorted(obj))[:80]}")


def _sharegpt_answer(value: Any) -> Any:
    """A ShareGPT `{"from": "gpt", "value": ...}` answer → its text (others pass through for
    the preference reader to judge)."""
    return value["value"] if isinstance(value, dict) and "value" in value else value


def _is_preference(obj: dict[str, Any]) -> bool:
    """A preference row, unless it is already our own record with single-message answers
    (which `validate_record` keeps as is, extra fields and all)."""
    if "chosen" not in obj and "rejected" not in obj:
        return False
    ours = "messages" in obj and all(isinstance(obj.get(k), dict) for k in ("chosen", "rejected"))
    return not ours


def _turns(value: Any, where: str, name: str, default_role: str) -> list[Message]:
    """A TRL field: a string (one `default_role` turn) or a list of {role, content}."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if isinstance(value, list) and value and all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
            for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise ExnihiloError(f"{where}: '{name}' must be a string or a non-empty list of "
                        f"{{role, content}} messages, got {json.dumps(value)[:80]}")


def from_prompt_completion(obj: dict[str, Any], where: str = "trl") -> Record:
    """TRL prompt-completion → the whole conversation (prompt turns, then the completion's
    assistant turns), so SFT trains on the completion exactly as TRL does."""
    prompt = _turns(obj["prompt"], where, "prompt", "user")
    completion = _turns(obj["completion"], where, "completion", "assistant")
    if prompt[-1]["role"] == "assistant":
        raise ExnihiloError(f"{where}: 'prompt' ends with an assistant turn; the answer "
                            f"belongs in 'completion'")
    if any(m["role"] != "assistant" for m in completion):
        raise ExnihiloError(f"{where}: 'completion' must hold only assistant turns")
    extra = {k: v for k, v in obj.items() if k not in ("prompt", "completion", "id", "meta")}
    meta = {**(obj.get("meta") if isinstance(obj.get("meta"), dict) else {}),
            "source": "trl-prompt-completion"}
    if extra:
        meta["fields"] = extra
    record = make_record(prompt + completion, meta)
    if isinstance(obj.get("id"), (str, int)) and not isinstance(obj.get("id"), bool):
        record["id"] = str(obj["id"])
    return record


def from_prompt_only(obj: dict[str, Any], where: str = "prompt") -> Record:
    """A prompt with no answer (IFEval's {"key", "prompt", ...}, TRL's prompt-only) → a
    record of the prompt turns; the other fields are kept under meta.fields for scorers."""
    fields = {k: v for k, v in obj.items() if k != "prompt"}
    return make_record(_turns(obj["prompt"], where, "prompt", "user"),
                       {"source": "prompt", "fields": fields})


def from_alpaca(obj: dict[str, Any], where: str = "alpaca") -> Record:
    """Alpaca {instruction, input, output[, system]} → [system] / user (instruction + input)
    / assistant."""
    instruction, inp, output = obj.get("instruction"), obj.get("input", ""), obj.get("output")
    if not isinstance(instruction, str) or not isinstance(output, str):
        raise ExnihiloError(f"{where}: Alpaca record needs string 'instruction' and 'output'")
    user = instruction if not inp else f"{instruction}\n\n{inp}"
    meta = {"source": "alpaca", "alpaca": {"instruction": instruction, "input": inp or ""}}
    # LLaMA-Factory's and axolotl's optional "system" column becomes the system turn.
    system = obj.get("system")
    head = [{"role": "system", "content": system}] if isinstance(system, str) and system else []
    return make_record(head + [{"role": "user", "content": user},
                               {"role": "assistant", "content": output}], meta)


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "chatgpt": "assistant", "bard": "assistant"}


def from_sharegpt(obj: dict[str, Any], where: str = "sharegpt") -> Record:
    """ShareGPT {conversations: [{from, value}]} → schema record."""
    messages = []
    turns = obj.get("conversations") or []
    if not isinstance(turns, list):
        raise ExnihiloError(f"{where}: 'conversations' must be a list of {{from, value}} turns")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ExnihiloError(f"{where}: conversations[{i}] must be an object {{from, value}}, "
                                f"got {type(turn).__name__}")
        role = _SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
        if role is None or not isinstance(turn.get("value"), str):
            raise ExnihiloError(f"{where}: conversations[{i}] has unknown role "
                                f"{turn.get('from')!r} or no text")
        messages.append({"role": role, "content": turn["value"]})
    if not messages:
        raise ExnihiloError(f"{where}: empty 'conversations'")
    return make_record(messages, {"source": "sharegpt"})


def to_alpaca(record: Record) -> dict[str, str]:
    """Schema record (single turn) → Alpaca."""
    users = [m for m in record["messages"] if m["role"] == "user"]
    answers = [m for m in record["messages"] if m["role"] == "assistant"]
    alpaca = record.get("meta", {}).get("alpaca")
    if alpaca:
        return {**alpaca, "output": answers[0]["content"] if answers else ""}
    return {"instruction": users[0]["content"] if users else "", "input": "",
            "output": answers[0]["content"] if answers else ""}


def to_sharegpt(record: Record) -> dict[str, Any]:
    back = {"user": "human", "assistant": "gpt", "system": "system"}
    return {"id": record["id"], "conversations": [
        {"from": back[m["role"]], "value": m["content"]} for m in record["messages"]]}


# ---------------------------------------------------------------------------------- writing
# The output discipline itself (atomic writes, locks, torn-tail repair) lives in
# `exnihilo.outputs`; these names stay here because every writer imports them from here.

dumps = outputs.dumps
write_jsonl_atomic = outputs.write_jsonl_atomic
check_writable = outputs.check_writable
repair_torn_tail = outputs.repair_torn_tail


class JsonlAppender:
    """Append-only JSONL writer that a `kill -9` cannot corrupt and a second process cannot
    interleave with.

    Each record is one `write()` of a whole line followed by flush+fsync, so after a crash
    the file is a sequence of complete lines plus at most one torn tail. Opening the file
    again cuts that torn tail off (it never held a complete record), which is what makes
    "rerun the same command" a safe resume. The output is locked (`outputs.OutputLock`)
    from construction to `close()`. The file is created only on the first append, so a run
    that fails before producing anything leaves no partial output behind.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        check_writable(self.path)
        self._lock = outputs.OutputLock(self.path).acquire()
        self._f = None
        try:
            repair_torn_tail(self.path)
        except BaseException:
            self._lock.release()
            raise

    def existing(self) -> list[Record]:
        """Records already in the file (after repair); a device or FIFO holds none."""
        if not self.path.exists() or outputs.is_special(self.path):
            return []
        return [obj for _, obj in iter_jsonl(self.path)]

    def append(self, record: Record) -> None:
        try:
            if self._f is None:
                outputs.make_side_dir(self.path)
                self._f = self.path.open("a", encoding="utf-8")
            self._f.write(dumps(record) + "\n")
            self._f.flush()
            if not outputs.is_special(self.path):
                os.fsync(self._f.fileno())
        except OSError as e:
            raise ExnihiloError(f"{self.path}: cannot append ({e.strerror or e}); the records "
                                f"written so far are kept, rerun to resume") from None

    def close(self) -> None:
        try:
            if self._f is not None:
                self._f.close()
                self._f = None
        finally:
            self._lock.release()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
