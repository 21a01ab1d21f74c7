"""Eval sets: reading prompts with their reference answers, and answered records back."""

from __future__ import annotations

from pathlib import Path

from exnihilo.errors import ExnihiloError
from exnihilo.records import Record, content_id, iter_jsonl, read_any, validate_record
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


def load_eval_set(path: str | Path, limit: int | None = None, offset: int = 0
                  ) -> list[Record]:
    """Eval records from our JSONL, Alpaca JSON/JSONL or ShareGPT: the prompt messages, with
    the reference answer (when the data has one) moved to meta["reference"].

    Duplicate prompts are kept once (the first), so every model answers each prompt once and
    pairwise matching by prompt is unambiguous; `offset`/`limit` then slice in file order.
    """
    if limit is not None and limit <= 0:
        raise ExnihiloError(f"--limit must be positive, got {limit}")
    if offset < 0:
        raise ExnihiloError(f"--offset must be >= 0, got {offset}")
    records: list[Record] = []
    seen: set[str] = set()
    for index, source in enumerate(read_any(path)):
        prompt, reference = split_reference(source)
        if not any(m["role"] == "user" for m in prompt):
            raise ExnihiloError(f"{path}[{index}]: record has no user message to answer")
        pid = content_id(prompt)
        if pid in seen:
            continue
        seen.add(pid)
        meta = {k: v for k, v in (source.get("meta") or {}).items()
                if k not in ("reference", "prompt_id", "judge")}
        meta.update(prompt_id=pid, reference=reference, source_id=source["id"])
        records.append({"id": pid, "messages": prompt, "meta": meta})
    records = records[offset:]
    if limit is not None:
        records = records[:limit]
    if not records:
        raise ExnihiloError(f"{path}: no eval records (after offset {offset})")
    return records


def read_generations(path: str | Path) -> list[Record]:
    """Records that end with an assistant answer to judge; errors name file:line."""
    records = []
    for lineno, obj in iter_jsonl(path):
        record = validate_record(obj, f"{path}:{lineno}")
        if record["messages"][-1]["role"] != "assistant":
            raise ExnihiloError(f"{path}:{lineno}: record has no assistant answer to judge "
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
