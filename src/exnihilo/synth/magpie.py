"""Magpie (arXiv 2406.08464): an aligned model, given only its chat template's text up to
where a user message would start, writes a user instruction and stops at its end-of-turn
marker; that instruction, sent as a normal chat turn, yields the response.

Resumability: candidate i is sampled with a seed derived from (base seed, i), so candidate i
produces the same conversation whatever batch it lands in (in float32; where sampling runs
in bfloat16, `devices.sampling_dtype`, the kernels' rounding varies with the batch's shape,
so a resumed run's new candidates can differ from an unbroken run's). Kept records go to
the output file, discarded candidates (and why) to a `.exnihilo/<out>.skipped.jsonl`
sidecar; on rerun every candidate index found in either file is skipped, so a killed run
(even `kill -9`) continues where it stopped and the final file holds exactly `n` unique
records.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from exnihilo.engines.base import Completion, Engine, SamplingParams
from exnihilo.errors import ExnihiloError
from exnihilo.outputs import side_file
from exnihilo.progress import note
from exnihilo.records import JsonlAppender, Record, make_record, write_jsonl_atomic
from exnihilo.resume import ResumableOutput
from exnihilo.templates import TemplateInfo, next_user_prefix, template_info


class MagpieConfig(BaseModel):
    n: int = Field(..., gt=0, description="unique records wanted in the output")
    turns: int = Field(1, ge=1)
    system: str | None = None
    use_default_system: bool = True
    seed: int = 0
    round_size: int = Field(128, ge=1, description="candidates generated together")
    min_words: int = Field(3, ge=1)
    max_candidates_factor: int = Field(20, description="give up after n × this candidates")
    instruction: SamplingParams = SamplingParams(temperature=1.0, top_p=1.0,
                                                 max_new_tokens=128)
    response: SamplingParams = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=384)


def candidate_seed(base_seed: int, index: int) -> int:
    """A 62-bit seed for candidate `index`, independent of every other candidate."""
    digest = hashlib.sha256(f"magpie:{base_seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 2


# ----------------------------------------------------------------------------- quality gates

_WORD = re.compile(r"\w+", re.UNICODE)


def repetition_ratio(text: str, n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier one (0 = none repeat)."""
    words = _WORD.findall(text.lower())
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if len(grams) < 8:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def instruction_problem(c: Completion, markers: list[str], min_words: int) -> str | None:
    """Why a sampled instruction is unusable, or None if it is fine."""
    text = c.text.strip()
    if not text:
        return "empty_instruction"
    if c.finish_reason == "length":
        return "instruction_unfinished"  # never emitted its end-of-turn marker
    if any(m and m in text for m in markers):
        return "template_leak"
    if len(_WORD.findall(text)) < min_words:
        return "instruction_too_short"
    if repetition_ratio(text) > 0.5:
        return "instruction_repetitive"
    return None


def response_problem(c: Completion, markers: list[str]) -> str | None:
    text = c.text.strip()
    if not text:
        return "empty_response"
    if c.finish_reason == "length":
        return "response_unfinished"
    if any(m and m in text for m in markers):
        return "template_leak"
    if repetition_ratio(text) > 0.5:
        return "response_repetitive"
    return None


# ----------------------------------------------------------------------------- one round

def _leak_markers(tokenizer: Any, info: TemplateInfo) -> list[str]:
    specials = [t for t in getattr(tokenizer, "all_special_tokens", []) or [] if len(t) > 2]
    return sorted({info.user_end, info.assistant_end, *specials} - {""})


def _seeded(params: SamplingParams, stop: list[str]) -> SamplingParams:
    return params.model_copy(update={"stop": sorted(set(params.stop) | set(stop))})


# The narrowest round worth running: below ~16 rows a decode step costs about the same.
MIN_ROUND = 16


def round_candidates(want: int, round_size: int, kept: int, tried: int) -> int:
    """Candidates for the next round: enough for `want` more records at the keep rate this
    run has seen (with a 1.5x margin; before any round, 2 per record), at least `MIN_ROUND`,
    at most `round_size`. Over half of a 135M model's candidates can be discarded, so a
    round oversamples; but a round sized by `round_size` alone spent a quarter of a 64-pair
    run on 64 candidates for its last 2 records (benchmarks/engines.py, 2026-12-01)."""
    wanted = 2 * want + 2 if tried == 0 else math.ceil(1.5 * want / max(kept / tried, 0.05))
    return min(round_size, max(wanted, MIN_ROUND))


