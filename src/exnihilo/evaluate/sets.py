"""Eval sets: reading prompts with their reference answers, and answered records back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exnihilo.errors import ExnihiloError
from exnihilo.fields import drop_verdict
from exnihilo.records import (
    Record,
    content_id,
    iter_source_rows,
    make_record,
    to_record,
    validate_record,
)
from exnihilo.styles import check_style

Message = dict[str, str]

EMBEDDED_JUDGES = ("smollm2-135m-instruct",)


def split_reference(record: Record) -> tuple[list[Message], str | None]:
    """(prompt messages, reference answer or None) of an eval-set or generated record.

    A generated record keeps the reference in meta["reference"] and ends with the model's
    answer; a plain dataset record ends with the reference answer itself.
    """
    messages = record["messages"]
    meta = record.get("meta") or {}
    prompt = messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages
    if "reference" in meta:
        return list(prompt), meta["reference"]
    if messages and messages[-1]["role"] == "assistant":
        return list(prompt), messages[-1]["content"]
    return list(prompt), None


def answer_parts(record: Record) -> tuple[list[Message], str, str | None]:
    """(prompt messages, the answer under judgement, reference or None) of a record that
    ends with an answer. Only meta["reference"] is a reference here: the final assistant
    message is the answer itself, never its own yardstick."""
    reference = (record.get("meta") or {}).get("reference")
    return list(record["messages"][:-1]), record["messages"][-1]["content"], reference


def prompt_id(record: Record) -> str:
    """The id of a record's prompt (everything before the final answer): the key that
    matches the same eval item across generations by different models."""
    meta = record.get("meta") or {}
    if isinstance(meta.get("prompt_id"), str):
        return meta["prompt_id"]
    return content_id(split_reference(record)[0])


def turns_record(obj: dict[str, Any], where: str) -> Record:
    """A multi-turn question (MT-Bench's question files: {"turns": [user message, …],
    "reference": [answer per turn, …]?, "question_id", "category", …}) as a record: the first
    user turn as its messages, every turn in meta["turns"] (`generation` answers them in
    order), the per-turn references in meta["turn_references"]."""
    turns = obj.get("turns")
    if (not isinstance(turns, list) or not turns
            or not all(isinstance(t, str) and t.strip() for t in turns)):
        raise ExnihiloError(f"{where}: 'turns' must be a non-empty list of user messages")
    references = obj.get("reference")
    if references is not None and (not isinstance(references, list)
                                   or len(references) != len(turns)):
        raise ExnihiloError(f"{where}: 'reference' must list one answer per turn "
                            f"({len(turns)})")
    meta = {k: v for k, v in obj.items() if k not in ("turns", "reference")}
    meta.update(turns=list(turns), turn_references=references)
    return make_record([{"role": "user", "content": turns[0]}], meta)


def turn_prompts(record: Record) -> list[str]:
    """A record's user turns when it is a multi-turn question, else []."""
    turns = (record.get("meta") or {}).get("turns")
    return list(turns) if isinstance(turns, list) and len(turns) > 1 else []


def read_eval_rows(path: str | Path) -> list[Record]:
    """`records.read_any` (JSONL, JSON, parquet, hf:org/name[:split]), plus multi-turn
    questions (objects with "turns")."""
    numbered = iter_source_rows(path)
    return [turns_record(obj, where) if isinstance(obj, dict) and "turns" in obj
            and "messages" not in obj else to_record(obj, where) for where, obj in numbered]


def load_eval_set(path: str | Path, limit: int | None = None, offset: int = 0
                  ) -> list[Record]:
    """Eval records from our JSONL, Alpaca JSON/JSONL, ShareGPT or multi-turn question
    files: the prompt messages, with the reference answer (when the data has one) moved to
    meta["reference"].

    Duplicate prompts are kept once (the first), so every model answers each prompt once and
    pairwise matching by prompt is unambiguous; `offset`/`limit` then slice in file order.
    A multi-turn question is identified by all its turns, and its reference is the last
    turn's (the answer a judge scores).
    """
    if limit is not None and limit <= 0:
        raise ExnihiloError(f"--limit must be positive, got {limit}")
    if offset < 0:
        raise ExnihiloError(f"--offset must be >= 0, got {offset}")
    records: list[Record] = []
    seen: set[str] = set()
    for index, source in enumerate(read_eval_rows(path)):
        prompt, reference = split_reference(source)
        if not any(m["role"] == "user" for m in prompt):
            raise ExnihiloError(f"{path}[{index}]: record has no user message to answer")
        turns = turn_prompts(source)
        if turns:
            refs = (source.get("meta") or {}).get("turn_references")
            reference = refs[-1] if refs else None
        pid = content_id([{"role": "user", "content": t} for t in turns] if turns else prompt)
        if pid in seen:
            continue
        seen.add(pid)
        meta = {k: v for k, v in drop_verdict(source.get("meta") or {}).items()
                if k not in ("reference", "prompt_id")}
        meta.update(prompt_id=pid, reference=reference, source_id=source["id"])
        records.append({"id": pid, "messages": prompt, "meta": meta})
    records = records[offset:]
    if limit is not None:
        records = records[:limit]
    if not records:
        raise ExnihiloError(f"{path}: no eval records (after offset {offset})")
    return records


def require_answers(records: list[Record]) -> None:
    """Every record must end with the assistant answer a judge is asked about."""
    for lineno, record in enumerate(records, start=1):
        if not record["messages"] or record["messages"][-1]["role"] != "assistant":
            raise ExnihiloError(f"record {lineno} ({record.get('id')}) has no assistant "
                                f"answer to judge")


def read_generations(path: str | Path) -> list[Record]:
    """Records that end with an assistant answer to judge; errors name file:line."""
    records = []
    for where, obj in iter_source_rows(path):
        record = validate_record(obj, where)
        if record["messages"][-1]["role"] != "assistant":
            raise ExnihiloError(f"{where}: record has no assistant answer to judge "
                                f"(its last message is {record['messages'][-1]['role']!r}); "
                                f"run `exnihilo generate` first")
        records.append(record)
    if not records:
        raise ExnihiloError(f"{path}: no records to judge")
    return records


def resolve_style(style: str | None, model: str) -> str:
    """An explicit style wins; else the run folder's; else the chat template."""
    if style is not None:
        check_style(style)
        return style
    from exnihilo.train.run import run_style

    return run_style(model) or "chat"
