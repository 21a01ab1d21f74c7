"""Preference data in: three file formats → our preference records → tokenised pairs.

Formats read (JSONL, or a JSON array for `.json` files):

- ours: `{"messages": [...prompt turns], "chosen": {"role": "assistant", "content": …},
  "rejected": {…}}` (chosen/rejected may also be plain strings);
- TRL's: `{"prompt", "chosen", "rejected"}`, each a string or a list of messages; without
  `prompt` ("implicit prompt"), chosen and rejected are whole conversations and their common
  prefix is the prompt;
- LLMs-from-scratch's `instruction-data-with-preference.json`:
  `{"instruction", "input", "chosen", "rejected"}` (kept under meta.alpaca, so the alpaca
  style renders its "### Input:" section as ch07 does).

A tokenised `PairExample` holds the prompt ids (rendered by the prompt style, exactly as
generation will see them) and each response's ids, ending in EOS by `data.append_eos`. A
pair whose prompt leaves no room for its responses under `--max-length`, or whose chosen
equals its rejected, is skipped and counted, never silently truncated into a meaningless
pair.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exnihilo.errors import ExnihiloError
from exnihilo.records import Record, iter_source_rows, make_record
from exnihilo.styles import render_segments
from exnihilo.train.data import append_eos

Message = dict[str, str]


# ------------------------------------------------------------------------------- reading

def _message(value: Any, where: str, name: str) -> Message:
    """A chosen/rejected value → one assistant message."""
    if isinstance(value, str):
        return {"role": "assistant", "content": value}
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return {"role": "assistant", "content": value["content"]}
    if isinstance(value, list) and len(value) == 1:
        return _message(value[0], where, name)
    raise ExnihiloError(f"{where}: '{name}' must be a string or one assistant message, got "
                        f"{json.dumps(value)[:80]}")


def _messages(value: Any, where: str, name: str) -> list[Message]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(
            isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
            and isinstance(m.get("content"), str) for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise ExnihiloError(f"{where}: '{name}' must be a string or a list of "
                        f"{{role, content}} messages, got {json.dumps(value)[:80]}")


def _require(obj: dict[str, Any], keys: tuple[str, ...], where: str, kind: str) -> None:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise ExnihiloError(f"{where}: {kind} preference record is missing "
                            f"{', '.join(repr(k) for k in missing)}")


def _implicit_prompt(chosen: list[Message], rejected: list[Message], where: str
                     ) -> tuple[list[Message], Message, Message]:
    """TRL's implicit-prompt form: the shared prefix is the prompt, then one answer each."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    # Identical conversations share everything; keep the last turn as the "answers".
    n = min(n, len(chosen) - 1, len(rejected) - 1)
    if len(chosen) != n + 1 or len(rejected) != n + 1 or n == 0:
        raise ExnihiloError(f"{where}: 'chosen' and 'rejected' conversations must share "
                            f"their prompt turns and differ only in a final assistant turn")
    for tail in (chosen[n], rejected[n]):
        if tail["role"] != "assistant":
            raise ExnihiloError(f"{where}: the last turn of 'chosen'/'rejected' must be the "
                                f"assistant's")
    return chosen[:n], chosen[n], rejected[n]


def to_preference_record(obj: Any, where: str) -> Record:
    """One parsed object in any supported format → our preference record."""
    if not isinstance(obj, dict):
        raise ExnihiloError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        _require(obj, ("chosen", "rejected"), where, "a 'messages'")
        prompt = _messages(obj["messages"], where, "messages")
        meta = dict(obj.get("meta") or {})
        chosen = _message(obj["chosen"], where, "chosen")
        rejected = _message(obj["rejected"], where, "rejected")
    elif "instruction" in obj:
        _require(obj, ("chosen", "rejected"), where, "an 'instruction'")
        instruction, inp = obj["instruction"], obj.get("input") or ""
        if not isinstance(instruction, str) or not isinstance(inp, str):
            raise ExnihiloError(f"{where}: 'instruction' and 'input' must be strings")
        user = instruction if not inp else f"{instruction}\n\n{inp}"
        prompt = [{"role": "user", "content": user}]
        meta = {"source": "alpaca-preference",
                "alpaca": {"instruction": instruction, "input": inp}}
        chosen = _message(obj["chosen"], where, "chosen")
        rejected = _message(obj["rejected"], where, "rejected")
    elif "chosen" in obj or "rejected" in obj or "prompt" in obj:
        _require(obj, ("chosen", "rejected"), where, "a TRL")
        meta = {"source": "trl"}
        if "prompt" in obj:
            prompt = _messages(obj["prompt"], where, "prompt")
            chosen = _message(obj["chosen"], where, "chosen")
            rejected = _message(obj["rejected"], where, "rejected")
        else:
            prompt, chosen, rejected = _implicit_prompt(
                _messages(obj["chosen"], where, "chosen"),
                _messages(obj["rejected"], where, "rejected"), where)
    else:
        raise ExnihiloError(f"{where}: not a preference record (expected 'messages', "
                            f"'prompt' or 'instruction' with 'chosen' and 'rejected')")
    if prompt[-1]["role"] == "assistant":
        raise ExnihiloError(f"{where}: the prompt ends with an assistant turn; the answers "
                            f"belong in 'chosen' and 'rejected'")
    record = make_record(prompt, meta, chosen, rejected)
    if "id" in obj:
        record["id"] = str(obj["id"])
    return record


