"""Preference pairs from a model's own samples (`synth pairs`, DICE's pair builder).

For each prompt: N samples from any engine (row k of prompt p is sampled with its own seed,
so a resumed run draws exactly what an uninterrupted one would), each scored by a scorer.
Samples that hit the token limit, are empty-ish (≤ 3 characters) or huge (≥ 6700) are
invalid, as DICE filters them. Among the valid samples, chosen = the best and rejected = the
worst of the length-regularized score r − α·len(response), len in characters (DICE,
arXiv 2406.09760, `generate_lc_paired_set.py`); α is swept (0, step, 2·step, … < 1), stopping
as soon as the mean chosen−rejected length gap gets worse than the best seen, and the α with
the smallest |gap| is kept — so the pairs do not teach "longer is better". Prompts with fewer
than `min_valid` valid samples, or whose best and worst tie, are skipped and counted.

Files: `.exnihilo/<out>.samples.jsonl` holds every prompt's samples and scores as they come (resume
reads it, and refuses samples made with other settings); `<out>` is written atomically at
the end, each pair's `meta` keeping all samples, their scores and α; `.exnihilo/<out>.summary.json`
the counts and the sweep.

Scorers (`score(record, responses) -> list[float | None]`, None = could not score):
`IFEvalScorer` (fraction of the record's IFEval-style instructions followed, loose),
`ImplicitScorer` (DPO's implicit reward Σ log π − Σ log π_ref), `JudgeScorer` (an engine
rates each answer 1–10).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from exnihilo import progress
from exnihilo.engines.base import Engine, SamplingParams
from exnihilo.errors import ExnihiloError
from exnihilo.outputs import side_file, write_text_atomic
from exnihilo.records import JsonlAppender, Record, make_record, write_jsonl_atomic

MIN_CHARS, MAX_CHARS = 3, 6700  # DICE: drop responses with len ≤ 3 or ≥ 6700 characters


# ------------------------------------------------------------------------------ selection

@dataclass(frozen=True)
class Sample:
    text: str
    score: float | None
    finish_reason: str = "stop"


def is_valid(sample: Sample, min_chars: int = MIN_CHARS, max_chars: int = MAX_CHARS) -> bool:
    return (sample.score is not None and sample.finish_reason != "length"
            and min_chars < len(sample.text) < max_chars)


def pick_pair(samples: Sequence[Sample], alpha: float) -> tuple[int, int] | None:
    """(chosen index, rejected index) by r − α·len among `samples` (all valid), or None if
    the best and worst tie (nothing to prefer). The first index wins within a tie."""
    shaped = [s.score - alpha * len(s.text) for s in samples]  # type: ignore[operator]
    best = max(range(len(shaped)), key=lambda i: (shaped[i], -i))
    worst = min(range(len(shaped)), key=lambda i: (shaped[i], i))
    if shaped[best] == shaped[worst]:
        return None
    return best, worst


def mean_length_gap(groups: Sequence[Sequence[Sample]], alpha: float) -> float | None:
    """Mean len(chosen) − len(rejected) over the groups that yield a pair at this α."""
    gaps = []
    for group in groups:
        pair = pick_pair(group, alpha)
        if pair is not None:
            gaps.append(len(group[pair[0]].text) - len(group[pair[1]].text))
    return sum(gaps) / len(gaps) if gaps else None


def sweep_alpha(groups: Sequence[Sequence[Sample]], step: float = 0.001, stop: float = 1.0
                ) -> tuple[float, list[tuple[float, float]]]:
    """DICE's α sweep: α = 0, step, 2·step, … (< stop); stop as soon as |gap| is worse than
    the best so far; return the α of the smallest |gap| (the first, on ties) and the trace."""
    trace: list[tuple[float, float]] = []
    for k in range(max(1, round(stop / step))):
        alpha = k * step
        gap = mean_length_gap(groups, alpha)
        if gap is None:
            break
        trace.append((alpha, gap))
        if abs(gap) > min(abs(g) for _, g in trace):
            break
    if not trace:
        return 0.0, trace
    best = min(range(len(trace)), key=lambda i: (abs(trace[i][1]), i))
    return trace[best][0], trace


def mix_replay(generated: list[Record], offline: list[Record], gamma: float, seed: int
               ) -> list[Record]:
    """DICE's experience replay: n_gen = min(⌊|D_off|(1−γ)⌋, |D_gen|) new pairs and
    n_off = ⌊γ·n_gen/(1−γ)⌋ offline pairs on prompts disjoint from the chosen new ones."""
    if not 0 <= gamma < 1:
        raise ExnihiloError(f"--replay must be in [0, 1), got {gamma}")
    if gamma == 0:
        return list(generated)
    rng = random.Random(seed)
    n_gen = min(int(len(offline) * (1 - gamma)), len(generated))
    n_off = int(gamma * n_gen / (1 - gamma))
    new = rng.sample(generated, n_gen)
    used = {prompt_key(r) for r in new}
    pool = [r for r in offline if prompt_key(r) not in used]
    if n_off > len(pool):
        raise ExnihiloError(f"replay needs {n_off} offline pairs on other prompts, only "
                            f"{len(pool)} available")
    return new + rng.sample(pool, n_off)


def prompt_key(record: Record) -> str:
    return json.dumps(record["messages"], sort_keys=True, ensure_ascii=False)


# -------------------------------------------------------------------------------- scorers

class Scorer(Protocol):
    name: str

    def score(self, record: Record, responses: list[str]) -> list[float | None]: ...


def constraint_fields(record: Record) -> tuple[list[str], list[dict[str, Any]]] | None:
    """(instruction ids, kwargs) of an IFEval-style prompt record, wherever they are kept."""
    for where in (record, (record.get("meta") or {}).get("fields") or {},
                  (record.get("meta") or {}).get("constraints") or {}):
        ids = where.get("instruction_id_list")
        if isinstance(ids, list) and ids:
            return ids, [k or {} for k in where.get("kwargs", [{}] * len(ids))]
    return None


class IFEvalScorer:
    """Fraction of the prompt's instructions a response follows (loose), by the IFEval
    checkers (`exnihilo.ifeval.score.score_response`)."""

    name = "ifeval"

    def __init__(self) -> None:
        try:
            from exnihilo.ifeval.score import score_response
        except ImportError as e:  # pragma: no cover - lands with the evaluation work
            raise ExnihiloError(f"scorer 'ifeval' needs exnihilo.ifeval ({e})") from None
        self._score = score_response

    def score(self, record: Record, responses: list[str]) -> list[float | None]:
        fields = constraint_fields(record)
        if fields is None:
            raise ExnihiloError(f"record {record.get('id')}: no instruction_id_list/kwargs to "
                                f"score with 'ifeval' (write prompts with `synth pairs "
                                f"--make-constraints`)")
        ids, kwargs = fields
        prompt = record["messages"][-1]["content"]
        return [float(self._score(ids, kwargs, r, prompt)) for r in responses]


class ImplicitScorer:
    """DPO's implicit reward Σ log π(y|x) − Σ log π_ref(y|x) (β dropped, as DICE scores).
    `reference` is any `train.dpo` reference (a frozen model, or the adapter disabled)."""

    name = "implicit"

    def __init__(self, policy: Any, reference: Any, tokenizer: Any, style: str = "chat",
                 batch_size: int = 8):
        self.policy, self.reference, self.tokenizer = policy, reference, tokenizer
        self.style, self.batch_size = style, batch_size

    def score(self, record: Record, responses: list[str]) -> list[float | None]:
        from exnihilo.train.collate import collate_continuations
        from exnihilo.train.dpo import no_grad_eval_logps
        from exnihilo.train.preference_data import tokenize_exchange

        rows = [tokenize_exchange(record["messages"], {"role": "assistant", "content": r},
                                  self.style, self.tokenizer) for r in responses]
        pad = self.tokenizer.pad_token_id
        pad = self.tokenizer.eos_token_id if pad is None else pad
        scores: list[float | None] = []
        for k in range(0, len(rows), self.batch_size):
            batch = collate_continuations(rows[k:k + self.batch_size], pad)
            policy = no_grad_eval_logps(self.policy, batch)
            ref = self.reference.logps(self.policy, batch)
            scores += [float(v) for v in (policy - ref.to(policy.device, policy.dtype))]
        return scores


JUDGE_PROMPT = ("Rate how well the answer follows the request, from 1 (not at all) to 10 "
                "(perfectly, every instruction obeyed). Reply with the number only.")


class JudgeScorer:
    """An engine rates each response 1–10 (greedy); unreadable ratings score None."""

    name = "judge"

    def __init__(self, engine: Engine, max_new_tokens: int = 16):
        self.engine = engine
        self.params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)

    def score(self, record: Record, responses: list[str]) -> list[float | None]:
        from exnihilo.judge import DATA_NOTICE, extract_score, fence

        request = record["messages"][-1]["content"]
        convs = [[{"role": "user", "content": f"{JUDGE_PROMPT} {DATA_NOTICE}\n\n"
                   f"{fence('REQUEST', request)}\n\n{fence('ANSWER', r)}"}] for r in responses]
        return [extract_score(c.text, 1, 10) for c in self.engine.chat(convs, self.params)]


# ------------------------------------------------------------------------------- sampling

@dataclass
class PairsConfig:
    n: int = 8  # samples per prompt (DICE: 16)
    min_valid: int = 2  # fewer valid samples → the prompt is skipped (DICE: 8 of 16)
    temperature: float = 0.9  # DICE's Llama-3 setting
    top_p: float = 1.0
    max_new_tokens: int = 512
    seed: int = 0
    alpha: float | None = None  # None: sweep
    alpha_step: float = 0.001  # DICE's grid; use a finer one for scores in [0, 1]
    prompts_per_call: int = 4  # prompts whose n samples go to the engine together

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p,
                              max_new_tokens=self.max_new_tokens, seed=self.seed)


def sample_seed(base_seed: int, record_id: str, k: int) -> int:
    """A 62-bit seed for sample k of a prompt, independent of every other row."""
    digest = hashlib.sha256(f"pairs:{base_seed}:{record_id}:{k}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 2


def samples_path(out: Path) -> Path:
    return side_file(out, "samples.jsonl")


def summary_path(out: Path) -> Path:
    return side_file(out, "summary.json")


def settings_key(engine: Engine, scorer: Scorer, cfg: PairsConfig) -> dict[str, Any]:
    """What a samples line must have been made with to be reused."""
    return {"engine": getattr(engine, "name", type(engine).__name__), "scorer": scorer.name,
            "n": cfg.n, "sampling": cfg.sampling().public()}


def sample_prompts(engine: Engine, scorer: Scorer, records: list[Record], cfg: PairsConfig,
                   out: Path) -> list[dict[str, Any]]:
    """Every prompt's N samples and scores, appended to `.exnihilo/<out>.samples.jsonl` prompt by
    prompt; lines already there (same settings) are reused."""
    settings = settings_key(engine, scorer, cfg)
    path = samples_path(out)
    writer = JsonlAppender(path)
    done: dict[str, dict[str, Any]] = {}
    try:
        for lineno, line in enumerate(writer.existing(), start=1):
            if line.get("settings") != settings:
                raise ExnihiloError(f"{path}:{lineno}: samples made with other settings "
                                    f"({line.get('settings')}); choose another --out or "
                                    f"remove it")
            done[line["id"]] = line
        if done:
            progress.note(f"resuming: {len(done)} of {len(records)} prompts already sampled")
        todo = list({r["id"]: r for r in records if r["id"] not in done}.values())
        params = cfg.sampling()
        for k in range(0, len(todo), cfg.prompts_per_call):
            chunk = todo[k:k + cfg.prompts_per_call]
            convs = [r["messages"] for r in chunk for _ in range(cfg.n)]
            seeds = [sample_seed(cfg.seed, r["id"], j) for r in chunk for j in range(cfg.n)]
            completions = engine.chat(convs, params, seeds=seeds)
            for i, record in enumerate(chunk):
                mine = completions[i * cfg.n:(i + 1) * cfg.n]
                texts = [c.text for c in mine]
                scores = scorer.score(record, texts)
                line = {"id": record["id"], "messages": record["messages"],
                        "settings": settings,
                        "samples": [{"text": c.text, "finish_reason": c.finish_reason,
                                     "tokens": c.completion_tokens, "seed": s, "score": sc}
                                    for c, s, sc in zip(mine, seeds[i * cfg.n:], scores,
                                                        strict=False)]}
                writer.append(line)
                done[record["id"]] = line
            progress.note(f"pairs: sampled {len(done)}/{len(records)} prompts")
    finally:
        writer.close()
    unique = dict.fromkeys(r["id"] for r in records)  # a prompt listed twice: one pair
    return [done[i] for i in unique if i in done]


@dataclass
class PairsSummary:
    out: str
    prompts: int = 0
    pairs: int = 0
    too_few_valid: int = 0
    tied: int = 0
    alpha: float = 0.0
    sweep: list[tuple[float, float]] = field(default_factory=list)
    mean_chosen_chars: float = 0.0
    mean_rejected_chars: float = 0.0
    mean_chosen_score: float = 0.0
    mean_rejected_score: float = 0.0


def build_pairs(lines: list[dict[str, Any]], cfg: PairsConfig, out: Path
                ) -> tuple[list[Record], PairsSummary]:
    """Pairs from sampled lines: filter, sweep α (unless fixed), pick best/worst."""
    summary = PairsSummary(out=str(out), prompts=len(lines))
    groups: list[tuple[dict[str, Any], list[int], list[Sample]]] = []
    for line in lines:
        samples = [Sample(s["text"], s["score"], s["finish_reason"]) for s in line["samples"]]
        keep = [i for i, s in enumerate(samples) if is_valid(s)]
        if len(keep) < cfg.min_valid:
            summary.too_few_valid += 1
            continue
        groups.append((line, keep, [samples[i] for i in keep]))
    if cfg.alpha is None:
        summary.alpha, summary.sweep = sweep_alpha([g for _, _, g in groups], cfg.alpha_step)
    else:
        summary.alpha = cfg.alpha
    pairs = []
    for line, keep, valid in groups:
        pick = pick_pair(valid, summary.alpha)
        if pick is None:
            summary.tied += 1
            continue
        best, worst = valid[pick[0]], valid[pick[1]]
        meta = {"source": "synth-pairs", "alpha": summary.alpha,
                "chosen_index": keep[pick[0]], "rejected_index": keep[pick[1]],
                "chosen_score": best.score, "rejected_score": worst.score,
                "samples": line["samples"], "sampling": line["settings"]}
        pairs.append(make_record(line["messages"], meta,
                                 {"role": "assistant", "content": best.text},
                                 {"role": "assistant", "content": worst.text}))
    summary.pairs = len(pairs)
    if pairs:
        n = len(pairs)
        summary.mean_chosen_chars = sum(len(p["chosen"]["content"]) for p in pairs) / n
        summary.mean_rejected_chars = sum(len(p["rejected"]["content"]) for p in pairs) / n
        summary.mean_chosen_score = sum(p["meta"]["chosen_score"] for p in pairs) / n
        summary.mean_rejected_score = sum(p["meta"]["rejected_score"] for p in pairs) / n
    return pairs, summary


def prompt_record(record: Record) -> Record:
    """The record as a prompt: a trailing assistant answer (and any chosen/rejected) is
    dropped; meta (e.g. IFEval fields) is kept."""
    messages = list(record["messages"])
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    if not messages:
        raise ExnihiloError(f"record {record.get('id')}: no prompt message before its answer")
    if messages == record["messages"] and "chosen" not in record:
        return record
    return make_record(messages, dict(record.get("meta") or {}))


def synthesize_pairs(engine: Engine, scorer: Scorer, records: list[Record], cfg: PairsConfig,
                     out: str | Path) -> PairsSummary:
    """Sample, score, pick, write `out` (atomically) and its summary."""
    out = Path(out)
    if cfg.n < 2 or cfg.min_valid < 2:
        raise ExnihiloError("-n and --min-valid must be at least 2 (a pair needs two samples)")
    if cfg.min_valid > cfg.n:
        raise ExnihiloError(f"--min-valid {cfg.min_valid} > -n {cfg.n}: no prompt could pass")
    prompts = [prompt_record(r) for r in records]
    lines = sample_prompts(engine, scorer, prompts, cfg, out)
    pairs, summary = build_pairs(lines, cfg, out)
    write_jsonl_atomic(out, pairs)
    write_text_atomic(summary_path(out), json.dumps(asdict(summary), indent=2))
    return summary
