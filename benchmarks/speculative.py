"""Speculative decoding at batch 1: acceptance rate and speedup over plain decoding.

Target: the embedded SmolLM2-135M-Instruct. Draft: by default the same model pruned in depth
to `--draft-layers` of its 30 layers (`exnihilo.prune`, block importance on a calibration
text) — undistilled, so its acceptance is a floor; pass `--draft FOLDER` for a distilled
student. Both arms decode the same prompts greedily, one at a time, alternating, in one
process with pinned threads; the outputs must be token-identical (checked). Prints JSON.

Usage: python benchmarks/speculative.py [--threads 1] [--prompts 6] [--max-new-tokens 96]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

os.environ.setdefault("EXNIHILO_NO_PROGRESS", "1")

from exnihilo.engines.base import SamplingParams  # noqa: E402
from exnihilo.engines.speculative import SpeculativeEngine  # noqa: E402
from exnihilo.engines.transformers import TransformersEngine  # noqa: E402
from exnihilo.models import DEFAULT_MODEL, load_model  # noqa: E402

PROMPTS = ["Explain what a hash table is.", "Write a short poem about autumn.",
           "List three uses of Python.", "What causes rain?", "Describe a cat to a child.",
           "Give two tips for writing clear emails.", "What is photosynthesis?",
           "Summarize the plot of Cinderella."]


def pruned_draft(layers: int, workdir: str) -> str:
    from exnihilo.prune import PruneTargets, run_prune

    corpus = os.path.join(workdir, "calibration.jsonl")
    with open(corpus, "w") as f:
        for text in PROMPTS * 8:
            f.write(json.dumps({"text": text + " " + text}) + "\n")
    out = os.path.join(workdir, "draft")
    run_prune(DEFAULT_MODEL, corpus, out, PruneTargets(depth=layers), rows=8, seq_len=64,
              batch_size=4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--draft", default=None)
    parser.add_argument("--draft-layers", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    target = TransformersEngine(DEFAULT_MODEL, batch_size=1)
    with tempfile.TemporaryDirectory() as workdir:
        draft_path = args.draft or pruned_draft(args.draft_layers, workdir)
        spec = SpeculativeEngine(target, load_model(draft_path))
        params = SamplingParams(temperature=0.0, max_new_tokens=args.max_new_tokens)
        convs = [[{"role": "user", "content": p}] for p in PROMPTS[:args.prompts]]
        times = {"plain": 0.0, "speculative": 0.0}
        tokens = {"plain": 0, "speculative": 0}
        identical = 0
        for conv in convs:  # alternate arms prompt by prompt: load drifts hit both
            start = time.perf_counter()
            plain = target.chat([conv], params)[0]
            times["plain"] += time.perf_counter() - start
            start = time.perf_counter()
            fast = spec.chat([conv], params)[0]
            times["speculative"] += time.perf_counter() - start
            tokens["plain"] += plain.completion_tokens
            tokens["speculative"] += fast.completion_tokens
            identical += int(plain.text == fast.text)
    rate = {k: tokens[k] / times[k] for k in times}
    print(json.dumps({
        "threads": args.threads, "load_average": os.getloadavg()[0],
        "draft": args.draft or f"SmolLM2-135M depth-pruned to {args.draft_layers} layers "
                               f"(undistilled)",
        "prompts": len(convs), "max_new_tokens": args.max_new_tokens,
        "tokens_per_s": {k: round(v, 2) for k, v in rate.items()},
        "speedup": round(rate["speculative"] / rate["plain"], 3),
        "acceptance_rate": round(spec.acceptance_rate, 3),
        "target_passes_per_token": round(spec.stats["target_passes"]
                                         / max(spec.stats["tokens"], 1), 3),
        "greedy_identical": f"{identical}/{len(convs)}"}, indent=2))


if __name__ == "__main__":
    main()