def read_preferences(path: str | Path) -> list[Record]:
    """Read preference pairs in any supported format from any source (JSONL, a JSON array,
    parquet, hf:org/name[:split]); errors name file:line (or [index])."""
    records = [to_preference_record(r, where) for where, r in iter_source_rows(path)]
    if not records:
        raise ExnihiloError(f"{path}: no preference records (the file is empty)")
    return records


# ---------------------------------------------------------------------------- tokenising

@dataclass(frozen=True)
class PairExample:
    prompt: tuple[int, ...]
    chosen: tuple[int, ...]
    rejected: tuple[int, ...]
    record_id: str = ""


@dataclass
class PairReport:
    """What happened to the pairs on the way in (printed, and stored in the run info)."""

    records: int = 0
    identical: int = 0  # chosen == rejected: no preference to learn
    no_room: int = 0  # the prompt leaves no room for the responses under --max-length
    too_long: int = 0  # prompt + a response exceeds --max-length (policy "drop")
    truncated: int = 0  # responses cut to fit (policy "truncate")
    kept: int = 0
    skipped_ids: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.kept} of {self.records} pairs used"]
        for name, text in (("identical", "chosen == rejected"),
                           ("no_room", "prompt leaves no room under --max-length"),
                           ("too_long", "longer than --max-length"),
                           ("truncated", "responses truncated to --max-length")):
            if getattr(self, name):
                verb = "" if name == "truncated" else " skipped"
                parts.append(f"{getattr(self, name)}{verb} ({text})")
        return ", ".join(parts)


def _ids(text: str, tokenizer: Any) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_exchange(prompt: list[Message], answer: Message, style: str, tokenizer: Any,
                      alpaca: dict[str, str] | None = None) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids + EOS) with the prompt style; segments are tokenised one by
    one, as SFT does, so the prompt ids are those generation starts from."""
    segments = render_segments([*prompt, answer], style, tokenizer, alpaca)
    *before, (answer_text, trained) = segments
    if not trained:  # pragma: no cover - render_segments ends with the final answer
        raise ExnihiloError("the prompt style rendered no answer segment")
    prompt_ids = [t for text, _ in before for t in _ids(text, tokenizer)]
    return prompt_ids, append_eos(_ids(answer_text, tokenizer), tokenizer.eos_token_id)


def fit_pair(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int,
             policy: str, report: PairReport) -> tuple[list[int], list[int]] | None:
    """Apply --max-length to a pair, counting what happens; None means skipped."""
    room = max_length - len(prompt)
    if room < 1:
        report.no_room += 1
        return None
    if max(len(chosen), len(rejected)) <= room:
        return chosen, rejected
    if policy == "drop":
        report.too_long += 1
        return None
    # A cut response did not end: it keeps no EOS (data.append_eos's rule).
    chosen, rejected = chosen[:room], rejected[:room]
    if chosen == rejected:
        report.identical += 1
        return None
    report.truncated += 1
    return chosen, rejected


def tokenize_pairs(records: list[Record], style: str, tokenizer: Any, max_length: int,
                   policy: str = "drop", report: PairReport | None = None
                   ) -> list[PairExample]:
    """Tokenise preference records; every skipped pair is counted in `report`."""
    if policy not in ("drop", "truncate"):
        raise ExnihiloError(f"unknown length policy {policy!r} (known: drop, truncate)")
    report = report if report is not None else PairReport()
    pairs = []
    for record in records:
        report.records += 1
        if record["chosen"]["content"] == record["rejected"]["content"]:
            report.identical += 1
            report.skipped_ids.append(record["id"])
            continue
        alpaca = (record.get("meta") or {}).get("alpaca")
        prompt, chosen = tokenize_exchange(record["messages"], record["chosen"], style,
                                           tokenizer, alpaca)
        prompt_r, rejected = tokenize_exchange(record["messages"], record["rejected"], style,
                                               tokenizer, alpaca)
        if prompt_r != prompt:  # pragma: no cover - same messages render the same prefix
            raise ExnihiloError(f"record {record['id']}: prompt renders differently")
        fitted = fit_pair(prompt, chosen, rejected, max_length, policy, report)
        if fitted is None:
            report.skipped_ids.append(record["id"])
            continue
        report.kept += 1
        pairs.append(PairExample(tuple(prompt), tuple(fitted[0]), tuple(fitted[1]),
                                 record["id"]))
    return pairs


def pairs_sha256(pairs: list[PairExample]) -> str:
    """A hash of the tokenised pairs (what reference log-probs depend on)."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([p.prompt, p.chosen, p.rejected]).encode())
    return h.hexdigest()
