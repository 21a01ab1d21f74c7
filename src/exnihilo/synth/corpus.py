"""The instruction-augmented corpus (Instruction Pre-Training, arXiv 2406.14491): each
chunk's text followed by its synthesized pairs, as pretraining text; optionally mixed with
general instruction data at an exact ratio (the paper's Mix). Pure functions of the finished
chunks; `synth/documents.py::build_corpus` reads them from a run's chunk log.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

from exnihilo.errors import ExnihiloError
from exnihilo.records import Record, write_jsonl_atomic
from exnihilo.synth.ingest import Chunk
from exnihilo.synth.pairs import PAIR_TEMPLATES, Pair, render_pairs


def corpus_texts(chunks: list[Chunk], done: dict[str, dict[str, Any]], seed: int
                 ) -> list[str]:
    """Instruction-augmented texts: each chunk's text followed by its pairs (pairs judged
    unsupported left out); chunks linked by few-shot chains form one text, oldest first,
    as in the paper's corpus. Chunks without pairs stay as raw text. Each chunk appears in
    exactly one text; the pair template is chosen per text from a seeded generator."""
    order = [c for c in chunks if c.id in done]
    text_of = {c.id: c.text for c in order}
    continued = {done[c.id]["prev"] for c in order if done[c.id].get("prev") in text_of}
    texts = []
    for chunk in order:
        if chunk.id in continued:
            continue  # rendered inside the chain of a later chunk
        chain = []
        cid: str | None = chunk.id
        while cid is not None and cid in text_of:
            chain.append(cid)
            cid = done[cid].get("prev")
        rng = random.Random(f"{seed}:{chunk.id}")
        template = rng.choice(PAIR_TEMPLATES)
        parts = []
        for cid in reversed(chain):
            pairs = [Pair(p["instruction"], p["response"]) for p in done[cid]["pairs"]
                     if p.get("grounded") is not False]
            body = text_of[cid].strip()
            parts.append(f"{body}\n\n{render_pairs(pairs, template)}" if pairs else body)
        texts.append("\n\n\n".join(parts))
    return texts


def parse_ratio(ratio: str) -> tuple[int, int]:
    """"A:B" → (A, B), both positive integers."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", ratio or "")
    if not match or int(match.group(1)) == 0 or int(match.group(2)) == 0:
        raise ExnihiloError(f"--mix-ratio must look like 1:1 or 2:1 (positive integers), "
                            f"got {ratio!r}")
    return int(match.group(1)), int(match.group(2))


def general_text(record: Record, template_index: int) -> str:
    """A general instruction record as plain text (its first user and assistant turn)."""
    user = next((m["content"] for m in record["messages"] if m["role"] == "user"), "")
    answer = next((m["content"] for m in record["messages"] if m["role"] == "assistant"), "")
    return render_pairs([Pair(user, answer)], PAIR_TEMPLATES[template_index % len(
        PAIR_TEMPLATES)])


def mix_corpus(augmented: list[str], general: list[Record], ratio: tuple[int, int],
               seed: int) -> tuple[list[str], dict[str, int]]:
    """The paper's Mix: augmented texts and general instruction texts in exactly
    `ratio` = (augmented : general) by count, shuffled together with a seeded generator.

    The general count is len(augmented) × B / A, which must be a whole number (so the ratio
    is exact, not rounded); general records are drawn without replacement in a seeded
    order and reused (counted as `general_repeats`) only when there are too few.
    """
    a, b = ratio
    if (len(augmented) * b) % a:
        raise ExnihiloError(f"--mix-ratio {a}:{b} cannot be exact with {len(augmented)} "
                            f"augmented texts ({len(augmented)} × {b} is not divisible by {a})")
    if not general:
        raise ExnihiloError("--mix file holds no records")
    want = len(augmented) * b // a
    rng = random.Random(f"mix:{seed}")
    drawn: list[int] = []
    while len(drawn) < want:
        order = list(range(len(general)))
        rng.shuffle(order)
        drawn.extend(order[:want - len(drawn)])
    mixed = augmented + [general_text(general[i], k) for k, i in enumerate(drawn)]
    rng.shuffle(mixed)
    return mixed, {"augmented": len(augmented), "general": want,
                   "general_repeats": max(0, want - len(general))}



def write_corpus(chunks: list[Chunk], done: dict[str, dict[str, Any]], corpus_out: str | Path,
                 seed: int = 0, general: list[Record] | None = None,
                 ratio: tuple[int, int] = (1, 1)) -> dict[str, int]:
    """Write the corpus (JSONL {"text": ...}) atomically from the finished chunks `done`;
    optionally mixed with general instruction records. Returns the counts."""
    texts = corpus_texts(chunks, done, seed)
    counts = {"augmented": len(texts), "general": 0, "general_repeats": 0}
    if general is not None:
        texts, counts = mix_corpus(texts, general, ratio, seed)
    write_jsonl_atomic(corpus_out, ({"text": t} for t in texts))
    counts["lines"] = len(texts)
    return counts