def generate_round(engine: Engine, tokenizer: Any, info: TemplateInfo, config: MagpieConfig,
                   indices: list[int]) -> tuple[list[tuple[int, list[dict]]], list[dict]]:
    """Generate candidates `indices`; return (kept (index, messages), skipped entries)."""
    markers = _leak_markers(tokenizer, info)
    instr_params = _seeded(config.instruction, [info.user_end])
    resp_params = _seeded(config.response, [info.assistant_end])
    head = [{"role": "system", "content": config.system}] if config.system else []
    convs: dict[int, list[dict]] = {i: list(head) for i in indices}
    tokens: dict[int, int] = dict.fromkeys(indices, 0)
    skipped: list[dict] = []
    live = list(indices)
    for turn in range(config.turns):
        if not live:
            break
        _label(engine, f"magpie turn {turn + 1}: instructions")
        if turn == 0:
            prompts = [info.pre_query] * len(live)
        else:
            prompts = [next_user_prefix(tokenizer, convs[i]) for i in live]
        seeds = [candidate_seed(config.seed, i) + 2 * turn for i in live]
        outs = engine.complete(prompts, instr_params, seeds=seeds)
        survivors = []
        for i, c in zip(live, outs, strict=True):
            tokens[i] += c.completion_tokens
            why = instruction_problem(c, markers, config.min_words)
            if why:
                skipped.append({"index": i, "turn": turn, "reason": why, "text": c.text[:300]})
                continue
            convs[i].append({"role": "user", "content": c.text.strip()})
            survivors.append(i)
        live = survivors
        if not live:
            break
        _label(engine, f"magpie turn {turn + 1}: responses")
        outs = engine.chat([convs[i] for i in live], resp_params,
                           seeds=[candidate_seed(config.seed, i) + 2 * turn + 1 for i in live])
        survivors = []
        for i, c in zip(live, outs, strict=True):
            tokens[i] += c.completion_tokens
            why = response_problem(c, markers)
            if why:
                skipped.append({"index": i, "turn": turn, "reason": why, "text": c.text[:300]})
                continue
            convs[i].append({"role": "assistant", "content": c.text.strip()})
            survivors.append(i)
        live = survivors
    kept = [(i, convs[i]) for i in sorted(live)]
    return kept, [dict(s, tokens=tokens[s["index"]]) for s in skipped]


def _label(engine: Engine, text: str) -> None:
    """Name the phase on the engine's progress bar, when it has one."""
    if hasattr(engine, "progress_label"):
        engine.progress_label = text


# ----------------------------------------------------------------------------- the run

def skipped_path(out: Path) -> Path:
    return side_file(out, "skipped.jsonl")


def summary_path(out: Path) -> Path:
    return side_file(out, "summary.json")


def magpie_settings(generator: str, config: MagpieConfig) -> dict[str, Any]:
    """The settings that change which records a run writes (not -n or the batch size):
    a resumed output must have been made with exactly these."""
    return {"generator": generator, "turns": config.turns, "system": config.system,
            "use_default_system": config.use_default_system, "seed": config.seed,
            "min_words": config.min_words, "instruction": config.instruction.public(),
            "response": config.response.public()}


def synthesize(engine: Engine, tokenizer: Any, config: MagpieConfig, out: str | Path
               ) -> dict[str, Any]:
    """Fill `out` with `config.n` unique Magpie records (resuming whatever is there)."""
    out = Path(out)
    info = template_info(tokenizer, system=config.system,
                         use_default_system=config.use_default_system)
    settings = dict(magpie_settings(engine.name, config), template=info.pre_query)
    with ResumableOutput(out, "synth magpie", settings,
                         sidecars=[skipped_path(out)]) as output:
        return _fill(engine, tokenizer, info, config, out, output)


