"""Training data: records → tokenised examples with per-token "trained" flags, a seeded
train/validation split, and the `--max-length` policy (truncate or drop, always counted).

An `Example` holds the token ids of the whole conversation as the prompt style renders it,
and for each token whether it lies inside an assistant message. The collate turns that into
shifted targets and masks; nothing here knows about batches.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exnihilo.errors import ExnihiloError
from exnihilo.records import Record, read_any
from exnihilo.styles import render_segments


@dataclass
class Example:
    input_ids: list[int]
    trained: list[bool]  # per token: True inside an assistant message
    complete: bool = True  # False once truncated: then no EOS is appended (it did not end)
    record_id: str = ""


@dataclass
class LengthReport:
    """What happened to the examples on the way in; printed by the CLI, stored in the run."""

    records: int = 0
    no_answer: int = 0  # records without an assistant message: skipped
    truncated: int = 0
    dropped: int = 0  # too long (policy "drop"), or nothing trained left after truncation
    kept: int = 0
    skipped_ids: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.kept} of {self.records} records used"]
        if self.no_answer:
            parts.append(f"{self.no_answer} skipped (no assistant message)")
        if self.truncated:
            parts.append(f"{self.truncated} truncated to --max-length")
        if self.dropped:
            parts.append(f"{self.dropped} dropped (longer than --max-length)")
        return ", ".join(parts)


def load_training_records(path: str | Path) -> list[Record]:
    """Read any supported format; an empty file is an error, not a zero-step run."""
    records = read_any(path)
    if not records:
        raise ExnihiloError(f"{path}: no records (the dataset is empty)")
    return records


def split_records(records: list[Record], val_fraction: float, seed: int
                  ) -> tuple[list[Record], list[Record]]:
    """Seeded shuffle, then the first `val_fraction` (at least 1 when > 0) for validation."""
    if not 0 <= val_fraction < 1:
        raise ExnihiloError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = 0 if val_fraction == 0 else max(1, round(len(records) * val_fraction))
    if n_val >= len(records):
        raise ExnihiloError(f"{len(records)} records leave nothing to train on with "
                            f"--val-fraction {val_fraction}")
    val = [records[i] for i in order[:n_val]]
    train = [records[i] for i in order[n_val:]]
    return train, val


def tokenize_record(record: Record, style: str, tokenizer: Any) -> Example:
    """Tokenise each segment on its own (add_special_tokens=False, like the engines do), so
    the prompt tokens are exactly those generation will see."""
    alpaca = (record.get("meta") or {}).get("alpaca")
    ids: list[int] = []
    trained: list[bool] = []
    for text, is_answer in render_segments(record["messages"], style, tokenizer, alpaca):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        trained.extend([is_answer] * len(piece))
    return Example(input_ids=ids, trained=trained, record_id=record.get("id", ""))


def append_eos(ids: list[int], eos_id: int | None, complete: bool = True) -> list[int]:
    """The one EOS rule, used by training, perplexity and preference scoring: a finished
    sequence ends in EOS (appended unless already there), so the model learns where an
    answer stops; a truncated one (`complete=False`) did not end, so it must not learn to
    stop there."""
    if complete and isinstance(eos_id, int) and (not ids or ids[-1] != eos_id):
        return [*ids, eos_id]
    return list(ids)


def final_length(example: Example, eos_id: int) -> int:
    """Length after the collate appends EOS (see `append_eos`)."""
    return len(append_eos(example.input_ids, eos_id, example.complete))


def fit_length(example: Example, max_length: int, eos_id: int, policy: str
               ) -> Example | None:
    """Apply the --max-length policy; None means "drop this example"."""
    if final_length(example, eos_id) <= max_length:
        return example
    if policy == "drop":
        return None
    cut = Example(example.input_ids[:max_length], example.trained[:max_length],
                  complete=False, record_id=example.record_id)
    # The first token is never a target, so it alone cannot carry any training signal.
    return cut if any(cut.trained[1:]) else None


def has_answer(record: Record) -> bool:
    return any(m["role"] == "assistant" for m in record["messages"])


def prepare_examples(records: list[Record], style: str, tokenizer: Any, max_length: int,
                     policy: str = "truncate", report: LengthReport | None = None
                     ) -> list[Example]:
    """Tokenise records and apply the length policy, counting every skip into `report`."""
    if policy not in ("truncate", "drop"):
        raise ExnihiloError(f"unknown length policy {policy!r} (known: truncate, drop)")
    if max_length < 2:
        raise ExnihiloError(f"--max-length must be at least 2, got {max_length}")
    report = report if report is not None else LengthReport()
    eos_id = tokenizer.eos_token_id
    examples = []
    for record in records:
        report.records += 1
        if not has_answer(record):
            report.no_answer += 1
            report.skipped_ids.append(record.get("id", ""))
            continue
        example = tokenize_record(record, style, tokenizer)
        too_long = final_length(example, eos_id) > max_length
        fitted = fit_length(example, max_length, eos_id, policy)
        if fitted is None:
            report.dropped += 1
            report.skipped_ids.append(example.record_id)
            continue
        report.truncated += int(too_long)
        report.kept += 1
        examples.append(fitted)
    return examples
