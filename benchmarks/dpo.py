"""DPO throughput: pairs per second and peak memory of exnihilo's DPO step on the embedded
SmolLM2-135M-Instruct (LoRA r 16, all-linear; sigmoid loss, β 0.1; batch 8 pairs; AdamW),
with the reference computed live (the adapter disabled: no second model) and precomputed
(one pass, cached), and, when TRL is installed, TRL's DPOTrainer on the same pairs and
hyperparameters, interleaved step by step (a TRL step, then one of ours) so both see the
same load on a shared CPU.

Pairs: ch07's Alpaca records rendered with the chat template; chosen = the record's answer,
rejected = the answer of the next record (a wrong answer of similar style and length).

    .venv/bin/python benchmarks/dpo.py [--steps 3] [--pairs 64] [--threads 1]

Prints one JSON object. Peak RSS is measured in a fresh subprocess running only our live-
reference steps (so the figure is that run's own peak).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from exnihilo.models import DEFAULT_MODEL, load_model, load_tokenizer
from exnihilo.train.dpo import (
    AdapterReference,
    CachedReference,
    DPOConfig,
    DPOObjective,
    collate_pairs,
    reference_table,
)
from exnihilo.train.loop import LoopConfig, make_scheduler, optimizer_step, parameter_groups
from exnihilo.train.preference_data import tokenize_pairs
from exnihilo.train.run import add_lora

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "evalsets" / "rasbt-instruction-data.json"
BATCH = 8


def preference_records(n: int) -> list[dict]:
    from exnihilo.records import read_any

    rows = read_any(DATA)[:n + 1]
    out = []
    for a, b in zip(rows[:-1], rows[1:], strict=True):
        out.append({"id": a["id"], "messages": a["messages"][:-1], "meta": {},
                    "chosen": a["messages"][-1], "rejected": b["messages"][-1]})
    return out


def our_steps(steps: int, n_pairs: int, precompute: bool) -> dict:
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    pairs = tokenize_pairs(preference_records(n_pairs), "chat", tokenizer, 512)
    cfg = DPOConfig(data="-", out="-", lr=5e-5)
    torch.manual_seed(0)
    model = add_lora(load_model(DEFAULT_MODEL), cfg)
    reference: object = AdapterReference()
    precompute_s = 0.0
    if precompute:
        started = time.perf_counter()
        reference = CachedReference(reference_table(reference, model, pairs, BATCH,
                                                    tokenizer.pad_token_id))
        precompute_s = time.perf_counter() - started
    objective = DPOObjective("sigmoid", 0.1, reference=reference)
    loop = LoopConfig(lr=5e-5)
    groups = parameter_groups(model, loop)
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=loop.lr)
    scheduler = make_scheduler(optimizer, steps + 1, loop)
    model.train()
    times = []
    for s in range(steps + 1):  # the first step is untimed (allocation warm-up)
        idx = [(s * BATCH + k) % len(pairs) for k in range(BATCH)]
        batch = collate_pairs(pairs, idx, tokenizer.pad_token_id)
        started = time.perf_counter()
        optimizer_step(model, objective, [batch], params, optimizer, scheduler, loop)
        if s:
            times.append(time.perf_counter() - started)
    return {"pairs_per_s": BATCH * len(times) / sum(times),
            "seconds_per_step": sum(times) / len(times), "precompute_seconds": precompute_s,
            "pairs": len(pairs)}


def trl_steps(steps: int, n_pairs: int) -> dict:
    """TRL's DPOTrainer on the same pairs (strings, chat template) and settings."""
    try:
        import trl  # noqa: F401
    except ImportError:
        return {"absent": "trl is not installed in this environment (pip install trl)"}
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    tokenizer = load_tokenizer(DEFAULT_MODEL)
    rows = preference_records(n_pairs)
    data = Dataset.from_list([{"prompt": r["messages"], "chosen": [r["chosen"]],
                               "rejected": [r["rejected"]]} for r in rows])
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    args = TRLConfig(output_dir="/tmp/trl-dpo-bench", per_device_train_batch_size=BATCH,
                     max_steps=steps + 1, learning_rate=5e-5, beta=0.1, max_length=512,
                     report_to=[], logging_steps=1000, save_strategy="no", use_cpu=True)
    trainer = DPOTrainer(model=load_model(DEFAULT_MODEL), args=args, train_dataset=data,
                         processing_class=tokenizer,
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                target_modules="all-linear",
                                                task_type="CAUSAL_LM"),
                         callbacks=[Timer()])
    trainer.train()
    timed = times[1:]
    return {"pairs_per_s": BATCH * len(timed) / sum(timed),
            "seconds_per_step": sum(timed) / len(timed)}


def peak_rss(steps: int, n_pairs: int, threads: int) -> float:
    """Peak RSS (MiB) of a fresh process running our live-reference steps."""
    code = (f"import resource, torch, sys; sys.path.insert(0, {str(HERE)!r}); "
            f"torch.set_num_threads({threads}); "
            f"from dpo import our_steps; our_steps({steps}, {n_pairs}, False); "
            f"print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    env = dict(os.environ, EXNIHILO_NO_PROGRESS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {"model": DEFAULT_MODEL, "batch_pairs": BATCH, "steps_timed": args.steps,
              "threads": args.threads,
              "ours_live_reference": our_steps(args.steps, args.pairs, False),
              "ours_precomputed_reference": our_steps(args.steps, args.pairs, True),
              "trl": trl_steps(args.steps, args.pairs),
              "ours_peak_rss_mib": peak_rss(args.steps, args.pairs, args.threads),
              "this_process_max_rss_mib":
                  resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    trl = result["trl"]
    if "pairs_per_s" in trl:
        result["speedup_vs_trl"] = (result["ours_live_reference"]["pairs_per_s"]
                                    / trl["pairs_per_s"])
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
