"""IFEval scoring: strict and loose following, the benchmark's result rows, and a summary
with bootstrap intervals, a per-instruction table and a paired difference of two runs.

Strict: a response follows an instruction when it is not blank and the checker passes.
Loose (the benchmark's upper bound): it follows when any of 8 variants passes — the
response as is, without its first line, without its last line, without both (lines split
on "\\n", rejoined and stripped), and each of those four with every "*" removed.

Results are a list of rows in the benchmark's own output format, one per prompt and mode:
`{"mode": "strict"|"loose", "key", "prompt", "response", "instruction_id_list",
"follow_all_instructions", "follow_instruction_list"}` (the reference writes the strict and
loose rows to two files; selecting one mode here gives that file's rows, plus `mode`/`key`).

Public API: `read_inputs`, `read_responses`, `match_responses`, `evaluate_responses`,
`score_response` (the fraction of instructions followed; the preference-optimization work
uses it as a reward), `summarize`, `paired_difference`, `read_results`, `write_results`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from exnihilo.errors import ExnihiloError
from exnihilo.ifeval.checkers import INSTRUCTIONS, validate_kwargs
from exnihilo.records import iter_jsonl, validate_record, write_jsonl_atomic

MODES = ("strict", "loose")
# The 541-prompt set in the project's shared/ folder, beside the checkout (src/exnihilo/ifeval/
# -> repository root -> its parent).
DEFAULT_INPUT = Path(__file__).resolve().parents[4] / "shared" / "evalsets" / \
    "ifeval-input-data.jsonl"


@dataclass(frozen=True)
class Prompt:
    """One benchmark row: a prompt and its instructions (kwargs already validated)."""

    key: Any
    prompt: str
    instruction_id_list: list[str]
    kwargs: list[dict[str, Any]]
    where: str = ""


# ------------------------------------------------------------------------------ inputs

def parse_input_row(obj: Any, where: str) -> Prompt:
    """A benchmark input row, validated; errors name `where` (file:line) and the id."""
    if not isinstance(obj, dict):
        raise ExnihiloError(f"{where}: expected an object, got {type(obj).__name__}")
    prompt, ids, kwargs = obj.get("prompt"), obj.get("instruction_id_list"), obj.get("kwargs")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ExnihiloError(f"{where}: 'prompt' must be a non-empty string")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise ExnihiloError(f"{where}: 'instruction_id_list' must be a non-empty list of ids")
    if kwargs is None:
        raise ExnihiloError(f"{where}: missing 'kwargs' (one object per instruction id)")
    if not isinstance(kwargs, list) or len(kwargs) != len(ids):
        raise ExnihiloError(f"{where}: 'kwargs' must be a list with one object per "
                            f"instruction id ({len(ids)})")
    checked = [validate_kwargs(i, k, where) for i, k in zip(ids, kwargs, strict=True)]
    return Prompt(obj.get("key"), prompt, ids, checked, where)


def read_inputs(path: str | Path, limit: int | None = None) -> list[Prompt]:
    """All rows of an IFEval input file (validated), the first `limit` when given."""
    if limit is not None and limit <= 0:
        raise ExnihiloError(f"--limit must be positive, got {limit}")
    rows, seen = [], {}
    for lineno, obj in iter_jsonl(path):
        row = parse_input_row(obj, f"{path}:{lineno}")
        if row.prompt in seen:
            raise ExnihiloError(f"{path}:{lineno}: prompt repeats line {seen[row.prompt]} "
                                f"(responses are matched by prompt text)")
        seen[row.prompt] = lineno
        rows.append(row)
    if not rows:
        raise ExnihiloError(f"{path}: no IFEval rows")
    return rows if limit is None else rows[:limit]


# ------------------------------------------------------------------------------ responses

def _response_of(obj: Any, where: str) -> tuple[str, str]:
    """(prompt, response) from a benchmark response row or one of our generated records."""
    if isinstance(obj, dict) and "messages" in obj:
        record = validate_record(obj, where)
        messages = record["messages"]
        if messages[-1]["role"] != "assistant":
            raise ExnihiloError(f"{where}: record has no assistant answer (last message is "
                                f"{messages[-1]['role']!r})")
        users = [m["content"] for m in messages[:-1] if m["role"] == "user"]
        if not users:
            raise ExnihiloError(f"{where}: record has no user message")
        return users[-1], messages[-1]["content"]
    if isinstance(obj, dict) and isinstance(obj.get("prompt"), str) \
            and isinstance(obj.get("response"), str):
        return obj["prompt"], obj["response"]
    raise ExnihiloError(f"{where}: expected {{\"prompt\", \"response\"}} strings or a record "
                        f"whose messages end with an assistant answer")


def read_responses(path: str | Path) -> dict[str, str]:
    """prompt -> response from a `{"prompt", "response"}` JSONL or our generated records (the
    prompt is the last user message). A prompt answered twice differently is an error."""
    responses: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for lineno, obj in iter_jsonl(path):
        prompt, response = _response_of(obj, f"{path}:{lineno}")
        if prompt in responses and responses[prompt] != response:
            raise ExnihiloError(f"{path}:{lineno}: prompt already answered differently on "
                                f"line {first_line[prompt]}")
        responses[prompt] = response
        first_line.setdefault(prompt, lineno)
    if not responses:
        raise ExnihiloError(f"{path}: no responses")
    return responses


def match_responses(inputs: list[Prompt], responses: dict[str, str], source: str = "responses",
                    known_prompts: set[str] | None = None) -> list[str]:
    """The response to each input prompt, in input order. Input prompts without a response,
    or responses to prompts outside `known_prompts` (default: the inputs), are an error
    that gives their count: nothing is skipped silently."""
    missing = [row for row in inputs if row.prompt not in responses]
    if missing:
        raise ExnihiloError(f"{source}: {len(missing)} of {len(inputs)} prompts have no "
                            f"response (first: {missing[0].where or repr(missing[0].prompt[:60])})")
    known = known_prompts if known_prompts is not None else {row.prompt for row in inputs}
    stray = [p for p in responses if p not in known]
    if stray:
        raise ExnihiloError(f"{source}: {len(stray)} responses answer prompts that are not in "
                            f"the input file (first: {stray[0][:60]!r})")
    return [responses[row.prompt] for row in inputs]


# ------------------------------------------------------------------------------ checking

def loose_variants(response: str) -> list[str]:
    """The 8 variants loose scoring tries, in the reference's order."""
    lines = response.split("\n")
    without_first = "\n".join(lines[1:]).strip()
    without_last = "\n".join(lines[:-1]).strip()
    without_both = "\n".join(lines[1:-1]).strip()
    trimmed = [response, without_first, without_last, without_both]
    return [response, response.replace("*", "")] + trimmed[1:] + \
        [t.replace("*", "") for t in trimmed[1:]]


