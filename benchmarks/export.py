"""GGUF export fidelity: the exported file run by the real llama.cpp vs the transformers model.

    python benchmarks/export.py                 # SmolLM2-135M-Instruct: f16 q8_0 q4_1 q4_0
    python benchmarks/export.py --model runs/sft1 --types f16 q8_0 --positions 2048

Held-out text: the last records of LLMs-from-scratch's instruction data
(../shared/evalsets/rasbt-instruction-data.json), each rendered as a chat with the model's
template (what the exported model will be prompted with), joined and cut into windows of
--ctx tokens. For every position, both runtimes give next-token logits for the same token ids
(the HF tokenizer's; the tokenizer round trip is tested separately): we report top-1 agreement
with transformers (float32), mean KL(transformers || llama.cpp) in nats, the largest logit
difference, file size and export time; and the same figures for the file read back by
transformers (`transformers_on_gguf`: the weights' rounding alone, without llama.cpp's own
arithmetic). One thread everywhere (the machine is shared). Prints JSON.

The embedded SmolLM2 was itself dequantized from a Q4_1 GGUF, so its weights lie on a Q4_1
grid: q4_1 re-creates that grid almost exactly, while q4_0 rounds it a second time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from exnihilo.export.gguf import export_gguf  # noqa: E402

EVALSET = Path(__file__).resolve().parents[2] / "shared" / "evalsets" / \
    "rasbt-instruction-data.json"


def held_out_ids(tokenizer, n_tokens: int) -> list[int]:
    """Chat-rendered records from the end of the instruction data, `n_tokens` ids in all."""
    records = json.loads(EVALSET.read_text())
    ids: list[int] = []
    for rec in reversed(records):
        user = rec["instruction"] + (f"\n\n{rec['input']}" if rec["input"] else "")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}],
            tokenize=False)
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
    raise SystemExit(f"{EVALSET} has fewer than {n_tokens} tokens")


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def hf_logits(model, windows: list[list[int]]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return np.concatenate([model(torch.tensor([w])).logits[0].double().numpy()
                               for w in windows])


def llama_cpp_logits(path: Path, windows: list[list[int]], ctx: int) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=ctx, n_batch=ctx, logits_all=True,
                          n_threads=1, verbose=False)
    out = []
    for window in windows:
        llm.reset()
        llm.eval(window)
        out.append(np.array(llm.scores[:len(window)], dtype=np.float64))
    return np.concatenate(out)


def transformers_on_gguf(path: Path, windows: list[list[int]]) -> np.ndarray:
    """The same file read back by transformers (dequantized weights, float32 activations):
    separates the weights' rounding from llama.cpp's own arithmetic (its quantized matmuls
    also round the activations to 8 bits, and it keeps the KV cache in f16)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    return hf_logits(model, windows)


def compare(reference: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    lp, lq = log_softmax(reference), log_softmax(logits)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    return {"top1_agreement": round(float((reference.argmax(-1) == logits.argmax(-1)).mean()), 5),
            "mean_kl": float(f"{kl.mean():.3g}"), "max_kl": float(f"{kl.max():.3g}"),
            "max_abs_logit_diff": round(float(np.abs(reference - logits).max()), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--types", nargs="+", default=["f16", "q8_0", "q4_1", "q4_0"])
    parser.add_argument("--no-weights-only", action="store_true",
                        help="Skip reading each file back with transformers (slow: ~30 s).")
    parser.add_argument("--positions", type=int, default=1024)
    parser.add_argument("--ctx", type=int, default=512)
    args = parser.parse_args()

    import torch

    from exnihilo.models import load_model, load_tokenizer, resolve_model

    torch.set_num_threads(1)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model)
    ids = held_out_ids(tokenizer, args.positions)
    windows = [ids[i:i + args.ctx] for i in range(0, len(ids), args.ctx)]
    started = time.perf_counter()
    reference = hf_logits(model, windows)
    hf_seconds = time.perf_counter() - started
    source_bytes = sum(p.stat().st_size for p in resolve_model(args.model).glob("*.safetensors"))

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for qtype in args.types:
            started = time.perf_counter()
            export = export_gguf(args.model, Path(tmp) / f"model-{qtype}.gguf", qtype)
            export_seconds = time.perf_counter() - started
            started = time.perf_counter()
            logits = llama_cpp_logits(export.path, windows, args.ctx)
            results[qtype] = {
                **compare(reference, logits),
                "file_mib": round(export.size_bytes / 2**20, 1),
                "export_s": round(export_seconds, 1),
                "llama_cpp_eval_s": round(time.perf_counter() - started, 1),
                "tensor_types": export.tensor_types}
            if not args.no_weights_only:
                results[qtype]["transformers_on_gguf"] = compare(
                    reference, transformers_on_gguf(export.path, windows))
            export.path.unlink()
    print(json.dumps({
        "model": args.model, "positions": len(ids), "ctx": args.ctx,
        "text": f"last records of {EVALSET.name}, chat-rendered",
        "reference": "transformers float32", "source_safetensors_mib":
            round(source_bytes / 2**20, 1), "transformers_eval_s": round(hf_seconds, 1),
        "threads": 1, "machine": platform.machine(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
