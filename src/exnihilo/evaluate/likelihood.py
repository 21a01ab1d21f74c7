"""Judging read from log-probabilities instead of from written verdicts.

A small judge fails at writing a verdict long before it fails at ranking: asked for "an
integer from 0 to 100", the embedded 135M model gave wrong references 99 and right ones 79,
and picked the first of two answers 92 % of the time. Reading its probabilities avoids the
parsing step entirely and keeps the information a single sampled token throws away:

- scores (G-Eval, Liu et al. 2023, arXiv 2303.16634): the judge is asked for one digit
  0–9; the score is the expectation Σ p(d)·d / Σ p(d) over the ten digit tokens, scaled to
  0–100. The probability mass on the digits, Σ p(d), is kept as `confidence`: how much of
  the judge's next-token distribution was a score at all.
- pairwise: P("A") against P("B") for the first token of the verdict, in both orders; the
  preferred position is the likelier letter, and `p_first` = P(A) / (P(A) + P(B)) is kept.
- options (tags, multiple choice): `choose_option` scores each option as the whole reply
  (`engine.reply_logprobs`) and normalises over the options, so a 5-token option and a
  1-token one are compared as complete answers, not by their first token.

Nothing here can be "unparseable". What remains is a judge whose top-k tokens hold no
score token at all: that record's score is None with `confidence` 0, counted like an
unreadable answer.

What this fixes and what it cannot: it removes parsing failures and exposes position bias
as a number, but it does not give a small judge judgement. On the embedded 135M model
(`benchmarks/judge_sanity.py`, 30 ch07 prompts, right references against shifted ones)
the expected-digit score separates right from wrong at AUC 0.51 (chance), and its letter
probabilities favour whichever answer is shown first (P(first) 0.70); the answers' own
log-likelihood separates them at AUC 0.97. Read these scores from a strong judge.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from exnihilo.engines.base import Conversation, Engine, supports_logprobs
from exnihilo.errors import ExnihiloError
from exnihilo.evaluate.resumable import _resumable
from exnihilo.evaluate.sets import Message, answer_parts, require_answers
from exnihilo.judge import DATA_NOTICE, fence
from exnihilo.records import Record

LOGPROB_JUDGE_PROMPT_VERSION = "score-digit-expected/v1"
LOGPROB_PAIRWISE_PROMPT_VERSION = "pairwise-letter-logprob/v1"
SCORE_TOKENS = tuple(str(d) for d in range(10))  # single tokens in SmolLM2's vocabulary
TOP_K = 20  # OpenAI's API returns at most 20 top_logprobs; the local engine matches it


def require_logprobs(engine: Any, what: str = "--mode logprob") -> None:
    """Refuse, naming the engine, when it cannot return log-probabilities."""
    if not supports_logprobs(engine):
        name = getattr(engine, "name", type(engine).__name__)
        raise ExnihiloError(f"{what} needs log-probabilities, and the judge {name} cannot "
                            f"return them; use the local engine (--engine transformers) or an "
                            f"OpenAI-compatible server that returns top_logprobs")


def _engine_name(engine: Any) -> str:
    return getattr(engine, "name", type(engine).__name__)


def label_probabilities(top: dict[str, float], labels: tuple[str, ...]) -> dict[str, float]:
    """P(label) for each label from a next-token {text: log p} table.

    Token texts are compared with surrounding whitespace removed, so " 7" and "7" both count
    for "7" (tokenizers differ in whether a reply's first token carries a space). A label
    absent from the top-k gets probability 0: it is below every listed token.
    """
    probs = dict.fromkeys(labels, 0.0)
    for text, logp in top.items():
        key = text.strip()
        if key in probs:
            probs[key] += math.exp(logp)
    return probs


def expected_score(top: dict[str, float], labels: tuple[str, ...] = SCORE_TOKENS,
                   scale: float = 100.0) -> tuple[float | None, float, dict[str, float]]:
    """(score, confidence, normalised probabilities) of a digit-score distribution.

    score = Σ p(d)·d / Σ p(d), mapped from [0, max digit] to [0, scale]; confidence = Σ p(d)
    (the mass the judge put on score tokens). No score token in `top` → (None, 0, {}).
    """
    probs = label_probabilities(top, labels)
    mass = sum(probs.values())
    if mass <= 0:
        return None, 0.0, {}
    values = [float(label) for label in labels]
    mean = sum(probs[label] * v for label, v in zip(labels, values, strict=True)) / mass
    low, high = min(values), max(values)
    score = (mean - low) / (high - low) * scale
    return score, mass, {label: p / mass for label, p in probs.items()}


def logprob_judge_prompt(prompt: list[Message], response: str, reference: str | None) -> str:
    """The scoring prompt of `judge.judge_prompt`, asking for one digit instead of 0–100
    (a digit is one token, so its probabilities are read from a single position)."""
    from exnihilo.evaluate.judging import format_conversation

    parts = [DATA_NOTICE, "", fence("INPUT", format_conversation(prompt))]
    if reference is not None:
        parts += ["", fence("CORRECT OUTPUT", reference)]
    parts += ["", fence("MODEL RESPONSE", response), ""]
    given = "the input and correct output above" if reference is not None else "the input above"
    parts.append(f"Given {given}, score the model response on a scale from 0 to 9, where 0 "
                 f"is wrong or useless and 9 is fully correct. Respond with the single digit "
                 f"only.")
    return "\n".join(parts)


def logprob_scores(engine: Engine, records: list[Record], out: str | Path | None = None,
                   chunk_size: int = 64, top_k: int = TOP_K) -> list[Record]:
    """Score every record's final answer 0–100 by the judge's expected digit; return copies
    with the score in meta.tags.score and meta["judge"] = {"confidence", "probs", "judge",
    "mode": "logprob",
    "prompt", "reference": bool}. Resumable like `judge_scores`."""
    require_logprobs(engine)
    name = _engine_name(engine)
    setting = {"judge": name, "prompt": LOGPROB_JUDGE_PROMPT_VERSION, "mode": "logprob",
               "top_k": top_k}

    def mismatch(old: Record) -> str | None:
        verdict = (old.get("meta") or {}).get("judge") or {}
        theirs = {k: verdict.get(k) for k in setting}
        return None if theirs == setting else (
            f"holds scores from judge {theirs['judge']} with other settings, not {name} "
            f"(--mode logprob)")

    def process(chunk: list[Record]) -> list[Record]:
        convs = [[{"role": "user", "content": logprob_judge_prompt(*answer_parts(r))}]
                 for r in chunk]
        tops = engine.next_token_logprobs(convs, top_k=top_k)  # type: ignore[attr-defined]
        results = []
        for record, top in zip(chunk, tops, strict=True):
            score, confidence, probs = expected_score(top)
            meta = dict(record.get("meta") or {})
            meta["tags"] = {**(meta.get("tags") or {}),
                            "score": None if score is None else round(score, 4)}
            meta["judge"] = {**setting, "confidence": confidence,
                             "probs": {k: round(v, 6) for k, v in probs.items()},
                             "raw": _top_text(top),
                             "reference": answer_parts(record)[2] is not None}
            results.append({**record, "meta": meta})
        return results

    require_answers(records)
    results, _ = _resumable(records, lambda r: r["id"], process, out, chunk_size, mismatch)
    return results


def _top_text(top: dict[str, float], n: int = 5) -> str:
    """The judge's five likeliest first tokens, for a reader to see what it wanted to say."""
    best = sorted(top.items(), key=lambda kv: -kv[1])[:n]
    return " ".join(f"{t!r}:{math.exp(lp):.2f}" for t, lp in best)


def letter_choices(engine: Engine, conversations: list[Conversation], top_k: int = TOP_K
                   ) -> list[dict[str, Any]]:
    """For each A/B verdict prompt: {"choice": "A" | "B" | None, "p_first", "mass", "raw"}.

    The choice is the likelier letter; `p_first` = P(A) / (P(A) + P(B)); None only when
    neither letter is among the judge's top-k first tokens."""
    rows = []
    for top in engine.next_token_logprobs(conversations, top_k=top_k):  # type: ignore[attr-defined]
        probs = label_probabilities(top, ("A", "B"))
        mass = probs["A"] + probs["B"]
        if mass <= 0:
            rows.append({"choice": None, "p_first": None, "mass": 0.0, "raw": _top_text(top)})
            continue
        p_first = probs["A"] / mass
        rows.append({"choice": "A" if p_first >= 0.5 else "B", "p_first": round(p_first, 6),
                     "mass": round(mass, 6), "raw": _top_text(top)})
    return rows


def option_distribution(engine: Engine, conversations: list[Conversation],
                        options: list[list[str]], length_norm: bool = False
                        ) -> list[list[float]]:
    """For each conversation, the probability of each of its options as the whole reply,
    normalised over the options: softmax of Σ log p (or of the mean per token with
    `length_norm`, which stops long options from losing merely for being long)."""
    flat_convs = [c for c, opts in zip(conversations, options, strict=True) for _ in opts]
    flat_opts = [o for opts in options for o in opts]
    if any(not o for o in flat_opts):
        raise ExnihiloError("an option is empty: every option needs text to score")
    scored = engine.reply_logprobs(flat_convs, flat_opts)  # type: ignore[attr-defined]
    out, start = [], 0
    for opts in options:
        rows = scored[start:start + len(opts)]
        start += len(opts)
        logits = [s / max(n, 1) if length_norm else s for s, n in rows]
        top = max(logits)
        weights = [math.exp(v - top) for v in logits]
        total = sum(weights)
        out.append([w / total for w in weights])
    return out


def choose_options(engine: Engine, conversations: list[Conversation], options: list[str],
                   length_norm: bool = False) -> list[tuple[str, float]]:
    """`choose_option` for many conversations sharing one option list (one batched call)."""
    require_logprobs(engine, "choosing an option by likelihood")
    if len(options) < 2:
        raise ExnihiloError(f"need at least two options to choose from, got {options}")
    dists = option_distribution(engine, conversations, [list(options)] * len(conversations),
                                length_norm)
    picks = []
    for dist in dists:
        best = max(range(len(options)), key=dist.__getitem__)
        picks.append((options[best], dist[best]))
    return picks


def choose_option(engine: Engine, conversation: Conversation, options: list[str],
                  length_norm: bool = False) -> tuple[str, float]:
    """The option the engine most likely replies with after `conversation`, and its
    probability normalised over the options (e.g. a quality tag from "very poor" …
    "excellent"). Ties go to the earlier option."""
    return choose_options(engine, [conversation], options, length_norm)[0]
