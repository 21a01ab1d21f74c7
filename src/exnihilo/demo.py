"""The demo: the main job on the embedded model, end to end, small enough for 2 CPU cores.

    Magpie synthesis from nothing → LoRA SFT on it → for the base and the tuned model:
    answers to a held-out slice of the LLMs-from-scratch ch07 instruction set (judge score,
    reference perplexity) and to a fixed slice of IFEval prompts (instructions followed,
    checked by code) → one report with 95 % bootstrap intervals and the paired differences.

The judge-free figures (IFEval, perplexity) are the ones to read: the embedded 135M judge
cannot tell right answers from wrong ones (see the README).

Every stage writes its files under `workdir` and resumes (or is reused) when rerun, so a
second `make demo` finishes in seconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exnihilo.engines.base import SamplingParams
from exnihilo.errors import ExnihiloError
from exnihilo.fields import score_of
from exnihilo.models import DEFAULT_MODEL
from exnihilo.progress import note
from exnihilo.synth.magpie import MagpieConfig, synthesize

EVAL_SET = "evalsets/rasbt-instruction-data.json"
EVAL_OFFSET = 1000  # the last 100 records: a slice no stage trains on


@dataclass
class DemoConfig:
    workdir: Path = Path("data/demo")
    n: int = 24  # Magpie pairs
    epochs: int = 2
    eval_limit: int = 20
    eval_set: Path | None = None  # default: ../shared/evalsets/rasbt-instruction-data.json
    max_new_tokens: int = 128
    ifeval_limit: int = 24  # the first N IFEval prompts (fixed slice)
    ifeval_max_new_tokens: int = 256
    seed: int = 0


@dataclass
class DemoResult:
    magpie: dict[str, Any]
    sft: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    differences: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    warning: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def demo_magpie_config(n: int, seed: int = 0) -> MagpieConfig:
    return MagpieConfig(
        n=n, seed=seed,
        instruction=SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=96),
        response=SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=256))


def find_eval_set(explicit: Path | None) -> Path:
    """The shared ch07 set: next to the checkout (../shared) or above the working folder."""
    if explicit is not None:
        return explicit
    here = Path(__file__).resolve()
    for base in [Path.cwd(), *Path.cwd().parents, *here.parents]:
        candidate = base / "shared" / EVAL_SET
        if candidate.exists():
            return candidate
    raise ExnihiloError(f"cannot find shared/{EVAL_SET} beside the checkout; pass --eval-set")


def run_magpie_stage(workdir: Path, n: int, engine: Any, seed: int = 0) -> dict[str, Any]:
    """Synthesize `n` Magpie pairs into workdir/magpie.jsonl (resumes if already there)."""
    return synthesize(engine, engine.tokenizer, demo_magpie_config(n, seed),
                      workdir / "magpie.jsonl")


def run_sft_stage(workdir: Path, data: Path, epochs: int, seed: int) -> dict[str, Any]:
    """LoRA SFT on the Magpie pairs; a finished run in workdir/sft is reused."""
    from exnihilo.train.run import read_run_info
    from exnihilo.train.sft import SFTConfig, run_sft

    out = workdir / "sft"
    info = read_run_info(out)
    if info is not None:
        note(f"reusing the finished SFT run in {out}")
        return {"out": str(out), "steps": info.get("steps"), "train_loss": info.get("train_loss"),
                "val_loss": info.get("val_loss"), "reused": True}
    cfg = SFTConfig(data=str(data), out=str(out), epochs=epochs, batch_size=8, max_length=512,
                    val_fraction=0.1, eval_every=0, save_every=0, seed=seed)
    resume = (out / "run_config.json").exists()  # an interrupted demo run continues
    result = run_sft(cfg, resume=resume)
    return {"out": result.out, "steps": result.steps, "train_loss": result.train_loss,
            "val_loss": result.val_loss,
            "trained_tokens_per_s": round(result.trained_tokens_per_s, 1), "reused": False}


def evaluate_model(label: str, engine: Any, judge: Any, records: list[dict], workdir: Path,
                   max_new_tokens: int, ifeval_inputs: list[Any], ifeval_max_new_tokens: int
                   ) -> dict[str, Any]:
    """Generate and judge on the ch07 slice, reference perplexity, and IFEval on its slice,
    for one model. Per-item values are kept (`_items`) for the paired differences."""
    from exnihilo.evaluate import (
        generate_responses,
        generation_summary,
        judge_scores,
        judge_summary,
        perplexity,
    )
    from exnihilo.ifeval import evaluate_responses, summarize, write_results
    from exnihilo.ifeval.run import answer_prompts

    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, seed=0)
    gen_path, judged_path = workdir / f"gen-{label}.jsonl", workdir / f"judged-{label}.jsonl"
    generated = generate_responses(engine, records, params, style="chat", out=gen_path)
    judged = judge_scores(judge, generated, out=judged_path)
    ppl_rows, ppl = perplexity(engine.model, engine.tokenizer, records, style="chat")
    answers = answer_prompts(engine, ifeval_inputs, ifeval_max_new_tokens, "chat",
                             workdir / f"ifeval-answers-{label}.jsonl")
    ifeval_results = evaluate_responses(ifeval_inputs, answers)
    write_results(workdir / f"ifeval-{label}.jsonl", ifeval_results)
    instr = summarize(ifeval_results)["loose"]["instruction_level"]
    gen, js = generation_summary(generated), judge_summary(judged)
    nll = [r["nll"] / r["tokens"] for r in ppl_rows]
    low, high = perplexity_interval(ppl_rows)
    scores = {r["meta"]["prompt_id"]: score_of(r) for r in judged}
    return {"model": label, "judge_mean": js["mean"], "judge_stderr": js["stderr"],
            "judged": f"{js['scored']}/{js['n']}", "unparseable": js["unparseable"],
            "perplexity": ppl["perplexity"],
            "perplexity_ci": [round(low, 3), round(high, 3)],
            "ifeval_instruction_loose": instr["value"], "ifeval_ci": instr["ci95"],
            "mean_tokens": gen["mean_completion_tokens"],
            "hit_max_tokens": gen["hit_max_new_tokens"], "generations": str(gen_path),
            "judged_file": str(judged_path),
            "_items": {"ifeval": ifeval_results, "nll": dict(zip(
                [r["id"] for r in ppl_rows], nll, strict=True)), "judge": scores}}


def perplexity_interval(rows: list[dict[str, Any]], resamples: int = 2000, seed: int = 0
                        ) -> tuple[float, float]:
    """Percentile bootstrap 95 % interval of the token-weighted perplexity (the statistic
    reported), resampling records: exp(Σ nll / Σ tokens) of each resample."""
    import numpy as np

    nll = np.array([r["nll"] for r in rows], dtype=float)
    tokens = np.array([r["tokens"] for r in rows], dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(rows), size=(resamples, len(rows)))
    ppl = np.exp(nll[idx].sum(axis=1) / tokens[idx].sum(axis=1))
    low, high = np.quantile(ppl, [0.025, 0.975])
    return float(low), float(high)


def paired_differences(base: dict[str, Any], tuned: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """tuned − base on the same items, each with a paired bootstrap 95 % interval; a
    difference is significant when its interval excludes zero."""
    from exnihilo.evaluate.stats import bootstrap_interval
    from exnihilo.ifeval import paired_difference

    out: dict[str, dict[str, Any]] = {}
    diff = paired_difference(tuned["_items"]["ifeval"], base["_items"]["ifeval"])
    instr = diff["loose"]["instruction_level"]
    out["IFEval instructions followed (loose)"] = {"value": instr["value"],
                                                   "ci95": list(instr["ci95"]), "unit": "%"}
    for name, key, unit in (("reference NLL per token", "nll", "nats"),
                            ("judge score", "judge", "points")):
        a, b = base["_items"][key], tuned["_items"][key]
        shared = [k for k in a if k in b and a[k] is not None and b[k] is not None]
        deltas = [b[k] - a[k] for k in shared]
        if deltas:
            out[name] = {"value": sum(deltas) / len(deltas),
                         "ci95": list(bootstrap_interval(deltas)), "unit": unit}
    for row in out.values():
        low, high = row["ci95"]
        row["significant"] = low is not None and (low > 0 or high < 0)
    return out


def run_demo(config: DemoConfig) -> DemoResult:
    from exnihilo.engines.transformers import TransformersEngine
    from exnihilo.evaluate import judge_warning, load_eval_set

    workdir = config.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    eval_path = find_eval_set(config.eval_set)
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    base = TransformersEngine(DEFAULT_MODEL, progress_label="magpie")
    magpie = run_magpie_stage(workdir, config.n, base, config.seed)
    seconds["magpie"] = time.perf_counter() - start

    start = time.perf_counter()
    sft = run_sft_stage(workdir, Path(magpie["out"]), config.epochs, config.seed)
    seconds["sft"] = time.perf_counter() - start

    start = time.perf_counter()
    records = load_eval_set(eval_path, limit=config.eval_limit, offset=EVAL_OFFSET)
    base.progress_label = "base: answers"
    from exnihilo.ifeval import DEFAULT_INPUT, read_inputs

    ifeval_path = find_eval_set(None).parent / DEFAULT_INPUT.name
    ifeval_inputs = read_inputs(ifeval_path, limit=config.ifeval_limit)
    rows = [evaluate_model("base", base, base, records, workdir, config.max_new_tokens,
                           ifeval_inputs, config.ifeval_max_new_tokens)]
    tuned = TransformersEngine(sft["out"], progress_label="tuned: answers")
    rows.append(evaluate_model("tuned", tuned, base, records, workdir, config.max_new_tokens,
                               ifeval_inputs, config.ifeval_max_new_tokens))
    differences = paired_differences(rows[0], rows[1])
    for row in rows:
        row.pop("_items")
    seconds["evaluate"] = time.perf_counter() - start
    return DemoResult(magpie=magpie, sft=sft, rows=rows, differences=differences,
                      files={"magpie": magpie["out"], "sft_model": sft["out"],
                             "eval_set": f"{eval_path} [{EVAL_OFFSET}:"
                                         f"{EVAL_OFFSET + config.eval_limit}]",
                             "ifeval_set": f"{ifeval_path} [0:{config.ifeval_limit}]",
                             "workdir": str(workdir)},
                      warning=judge_warning(base.name),
                      seconds={k: round(v, 1) for k, v in seconds.items()})
