"""Judge tags: input quality, difficulty, task category and an optional response score.

Any engine can be the judge (the embedded 135M model, a local HF model, an OpenAI-compatible
server). The tag set follows Magpie (arXiv 2406.08464, Section 3 and Appendix): input
quality on five levels (very poor … excellent), difficulty on five levels (very easy … very
hard) and a task category from a fixed taxonomy (Magpie's: information seeking, reasoning,
planning, editing, coding & debugging, math, role playing, data analysis, creative writing,
advice seeking, brainstorming, others).

Judging is greedy (temperature 0) with one fixed seed for every row, so a record's tags do
not depend on its batch or on whether the run was resumed. The text under judgement is
fenced as data (`judge.fence`). Parsing is forgiving about form (JSON in prose or code
fences, "Very_Poor", "coding & debugging") but never guesses: an answer it cannot read
becomes `null` for that tag and is counted in the summary.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exnihilo.curate.fields import instruction_of, response_of, set_tags
from exnihilo.engines.base import Engine, SamplingParams
from exnihilo.errors import ExnihiloError
from exnihilo.judge import DATA_NOTICE, extract_json_object, extract_score, fence
from exnihilo.outputs import check_output
from exnihilo.records import Record, read_any
from exnihilo.resume import ResumableOutput
from exnihilo.vocab import (  # noqa: F401  (re-exported: curation's public names)
    CATEGORIES,
    CATEGORY_ALIASES,
    DIFFICULTY_LEVELS,
    INPUT_TAGS,
    QUALITY_LEVELS,
)

# ----------------------------------------------------------------------------------- prompts

def input_prompt(instruction: str) -> list[dict[str, str]]:
    """One user turn asking for quality, difficulty and category as JSON.

    Everything is in the user turn because some chat templates (Gemma) have no system role.
    The format line uses placeholders, not real values, so a judge that merely echoes the
    format is unparseable rather than silently "good".
    """
    text = (
        f"{DATA_NOTICE}\n\n"
        f"Rate the user instruction below.\n\n{fence('INSTRUCTION', instruction)}\n\n"
        f"quality: how clear, specific and well-formed it is; one of: "
        f"{', '.join(QUALITY_LEVELS)}.\n"
        f"difficulty: how hard it is to answer well; one of: {', '.join(DIFFICULTY_LEVELS)}.\n"
        f"category: its main task; one of: {', '.join(CATEGORIES)}.\n\n"
        'Answer with one JSON object and nothing else, in this form: '
        '{"quality": "<level>", "difficulty": "<level>", "category": "<category>"}'
    )
    return [{"role": "user", "content": text}]


def response_prompt(instruction: str, response: str) -> list[dict[str, str]]:
    """One user turn asking for a 0–100 score of the response (LLMs-from-scratch ch07 style)."""
    text = (
        f"{DATA_NOTICE}\n\n"
        f"Score how well the response answers the instruction, from 0 (useless or wrong) to "
        f"100 (correct, complete and clear).\n\n{fence('INSTRUCTION', instruction)}\n\n"
        f"{fence('RESPONSE', response)}\n\n"
        'Answer with one JSON object and nothing else, in this form: {"score": <0-100>}'
    )
    return [{"role": "user", "content": text}]


# ----------------------------------------------------------------------------------- parsing

def normalise_label(value: Any) -> str:
    """'Very_Poor', ' very-poor.' and 'VERY  POOR' all become 'very poor'."""
    text = str(value).lower().replace("_", " ").replace("-", " ")
    text = re.sub(r"[^a-z0-9& ]+", " ", text)
    return " ".join(text.split())


def match_label(value: Any, labels: tuple[str, ...],
                aliases: dict[str, str] | None = None) -> str | None:
    """The label `value` names, or None. Accepts an exact (normalised) name or alias, or a
    value that starts with one ("good quality"); longer names win, so "very poor" is never
    read as "poor". Numbers and anything else are unreadable."""
    if value is None or isinstance(value, bool | int | float):
        return None
    text = normalise_label(value)
    if not text:
        return None
    names = dict(aliases or {})
    names.update({label: label for label in labels})
    if text in names:
        return names[text]
    for name in sorted(names, key=len, reverse=True):
        if text.startswith(name + " "):
            return names[name]
    return None


_KEY_VALUE = r"(?im)[\"']?\b{key}\b[\"']?\s*[:=]\s*[\"']?([A-Za-z][A-Za-z _&\-]*)"


def _field_from_text(text: str, key: str) -> str | None:
    """`quality: good` style answers when there is no JSON object at all."""
    match = re.search(_KEY_VALUE.format(key=key), text)
    return match.group(1) if match else None


def parse_input_tags(text: str) -> dict[str, str | None]:
    """quality / difficulty / category from a judge answer; None for each one unreadable."""
    obj = extract_json_object(text) or {}
    lowered = {normalise_label(k): v for k, v in obj.items()}

    def raw(key: str) -> Any:
        return lowered[key] if key in lowered else _field_from_text(text, key)

    return {
        "quality": match_label(raw("quality"), QUALITY_LEVELS),
        "difficulty": match_label(raw("difficulty"), DIFFICULTY_LEVELS),
        "category": match_label(raw("category"), CATEGORIES, CATEGORY_ALIASES),
    }


def parse_response_score(text: str) -> float | None:
    return extract_score(text, 0, 100)


# ----------------------------------------------------------------------------------- tagging

@dataclass
class TagSummary:
    """What one `tag_file` run did, plus the tag distributions of the whole output file."""

    input_records: int = 0
    tagged: int = 0
    already_tagged: int = 0
    duplicate_ids: int = 0
    unparsed: Counter = field(default_factory=Counter)
    distributions: dict[str, Counter] = field(default_factory=dict)
    output_records: int = 0


def judge_params(seed: int, max_new_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, seed=seed)


def _require_instruction(record: Record) -> str:
    instruction = instruction_of(record)
    if instruction is None:
        raise ExnihiloError(f"record {record.get('id')}: has no user message to tag")
    return instruction


def tag_batch(records: list[Record], engine: Engine, *, score: bool = False, seed: int = 0,
              max_new_tokens: int = 96) -> list[Record]:
    """Tag one batch (in place) and return it; each record's meta.tags gains the tags."""
    params = judge_params(seed, max_new_tokens)
    instructions = [_require_instruction(r) for r in records]
    answers = engine.chat([input_prompt(i) for i in instructions], params,
                          seeds=[seed] * len(records))
    scores: list[float | None] = [None] * len(records)
    score_answers: list[str | None] = [None] * len(records)
    if score:
        rows = [(i, response_of(r)) for i, r in enumerate(records)]
        rows = [(i, resp) for i, resp in rows if resp is not None]
        if rows:
            out = engine.chat([response_prompt(instructions[i], resp) for i, resp in rows],
                              params, seeds=[seed] * len(rows))
            for (i, _), completion in zip(rows, out, strict=True):
                score_answers[i] = completion.text
                scores[i] = parse_response_score(completion.text)
    for i, (record, answer) in enumerate(zip(records, answers, strict=True)):
        tags: dict[str, Any] = parse_input_tags(answer.text)
        if score and score_answers[i] is not None:  # a record without a response gets none
            tags["score"] = scores[i]
        set_tags(record, **tags)
        unparsed = [k for k, v in tags.items() if v is None]
        tagger: dict[str, Any] = {"judge": getattr(engine, "name", type(engine).__name__),
                                  "seed": seed}
        if unparsed:
            # Kept (short) so a user can see why a tag is null without rerunning the judge.
            tagger["unparsed"] = unparsed
            tagger["raw"] = answer.text[:300]
            if score and scores[i] is None and score_answers[i] is not None:
                tagger["raw_score"] = score_answers[i][:300]
        record["meta"]["tagger"] = tagger
    return records


