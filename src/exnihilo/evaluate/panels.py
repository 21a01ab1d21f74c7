"""Judge panels: several judges score (or compare) the same answers; their verdicts are
pooled and their agreement measured (PoLL, Verga et al. 2024, arXiv 2404.18796: a panel of
smaller, different judges tracks human preference better than one large judge and shares
less of any one model's bias).

- scores: each answer's pooled score is the mean over the judges that scored it; agreement
  is Krippendorff's α (interval; tolerates a judge's missing scores) over the panel, and
  Spearman's ρ for each pair of judges.
- pairwise: a prompt's pooled outcome is the majority of the judges' outcomes (a tie
  without a strict majority); agreement is Cohen's κ for each pair of judges on the
  prompts both decided; each judge's position-bias rate is shown beside it.

Raw percent agreement is reported only next to these: two judges that always say "tie"
agree 100 % and tell nothing, which κ (chance-corrected) shows as undefined or 0.

A judge that fails (cannot load, server down, no log-probabilities) does not sink the
panel: its failure and error are reported, its answers count as not scored, and the others
are pooled as usual.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable
from itertools import combinations
from pathlib import Path
from typing import Any

from exnihilo.engines.base import Engine, SamplingParams
from exnihilo.errors import ExnihiloError
from exnihilo.evaluate.judging import (
    judge_engine_name,
    judge_scores,
    judge_summary,
    match_by_prompt,
    mean_and_stderr,
    pairwise_compare,
    pairwise_summary,
)
from exnihilo.evaluate.stats import cohen_kappa, krippendorff_alpha_interval, spearman
from exnihilo.fields import score_of
from exnihilo.outputs import make_side_dir, side_path
from exnihilo.records import Record

JudgeFactory = Callable[[], Engine]
# what a judge may fail with and still let the panel go on: our own errors (bad server
# answers, missing capability), OS and network errors, and model errors at run time
JUDGE_FAILURES = (ExnihiloError, OSError, RuntimeError, ValueError)


def judge_file(out: str | Path, judge: str) -> Path:
    """Each panel judge's own resumable file, a side file of the pooled output:
    `.exnihilo/OUT.<judge>.jsonl` (a panel run before side files had their folder kept it
    beside the output as OUT-stem.<judge>.jsonl: moved in, so the run resumes)."""
    out = Path(out)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", judge).strip("_")
    path = side_path(out, f"{slug}.jsonl")
    old = out.with_name(f"{out.stem}.{slug}{out.suffix or '.jsonl'}")
    if old.is_file() and not path.exists():
        make_side_dir(path)
        os.replace(old, path)
    return path


def _run_judge(label: str, factory: JudgeFactory, work: Callable[[Engine], Any]
               ) -> tuple[str, Any, str | None]:
    """(judge name, result or None, error or None)."""
    try:
        engine = factory()
    except JUDGE_FAILURES as e:
        return label, None, f"{type(e).__name__}: {e}"
    name = judge_engine_name(engine)
    try:
        return name, work(engine), None
    except JUDGE_FAILURES as e:
        return name, None, f"{type(e).__name__}: {e}"


def pooled_scores(per_judge: dict[str, list[float | None]]) -> list[float | None]:
    """Each answer's mean score over the judges that scored it (None if none did)."""
    columns = list(zip(*per_judge.values(), strict=True))
    return [(sum(s) / len(s)) if (s := [v for v in col if v is not None]) else None
            for col in columns]


def score_agreement(per_judge: dict[str, list[float | None]]) -> dict[str, Any]:
    """Krippendorff's α (interval) over the panel, Spearman's ρ per pair of judges (on the
    answers both scored)."""
    pairs = {}
    for a, b in combinations(per_judge, 2):
        both = [(x, y) for x, y in zip(per_judge[a], per_judge[b], strict=True)
                if x is not None and y is not None]
        rho = spearman([x for x, _ in both], [y for _, y in both]) if both else None
        pairs[f"{a} vs {b}"] = {"n": len(both),
                                "spearman": None if rho is None else round(rho, 4)}
    alpha = krippendorff_alpha_interval(list(per_judge.values()))
    return {"krippendorff_alpha": None if alpha is None else round(alpha, 4), "pairs": pairs}


