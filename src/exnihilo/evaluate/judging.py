"""Judging: 0–100 scores (ch07) and pairwise A/B in both orders (MT-Bench's conservative
rule), with the verdict written by the judge (mode "generate") or read from its
log-probabilities (mode "logprob", `likelihood`); pairwise also reports each side's mean
length and, on request, the length-controlled win rate."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from exnihilo.engines.base import Engine, SamplingParams
from exnihilo.errors import ExnihiloError
from exnihilo.evaluate.likelihood import LOGPROB_PAIRWISE_PROMPT_VERSION, logprob_scores
from exnihilo.evaluate.resumable import _resumable
from exnihilo.evaluate.sets import (
    EMBEDDED_JUDGES,
    Message,
    answer_parts,
    prompt_id,
    require_answers,
)
from exnihilo.evaluate.stats import logistic_fit, sigmoid
from exnihilo.fields import score_of, set_tags
from exnihilo.judge import DATA_NOTICE, extract_choice, extract_score, fence
from exnihilo.records import Record

JUDGE_PROMPT_VERSION = "score-0-100/v1"
PAIRWISE_PROMPT_VERSION = "pairwise-ab/v1"
JUDGE_MODES = ("generate", "logprob")


def check_mode(mode: str) -> None:
    if mode not in JUDGE_MODES:
        raise ExnihiloError(f"--mode must be one of {', '.join(JUDGE_MODES)}, got {mode!r}")


JUDGE_PARAMS = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=32, seed=0)


def format_conversation(messages: list[Message]) -> str:
    """The prompt shown to a judge: the user's text alone for a single user turn, else each
    message under its role."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in messages)


def judge_prompt(prompt: list[Message], response: str, reference: str | None) -> str:
    """ch07's scoring prompt ("Given the input … and correct output …, score the model
    response … on a scale from 0 to 100 …"), with every text fenced as data."""
    parts = [DATA_NOTICE, "", fence("INPUT", format_conversation(prompt))]
    if reference is not None:
        parts += ["", fence("CORRECT OUTPUT", reference)]
    parts += ["", fence("MODEL RESPONSE", response), ""]
    given = "the input and correct output above" if reference is not None else "the input above"
    parts.append(f"Given {given}, score the model response on a scale from 0 to 100, where "
                 f"100 is the best score. Respond with the integer number only.")
    return "\n".join(parts)


def judge_engine_name(engine: Engine) -> str:
    return getattr(engine, "name", type(engine).__name__)


def judge_scores(engine: Engine, records: list[Record], params: SamplingParams | None = None,
                 out: str | Path | None = None, chunk_size: int = 64, mode: str = "generate"
                 ) -> list[Record]:
    """Score every record's final answer 0–100; return copies with the score in
    meta.tags.score (float | None, the one place `curate filter` and `report` read) and the
    verdict in meta["judge"] = {"raw": judge's text, "judge": engine name, "reference": bool}.

    Every record is sent with the same fixed seed at temperature 0 (unless `params` says
    otherwise), so scores are reproducible and independent of batching. A None score means
    the answer could not be read; `judge_summary` counts those. mode "logprob" scores by the
    judge's expected digit instead (`likelihood.logprob_scores`; `params` unused).
    """
    check_mode(mode)
    if mode == "logprob":
        return logprob_scores(engine, records, out=out, chunk_size=chunk_size)
    params = params or JUDGE_PARAMS
    name = judge_engine_name(engine)
    setting = {"judge": name, "prompt": JUDGE_PROMPT_VERSION, "sampling": params.public()}

    def mismatch(old: Record) -> str | None:
        verdict = (old.get("meta") or {}).get("judge") or {}
        theirs = {k: verdict.get(k) for k in setting}
        return None if theirs == setting else (
            f"holds scores from judge {theirs['judge']} with other settings, not {name}")

    def process(chunk: list[Record]) -> list[Record]:
        prompts = []
        for record in chunk:
            prompts.append([{"role": "user", "content": judge_prompt(*answer_parts(record))}])
        outs = engine.chat(prompts, params, seeds=[params.seed] * len(chunk))
        results = []
        for record, completion in zip(chunk, outs, strict=True):
            meta = dict(record.get("meta") or {})
            meta["judge"] = {**setting, "raw": completion.text,
                             "reference": answer_parts(record)[2] is not None}
            results.append(set_tags({**record, "meta": meta},
                                    score=extract_score(completion.text)))
        return results

    require_answers(records)
    results, _ = _resumable(records, lambda r: r["id"], process, out, chunk_size, mismatch)
    return results


