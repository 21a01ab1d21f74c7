"""Multiple-choice accuracy by log-likelihood: no judge, no answer parsing.

Each question is shown with its options lettered; every option, written as the reply
"B) its text", is scored by the model's summed log-probability (`engine.reply_logprobs`),
and the likeliest is the model's answer (as lm-evaluation-harness scores MMLU-style tasks;
`length_norm` divides by the token count, its `acc_norm` idea with tokens for bytes).

`style="cloze"` shows the question alone and scores each option's bare text as the reply
(lm-evaluation-harness's form for ARC or HellaSwag): no letters, no listing, so no order
to cancel (one trial per question). It asks what the model knows without asking it to
work a lettered format, which small models do poorly.

Small models prefer positions ("A)" above all), so lettered options are shown in several
orders:
a seeded random order per question, then its rotations by 1, 2, … places. With as many
shuffles as options, every option sits in every position exactly once and a position
preference adds the same to every option. A question's accuracy is the share of its
orders answered right; the set's accuracy is the mean over questions, with a percentile
bootstrap interval over questions (the orders of one question are not independent).

Input, JSON array or JSONL, either of:
- plain: {"question": str, "options": [str, …] or {"A": str, …}, "answer": index, letter
  or the option's text} (optional "id");
- the documents synthesizer's records: meta.task_format "multiple_choice", the user
  message "question\\nA) …\\nB) …", the assistant message "C) right option".
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

from exnihilo.engines.base import Engine
from exnihilo.errors import ExnihiloError
from exnihilo.evaluate.likelihood import option_distribution, require_logprobs
from exnihilo.evaluate.resumable import _resumable
from exnihilo.evaluate.stats import bootstrap_interval
from exnihilo.records import content_id, iter_source_rows, validate_record

LETTERS = "ABCDEFGHIJ"
CHOICE_PROMPT_VERSION = "choice/v1"
CHOICE_STYLES = ("lettered", "cloze")
_OPTION = re.compile(r"^[ \t]*\(?([A-J])[).:][ \t]+(.+?)[ \t]*$")


def choice_item(question: str, options: list[str], answer: int, item_id: str | None = None
                ) -> dict[str, Any]:
    return {"id": item_id or content_id([{"role": "user", "content": question + "\n"
                                          + "\n".join(options)}]),
            "question": question, "options": options, "answer": answer}


def _plain_item(obj: dict[str, Any], where: str) -> dict[str, Any]:
    options = obj["options"]
    if isinstance(options, dict):
        letters = [str(k).strip().upper() for k in options]
        options = [str(v) for v in options.values()]
    elif isinstance(options, list):
        letters = list(LETTERS[:len(options)])
        options = [str(o) for o in options]
    else:
        raise ExnihiloError(f"{where}: 'options' must be a list or an object, got "
                            f"{type(options).__name__}")
    if not 2 <= len(options) <= len(LETTERS):
        raise ExnihiloError(f"{where}: needs 2 to {len(LETTERS)} options, got {len(options)}")
    answer = obj.get("answer")
    if isinstance(answer, bool) or answer is None:
        index = None
    elif isinstance(answer, int):
        index = answer if 0 <= answer < len(options) else None
    elif str(answer).strip().upper() in letters:
        index = letters.index(str(answer).strip().upper())
    else:
        index = options.index(str(answer)) if str(answer) in options else None
    if index is None:
        raise ExnihiloError(f"{where}: answer {answer!r} is not an option index, letter or "
                            f"option text")
    if not isinstance(obj.get("question"), str) or not obj["question"].strip():
        raise ExnihiloError(f"{where}: 'question' must be non-empty text")
    return choice_item(obj["question"].strip(), options, index,
                       str(obj["id"]) if obj.get("id") is not None else None)


def parse_lettered(text: str) -> tuple[str, list[str], list[str]]:
    """(stem, letters, option texts) of a question followed by "A) …" lines."""
    stem, letters, options = [], [], []
    for line in text.splitlines():
        match = _OPTION.match(line)
        if match:
            letters.append(match.group(1))
            options.append(match.group(2))
        elif not options:
            stem.append(line)
    return "\n".join(stem).strip(), letters, options


def _record_item(obj: dict[str, Any], where: str) -> dict[str, Any]:
    record = validate_record(obj, where)
    users = [m for m in record["messages"] if m["role"] == "user"]
    answers = [m for m in record["messages"] if m["role"] == "assistant"]
    if not users or not answers:
        raise ExnihiloError(f"{where}: a multiple-choice record needs a user question and an "
                            f"assistant answer")
    stem, letters, options = parse_lettered(users[-1]["content"])
    if len(options) < 2 or not stem:
        raise ExnihiloError(f"{where}: no lettered options (\"A) …\" lines) after a question")
    given = answers[-1]["content"].strip()
    match = re.match(r"\(?([A-J])\b", given)
    if match and match.group(1) in letters:
        index = letters.index(match.group(1))
    elif given in options:
        index = options.index(given)
    else:
        raise ExnihiloError(f"{where}: the answer {given[:60]!r} names none of the options "
                            f"{', '.join(letters)}")
    return choice_item(stem, options, index, record["id"])


def load_choice_set(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Multiple-choice items {"id", "question", "options", "answer": index} from `path`;
    errors name the file and line (or array index). Any source `records.iter_source_rows`
    reads: JSONL, a JSON array, parquet, hf:org/name[:split]."""
    numbered = iter_source_rows(path)
    items = []
    for where, obj in numbered:
        if isinstance(obj, dict) and "messages" in obj:
            task = (obj.get("meta") or {}).get("task_format")
            if task not in (None, "multiple_choice"):
                continue  # a documents set mixes free-form pairs in: not questions here
            items.append(_record_item(obj, where))
        elif isinstance(obj, dict) and "question" in obj and "options" in obj:
            items.append(_plain_item(obj, where))
        else:
            raise ExnihiloError(f"{where}: not a multiple-choice item (expected "
                                f"question/options/answer, or a record with lettered options)")
    if limit is not None:
        items = items[:limit]
    if not items:
        raise ExnihiloError(f"{path}: no multiple-choice items")
    return items


