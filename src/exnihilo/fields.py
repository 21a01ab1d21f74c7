"""Which text of a record is "the instruction" and which is "the response".

Curation, filters and reports all ask the same two questions, so they share one answer:
the instruction is the first user message; the response is the last assistant message of
`messages`, or the `chosen` message of a preference record that has no answer in `messages`.
"""

from __future__ import annotations

from typing import Any

from exnihilo.records import Record


def instruction_of(record: Record) -> str | None:
    for message in record.get("messages") or []:
        if message.get("role") == "user":
            return message.get("content", "")
    return None


def response_of(record: Record) -> str | None:
    for message in reversed(record.get("messages") or []):
        if message.get("role") == "assistant":
            return message.get("content", "")
    chosen = record.get("chosen")
    if isinstance(chosen, dict) and isinstance(chosen.get("content"), str):
        return chosen["content"]
    return None


def tags_of(record: Record) -> dict[str, Any]:
    meta = record.get("meta")
    tags = meta.get("tags") if isinstance(meta, dict) else None
    return tags if isinstance(tags, dict) else {}


def set_tags(record: Record, **tags: Any) -> Record:
    """Merge `tags` into record.meta.tags (in place; returns the record)."""
    meta = record.setdefault("meta", {})
    merged = dict(meta.get("tags") or {})
    merged.update(tags)
    meta["tags"] = merged
    return record
