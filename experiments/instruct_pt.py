"""Instruction Pre-Training end to end (Cheng et al., arXiv 2406.14491): Vanilla PT vs Mix PT
vs Instruct PT at an equal token budget, from scratch on a tiny Gemma 2 (and, with
--continual, as continual pretraining of SmolLM2-135M), by held-out perplexity.

    python experiments/instruct_pt.py --quick --out runs/exp-ipt     # minutes (+ synthesis)
    python experiments/instruct_pt.py --out runs/exp-ipt-full [--continual]

1. `exnihilo synth documents --pydoc <modules> --corpus-out` writes instruction-augmented
   texts (each chunk of the standard library's documentation followed by question–answer
   pairs about it, written by the embedded 135M with the stepwise method). Resumable.
2. Corpora over the same chunks: Vanilla = the chunks' raw text; Mix = raw + general
   instruction data (LLMs-from-scratch ch07's 1,100 examples rendered as text with the
   synthesizer's own pair templates, as many as there are chunks); Instruct = the
   augmented texts + the same general texts (the paper's Instruct PT mixes in the
   synthesizer's fine-tuning data).
3. Each arm trains the same preset from the same seed for the same --tokens (corpora repeat
   as needed), and is scored on held-out modules' raw documentation.

Measured here: (a) held-out raw-text perplexity only. The issue's (b) multiple-choice
accuracy on held-out questions and (c) the same short instruction tuning afterwards are
not run by this script.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import (
    HELDOUT_MODULES,
    ROOT,
    TRAIN_MODULES,
    arm_row,
    document_nll,
    module_docs,
    save_results,
    split_paragraph_docs,
    threads,
    write_text_jsonl,
)

QUICK = dict(preset="gemma2-micro", modules=8, chunks=40, chunk_tokens=256, heldout_docs=24,
             seq_len=128, tokens=8_192, batch_size=8, lr=3e-3, eval_len=128)
FULL = dict(preset="gemma2-tiny", modules=24, chunks=240, chunk_tokens=256,
            heldout_docs=200, seq_len=256, tokens=1_000_000, batch_size=8, lr=2e-3,
            eval_len=256)
SYNTHESIZER = "smollm2-135m-instruct"
GENERAL = ROOT.parent / "shared" / "evalsets" / "rasbt-instruction-data.json"


def synthesize(out: Path, s: dict) -> tuple[Path, Path]:
    """Run (or resume) the documents synthesizer; returns (records, augmented corpus)."""
    records, augmented = out / "synth" / "pairs.jsonl", out / "synth" / "augmented.jsonl"
    records.parent.mkdir(parents=True, exist_ok=True)
    if not augmented.exists():
        cmd = [sys.executable, "-m", "exnihilo.cli", "synth", "documents", "--pydoc",
               ",".join(TRAIN_MODULES[:s["modules"]]), "--limit-chunks", str(s["chunks"]),
               "--chunk-tokens", str(s["chunk_tokens"]), "--pairs-per-chunk", "3",
               "-o", str(records), "--corpus-out", str(augmented), "--batch-size", "8"]
        subprocess.run(cmd, check=True, env={**__import__("os").environ,
                                             "PYTHONPATH": str(ROOT / "src")})
    return records, augmented


def raw_chunks(records: Path, augmented: list[str], seed: int = 0) -> list[str]:
    """The raw text of exactly the chunks in the augmented corpus: each augmented text is
    `chunk text + "\n\n" + rendered pairs`, and the rendering is reproducible (the
    template is drawn from Random(f"{seed}:{chunk id}"), as `corpus_texts` does), so the
    suffix is stripped exactly. (Re-chunking the module docs is not safe: their text can
    differ between processes.) A text with no pairs is its chunk's raw text already."""
    import random

    from exnihilo.synth.documents import load_done
    from exnihilo.synth.pairs import PAIR_TEMPLATES, Pair, render_pairs

    suffixes = []
    for cid, row in load_done(records).items():
        pairs = [Pair(p["instruction"], p["response"]) for p in row["pairs"]
                 if p.get("grounded") is not False]
        if pairs:
            template = random.Random(f"{seed}:{cid}").choice(PAIR_TEMPLATES)
            suffixes.append("\n\n" + render_pairs(pairs, template))
    raw = []
    for text in augmented:
        match = next((sfx for sfx in suffixes if text.endswith(sfx)), None)
        raw.append(text[:-len(match)] if match else text)
    stripped = sum(a != r for a, r in zip(augmented, raw, strict=True))
    if stripped == 0:
        raise SystemExit("no augmented text ends with its chunk's rendered pairs")
    return raw


