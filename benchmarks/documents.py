"""Document synthesis methods side by side: joint (the paper's) vs stepwise (quote, generate).

The same chunks of the installed `json` module's documentation go through each method with
the same model, greedy. Reported per method: pairs, seconds, pairs/min, and a grounding
proxy computed the same way for every method: the share of answers whose content words are
at least 80 % found in their chunk (`lexical_support`, the number the stepwise `generate`
gate uses). Quoted answers meet it by construction; it is printed for them as a check.
Prints one JSON object; `--show` adds a few pairs per method to read.

Usage: python benchmarks/documents.py [--chunks 8] [--pairs 3] [--modules json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("EXNIHILO_NO_PROGRESS", "1")

from exnihilo.embedder import load_embedder  # noqa: E402
from exnihilo.engines.base import SamplingParams  # noqa: E402
from exnihilo.engines.transformers import TransformersEngine  # noqa: E402
from exnihilo.records import read_records  # noqa: E402
from exnihilo.synth.documents import DocumentsConfig, synthesize_documents  # noqa: E402
from exnihilo.synth.evidence import lexical_support  # noqa: E402
from exnihilo.synth.ingest import chunk_documents, pydoc_documents  # noqa: E402

METHODS = {
    "joint": dict(method="joint", generation=SamplingParams(temperature=0.0,
                                                            max_new_tokens=384)),
    "stepwise_quote": dict(method="stepwise", answers="quote"),
    "stepwise_generate": dict(method="stepwise", answers="generate"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--modules", default="json")
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--chunk-tokens", type=int, default=384)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--show", type=int, default=0)
    args = parser.parse_args()

    engine = TransformersEngine(args.model, batch_size=32)
    embedder = load_embedder()
    docs = pydoc_documents(args.modules.split(",")).documents
    chunks = chunk_documents(docs, engine.tokenizer, args.chunk_tokens, 32)[0][:args.chunks]
    result: dict = {"model": args.model, "modules": args.modules, "chunks": len(chunks),
                    "pairs_per_chunk": args.pairs}
    with tempfile.TemporaryDirectory() as tmp:
        for name, options in METHODS.items():
            config = DocumentsConfig(context_tokens=2048, pairs_per_chunk=args.pairs,
                                     batch_chunks=8, **options)
            out = Path(tmp) / f"{name}.jsonl"
            start = time.perf_counter()
            summary = synthesize_documents(engine, engine.tokenizer, chunks, config, out,
                                           embedder=embedder)
            seconds = time.perf_counter() - start
            records = read_records(out) if out.exists() else []
            support = [lexical_support(r["messages"][1]["content"],
                                       [r["meta"]["source_chunk"]["text"]]) for r in records]
            result[name] = {
                "pairs": len(records), "seconds": round(seconds, 1),
                "pairs_per_min": round(60 * len(records) / seconds, 1),
                "supported_share": round(sum(s >= 0.8 for s in support) / len(support), 3)
                if support else None,
                "supported_pairs": sum(s >= 0.8 for s in support),
                "mean_support": round(sum(support) / len(support), 3) if support else None,
                "chunks_without_pairs": summary["chunks_without_pairs"],
                "questions_rejected": summary.get("questions_rejected"),
            }
            if args.show:
                result[name]["examples"] = [[m["content"][:200] for m in r["messages"]]
                                            for r in records[:args.show]]
    joint, quote = result["joint"], result["stepwise_quote"]
    if joint["supported_pairs"]:
        result["supported_pairs_ratio_quote_vs_joint"] = round(
            quote["supported_pairs"] / joint["supported_pairs"], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
