"""Agreement of our IFEval checkers with the reference implementation's own result rows.

    python benchmarks/ifeval_reference.py --responses RESPONSES.jsonl \
        --strict eval_results_strict.jsonl --loose eval_results_loose.jsonl [--input IN.jsonl]

RESPONSES is a benchmark response file ({"prompt", "response"}), e.g. the GPT-4 answers the
IFEval authors publish (`data/input_response_data_gpt4_20231107_145030.jsonl`); the two
result files are what google-research's `evaluation_main.py` (NLTK Punkt, langdetect) wrote
for those answers. We score the same answers and compare every instruction's boolean, strict
and loose. Prompts the reference rows lack are left out. Prints JSON: per-mode agreement,
the differing (mode, instruction id) counts with the prompts, and both sides' accuracies.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import Any

from exnihilo.ifeval import DEFAULT_INPUT, evaluate_responses, read_inputs, read_responses
from exnihilo.records import iter_jsonl


def accuracy(rows: list[dict[str, Any]]) -> dict[str, float]:
    prompts = sum(r["follow_all_instructions"] for r in rows) / len(rows)
    followed = sum(sum(r["follow_instruction_list"]) for r in rows)
    total = sum(len(r["follow_instruction_list"]) for r in rows)
    return {"prompt_level": round(prompts, 4), "instruction_level": round(followed / total, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--responses", required=True)
    parser.add_argument("--strict", required=True)
    parser.add_argument("--loose", required=True)
    parser.add_argument("--input", default=str(DEFAULT_INPUT))
    args = parser.parse_args()

    reference = {mode: {obj["prompt"]: obj for _, obj in iter_jsonl(path)}
                 for mode, path in (("strict", args.strict), ("loose", args.loose))}
    inputs = [row for row in read_inputs(args.input) if row.prompt in reference["strict"]]
    answers = read_responses(args.responses)
    ours = evaluate_responses(inputs, [answers[row.prompt] for row in inputs])

    report: dict[str, Any] = {"prompts": len(inputs)}
    differences: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    for mode in ("strict", "loose"):
        rows = [r for r in ours if r["mode"] == mode]
        agree = total = 0
        for row in rows:
            theirs = reference[mode][row["prompt"]]["follow_instruction_list"]
            for iid, a, b in zip(row["instruction_id_list"], row["follow_instruction_list"],
                                 theirs, strict=True):
                total += 1
                agree += a == b
                if a != b:
                    key = f"{mode} {iid} (ours {a})"
                    differences[key] += 1
                    examples.setdefault(key, []).append(row["prompt"][:70])
        report[mode] = {"instructions_agreeing": f"{agree}/{total}",
                        "ours": accuracy(rows),
                        "reference": accuracy([reference[mode][r["prompt"]] for r in rows])}
    report["differences"] = {k: {"count": v, "prompts": examples[k]}
                             for k, v in differences.most_common()}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