def option_orders(item: dict[str, Any], shuffles: int, seed: int) -> list[list[int]]:
    """`shuffles` orders of the item's options: a seeded random order, then its rotations
    (so `shuffles` = number of options puts every option in every position once)."""
    n = len(item["options"])
    base = list(range(n))
    random.Random(f"{seed}:{item['id']}").shuffle(base)
    return [base[k % n:] + base[:k % n] for k in range(shuffles)]


def choice_prompt(question: str, shown: list[str]) -> str:
    listing = "\n".join(f"{LETTERS[i]}) {o}" for i, o in enumerate(shown))
    return (f"{question}\n{listing}\n\nAnswer with the letter and the text of the correct "
            f"option.")


def choice_accuracy(engine: Engine, items: list[dict[str, Any]], shuffles: int = 4,
                    seed: int = 0, length_norm: bool = False, out: str | Path | None = None,
                    chunk_size: int = 8, style: str = "lettered"
                    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Score every item in `shuffles` option orders (one for `style` "cloze"); rows
    (resumable in `out`) and summary {accuracy, interval_95, first_position_rate,
    consistent, …}."""
    require_logprobs(engine, "eval choice")
    if shuffles < 1:
        raise ExnihiloError(f"--shuffles must be at least 1, got {shuffles}")
    if style not in CHOICE_STYLES:
        raise ExnihiloError(f"--style must be one of {', '.join(CHOICE_STYLES)}, got {style!r}")
    if style == "cloze":
        shuffles = 1  # the options are not shown: their order cannot matter
    name = getattr(engine, "name", type(engine).__name__)
    setting = {"model": name, "prompt": CHOICE_PROMPT_VERSION, "style": style,
               "shuffles": shuffles, "seed": seed, "length_norm": length_norm}

    def mismatch(old: dict[str, Any]) -> str | None:
        theirs = {k: old.get(k) for k in setting}
        return None if theirs == setting else (
            f"holds choices scored with other settings ({theirs}), not {setting}")

    def process(chunk: list[dict[str, Any]]) -> list[dict[str, Any]]:
        convs, options, plan = [], [], []
        for item in chunk:
            for order in option_orders(item, shuffles, seed):
                shown = [item["options"][j] for j in order]
                if style == "cloze":
                    convs.append([{"role": "user", "content": item["question"]}])
                    options.append(shown)
                else:
                    convs.append([{"role": "user", "content": choice_prompt(item["question"],
                                                                            shown)}])
                    options.append([f"{LETTERS[i]}) {o}" for i, o in enumerate(shown)])
                plan.append(order)
        dists = option_distribution(engine, convs, options, length_norm)
        rows, k = [], 0
        for item in chunk:
            trials = []
            for _ in range(shuffles):
                order, dist = plan[k], dists[k]
                k += 1
                position = max(range(len(dist)), key=dist.__getitem__)
                trials.append({"order": order, "picked": order[position],
                               "position": position,
                               "probs": [round(p, 6) for p in dist]})
            right = sum(t["picked"] == item["answer"] for t in trials)
            rows.append({**item, **setting, "trials": trials,
                         "accuracy": right / len(trials)})
        return rows

    rows, _ = _resumable(items, lambda r: r["id"], process, out, chunk_size, mismatch)
    return rows, choice_summary(rows, seed)


def choice_summary(rows: list[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    """Accuracy (mean over questions of the share of orders answered right) with its 95 %
    bootstrap interval; first_position_rate (share of answers at position A, against
    `chance_first_position`) and `consistent` (share of questions answered with the same
    option in every order): how much the order still mattered."""
    accuracy = [row["accuracy"] for row in rows]
    trials = [t for row in rows for t in row["trials"]]
    low, high = bootstrap_interval(accuracy, seed=seed)
    mean = sum(accuracy) / len(accuracy) if accuracy else None
    chance = (sum(1 / len(row["options"]) for row in rows) / len(rows)) if rows else None
    return {
        "model": rows[0]["model"] if rows else None,
        "style": rows[0].get("style") if rows else None,
        "n": len(rows),
        "shuffles": rows[0]["shuffles"] if rows else None,
        "accuracy": None if mean is None else round(mean, 4),
        "interval_95": [None if low is None else round(low, 4),
                        None if high is None else round(high, 4)],
        "chance": None if chance is None else round(chance, 4),
        "first_position_rate": (round(sum(t["position"] == 0 for t in trials) / len(trials), 4)
                                if trials else None),
        "consistent": (round(sum(len({t["picked"] for t in row["trials"]}) == 1
                                 for row in rows) / len(rows), 4) if rows else None),
    }
