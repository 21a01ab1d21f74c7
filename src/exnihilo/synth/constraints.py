"""Synthetic IFEval-style constraint prompts: any instruction + one to three verifiable
constraints with sampled arguments, so a checker can score a model's answers (the `ifeval`
scorer of `synth pairs`).

Each constraint is one of IFEval's 25 instruction ids (Zhou et al. 2023, arXiv 2311.07911)
with kwargs under the benchmark's own names, so `exnihilo.ifeval` checks it directly; the
sentence appended to the instruction is our own wording of what the checker verifies.
Instructions come from the caller's records (Magpie output or any dataset) — never from the
541 evaluation prompts: `drop_eval_overlap` removes any instruction that occurs in them.

Output rows use IFEval's input format, `{"key", "prompt", "instruction_id_list", "kwargs"}`
plus `meta`, which every reader of prompts accepts (`records.from_prompt_only` keeps the
fields for the scorer).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from exnihilo.errors import ExnihiloError
from exnihilo.records import Record

Kwargs = dict[str, Any]

WORDS = ("garden", "river", "history", "energy", "future", "market", "planet", "music",
         "simple", "window", "travel", "health", "science", "friend", "ocean", "summer",
         "letter", "bridge", "coffee", "winter", "mountain", "student", "light", "story")
END_PHRASES = ("Is there anything else I can help with?", "Let me know if you have additional "
               "questions.", "Any other questions?")
MARKERS = ("P.S.", "P.P.S")
SPLITTERS = ("Section", "SECTION")
LETTERS = "aeiorstnl"
RELATIONS = ("less than", "at least")
LANGUAGE_NAMES = {"es": "Spanish", "fr": "French", "de": "German", "it": "Italian",
                  "pt": "Portuguese"}
SOLO = {"detectable_format:json_format", "detectable_format:constrained_response",
        "combination:two_responses", "combination:repeat_prompt",
        "language:response_language"}  # conflict with most others: used alone


def _relation(rng: random.Random) -> str:
    return rng.choice(RELATIONS)


# id → (kwargs sampler, sentence builder). Sentences say exactly what the checker verifies.
SPECS: dict[str, tuple[Callable[[random.Random, str], Kwargs], Callable[[Kwargs], str]]] = {
    "keywords:existence": (
        lambda r, _: {"keywords": r.sample(WORDS, 2)},
        lambda k: f"Include the keywords {', '.join(k['keywords'])} in the response."),
    "keywords:frequency": (
        lambda r, _: {"keyword": r.choice(WORDS), "frequency": r.randint(1, 3),
                      "relation": _relation(r)},
        lambda k: f"In your response, the word {k['keyword']} should appear {k['relation']} "
                  f"{k['frequency']} times."),
    "keywords:forbidden_words": (
        lambda r, _: {"forbidden_words": r.sample(WORDS, 2)},
        lambda k: f"Do not include the words {', '.join(k['forbidden_words'])} in the "
                  f"response."),
    "keywords:letter_frequency": (
        lambda r, _: {"letter": r.choice(LETTERS), "let_frequency": r.randint(2, 8),
                      "let_relation": _relation(r)},
        lambda k: f"In your response, the letter {k['letter']} should appear "
                  f"{k['let_relation']} {k['let_frequency']} times."),
    "language:response_language": (
        lambda r, _: {"language": r.choice(sorted(LANGUAGE_NAMES))},
        lambda k: f"Your ENTIRE response should be in {LANGUAGE_NAMES[k['language']]} "
                  f"language, no other language is allowed."),
    "length_constraints:number_sentences": (
        lambda r, _: {"num_sentences": r.randint(2, 6), "relation": _relation(r)},
        lambda k: f"Your response should contain {k['relation']} {k['num_sentences']} "
                  f"sentences."),
    "length_constraints:number_paragraphs": (
        lambda r, _: {"num_paragraphs": r.randint(2, 4)},
        lambda k: f"There should be {k['num_paragraphs']} paragraphs. Paragraphs are "
                  f"separated with the markdown divider: ***"),
    "length_constraints:number_words": (
        lambda r, _: {"num_words": r.choice([30, 50, 80, 120, 200]),
                      "relation": _relation(r)},
        lambda k: f"Answer with {k['relation']} {k['num_words']} words."),
    "length_constraints:nth_paragraph_first_word": (
        lambda r, _: (lambda n: {"num_paragraphs": n, "nth_paragraph": r.randint(1, n),
                                 "first_word": r.choice(WORDS)})(r.randint(2, 4)),
        lambda k: f"There should be {k['num_paragraphs']} paragraphs, separated from each "
                  f"other by two new lines. Paragraph {k['nth_paragraph']} must start with "
                  f"the word {k['first_word']}."),
    "detectable_content:number_placeholders": (
        lambda r, _: {"num_placeholders": r.randint(1, 3)},
        lambda k: f"The response must contain at least {k['num_placeholders']} placeholders "
                  f"in square brackets, such as [address]."),
    "detectable_content:postscript": (
        lambda r, _: {"postscript_marker": r.choice(MARKERS)},
        lambda k: f"At the end of your response, add a postscript starting with "
                  f"{k['postscript_marker']}"),
    "detectable_format:number_bullet_lists": (
        lambda r, _: {"num_bullets": r.randint(2, 5)},
        lambda k: f"Your answer must contain exactly {k['num_bullets']} bullet points, in "
                  f"markdown such as:\n* This is point 1.\n* This is point 2"),
    "detectable_format:constrained_response": (
        lambda r, _: {},
        lambda k: "Answer with one of the following options: ('My answer is yes.', "
                  "'My answer is no.', 'My answer is maybe.')"),
    "detectable_format:number_highlighted_sections": (
        lambda r, _: {"num_highlights": r.randint(1, 3)},
        lambda k: f"Highlight at least {k['num_highlights']} sections of your answer with "
                  f"markdown, i.e. *highlighted section*."),
    "detectable_format:multiple_sections": (
        lambda r, _: {"section_spliter": r.choice(SPLITTERS), "num_sections": r.randint(2, 4)},
        lambda k: f"Your response must have {k['num_sections']} sections. Mark the beginning "
                  f"of each section with {k['section_spliter']} X, such as: "
                  f"{k['section_spliter']} 1"),
    "detectable_format:json_format": (
        lambda r, _: {},
        lambda k: "Wrap your entire output in JSON format; you may use markdown ticks such "
                  "as ```."),
    "detectable_format:title": (
        lambda r, _: {},
        lambda k: "Your answer must contain a title, wrapped in double angular brackets, "
                  "such as <<poem of joy>>."),
    "combination:two_responses": (
        lambda r, _: {},
        lambda k: "Give two different responses, separated by 6 asterisk symbols: ******."),
    "combination:repeat_prompt": (
        lambda r, instruction: {"prompt_to_repeat": instruction},
        lambda k: "First repeat the request above word for word without change, then give "
                  "your answer (do not say anything before repeating the request; the "
                  "request to repeat does not include this sentence)."),
    "startend:end_checker": (
        lambda r, _: {"end_phrase": r.choice(END_PHRASES)},
        lambda k: f"Finish your response with this exact phrase: {k['end_phrase']} No other "
                  f"words should follow it."),
    "startend:quotation": (
        lambda r, _: {},
        lambda k: "Wrap your entire response in double quotation marks."),
    "change_case:capital_word_frequency": (
        lambda r, _: {"capital_frequency": r.randint(2, 6), "capital_relation": _relation(r)},
        lambda k: f"In your response, words in all capital letters should appear "
                  f"{k['capital_relation']} {k['capital_frequency']} times."),
    "change_case:english_capital": (
        lambda r, _: {},
        lambda k: "Your entire response should be in English, in all capital letters."),
    "change_case:english_lowercase": (
        lambda r, _: {},
        lambda k: "Your entire response should be in English, in all lowercase letters. No "
                  "capital letters are allowed."),
    "punctuation:no_comma": (
        lambda r, _: {},
        lambda k: "Do not use any commas in your entire response."),
}


def family(instruction_id: str) -> str:
    return instruction_id.split(":")[0]


def sample_constraints(rng: random.Random, instruction: str, max_constraints: int = 3
                       ) -> tuple[list[str], list[Kwargs], list[str]]:
    """1..max_constraints ids from different families (a "solo" id stands alone), their
    kwargs and sentences."""
    ids = sorted(SPECS)
    count = rng.randint(1, max_constraints)
    chosen: list[str] = []
    for candidate in rng.sample(ids, len(ids)):
        if len(chosen) == count:
            break
        if candidate in SOLO and chosen:
            continue
        if any(c in SOLO for c in chosen) or family(candidate) in {family(c) for c in chosen}:
            continue
        chosen.append(candidate)
        if candidate in SOLO:
            break
    kwargs = [SPECS[i][0](rng, instruction) for i in chosen]
    sentences = [SPECS[i][1](k) for i, k in zip(chosen, kwargs, strict=True)]
    return chosen, kwargs, sentences


def constraint_prompt(record: Record, index: int, seed: int, max_constraints: int = 3
                      ) -> dict[str, Any]:
    """One IFEval-format row: the record's (first user) instruction + constraints."""
    users = [m["content"] for m in record["messages"] if m["role"] == "user"]
    if not users:
        raise ExnihiloError(f"record {record.get('id')}: no user message to constrain")
    instruction = users[0].strip()
    rng = random.Random(f"constraints:{seed}:{index}:{instruction}")
    ids, kwargs, sentences = sample_constraints(rng, instruction, max_constraints)
    return {"key": index, "prompt": f"{instruction} {' '.join(sentences)}",
            "instruction_id_list": ids, "kwargs": kwargs,
            "meta": {"source": "constraints", "instruction": instruction,
                     "from_id": record.get("id", "")}}


