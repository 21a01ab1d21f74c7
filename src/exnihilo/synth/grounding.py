"""The grounding check: a judge model says whether each synthesized answer is supported
by the chunk it came from → `meta.tags.grounded` true / false / null (null: the judge's
reply was unreadable, or the prompt did not fit the judge's context, never a truncated
document). Used by both synthesis methods (`synth/documents.py`).
"""

from __future__ import annotations

import re
from typing import Any

from exnihilo.engines.base import Engine, SamplingParams
from exnihilo.judge import DATA_NOTICE, extract_json_object, fence
from exnihilo.synth.ingest import Chunk
from exnihilo.synth.joint import prompt_tokens
from exnihilo.synth.pairs import Pair


def grounding_request(chunk_text: str, pair: Pair) -> str:
    return (f"{DATA_NOTICE}\n\nYou check whether an answer is supported by a document.\n\n"
            f"{fence('DOCUMENT', chunk_text)}\n\n{fence('QUESTION', pair.instruction)}\n\n"
            f"{fence('ANSWER', pair.response)}\n\n"
            "Is the answer stated in, or directly implied by, the document? Reply with JSON "
            'only: {"supported": true} or {"supported": false}.')


_VERDICT_WORD = re.compile(r"\b(yes|no|true|false|supported|unsupported|not supported)\b", re.I)
_TRUE_WORDS = {"yes", "true", "supported"}


def parse_grounding(text: str) -> bool | None:
    """True/False from a judge reply (JSON first, then the first verdict word), else None."""
    obj = extract_json_object(text)
    if obj is not None:
        for key in ("supported", "grounded", "answer", "verdict"):
            value = obj.get(key)
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS | {
                    "no", "false", "unsupported", "not supported"}:
                return value.strip().lower() in _TRUE_WORDS
    match = _VERDICT_WORD.search(text)
    if match:
        return match.group(1).lower() in _TRUE_WORDS
    return None


def judge_pairs(judge: Engine, tokenizer: Any | None, items: list[tuple[Chunk, Pair, int]],
                params: SamplingParams, context_tokens: int | None) -> list[bool | None]:
    """One verdict per (chunk, pair, seed); a prompt longer than the judge's context gets
    None (unjudged) rather than a truncated document."""
    verdicts: list[bool | None] = [None] * len(items)
    conversations, where, seeds = [], [], []
    for i, (chunk, pair, seed) in enumerate(items):
        conversation = [{"role": "user", "content": grounding_request(chunk.text, pair)}]
        if tokenizer is not None and context_tokens is not None and prompt_tokens(
                tokenizer, conversation) + params.max_new_tokens > context_tokens:
            continue
        conversations.append(conversation)
        where.append(i)
        seeds.append(seed)
    if conversations:
        for i, out in zip(where, judge.chat(conversations, params, seeds=seeds), strict=True):
            verdicts[i] = parse_grounding(out.text)
    return verdicts

def judge_rows(judge: Engine, tokenizer: Any, context_tokens: int | None,
               chunks: list[Chunk], rows: list[dict[str, Any]], params: SamplingParams) -> None:
    """Add `grounded` to every pair of every row (in place)."""
    items: list[tuple[Chunk, Pair, int]] = []
    slots: list[dict[str, Any]] = []
    for chunk, row in zip(chunks, rows, strict=True):
        for i, p in enumerate(row["pairs"]):
            items.append((chunk, Pair(p["instruction"], p["response"]), row["seed"] + 1 + i))
            slots.append(p)
    for slot, verdict in zip(slots, judge_pairs(judge, tokenizer, items, params,
                                                context_tokens), strict=True):
        slot["grounded"] = verdict