def tag_records(records: Iterable[Record], engine: Engine, *, score: bool = False,
                batch_size: int = 16, seed: int = 0,
                max_new_tokens: int = 96) -> Iterator[Record]:
    """Yield tagged records in input order, judging `batch_size` at a time."""
    batch: list[Record] = []
    for record in records:
        batch.append(record)
        if len(batch) == batch_size:
            yield from tag_batch(batch, engine, score=score, seed=seed,
                                 max_new_tokens=max_new_tokens)
            batch = []
    if batch:
        yield from tag_batch(batch, engine, score=score, seed=seed, max_new_tokens=max_new_tokens)


def tag_distributions(records: Iterable[Record], score: bool) -> dict[str, Counter]:
    """Counts of each tag value (None for unparseable) over `records`."""
    keys = INPUT_TAGS + (("score",) if score else ())
    counts: dict[str, Counter] = {k: Counter() for k in keys}
    for record in records:
        tags = (record.get("meta") or {}).get("tags") or {}
        for key in keys:
            value = tags.get(key)
            if key == "score" and value is not None:
                if isinstance(value, bool) or not isinstance(value, int | float):
                    value = None  # a stored "high" where a number belongs: unreadable
                else:
                    value = min(max(int(value), 0) // 20 * 20, 80)  # 0-19, …, 80-100
            counts[key][value] += 1
    return counts


def tag_settings(judge: str, score: bool, seed: int, max_new_tokens: int) -> dict[str, Any]:
    """The settings that change a record's tags (`judge` is the engine name, e.g.
    "transformers:smollm2-135m-instruct"); a resumed output must have been made with these."""
    return {"judge": judge, "score": score, "seed": seed, "max_new_tokens": max_new_tokens}


def tag_file(input_path: str | Path, output_path: str | Path, engine: Engine, *,
             score: bool = False, batch_size: int = 16, seed: int = 0,
             max_new_tokens: int = 96, progress: Any = None) -> TagSummary:
    """Tag every record of `input_path` into `output_path`, resuming a killed run.

    Records whose id (or, without one, content id) is already in the output are skipped,
    and each tagged record is appended (whole line + fsync) as soon as its batch is judged,
    so rerunning the same command after a kill loses and duplicates nothing. Resuming with
    another judge or other settings is refused (`resume.ResumableOutput`).
    """
    input_path, output_path = Path(input_path), Path(output_path)
    check_output(output_path, [input_path])
    records = read_any(input_path)
    if not records:
        raise ExnihiloError(f"{input_path}: no records (empty file)")
    summary = TagSummary(input_records=len(records))
    settings = tag_settings(getattr(engine, "name", type(engine).__name__), score, seed,
                            max_new_tokens)
    with ResumableOutput(output_path, "curate tag", settings, inputs=[input_path]) as output:
        todo: list[Record] = []
        seen: set[str] = set()
        for record in records:
            if record["id"] in output.keys:
                summary.already_tagged += 1
            elif record["id"] in seen:
                summary.duplicate_ids += 1
            else:
                seen.add(record["id"])
                todo.append(record)
        for record in tag_records(todo, engine, score=score, batch_size=batch_size, seed=seed,
                                  max_new_tokens=max_new_tokens):
            output.append(record)
            summary.tagged += 1
            for key in (record["meta"].get("tagger") or {}).get("unparsed", []):
                summary.unparsed[key] += 1
            if progress is not None:
                progress.advance(items=1)
        written = list(output.rows)
    summary.output_records = len(written)
    summary.distributions = tag_distributions(written, score)
    return summary