def _fill(engine: Engine, tokenizer: Any, info: TemplateInfo, config: MagpieConfig, out: Path,
          output: ResumableOutput) -> dict[str, Any]:
    skip_log = JsonlAppender(skipped_path(out))
    existing = output.rows
    ids = set(output.keys)
    attempted = {(r.get("meta") or {}).get("index") for r in existing}
    previous_skips = skip_log.existing()
    attempted |= {s.get("index") for s in previous_skips if isinstance(s, dict)}
    already = len(ids)
    if already > config.n:
        skip_log.close()
        raise ExnihiloError(f"{out} already holds {already} records, more than -n {config.n}")

    meta_base = {
        "source": "magpie",
        "generator": engine.name,
        "template": {"pre_query": info.pre_query, "system": info.system},
        "sampling": {"instruction": config.instruction.public(),
                     "response": config.response.public()},
        "turns": config.turns,
    }
    skipped_counts: dict[str, int] = {}
    for s in previous_skips:
        skipped_counts[s["reason"]] = skipped_counts.get(s["reason"], 0) + 1
    start = time.perf_counter()
    generated_tokens = 0
    written = 0
    candidates = 0
    next_index = 0
    limit = config.n * config.max_candidates_factor + config.round_size
    examples: list[Record] = []
    try:
        while len(ids) < config.n:
            size = round_candidates(config.n - len(ids), config.round_size, written,
                                    candidates)
            batch: list[int] = []
            while len(batch) < size:
                if next_index not in attempted:
                    batch.append(next_index)
                next_index += 1
            if next_index > limit:
                raise ExnihiloError(
                    f"gave up after {next_index} candidates with {len(ids)}/{config.n} records; "
                    f"skip reasons: {skipped_counts} (see {skipped_path(out)})")
            candidates += len(batch)
            kept, skipped = generate_round(engine, tokenizer, info, config, batch)
            for s in skipped:
                generated_tokens += s.pop("tokens", 0)
            written_now = {}
            for index, messages in kept:
                seed = candidate_seed(config.seed, index)
                record = make_record(messages, dict(meta_base, seed=seed, index=index))
                if record["id"] in ids or record["id"] in written_now:
                    skipped.append({"index": index, "turn": config.turns - 1,
                                    "reason": "duplicate", "text": messages[-2]["content"][:300]})
                    continue
                written_now[record["id"]] = record
            for record in sorted(written_now.values(), key=lambda r: r["meta"]["index"]):
                if len(ids) >= config.n:
                    break  # extra candidates stay unattempted; a larger -n reuses them
                record["meta"]["tokens"] = sum(
                    len(tokenizer(m["content"], add_special_tokens=False)["input_ids"])
                    for m in record["messages"] if m["role"] != "system")
                generated_tokens += record["meta"]["tokens"]
                output.append(record)
                ids.add(record["id"])
                written += 1
                if len(examples) < 5:
                    examples.append(record)
            for s in skipped:
                skip_log.append(s)
                skipped_counts[s["reason"]] = skipped_counts.get(s["reason"], 0) + 1
            note(f"magpie: {len(ids)}/{config.n} records after {candidates} candidates "
                 f"({sum(skipped_counts.values())} discarded so far)")
    finally:
        skip_log.close()
    elapsed = time.perf_counter() - start
    summary = {
        "out": str(out),
        "requested": config.n,
        "already_present": already,
        "written_this_run": written,
        "total": len(ids),
        "candidates": candidates,
        "skipped": skipped_counts,
        "elapsed_s": round(elapsed, 1),
        "pairs_per_minute": round(60 * written / elapsed, 1) if elapsed > 0 else 0.0,
        "generated_tokens_per_s": round(generated_tokens / elapsed, 1) if elapsed > 0 else 0.0,
        "template": {"pre_query": info.pre_query, "system": info.system},
        "generator": engine.name,
    }
    write_jsonl_atomic(summary_path(out), [summary])
    summary["examples"] = examples
    return summary


# ----------------------------------------------------------------------------- the command

class MagpieJob(BaseModel):
    """Everything `exnihilo synth magpie` takes."""

    n: int
    out: Path
    model: str = "smollm2-135m-instruct"
    engine: str = "transformers"
    base_url: list[str] = Field(default_factory=list)
    concurrency: int = 8
    template_from: str | None = None
    turns: int = 1
    system: str | None = None
    no_system: bool = False
    seed: int = 0
    batch_size: int | None = None  # None: rounds of 128 candidates, the engine's own width
    dtype: str = "auto"
    instruction_max_tokens: int = 128
    response_max_tokens: int = 384
    instruction_temperature: float = 1.0
    response_temperature: float = 0.7
    response_top_p: float = 0.9


def validate_magpie_job(job: MagpieJob) -> MagpieConfig:
    """Check every option, the output, its lock and its resume settings; nothing loads."""
    from pydantic import ValidationError

    from exnihilo.assemble import check_engine
    from exnihilo.resume import check_resumable

    if job.n <= 0:
        raise ExnihiloError(f"-n must be positive, got {job.n}")
    if job.system and job.no_system:
        raise ExnihiloError("--system and --no-system contradict each other")
    check_engine(job.engine, job.base_url, job.dtype)
    for name, value in (("--instruction-max-tokens", job.instruction_max_tokens),
                        ("--response-max-tokens", job.response_max_tokens),
                        ("--batch-size", job.batch_size), ("--concurrency", job.concurrency)):
        if value is not None and value < 1:
            raise ExnihiloError(f"{name} must be at least 1, got {value}")
    try:
        config = MagpieConfig(
            n=job.n, turns=job.turns, system=job.system, use_default_system=not job.no_system,
            seed=job.seed,
            round_size=job.batch_size or MagpieConfig.model_fields["round_size"].default,
            instruction=SamplingParams(temperature=job.instruction_temperature, top_p=1.0,
                                       max_new_tokens=job.instruction_max_tokens),
            response=SamplingParams(temperature=job.response_temperature,
                                    top_p=job.response_top_p,
                                    max_new_tokens=job.response_max_tokens))
    except ValidationError as e:
        first = e.errors()[0]
        raise ExnihiloError(f"invalid option {'.'.join(map(str, first['loc']))}: "
                            f"{first['msg']}") from None
    check_resumable(job.out, "synth magpie",
                    magpie_settings(f"{job.engine}:{job.model}", config),
                    sidecars=[skipped_path(job.out)])
    return config


def run_magpie_job(job: MagpieJob, config: MagpieConfig) -> dict[str, Any]:
    """Load the model (and the template's tokenizer) and fill the output."""
    from exnihilo.assemble import load_engine

    gen, tokenizer = load_engine(job.engine, job.model, job.template_from, dtype=job.dtype,
                                 batch_size=job.batch_size, base_urls=job.base_url,
                                 concurrency=job.concurrency, label="magpie")
    return synthesize(gen, tokenizer, config, job.out)
