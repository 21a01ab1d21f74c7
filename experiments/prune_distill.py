"""Minitron on the embedded model: SmolLM2-135M pruned to about half its parameters and
recovered by distillation vs a same-shape model trained from scratch, equal tokens.

    python experiments/prune_distill.py --quick --out runs/exp-prune   # minutes
    python experiments/prune_distill.py --out runs/exp-prune-full      # ~1 h, 1 thread

Pruning: 30 → 16 layers by block importance and half the MLP neurons (1536 → 768), scored
on calibration rows of the training text: 134.5M → ~64M parameters (the 28.3M embedding
kept). Both arms then train with the same objective (forward KL to the 135M teacher's
top-k, τ = 1, Minitron's logit-only recovery) on the same rows for the same token budget;
they differ only in where the weights start: the pruned model, or a random init of the
same config. Rates: 2e-4 for the pruned model (it starts trained), 1e-3 from scratch
(a small random model needs a large rate); the pruned model before recovery and the
teacher are listed for reference.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import (
    HELDOUT_MODULES,
    TRAIN_MODULES,
    arm_row,
    document_nll,
    module_docs,
    save_results,
    split_paragraph_docs,
    threads,
    write_text_jsonl,
)

QUICK = dict(train_modules=2, train_docs=8, heldout_docs=8, seq_len=128, tokens=1_024,
             batch_size=4, calibration_rows=8, depth=16, mlp=0.5, top_k=32, eval_len=64)
# The full size: 64k tokens per arm (0.4 epoch of the 165k-token corpus). A ~64M model trains
# at roughly 30-60 tokens/s on one thread here, so both arms take about 45 min in all.
FULL = dict(train_modules=len(TRAIN_MODULES), train_docs=None, heldout_docs=120, seq_len=256,
            tokens=65_536, batch_size=8, calibration_rows=128, depth=16, mlp=0.5, top_k=32,
            eval_len=256)
TEACHER = "smollm2-135m-instruct"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="minutes, for CI")
    parser.add_argument("--out", default="runs/exp-prune")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=None,
                        help="override the size's tokens")
    parser.add_argument("--train-docs", type=int, default=None,
                        help="override the size's train_docs")
    parser.add_argument("--heldout-docs", type=int, default=None,
                        help="override the size's heldout_docs")
    args = parser.parse_args()
    threads(1)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from exnihilo.models import load_model, load_tokenizer
    from exnihilo.prune import PruneTargets, run_prune
    from exnihilo.train.distill import DistillConfig, run_distill

    s = dict(QUICK if args.quick else FULL)
    overrides = ("tokens", "train_docs", "heldout_docs")
    s.update({k: getattr(args, k) for k in overrides if getattr(args, k) is not None})
    out = Path(args.out)
    started = time.perf_counter()
    tokenizer = load_tokenizer(TEACHER)
    train = split_paragraph_docs(module_docs(TRAIN_MODULES[:s["train_modules"]]),
                                 2000)[:s["train_docs"]]
    heldout = split_paragraph_docs(module_docs(HELDOUT_MODULES), 2000)[:s["heldout_docs"]]
    data = write_text_jsonl(out / "data" / "train.jsonl", train)

    pruned = run_prune(TEACHER, str(data), str(out / "pruned"),
                       PruneTargets(depth=s["depth"], mlp=s["mlp"]),
                       rows=s["calibration_rows"], seq_len=s["seq_len"], seed=args.seed)
    print(f"pruned: {pruned.params_before:,} → {pruned.params_after:,} parameters, kept "
          f"layers {pruned.layers}")
    torch.manual_seed(args.seed)
    scratch_init = out / "scratch-init"
    if not (scratch_init / "config.json").exists():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out / "pruned"))
        model.save_pretrained(scratch_init)
        tokenizer.save_pretrained(scratch_init)

    common = dict(data=str(data), teacher=TEACHER, seq_len=s["seq_len"], tokens=s["tokens"],
                  batch_size=s["batch_size"], val_fraction=0.0, eval_every=0, save_every=0,
                  seed=args.seed, warmup_ratio=0.02, loss="forward_kl", top_k=s["top_k"])
    arms = {}
    kd = run_distill(DistillConfig(out=str(out / "pruned-distilled"), model=str(out / "pruned"),
                                   lr=2e-4, **common), tokenizer=tokenizer)
    arms["pruned + distilled"] = (out / "pruned-distilled", kd)
    scratch = run_distill(DistillConfig(out=str(out / "scratch-distilled"),
                                        model=str(scratch_init), lr=1e-3, **common),
                          tokenizer=tokenizer)
    arms["same shape from scratch, distilled"] = (out / "scratch-distilled", scratch)

    rows, baseline = [], None
    for name, (folder, result) in arms.items():
        model = AutoModelForCausalLM.from_pretrained(folder)
        scores = document_nll(model, tokenizer, heldout, s["eval_len"])
        rows.append(arm_row(name, scores, baseline, {
            "trained_tokens": s["tokens"], "train_seconds": result.train_seconds,
            "params": pruned.params_after}))
        baseline = baseline or scores
    before = document_nll(AutoModelForCausalLM.from_pretrained(out / "pruned"), tokenizer,
                          heldout, s["eval_len"])
    rows.append(arm_row("pruned, before recovery (reference)", before, None))
    teacher = document_nll(load_model(TEACHER), tokenizer, heldout, s["eval_len"])
    rows.append(arm_row(f"teacher {TEACHER} (reference)", teacher, None,
                        {"params": pruned.params_before}))
    settings = {**s, "seed": args.seed, "quick": args.quick, "teacher": TEACHER,
                "kept_layers": pruned.layers, "params_after": pruned.params_after,
                "wall_seconds": round(time.perf_counter() - started)}
    save_results(out, "prune + distill vs scratch", rows, settings, "pruned + distilled")


if __name__ == "__main__":
    main()
