"""The demo's report: paired differences with intervals, computed on hand-made items."""

from __future__ import annotations

import pytest

from exnihilo.demo import paired_differences


def ifeval_rows(follow: list[list[bool]]) -> list[dict]:
    rows = []
    for mode in ("strict", "loose"):
        for i, flags in enumerate(follow):
            rows.append({"mode": mode, "key": i, "prompt": f"p{i}", "response": "r",
                         "instruction_id_list": ["punctuation:no_comma"] * len(flags),
                         "follow_all_instructions": all(flags),
                         "follow_instruction_list": flags})
    return rows


def items(follow, nll, judge):
    return {"_items": {"ifeval": ifeval_rows(follow), "nll": nll, "judge": judge}}


def test_paired_differences_values_and_significance():
    base = items([[False, False]] * 10, {f"q{i}": 2.0 for i in range(10)},
                 {f"q{i}": 50.0 for i in range(10)})
    tuned = items([[True, False]] * 10, {f"q{i}": 2.0 - 0.1 * (i % 2) for i in range(10)},
                  {f"q{i}": 50.0 + (10 if i < 5 else -10) for i in range(10)})
    diff = paired_differences(base, tuned)
    ifeval = diff["IFEval instructions followed (loose)"]
    assert ifeval["value"] == pytest.approx(0.5) and ifeval["significant"]
    nll = diff["reference NLL per token"]
    assert nll["value"] == pytest.approx(-0.05)
    assert nll["ci95"][0] < -0.05 < nll["ci95"][1] and nll["significant"]
    judge = diff["judge score"]
    assert judge["value"] == pytest.approx(0.0) and not judge["significant"]


def test_unreadable_judge_scores_are_left_out_of_the_pairing():
    base = items([[True]], {"q": 1.0}, {"q": None, "r": 40.0})
    tuned = items([[True]], {"q": 1.0}, {"q": 90.0, "r": 50.0})
    assert paired_differences(base, tuned)["judge score"]["value"] == pytest.approx(10.0)


def test_perplexity_interval_brackets_the_token_weighted_value():
    import math

    from exnihilo.demo import perplexity_interval

    rows = [{"nll": 2.0 * t, "tokens": t} for t in (5, 50, 10, 7, 30)]
    low, high = perplexity_interval(rows)
    assert low == pytest.approx(math.exp(2.0)) and high == pytest.approx(math.exp(2.0))
    rows = [{"nll": float(i % 3) * 10, "tokens": 10} for i in range(30)]
    value = math.exp(sum(r["nll"] for r in rows) / sum(r["tokens"] for r in rows))
    low, high = perplexity_interval(rows)
    assert low < value < high