def general_texts(n: int) -> list[str]:
    from exnihilo.records import read_any
    from exnihilo.synth.documents import general_text

    records = read_any(GENERAL)
    return [general_text(records[i % len(records)], i) for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="minutes, for CI")
    parser.add_argument("--out", default="runs/exp-ipt")
    parser.add_argument("--continual", action="store_true",
                        help="also continual pretraining of SmolLM2-135M (slow)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=None,
                        help="override the size's tokens")
    args = parser.parse_args()
    threads(1)
    from transformers import AutoModelForCausalLM

    from exnihilo.models import load_tokenizer
    from exnihilo.train.pretrain import PretrainConfig, run_pretrain

    s = dict(QUICK if args.quick else FULL)
    if args.tokens is not None:
        s["tokens"] = args.tokens
    out = Path(args.out)
    started = time.perf_counter()
    tokenizer = load_tokenizer(SYNTHESIZER)
    records, augmented = synthesize(out, s)
    aug = [json.loads(line)["text"] for line in augmented.read_text().splitlines() if line]
    raw = raw_chunks(records, aug)
    general = general_texts(len(raw))
    corpora = {"Vanilla PT (raw)": write_text_jsonl(out / "data" / "vanilla.jsonl", raw),
               "Mix PT (raw + general)": write_text_jsonl(out / "data" / "mix.jsonl",
                                                          raw + general),
               "Instruct PT (augmented + general)": write_text_jsonl(
                   out / "data" / "instruct.jsonl", aug + general)}
    heldout = split_paragraph_docs(module_docs(HELDOUT_MODULES), 2000)[:s["heldout_docs"]]

    setups = [("scratch", dict(arch=s["preset"], lr=s["lr"]))]
    if args.continual:
        setups.append(("continual", dict(arch=None, model=SYNTHESIZER, lr=5e-5)))
    rows = []
    for setup, extra in setups:
        baseline = None
        for k, (name, data) in enumerate(corpora.items()):
            folder = out / f"{setup}-{k}"
            if not (folder / "exnihilo_run.json").exists():
                run_pretrain(PretrainConfig(
                    data=str(data), out=str(folder), seq_len=s["seq_len"], tokens=s["tokens"],
                    batch_size=s["batch_size"], val_fraction=0.0, eval_every=0, save_every=0,
                    seed=args.seed, warmup_ratio=0.02, **extra), tokenizer=tokenizer)
            info = json.loads((folder / "exnihilo_run.json").read_text())
            model = AutoModelForCausalLM.from_pretrained(folder)
            scores = document_nll(model, tokenizer, heldout, s["eval_len"])
            rows.append(arm_row(f"{setup}: {name}", scores, baseline, {
                "trained_tokens": info["trained_tokens"],
                "train_seconds": json.loads((folder / "metrics.jsonl").read_text()
                                            .splitlines()[-1])["train_seconds"],
                "corpus_documents": info["data"]["documents"]}))
            baseline = baseline or scores
    settings = {**s, "seed": args.seed, "quick": args.quick, "chunks_used": len(raw),
                "augmented_texts": len(aug), "general_texts": len(general),
                "wall_seconds": round(time.perf_counter() - started)}
    save_results(out, "Instruction Pre-Training: Vanilla vs Mix vs Instruct", rows, settings,
                 "Vanilla PT")


if __name__ == "__main__":
    main()
