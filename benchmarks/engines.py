"""Magpie pairs/minute: the `openai` engine through a real llama.cpp server (llama-cpp-python,
the embedded SmolLM2-135M GGUF, 127.0.0.1) at several concurrencies, against the in-process
`llamacpp` engine (many sequences per llama_batch; F16 weights, its default, and the GGUF as
shipped, Q4_1) and the local `transformers` engine, on the same Magpie settings and seeds,
one run each, in one process.

    .venv/bin/python benchmarks/engines.py [--n 8] [--concurrency 1 4 16] [--threads 1]

Prints one JSON object. Needs scripts/test-deps/llama-server.sh. Ratios are against the
transformers engine and against the server at its best concurrency, measured in the same run
(`--threads` is the thread count of the server and of the llamacpp engine alike). The
engines sample differently (llama.cpp's sampler on a Q4_1 or F16 model vs ours on its fp32
dequantisation), so their outputs and discard rates differ: compare pairs/minute *and*
generated tokens/s.

Measured 2026-12-01 (--n 24 --threads 1 --concurrency 4 16, load 2.9 -> 2.0), pairs/min and
generated tok/s: server c=4 15.5 / 37.3 (its best), c=16 12.7 / 30.5; in-process llamacpp F16
batch 32 15.7 / 49.6, Q4_1 15.0 / 43.9; transformers fp32 batch 16 16.0 / 36.1. Parity: the
llamacpp engine generates 1.33x the server's tokens/s, but Magpie's rounds wait for their
longest row, and it discarded more candidates (74 vs 56) in this run.

Measured 2026-12-01 on a 2-core CPU with AVX512-BF16/AMX, idle (--n 64 --threads 1
--torch-threads 1 --concurrency 1 4 --skip-llamacpp; two runs, --dtypes auto float32 and
float32 auto), pairs/min and generated tok/s:
  server (Q4_1, x86-64-v3 build)  c=1 14.1 / 35.4, c=4 13.6 / 33.9;  c=1 13.4, c=4 13.8
  transformers auto (bf16 sampling, automatic width, rounds of 128)
                                  53.6 / 156.9 (3.80x the server);   68.3 / 200.1 (4.95x)
  transformers float32            22.4 / 87.2 (1.59x);               23.5 / 91.3 (1.70x)
The bf16 arm used 192 candidates in both runs, the fp32 arm 256: the dtypes sample
different texts, and more of fp32's were discarded here (unfinished instructions).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("EXNIHILO_NO_PROGRESS", "1")

ALIAS = "smollm2"
# llama-cpp-python applies repeat_penalty 1.1, min_p 0.05 and top_k 40 unless told otherwise;
# switch them off so both engines sample with the same settings.
LLAMA_NEUTRAL = {"repeat_penalty": 1.0, "min_p": 0.0, "top_k": 0}
SHORT_ANSWERS = "You are a helpful assistant. Every answer is one short sentence."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(gguf: Path, threads: int, log: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias",
           ALIAS, "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
           "--n_threads", str(threads), "--verbose", "False"]
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"llama_cpp.server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("llama_cpp.server not ready within 90 s")


def run_magpie(engine, tokenizer, config, folder: Path, label: str) -> dict:
    from exnihilo.synth.magpie import synthesize

    summary = synthesize(engine, tokenizer, config, folder / f"{label}.jsonl")
    return {k: summary[k] for k in ("total", "candidates", "elapsed_s", "pairs_per_minute",
                                    "generated_tokens_per_s", "skipped")}


def raw_completion_rates(url: str, tokenizer, concurrencies: list[int]) -> dict:
    """Decode tokens/s for 16 pre-query completions of 32 tokens at each concurrency: what
    concurrency buys from the server alone, without Magpie's discards in the way."""
    from exnihilo.engines.base import SamplingParams
    from exnihilo.engines.openai import OpenAIEngine
    from exnihilo.templates import template_info

    prompt = template_info(tokenizer).pre_query
    params = SamplingParams(temperature=1.0, max_new_tokens=32)
    rates = {}
    for c in concurrencies:
        engine = OpenAIEngine(ALIAS, [url], concurrency=c, timeout=600,
                              extra_body=LLAMA_NEUTRAL)
        start = time.perf_counter()
        outs = engine.complete([prompt] * 16, params, seeds=list(range(16)))
        elapsed = time.perf_counter() - start
        tokens = sum(o.completion_tokens for o in outs)
        rates[f"concurrency_{c}"] = {"tokens": tokens, "elapsed_s": round(elapsed, 2),
                                     "tokens_per_s": round(tokens / elapsed, 1)}
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="Magpie pairs per run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--threads", type=int, default=1,
                        help="llama.cpp server threads (2 spin-wait badly on a busy 2-core box)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="transformers rows decoded together (default: the engine's "
                             "automatic width)")
    parser.add_argument("--round-size", type=int, default=128,
                        help="Magpie candidates per round for the transformers arm (the "
                             "command's default)")
    parser.add_argument("--server-round-size", type=int, default=16,
                        help="Magpie candidates per round for the server (raised to the "
                             "concurrency where that is higher)")
    parser.add_argument("--llamacpp-batch-size", type=int, default=32,
                        help="llamacpp engine: sequences decoded together (Magpie's round)")
    parser.add_argument("--dtypes", nargs="+", default=["auto"],
                        choices=["auto", "float32", "bfloat16"],
                        help="transformers arms by --dtype (auto: sampling in bf16 on a CPU "
                             "with native bf16, else float32)")
    parser.add_argument("--skip-transformers", action="store_true",
                        help="leave out the transformers arm")
    parser.add_argument("--skip-llamacpp", action="store_true",
                        help="leave out the in-process llamacpp arms")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch threads for the local engine (1 = same core budget as "
                             "the one-thread server)")
    parser.add_argument("--instruction-max-tokens", type=int, default=48)
    parser.add_argument("--response-max-tokens", type=int, default=64)
    parser.add_argument("--system", default=SHORT_ANSWERS,
                        help="Magpie system prompt (short answers keep the run short)")
    args = parser.parse_args()

    import llama_cpp
    import torch

    from exnihilo.engines.base import SamplingParams
    from exnihilo.engines.llamacpp import DEFAULT_WEIGHTS, LlamaCppEngine
    from exnihilo.engines.openai import OpenAIEngine
    from exnihilo.engines.transformers import TransformersEngine
    from exnihilo.models import EMBEDDED, embedded_gguf_path, load_tokenizer
    from exnihilo.synth.magpie import MagpieConfig

    name = "smollm2-135m-instruct"
    gguf = embedded_gguf_path(EMBEDDED[name])
    tokenizer = load_tokenizer(name)
    config = MagpieConfig(
        n=args.n, turns=1, seed=0, round_size=args.server_round_size,
        system=args.system or None,
        instruction=SamplingParams(temperature=0.7, top_p=1.0,
                                   max_new_tokens=args.instruction_max_tokens),
        response=SamplingParams(temperature=0.7, top_p=0.9,
                                max_new_tokens=args.response_max_tokens))
    result: dict = {
        "benchmark": "magpie pairs/minute, openai engine (llama-cpp-python server) vs "
                     "in-process llamacpp engine vs transformers engine",
        "n": args.n, "system": args.system, "instruction_max_tokens": args.instruction_max_tokens,
        "response_max_tokens": args.response_max_tokens,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "llama_cpp_python": llama_cpp.__version__},
        "server": {"threads": args.threads, "model": gguf.name, "extra_body": LLAMA_NEUTRAL,
                   "note": "llama-cpp-python serves one request at a time (a global lock); "
                           "concurrency only overlaps HTTP and queueing"},
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "openai": {},
        "llamacpp": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        proc, url = start_server(gguf, args.threads, folder / "server.log")
        try:
            # Warm-up (the first request pays for llama.cpp's first graph build), untimed.
            OpenAIEngine(ALIAS, [url], timeout=600).complete(
                ["Hello"], SamplingParams(temperature=0.0, max_new_tokens=4))
            result["raw_completions"] = raw_completion_rates(url, tokenizer, args.concurrency)
            for c in args.concurrency:
                # round_size ≥ concurrency, else a round cannot fill the requests in flight.
                cfg = config.model_copy(update={"round_size": max(config.round_size, c)})
                engine = OpenAIEngine(ALIAS, [url], concurrency=c, timeout=600,
                                      extra_body=LLAMA_NEUTRAL)
                result["openai"][f"concurrency_{c}"] = run_magpie(
                    engine, tokenizer, cfg, folder, f"openai-c{c}")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        cfg = config.model_copy(update={"round_size": args.llamacpp_batch_size})
        arms = [] if args.skip_llamacpp else [(DEFAULT_WEIGHTS, DEFAULT_WEIGHTS), ("q4_1", None)]
        for label, weights in arms:
            engine = LlamaCppEngine(name, batch_size=args.llamacpp_batch_size,
                                    threads=args.threads, tokenizer=tokenizer, weights=weights)
            engine.complete(["Hello"], SamplingParams(temperature=0.0, max_new_tokens=4))
            result["llamacpp"][label] = dict(
                run_magpie(engine, tokenizer, cfg, folder, f"llamacpp-{label}"),
                batch_size=args.llamacpp_batch_size, threads=engine.threads)
            engine.close()
        if not args.skip_transformers:
            torch.set_num_threads(args.torch_threads)
            local_config = config.model_copy(update={"round_size": args.round_size})
            for dtype in args.dtypes:
                local = TransformersEngine(name, dtype=dtype, batch_size=args.batch_size)
                key = "transformers" if dtype == args.dtypes[0] else f"transformers_{dtype}"
                sampling = SamplingParams(temperature=1.0)
                result[key] = dict(
                    run_magpie(local, tokenizer, local_config, folder, key),
                    batch_size=args.batch_size or "auto", round_size=args.round_size,
                    dtype=dtype, sampled_in=str(next(local.decoder_for(sampling).parameters())
                                                .dtype).removeprefix("torch."),
                    torch_threads=torch.get_num_threads())
                del local
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    best = max(result["openai"], key=lambda k: result["openai"][k]["pairs_per_minute"])
    server = result["openai"][best]["pairs_per_minute"] or 1e-9
    result["server_best"] = best
    result["ratio_llamacpp_vs_server_best"] = {
        k: round(v["pairs_per_minute"] / server, 2) for k, v in result["llamacpp"].items()}
    for key in [k for k in result if k.startswith("transformers")]:
        result[f"ratio_{key}_vs_server_best"] = round(
            result[key]["pairs_per_minute"] / server, 2)
    if "transformers" in result:
        base = result["transformers"]["pairs_per_minute"] or 1e-9
        result["ratio_pairs_per_minute_vs_transformers"] = dict(
            {k: round(v["pairs_per_minute"] / base, 2) for k, v in result["openai"].items()},
            **{f"llamacpp_{k}": round(v["pairs_per_minute"] / base, 2)
               for k, v in result["llamacpp"].items()})
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