def _follows(instruction_id: str, kwargs: dict[str, Any], candidates: list[str]) -> bool:
    check = INSTRUCTIONS[instruction_id].check
    return any(text.strip() and check(text, **kwargs) for text in candidates)


def follow_list(instruction_id_list: list[str], kwargs_list: list[dict[str, Any]],
                response: str, loose: bool = False) -> list[bool]:
    """One bool per instruction: followed (strict, or loose over the 8 variants)."""
    if len(kwargs_list) != len(instruction_id_list):
        raise ExnihiloError(f"{len(instruction_id_list)} instruction ids but "
                            f"{len(kwargs_list)} kwargs objects")
    candidates = loose_variants(response) if loose else [response]
    return [_follows(i, validate_kwargs(i, k), candidates)
            for i, k in zip(instruction_id_list, kwargs_list, strict=True)]


def score_response(instruction_id_list: list[str], kwargs_list: list[dict[str, Any]],
                   response: str, prompt: str | None = None, loose: bool = True) -> float:
    """Fraction of the instructions `response` follows (loose by default), in [0, 1].

    A dense reward for sampling and preference pairs: 1.0 means every instruction is
    followed. `prompt` is unused by the 25 checkers and accepted for symmetry.
    """
    del prompt
    followed = follow_list(instruction_id_list, kwargs_list, response, loose=loose)
    return sum(followed) / len(followed)


def result_row(row: Prompt, response: str, mode: str) -> dict[str, Any]:
    """The benchmark's output row for one prompt and one mode."""
    followed = follow_list(row.instruction_id_list, row.kwargs, response, loose=mode == "loose")
    return {"mode": mode, "key": row.key, "prompt": row.prompt, "response": response,
            "instruction_id_list": list(row.instruction_id_list),
            "follow_all_instructions": all(followed), "follow_instruction_list": followed}


def evaluate_responses(inputs: list[Prompt], responses: list[str] | dict[str, str]
                       ) -> list[dict[str, Any]]:
    """Strict and loose result rows for every input (responses by position or by prompt)."""
    if isinstance(responses, dict):
        responses = match_responses(inputs, responses)
    if len(responses) != len(inputs):
        raise ExnihiloError(f"{len(inputs)} prompts but {len(responses)} responses")
    return [result_row(row, response, mode) for mode in MODES
            for row, response in zip(inputs, responses, strict=True)]


# ------------------------------------------------------------------------------ results files

def write_results(path: str | Path, results: list[dict[str, Any]]) -> int:
    """Write result rows atomically (temp file + rename)."""
    return write_jsonl_atomic(path, results)


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """Result rows written by `write_results`; errors name file:line."""
    rows = []
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        if not isinstance(obj, dict) or obj.get("mode") not in MODES:
            raise ExnihiloError(f"{where}: not an IFEval result row (mode strict|loose)")
        ids, followed = obj.get("instruction_id_list"), obj.get("follow_instruction_list")
        if not isinstance(obj.get("prompt"), str) or not isinstance(ids, list) \
                or not isinstance(followed, list) or len(ids) != len(followed) \
                or not all(isinstance(f, bool) for f in followed):
            raise ExnihiloError(f"{where}: result row needs prompt, instruction_id_list and a "
                                f"follow_instruction_list of booleans of the same length")
        rows.append(obj)
    if not rows:
        raise ExnihiloError(f"{path}: no result rows")
    return rows


