"""The judge-free proof: does preference optimization on the model's own samples, scored by
IFEval's checkers, make SmolLM2-135M-Instruct follow instructions better?

    python experiments/dpo_ifeval.py --out runs/proof            # ~3 h at 1 thread (see below)
    python experiments/dpo_ifeval.py --out runs/proof-q --quick  # the same path in minutes

Stages (each resumable; rerun the same command after a kill):
1. constraint prompts: ch07's instructions + 1–3 IFEval-style constraints
   (`synth.constraints`; instructions overlapping the 541 evaluation prompts are dropped);
2. pairs: N samples per prompt from the base model, scored by `ifeval` (loose fraction of
   instructions followed), best vs worst with DICE's length regularization;
3. DPO (LoRA, sigmoid) on those pairs;
4. DICE iteration 1 from the DPO model (implicit reward against the base, replay 0.5 of
   the stage-2 pairs, on other constraint prompts);
5. IFEval on the held-out 541 prompts (greedy; `--quick`: the first 20) for base, DPO and
   DICE-1: prompt- and instruction-level, strict and loose, bootstrap 95 % intervals, the
   paired difference against the base (DICE-1 also against DPO), mean response length; and
   reference perplexity on ch07 records (did anything else get worse?).

Measured (full size, 1 thread, shared 2-core CPU; experiments/results/dpo_ifeval/): IFEval
instruction-level loose, all 541 prompts: base 32.0 %, DPO 35.5 %, DICE-1 36.1 %; paired
vs base +3.5 [+1.5, +5.6] and +4.1 [+1.7, +6.6]; DICE-1 vs DPO +0.6 [-1.5, +2.8]. Each
541-prompt evaluation takes about 40 minutes at 1 thread; the issue's one-hour size would
need the evaluations on more cores or a smaller --eval set.

Prints one JSON report and writes it to <out>/report.json (rewritten after every stage).
Greedy decoding does not depend on the batch size beyond fp32 rounding, so the base answers
of an earlier `eval ifeval` run (same sampling; batch 16) can be reused with --base-answers.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from exnihilo.engines import make_engine
from exnihilo.models import DEFAULT_MODEL, load_model, load_tokenizer
from exnihilo.records import make_record, read_any, write_jsonl_atomic

SHARED = Path(__file__).resolve().parents[2] / "shared" / "evalsets"
IFEVAL = SHARED / "ifeval-input-data.jsonl"
CH07 = SHARED / "rasbt-instruction-data.json"

FULL = dict(train_prompts=100, dice_prompts=50, n=6, sample_tokens=256, eval_prompts=None,
            eval_tokens=512, epochs=2, batch=8, lr=1e-4, ppl_records=100, batch_gen=32,
            batch_sample=30, val=0.1)
QUICK = dict(train_prompts=16, dice_prompts=8, n=4, sample_tokens=160, eval_prompts=20,
             eval_tokens=96, epochs=1, batch=2, lr=1e-4, ppl_records=20, batch_gen=16,
             batch_sample=16, val=0.0)


def instructions(start: int, count: int) -> list[dict[str, Any]]:
    """ch07 instructions without an input field (their text stands alone), as records."""
    rows = [r for r in json.loads(CH07.read_text()) if not r.get("input")]
    return [make_record([{"role": "user", "content": r["instruction"]}])
            for r in rows[start:start + count]]


def stage_constraints(out: Path, s: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    from exnihilo.synth.constraints import make_constraint_prompts

    path = out / "constraints.jsonl"
    if not path.exists():
        rows, _ = make_constraint_prompts(instructions(0, s["train_prompts"] + s["dice_prompts"]
                                                       + 20), seed=0, eval_path=IFEVAL)
        write_jsonl_atomic(path, rows[:s["train_prompts"] + s["dice_prompts"]])
    records = read_any(path)
    train, dice = s["train_prompts"], s["dice_prompts"]
    return records[:train], records[train:train + dice]


def stage_pairs(out: Path, prompts: list[Any], s: dict[str, Any]) -> dict[str, Any]:
    from exnihilo.synth.preference import IFEvalScorer, PairsConfig, summary_path, synthesize_pairs

    path = out / "pairs.jsonl"
    summary = summary_path(path)
    if not summary.exists():
        engine = make_engine("transformers", DEFAULT_MODEL, batch_size=s["batch_sample"])
        cfg = PairsConfig(n=s["n"], max_new_tokens=s["sample_tokens"], alpha_step=1e-5,
                          prompts_per_call=max(1, s["batch_sample"] // s["n"]))
        synthesize_pairs(engine, IFEvalScorer(), prompts, cfg, path)
    return json.loads(summary.read_text())


def stage_dpo(out: Path, s: dict[str, Any]) -> str:
    from exnihilo.train.dpo import DPOConfig, run_dpo

    folder = out / "dpo"
    if not (folder / "exnihilo_run.json").exists():
        cfg = DPOConfig(data=str(out / "pairs.jsonl"), out=str(folder), beta=0.1, lr=s["lr"],
                        epochs=s["epochs"], batch_size=s["batch"], max_length=768,
                        val_fraction=s["val"], eval_every=20, save_every=20)
        run_dpo(cfg, resume=folder.exists())
    return str(folder)


def stage_dice(out: Path, dpo: str, prompts: list[Any], s: dict[str, Any]) -> str:
    from exnihilo.train.dice import DiceConfig, iteration_dir, run_dice

    prompt_file = out / "dice_prompts.jsonl"
    if not prompt_file.exists():
        write_jsonl_atomic(prompt_file, prompts)
    cfg = DiceConfig(model=dpo, reference=DEFAULT_MODEL, prompts=str(prompt_file),
                     out=str(out / "dice"), iterations=1, n=s["n"],
                     max_new_tokens=s["sample_tokens"], alpha_step=1e-3, replay=0.5,
                     offline=str(out / "pairs.jsonl"),
                     dpo=dict(beta=0.1, lr=s["lr"], epochs=s["epochs"], batch_size=s["batch"],
                              max_length=768, val_fraction=s["val"]))
    run_dice(cfg, lambda m: make_engine("transformers", m, batch_size=s["batch_sample"]))
    return str(iteration_dir(out / "dice", 1) / "model")


def ifeval_results(out: Path, name: str, model: str, s: dict[str, Any]) -> list[dict]:
    from exnihilo.engines.base import SamplingParams
    from exnihilo.evaluate import generate_responses

    score = importlib.import_module("exnihilo.ifeval.score")  # the evaluation issue's module
    inputs = score.read_inputs(IFEVAL, s["eval_prompts"])
    records = [make_record([{"role": "user", "content": row.prompt}]) for row in inputs]
    engine = make_engine("transformers", model, batch_size=s["batch_gen"])
    params = SamplingParams(temperature=0.0, max_new_tokens=s["eval_tokens"], seed=0)
    answers = generate_responses(engine, records, params, out=out / f"ifeval-{name}.jsonl")
    return score.evaluate_responses(inputs, [a["messages"][-1]["content"] for a in answers])


def reference_perplexity(model: str, s: dict[str, Any]) -> float:
    from exnihilo.evaluate import perplexity

    records = read_any(CH07)[-s["ppl_records"]:]  # the end of the set: unused above
    _, summary = perplexity(load_model(model), load_tokenizer(model), records)
    return summary["perplexity"]


def model_report(out: Path, name: str, path: str, s: dict[str, Any],
                 against: dict[str, list[dict]] | None = None
                 ) -> tuple[dict[str, Any], list[dict]]:
    """IFEval (with paired differences against earlier models, e.g. {"base": ...}) and
    reference perplexity."""
    from exnihilo.ifeval.score import paired_difference, summarize

    results = ifeval_results(out, name, path, s)
    strict = [r for r in results if r["mode"] == "strict"]
    entry: dict[str, Any] = {
        "ifeval": {k: v for k, v in summarize(results).items() if k != "by_instruction"},
        "mean_response_chars": sum(len(r["response"]) for r in strict) / len(strict),
        "reference_perplexity": reference_perplexity(path, s)}
    for other, other_results in (against or {}).items():
        entry[f"vs_{other}"] = paired_difference(results, other_results)
    return entry, results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("THREADS", "1")))
    parser.add_argument("--base-answers", type=Path, default=None,
                        help="the base model's IFEval answers from an earlier run with the same "
                             "sampling (e.g. `eval ifeval --responses-out`); reused, not "
                             "regenerated (generation refuses a file with other sampling)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    s = QUICK if args.quick else FULL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.base_answers and not (out / "ifeval-base.jsonl").exists():
        shutil.copyfile(args.base_answers, out / "ifeval-base.jsonl")

    train_prompts, dice_prompts = stage_constraints(out, s)
    report: dict[str, Any] = {"settings": s, "threads": args.threads, "models": {}}

    started = time.monotonic()

    def save() -> None:  # after every stage, so a long run shows what it has so far
        report["wall_seconds_this_process"] = round(time.monotonic() - started)
        (out / "report.json").write_text(json.dumps(report, indent=2))

    report["models"]["base"], base = model_report(out, "base", DEFAULT_MODEL, s)
    save()
    report["pairs"] = stage_pairs(out, train_prompts, s)
    save()
    dpo = stage_dpo(out, s)
    report["models"]["dpo"], dpo_results = model_report(out, "dpo", dpo, s, {"base": base})
    save()
    dice = stage_dice(out, dpo, dice_prompts, s)
    report["models"]["dice1"], _ = model_report(out, "dice1", dice, s,
                                                {"base": base, "dpo": dpo_results})
    save()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