def mean_and_stderr(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n))."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(variance / len(values))


def score_histogram(scores: list[float], width: int = 10, high: int = 100) -> dict[str, int]:
    """Counts per bin "0-9", "10-19", …, with the top score in the last bin ("90-100")."""
    edges = list(range(0, high, width))
    bins = {f"{lo}-{lo + width - 1}" if lo + width < high else f"{lo}-{high}": 0
            for lo in edges}
    labels = list(bins)
    for score in scores:
        bins[labels[min(int(score // width), len(labels) - 1)]] += 1
    return bins


def judge_summary(results: list[Record], examples: int = 3) -> dict[str, Any]:
    """n, scored, unparseable (with a few raw answers), mean, stderr, histogram."""
    verdicts = [(r.get("meta") or {}).get("judge") or {} for r in results]
    all_scores = [score_of(r) for r in results]
    scores = [s for s in all_scores if s is not None]
    raw_unparseable = [v.get("raw", "") for v, s in zip(verdicts, all_scores, strict=True)
                       if s is None]
    mean, stderr = mean_and_stderr(scores)
    return {
        "judge": verdicts[0].get("judge") if verdicts else None,
        "n": len(results),
        "scored": len(scores),
        "unparseable": len(raw_unparseable),
        "unparseable_examples": raw_unparseable[:examples],
        "mean": None if mean is None else round(mean, 2),
        "stderr": None if stderr is None else round(stderr, 2),
        "histogram": score_histogram(scores),
        **_confidence(verdicts),
    }


def _confidence(verdicts: list[dict[str, Any]]) -> dict[str, Any]:
    """A likelihood judge's mean probability mass on its score tokens (absent otherwise)."""
    masses = [v["confidence"] for v in verdicts if v.get("confidence") is not None]
    if not masses:
        return {}
    return {"mode": "logprob", "mean_confidence": round(sum(masses) / len(masses), 4)}


def judge_warning(judge: str) -> str | None:
    """A plain warning when the judge is the small embedded model, else None."""
    short = judge.split(":", 1)[-1]
    if short not in EMBEDDED_JUDGES:
        return None
    return (f"the judge {short} is a 135M-parameter model: its scores are close to noise "
            f"and say little about answer quality. Use them to check the pipeline, read "
            f"`exnihilo eval perplexity` beside them, and for real judgements point --judge at "
            f"a strong model (--engine openai --base-url …).")


PAIRWISE_PARAMS = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=16, seed=0)


def pairwise_prompt(prompt: list[Message], first: str, second: str,
                    reference: str | None, letter_only: bool = False) -> str:
    """Ask which of two fenced responses is better; the answer is a letter or "tie" (with
    `letter_only`, a letter: the likelihood judge reads P(A) against P(B))."""
    parts = [DATA_NOTICE, "", fence("INPUT", format_conversation(prompt))]
    if reference is not None:
        parts += ["", fence("CORRECT OUTPUT", reference)]
    parts += ["", fence("RESPONSE A", first), "", fence("RESPONSE B", second), ""]
    given = ("the input and correct output above" if reference is not None
             else "the input above")
    tie = "" if letter_only else ", or with the word tie if they are equally good"
    parts.append(f"Given {given}, which response is better: A or B? Respond with the single "
                 f"letter A or B only{tie}.")
    return "\n".join(parts)


def _preference(choice: str | None, a_first: bool) -> str | None:
    """Which model ("a", "b", "tie") a positional choice favours, given the order shown."""
    if choice is None or choice == "tie":
        return choice
    return "a" if (choice == "A") == a_first else "b"


def combine_orders(first: str | None, second: str | None) -> str:
    """One prompt's outcome for model a from its preferences in the two orders.

    A win (or loss) needs the same preference in both orders; any disagreement is a tie
    (MT-Bench's conservative rule, arXiv 2306.05685). An unreadable answer in either order
    makes the prompt "unparseable": counting the one readable order would let position bias
    back in.
    """
    if first is None or second is None:
        return "unparseable"
    if first == second == "a":
        return "win"
    if first == second == "b":
        return "loss"
    return "tie"


def match_by_prompt(records_a: list[Record], records_b: list[Record]
                    ) -> tuple[list[tuple[Record, Record]], int, int]:
    """Pairs of records answering the same prompt (A's order), plus how many of A and of B
    found no partner."""
    b_by_prompt = {prompt_id(r): r for r in records_b}
    pairs = [(a, b_by_prompt[prompt_id(a)]) for a in records_a if prompt_id(a) in b_by_prompt]
    matched = {prompt_id(a) for a, _ in pairs}
    return pairs, len(records_a) - len(pairs), len(b_by_prompt) - len(matched)


def pairwise_compare(engine: Engine, records_a: list[Record], records_b: list[Record],
                     params: SamplingParams | None = None, out: str | Path | None = None,
                     chunk_size: int = 32, mode: str = "generate", length_control: bool = False
                     ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Judge model A's answers against model B's on the prompts both answered.

    Each prompt is judged twice, A shown first then B shown first. Returns one row per
    prompt ({"id": prompt id, "outcome": win|tie|loss|unparseable for A, "orders": [...]})
    and `pairwise_summary` of them. With `out`, rows are appended as they finish and a rerun
    resumes. mode "logprob" reads each order's verdict as the likelier of the letters A and
    B (`likelihood.letter_choices`) instead of parsing a written answer.
    """
    check_mode(mode)
    if mode == "logprob":
        from exnihilo.evaluate.likelihood import require_logprobs

        require_logprobs(engine)
    params = params or PAIRWISE_PARAMS
    pairs, unmatched_a, unmatched_b = match_by_prompt(records_a, records_b)
    if not pairs:
        raise ExnihiloError("the two files share no prompt: pairwise needs answers to the same "
                            "prompts (generate both from the same eval set)")
    name = judge_engine_name(engine)
    setting: dict[str, Any] = (
        {"judge": name, "prompt": PAIRWISE_PROMPT_VERSION, "sampling": params.public()}
        if mode == "generate" else
        {"judge": name, "prompt": LOGPROB_PAIRWISE_PROMPT_VERSION, "mode": "logprob"})
    items = [{"id": prompt_id(a), "messages": _question(a),
              "meta": {"reference": answer_parts(a)[2], "a": _answer(a), "b": _answer(b)}}
             for a, b in pairs]

    def mismatch(old: Record) -> str | None:
        theirs = {k: old.get(k) for k in setting}
        return None if theirs == setting else (
            f"holds verdicts from judge {theirs['judge']} with other settings, not {name}")

    def process(chunk: list[Record]) -> list[Record]:
        convs = []
        for item in chunk:
            ref, a, b = item["meta"]["reference"], item["meta"]["a"], item["meta"]["b"]
            for first, second in ((a, b), (b, a)):
                convs.append([{"role": "user", "content": pairwise_prompt(
                    item["messages"], first["content"], second["content"], ref,
                    letter_only=mode == "logprob")}])
        verdicts = _verdicts(engine, convs, params, mode)
        rows = []
        for i, item in enumerate(chunk):
            orders = []
            for j, a_first in enumerate((True, False)):
                verdict = verdicts[2 * i + j]
                orders.append({"a_first": a_first, **verdict,
                               "prefers": _preference(verdict["choice"], a_first)})
            extra = {"p_a": _p_a(orders)} if mode == "logprob" else {}
            rows.append({"id": item["id"], **setting, **extra, "messages": item["messages"],
                         "reference": item["meta"]["reference"],
                         "outcome": combine_orders(orders[0]["prefers"], orders[1]["prefers"]),
                         "orders": orders, "a": item["meta"]["a"], "b": item["meta"]["b"]})
        return rows

    rows, _ = _resumable(items, lambda r: r["id"], process, out, chunk_size, mismatch)
    summary = pairwise_summary(rows, length_control=length_control)
    summary.update(unmatched_a=unmatched_a, unmatched_b=unmatched_b,
                   a=_generator(records_a), b=_generator(records_b))
    return rows, summary


def _p_a(orders: list[dict[str, Any]]) -> float | None:
    """P(model a is better) from a likelihood judge's two orders, averaged so that a fixed
    preference for one position cancels: (P(A | a first) + P(B | a second)) / 2."""
    first, second = (o.get("p_first") for o in orders)
    if first is None or second is None:
        return None
    return round((first + (1 - second)) / 2, 6)


def _verdicts(engine: Engine, convs: list[list[Message]], params: SamplingParams, mode: str
              ) -> list[dict[str, Any]]:
    """One {"raw", "choice", …} per A/B prompt: parsed from the judge's text, or (logprob)
    the likelier letter with its probability."""
    if mode == "logprob":
        from exnihilo.evaluate.likelihood import letter_choices

        return letter_choices(engine, convs)
    outs = engine.chat(convs, params, seeds=[params.seed] * len(convs))
    return [{"raw": o.text, "choice": extract_choice(o.text)} for o in outs]


def _multi_turn(record: Record) -> bool:
    return sum(m["role"] == "assistant" for m in record["messages"]) > 1


def _question(record: Record) -> list[Message]:
    """What both answers respond to: the prompt, or for a multi-turn record its user turns
    alone (each model's earlier answers belong to its own side)."""
    if _multi_turn(record):
        return [m for m in record["messages"] if m["role"] == "user"]
    return answer_parts(record)[0]


def _answer(record: Record) -> dict[str, Any]:
    """The side shown to a pairwise judge: the final answer, or for a multi-turn record the
    model's whole conversation (MT-Bench's pairwise judge reads both conversations)."""
    content = (format_conversation(record["messages"]) if _multi_turn(record)
               else record["messages"][-1]["content"])
    return {"content": content, "record_id": record["id"],
            "generator": (record.get("meta") or {}).get("generator")}


def _generator(records: list[Record]) -> str | None:
    names = {(r.get("meta") or {}).get("generator") for r in records}
    return names.pop() if len(names) == 1 else None


OUTCOME_POINTS = {"win": 1.0, "tie": 0.5, "loss": 0.0}


def length_controlled_win_rate(outcomes: list[str], lengths_a: list[int], lengths_b: list[int]
                               ) -> dict[str, Any]:
    """A's win rate with the length difference regressed out (the idea of AlpacaEval 2's
    length-controlled win rate, Dubois et al. 2024, arXiv 2404.04475).

    Fit P(A wins) = σ(b0 + b1·x) over the decided prompts, x = tanh((len_a − len_b) / sd)
    (character lengths; sd the standard deviation of the differences, so x is scale-free
    and bounded), a tie counting as half a win; the LC win rate is the prediction at equal
    length, σ(b0). How ours differs from AlpacaEval's GLM: theirs is fitted over a whole
    leaderboard of models against one fixed baseline, with a per-model term, the length
    term, and a per-instruction difficulty term, with regularisation; ours compares one
    pair of models on one prompt set with only the length term (no difficulty term: each
    prompt is seen once here, so it would absorb the outcome). `length_slope` > 0 means the
    judge favoured the longer answer.
    """
    keep = [i for i, o in enumerate(outcomes) if o in OUTCOME_POINTS]
    result: dict[str, Any] = {"lc_win_rate": None, "length_slope": None}
    if not keep:
        return result
    diffs = [lengths_a[i] - lengths_b[i] for i in keep]
    y = [OUTCOME_POINTS[outcomes[i]] for i in keep]
    mean = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / len(diffs))
    x = [math.tanh(d / sd) if sd > 0 else 0.0 for d in diffs]
    b0, b1 = logistic_fit(x, y)
    result.update(lc_win_rate=round(sigmoid(b0), 4), length_slope=round(b1, 4))
    return result


def pairwise_summary(rows: list[dict[str, Any]], examples: int = 3,
                     length_control: bool = False) -> dict[str, Any]:
    """Wins/ties/losses for A, win rate (wins + ties/2) / decided, position consistency,
    each side's mean answer length in characters (and with `length_control` the
    length-controlled win rate, `length_controlled_win_rate`).

    Position consistency: among prompts with both orders readable, the share where the
    judge preferred the same model (or tie) in both orders. A judge that always picks the
    first position scores 0 %. first_position_rate: share of readable A/B answers that
    picked whichever response was shown first (0.5 is unbiased).
    """
    outcomes = Counter(row["outcome"] for row in rows)
    decided = outcomes["win"] + outcomes["tie"] + outcomes["loss"]
    orders = [o for row in rows for o in row["orders"]]
    consistent = sum(1 for row in rows if row["outcome"] != "unparseable"
                     and row["orders"][0]["prefers"] == row["orders"][1]["prefers"])
    lettered = [o for o in orders if o["choice"] in ("A", "B")]
    p_first = [o["p_first"] for o in orders if o.get("p_first") is not None]
    p_a = [row["p_a"] for row in rows if row.get("p_a") is not None]
    points = [1.0] * outcomes["win"] + [0.5] * outcomes["tie"] + [0.0] * outcomes["loss"]
    win_rate, stderr = mean_and_stderr(points)
    lengths_a = [len(row["a"]["content"]) for row in rows]
    lengths_b = [len(row["b"]["content"]) for row in rows]
    lengths: dict[str, Any] = {
        "mean_length_a": round(sum(lengths_a) / len(rows), 1) if rows else None,
        "mean_length_b": round(sum(lengths_b) / len(rows), 1) if rows else None}
    if length_control:
        lengths.update(length_controlled_win_rate([row["outcome"] for row in rows],
                                                  lengths_a, lengths_b))
    return {
        "judge": rows[0].get("judge") if rows else None,
        "n": len(rows),
        "decided": decided,
        "wins": outcomes["win"],
        "ties": outcomes["tie"],
        "losses": outcomes["loss"],
        "unparseable_prompts": outcomes["unparseable"],
        "unparseable_answers": sum(1 for o in orders if o["choice"] is None),
        "unparseable_examples": [o["raw"] for o in orders if o["choice"] is None][:examples],
        "win_rate": None if win_rate is None else round(win_rate, 4),
        "win_rate_stderr": None if stderr is None else round(stderr, 4),
        **lengths,
        "position_consistency": round(consistent / decided, 4) if decided else None,
        "first_position_rate": (round(sum(1 for o in lettered if o["choice"] == "A")
                                      / len(lettered), 4) if lettered else None),
        # a likelihood judge's mean P(first shown) / (P(A) + P(B)): 0.5 is unbiased
        **({"mean_p_first": round(sum(p_first) / len(p_first), 4)} if p_first else {}),
        # and its position-averaged P(a better): the share of prompts above 0.5
        **({"mean_p_a": round(sum(p_a) / len(p_a), 4),
            "probability_win_rate": round(sum(p > 0.5 for p in p_a) / len(p_a), 4)}
           if p_a else {}),
    }