def check_same_prompts(results: list[dict[str, Any]], inputs: list[Prompt], source: str
                       ) -> None:
    """Refuse (with the count) a result file whose prompts differ from `inputs`, so a paired
    comparison fails before any generation rather than after."""
    theirs = {r["prompt"] for r in results if r["mode"] == "strict"}
    unmatched = len(theirs ^ {row.prompt for row in inputs})
    if unmatched:
        raise ExnihiloError(f"{source}: {unmatched} prompts are in only one of the two runs; "
                            f"compare runs over the same prompts (same --input and --limit)")


def _by_mode(results: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    return [r for r in results if r["mode"] == mode]


# ------------------------------------------------------------------------------ summary

def _interval(samples: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(samples, [2.5, 97.5])
    return float(low), float(high)


def _metrics(rows: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per prompt: all followed (0/1), instructions followed, instructions."""
    all_ok = np.array([r["follow_all_instructions"] for r in rows], dtype=float)
    followed = np.array([sum(r["follow_instruction_list"]) for r in rows], dtype=float)
    total = np.array([len(r["follow_instruction_list"]) for r in rows], dtype=float)
    return all_ok, followed, total


def _resample(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def summarize(results: list[dict[str, Any]], resamples: int = 1000, seed: int = 0
              ) -> dict[str, Any]:
    """Prompt- and instruction-level accuracy, strict and loose, each with a percentile
    bootstrap 95% interval over prompts (instruction level: followed / total over the
    resampled prompts), and a per-instruction-id table."""
    summary: dict[str, Any] = {"resamples": resamples, "seed": seed}
    by_id: dict[str, dict[str, Any]] = defaultdict(dict)
    for mode in MODES:
        rows = _by_mode(results, mode)
        if not rows:
            continue
        all_ok, followed, total = _metrics(rows)
        idx = _resample(len(rows), resamples, seed)
        boot_prompt = all_ok[idx].mean(axis=1)
        boot_instr = followed[idx].sum(axis=1) / total[idx].sum(axis=1)
        summary["n_prompts"] = len(rows)
        summary["n_instructions"] = int(total.sum())
        summary[mode] = {
            "prompt_level": {"value": float(all_ok.mean()), "ci95": _interval(boot_prompt)},
            "instruction_level": {"value": float(followed.sum() / total.sum()),
                                  "ci95": _interval(boot_instr)},
        }
        counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for row in rows:
            for iid, ok in zip(row["instruction_id_list"], row["follow_instruction_list"],
                               strict=True):
                counts[iid][0] += int(ok)
                counts[iid][1] += 1
        for iid, (ok, n) in counts.items():
            by_id[iid]["n"] = n
            by_id[iid][mode] = ok / n
    if "n_prompts" not in summary:
        raise ExnihiloError("no result rows to summarize")
    summary["by_instruction"] = dict(sorted(by_id.items()))
    return summary


def paired_difference(results_a: list[dict[str, Any]], results_b: list[dict[str, Any]],
                      resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """A minus B on the same prompts, each metric with a paired bootstrap 95% interval (the
    same resampled prompts for both). Prompts present in only one run are an error."""
    out: dict[str, Any] = {"resamples": resamples, "seed": seed}
    for mode in MODES:
        rows_a = {r["prompt"]: r for r in _by_mode(results_a, mode)}
        rows_b = {r["prompt"]: r for r in _by_mode(results_b, mode)}
        if not rows_a and not rows_b:
            continue
        unmatched = len(set(rows_a) ^ set(rows_b))
        if unmatched:
            raise ExnihiloError(f"{mode}: {unmatched} prompts are in only one of the two result "
                                f"files; compare runs over the same prompts")
        prompts = sorted(rows_a)
        a_all, a_fol, a_tot = _metrics([rows_a[p] for p in prompts])
        b_all, b_fol, b_tot = _metrics([rows_b[p] for p in prompts])
        idx = _resample(len(prompts), resamples, seed)
        d_prompt = a_all[idx].mean(axis=1) - b_all[idx].mean(axis=1)
        d_instr = a_fol[idx].sum(axis=1) / a_tot[idx].sum(axis=1) \
            - b_fol[idx].sum(axis=1) / b_tot[idx].sum(axis=1)
        out["n_prompts"] = len(prompts)
        out[mode] = {
            "prompt_level": {"value": float(a_all.mean() - b_all.mean()),
                             "ci95": _interval(d_prompt)},
            "instruction_level": {"value": float(a_fol.sum() / a_tot.sum()
                                                 - b_fol.sum() / b_tot.sum()),
                                  "ci95": _interval(d_instr)},
        }
    return out
