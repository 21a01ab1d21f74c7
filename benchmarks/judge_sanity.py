"""Can a judge tell right answers from wrong ones? Both judge modes and perplexity, side by
side.

"Right" answers are each ch07 prompt's own reference; "wrong" ones are the next prompt's
reference. For each judge mode (generate: the judge writes a 0-100 score; logprob: the
expected digit under its probabilities) it reports how well scores separate right from
wrong — AUC (P(a right answer scores above a wrong one), 0.5 = chance) and the mean gap —
and, in pairwise right vs wrong (both orders), the right answer's win rate and the position
bias (first_position_rate: share of verdicts for whichever answer was shown first; 0.5 is
unbiased). Reference perplexity is the judge-free baseline. Prints one JSON object.

Usage: OMP_NUM_THREADS=1 python benchmarks/judge_sanity.py [--n 30] [--modes generate,logprob]

Measured on SmolLM2-135M-Instruct, the first 30 ch07 prompts (2026-11-30, 1 CPU thread):
  generate: AUC 0.387, mean gap −20.6 (right 78.6 ± 8.0, 7 unreadable; wrong 99.2 ± 0.5,
            10 unreadable); pairwise 28 ties of 28 readable, first position 96 %
  logprob:  AUC 0.512, mean gap +0.3 (right 20.8 ± 1.5, wrong 20.5 ± 1.3; none unreadable;
            15 % of the probability on score digits); pairwise 30 ties, first position
            100 %, mean P(first) 0.70, position-averaged P(right better) 0.496
  answers' own log-likelihood: AUC 0.967 (perplexity 2.7 right, 27.2 wrong)
The model cannot judge in either mode; its likelihood of the answer itself separates.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("EXNIHILO_NO_PROGRESS", "1")

import torch  # noqa: E402

from exnihilo.engines.transformers import TransformersEngine  # noqa: E402
from exnihilo.evaluate import (  # noqa: E402
    auc,
    judge_scores,
    judge_summary,
    load_eval_set,
    pairwise_compare,
    perplexity,
)
from exnihilo.fields import score_of  # noqa: E402
from exnihilo.records import Record, make_record  # noqa: E402

EVAL_SET = Path(__file__).resolve().parents[2] / "shared/evalsets/rasbt-instruction-data.json"


def with_answer(record: Record, text: str, generator: str) -> Record:
    meta = dict(record["meta"], generator=generator)
    return make_record(record["messages"] + [{"role": "assistant", "content": text}], meta)


def separation(right: list[Record], wrong: list[Record]) -> dict:
    """AUC and mean gap of the judge's scores, right answers against wrong ones; records the
    judge could not score are left out of both (and counted in the summaries)."""
    def scores(rs: list[Record]) -> list[float]:
        return [s for s in map(score_of, rs) if s is not None]

    pos, neg = scores(right), scores(wrong)
    gap = (sum(pos) / len(pos) - sum(neg) / len(neg)) if pos and neg else None
    value = auc(pos, neg)
    return {"auc": None if value is None else round(value, 4),
            "mean_gap": None if gap is None else round(gap, 2)}


def judge_mode(engine: TransformersEngine, right: list[Record], wrong: list[Record],
               mode: str) -> dict:
    start = time.perf_counter()
    judged_right = judge_scores(engine, right, mode=mode)
    judged_wrong = judge_scores(engine, wrong, mode=mode)
    _, pair = pairwise_compare(engine, right, wrong, mode=mode)
    keep = ("win_rate", "wins", "ties", "losses", "unparseable_prompts",
            "position_consistency", "first_position_rate", "mean_p_first", "mean_p_a",
            "probability_win_rate")
    return {**separation(judged_right, judged_wrong),
            "right": judge_summary(judged_right), "wrong": judge_summary(judged_wrong),
            "pairwise_right_vs_wrong": {k: pair.get(k) for k in keep if k in pair},
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--modes", default="generate,logprob")
    parser.add_argument("--judge", default="smollm2-135m-instruct")
    parser.add_argument("--data", default=str(EVAL_SET))
    args = parser.parse_args()

    evals = load_eval_set(args.data, limit=args.n)
    n = len(evals)
    right = [with_answer(r, r["meta"]["reference"], "reference") for r in evals]
    wrong_refs = [evals[(i + 1) % n]["meta"]["reference"] for i in range(n)]
    wrong = [with_answer(r, w, "shifted-reference") for r, w in zip(evals, wrong_refs,
                                                                    strict=True)]
    torch.set_num_threads(1)
    engine = TransformersEngine(args.judge, batch_size=16)
    out: dict = {"judge": args.judge, "n": n}
    for mode in args.modes.split(","):
        out[mode] = judge_mode(engine, right, wrong, mode)
    wrong_evals = [dict(r, meta=dict(r["meta"], reference=w))
                   for r, w in zip(evals, wrong_refs, strict=True)]
    rows_right, out["perplexity_right"] = perplexity(engine.model, engine.tokenizer, evals)
    rows_wrong, out["perplexity_wrong"] = perplexity(engine.model, engine.tokenizer,
                                                     wrong_evals)
    # the judge-free baseline on the same footing: how well each answer's own mean log-prob
    # (given the prompt) separates right from wrong
    value = auc([-r["nll"] / r["tokens"] for r in rows_right],
                [-r["nll"] / r["tokens"] for r in rows_wrong])
    out["perplexity_auc"] = None if value is None else round(value, 4)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