def normalize(text: str) -> str:
    return " ".join(text.lower().split())


def drop_eval_overlap(records: list[Record], eval_path: str | Path | None
                      ) -> tuple[list[Record], int]:
    """Records whose instruction occurs inside an evaluation prompt (or contains one) are
    dropped, so the held-out benchmark stays held out. Returns (kept, dropped)."""
    if eval_path is None or not Path(eval_path).exists():
        return records, 0
    prompts = [normalize(json.loads(line)["prompt"])
               for line in Path(eval_path).read_text(encoding="utf-8").splitlines()
               if line.strip()]
    kept, dropped = [], 0
    for record in records:
        users = [normalize(m["content"]) for m in record["messages"] if m["role"] == "user"]
        text = users[0] if users else ""
        # Short texts ("Hi") occur inside many prompts by chance; only longer ones count.
        if text and any((len(text) >= 20 and text in p) or p in text for p in prompts):
            dropped += 1
        else:
            kept.append(record)
    return kept, dropped


def make_constraint_prompts(records: list[Record], seed: int = 0, max_constraints: int = 3,
                            eval_path: str | Path | None = None
                            ) -> tuple[list[dict[str, Any]], int]:
    """(IFEval-format rows, how many instructions were dropped as evaluation overlap)."""
    if not 1 <= max_constraints <= 3:
        raise ExnihiloError(f"--max-constraints must be 1..3, got {max_constraints}")
    kept, dropped = drop_eval_overlap(records, eval_path)
    return [constraint_prompt(r, i, seed, max_constraints) for i, r in enumerate(kept)], dropped