def judge_panel(judges: list[tuple[str, JudgeFactory]], records: list[Record],
                params: SamplingParams | None = None, out: str | Path | None = None,
                mode: str = "generate") -> tuple[list[Record], dict[str, Any]]:
    """Score `records` with every judge (each resumable in `judge_file(out, judge)`), pool.

    Returns pooled records (meta.tags.score = the mean, meta["judge"] = {"judge": "panel",
    "scores": {judge: score}}) and a summary: per-judge summaries (or failures), pooled
    summary, agreement.
    """
    per_judge: dict[str, list[float | None]] = {}
    judges_out: list[dict[str, Any]] = []
    for label, factory in judges:
        def work(engine: Engine, label: str = label) -> list[Record]:
            path = judge_file(out, judge_engine_name(engine)) if out is not None else None
            return judge_scores(engine, records, params, out=path, mode=mode)

        name, results, error = _run_judge(label, factory, work)
        if results is None:
            judges_out.append({"judge": name, "failed": len(records), "error": error})
            continue
        if name in per_judge:
            raise ExnihiloError(f"judge {name} is listed twice in the panel")
        per_judge[name] = [score_of(r) for r in results]
        judges_out.append(judge_summary(results))
    if not per_judge:
        raise ExnihiloError("every judge of the panel failed: " + "; ".join(
            f"{j['judge']}: {j['error']}" for j in judges_out))
    pooled = pooled_scores(per_judge)
    pooled_records = []
    for i, record in enumerate(records):
        meta = dict(record.get("meta") or {})
        meta["tags"] = {**(meta.get("tags") or {}), "score": pooled[i]}
        meta["judge"] = {"judge": "panel", "mode": mode,
                         "scores": {name: scores[i] for name, scores in per_judge.items()}}
        pooled_records.append({**record, "meta": meta})
    scored = [s for s in pooled if s is not None]
    mean, stderr = mean_and_stderr(scored)
    summary = {"judges": judges_out,
               "pooled": {"n": len(records), "scored": len(scored),
                          "mean": None if mean is None else round(mean, 2),
                          "stderr": None if stderr is None else round(stderr, 2)},
               "agreement": score_agreement(per_judge)}
    return pooled_records, summary


def majority(outcomes: list[str]) -> str:
    """The outcome more than half of the readable votes give; a tie otherwise (or when no
    judge could read the prompt: "unparseable")."""
    votes = [o for o in outcomes if o != "unparseable"]
    if not votes:
        return "unparseable"
    outcome, count = Counter(votes).most_common(1)[0]
    return outcome if count * 2 > len(votes) else "tie"


def outcome_agreement(per_judge: dict[str, list[str]]) -> dict[str, Any]:
    """Cohen's κ and raw agreement for each pair of judges, on prompts both could read."""
    pairs = {}
    for a, b in combinations(per_judge, 2):
        both = [(x, y) for x, y in zip(per_judge[a], per_judge[b], strict=True)
                if "unparseable" not in (x, y)]
        kappa = cohen_kappa([x for x, _ in both], [y for _, y in both]) if both else None
        raw = sum(x == y for x, y in both) / len(both) if both else None
        pairs[f"{a} vs {b}"] = {"n": len(both),
                                "cohen_kappa": None if kappa is None else round(kappa, 4),
                                "raw_agreement": None if raw is None else round(raw, 4)}
    return {"pairs": pairs}


def pairwise_panel(judges: list[tuple[str, JudgeFactory]], records_a: list[Record],
                   records_b: list[Record], params: SamplingParams | None = None,
                   out: str | Path | None = None, mode: str = "generate",
                   length_control: bool = False
                   ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Pairwise A vs B by every judge (each resumable in `judge_file(out, judge)`), pooled
    per prompt by majority. Returns pooled rows ({"id", "outcome", "votes": {judge:
    outcome}, "a", "b"}) and a summary: per-judge pairwise summaries (with their
    first_position_rate) or failures, the pooled summary, and κ per pair of judges."""
    per_judge: dict[str, list[str]] = {}
    judges_out: list[dict[str, Any]] = []
    base_rows: list[dict[str, Any]] | None = None
    n_prompts = len(match_by_prompt(records_a, records_b)[0])
    for label, factory in judges:
        def work(engine: Engine, label: str = label) -> tuple[list[dict], dict]:
            path = judge_file(out, judge_engine_name(engine)) if out is not None else None
            return pairwise_compare(engine, records_a, records_b, params, out=path, mode=mode,
                                    length_control=length_control)

        name, result, error = _run_judge(label, factory, work)
        if result is None:
            judges_out.append({"judge": name, "failed": n_prompts, "error": error})
            continue
        rows, summary = result
        if name in per_judge:
            raise ExnihiloError(f"judge {name} is listed twice in the panel")
        per_judge[name] = [row["outcome"] for row in rows]
        base_rows = base_rows or rows
        judges_out.append(summary)
    if base_rows is None:
        raise ExnihiloError("every judge of the panel failed: " + "; ".join(
            f"{j['judge']}: {j['error']}" for j in judges_out))
    pooled = []
    for i, row in enumerate(base_rows):
        votes = {name: outcomes[i] for name, outcomes in per_judge.items()}
        outcome = majority(list(votes.values()))
        pooled.append({"id": row["id"], "judge": "panel", "messages": row["messages"],
                       "reference": row["reference"], "outcome": outcome, "votes": votes,
                       # orders stand for the pooled outcome's preference in both
                       "orders": [_pooled_order(outcome)] * 2, "a": row["a"], "b": row["b"]})
    summary = pairwise_summary(pooled, length_control=length_control)
    for key in ("unparseable_answers", "unparseable_examples", "position_consistency",
                "first_position_rate"):  # per-judge quantities: see each judge's summary
        summary.pop(key, None)
    return pooled, {"judges": judges_out, "pooled": summary,
                    "agreement": outcome_agreement(per_judge)}


def _pooled_order(outcome: str) -> dict[str, Any]:
    prefers = {"win": "a", "loss": "b", "tie": "tie"}.get(outcome)
    return {"choice": None if prefers is None else "pooled", "prefers": prefers}
