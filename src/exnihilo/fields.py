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
    """record.meta.tags, the one place curation, filters and reports read. A file judged
    before scores had one place kept `eval judge`'s score at meta.judge.score: it is read
    as the score tag (a copy; the record is not changed)."""
    meta = record.get("meta")
    if not isinstance(meta, dict):
        return {}
    tags = meta.get("tags") if isinstance(meta.get("tags"), dict) else {}
    judge = meta.get("judge")
    if "score" not in tags and isinstance(judge, dict) and "score" in judge:
        return {**tags, "score": judge["score"]}
    return tags


def drop_verdict(meta: dict[str, Any]) -> dict[str, Any]:
    """A copy of `meta` without the judge's verdict and score: for a new answer to the same
    prompt, which the old verdict does not describe."""
    meta = {k: v for k, v in meta.items() if k != "judge"}
    if isinstance(meta.get("tags"), dict) and "score" in meta["tags"]:
        meta["tags"] = {k: v for k, v in meta["tags"].items() if k != "score"}
    return meta


def score_of(record: Record) -> float | None:
    """The record's 0-100 score (`curate tag --score`, `eval judge`): meta.tags.score, or
    an old judged file's meta.judge.score; None when unscored or unreadable."""
    score = tags_of(record).get("score")
    return None if score is None else float(score)


def set_tags(record: Record, **tags: Any) -> Record:
    """Merge `tags` into record.meta.tags (in place; returns the record)."""
    meta = record.setdefault("meta", {})
    merged = dict(meta.get("tags") or {})
    merged.update(tags)
    meta["tags"] = merged
    return record
