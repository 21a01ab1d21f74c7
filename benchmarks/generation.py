"""Generation benchmark: the local engine's levers against a naive batch-1 `generate` loop.

Same model, same prompts, one process; the arms run alternately, `--repeats` times each, so a
shared machine's load hits every arm alike (medians and ratios are reported, with the load
average before and after):
  * decode tokens/s at fixed length (end-of-turn stopping off): naive batch-1 `generate`,
    the engine (fp32) and the engine in bf16;
  * replies with real stopping (long-tailed lengths): the engine with refill off (one batch
    at a time), refill on (finished rows dropped at once), refill on with rows dropped in
    groups (`drop_slack`), and bf16;
  * bf16 against fp32 greedy: share of identical replies and the first divergence position;
  * Magpie pairs/minute, engine vs the naive loop through the same Magpie code;
  * this machine's fp32 GEMM FLOP/s, and the engine's share of it (2 × params × tokens/s).
  * with --llamacpp (or --llamacpp-only): the in-process llama.cpp engine
    (`engines.llamacpp`) at batch 1/8/32 on F16 weights (its default) and at batch 32 on Q8_0
    and on the GGUF as shipped (Q4_1), its Magpie pairs/minute, and greedy agreement;
    --llamacpp-only skips the transformers levers (bf16, refill variants) to fit a short run.
Prints one JSON object.  Usage: python benchmarks/generation.py [--threads 1] [--quick]

Measured 2026-11-30 (2-core shared VM without AVX512-BF16/AMX, 1 torch thread, load
5.3 -> 3.9; batch 32, 2 repeats, alternating; --tokens 32 --replies 24 --reply-tokens 64
--naive-prompts 2 --pairs 16 --naive-pairs 2):
  decode tok/s      engine fp32 16.3, bf16 6.9, naive batch-1 1.9 -> 8.58x naive
  replies tok/s     refill off 9.35, refill on 13.75 (1.47x), + grouped drop 14.45 (1.55x),
                    bf16 11.65
  bf16 vs fp32      greedy replies identical 41.7%, first divergence median 5.5 tokens
  Magpie pairs/min  engine 2.22 (n=16, 64 candidates) vs naive 0.24 (n=2, 16 candidates):
                    9.25x; per candidate 4.6x (the naive arm's n is small: noisy)
  GEMM share        19.8% of 22.1 GFLOP/s
bf16 is emulated on that CPU (2.4x slower) and diverges early; greedy decoding stays fp32.

Measured 2026-12-01, --llamacpp-only (1 thread each, load 1.8 -> 3.2; --tokens 32 --repeats 2
--replies 16 --reply-tokens 64 --pairs 64 --naive-pairs 2; Q8_0 was then the llamacpp default):
  decode tok/s      naive 13.7, engine fp32 b32 110.7 (8.1x), llamacpp Q8_0 b1 40.6 (3.0x),
                    b8 72.9 (5.3x), b32 67.8 (4.95x; runs 45 and 90), Q4_1 b32 49.4 (3.6x)
  Magpie pairs/min  llamacpp Q8_0 5.71 (n=64, 278 candidates) vs naive 0.59 (n=2): 9.7x
  greedy identical  Q8_0 vs Q4_1 6 %, Q4_1 llama.cpp vs fp32 engine 31 % (same weights)
llama.cpp here is built for x86-64-v3 (scripts/test-deps/llama-server.sh): no AVX-512, which
this CPU has and torch uses.

Measured 2026-12-01, --decode-only (2 threads, idle machine, load 0.3 -> 2.0; --tokens 64,
naive on 2 prompts; each arm alternating with the naive loop):
  --decode-only 32 64 128 --repeats 3:  naive 16.8 tok/s; batch 32 120.9 (7.2x), 64 203.4
                                         (12.1x), 128 241.7 (14.4x); GEMM 212.6 GFLOP/s,
                                         share 15.3 / 25.7 / 30.6 %
  --decode-only 128 256 --repeats 2:    naive 16.75; batch 128 261.4 (15.6x), 256 255.8
                                         (15.3x); GEMM 158.9 GFLOP/s, share 44.3 / 43.3 %
  after the inverse-CDF sampler, --decode-only 32 64 128 --repeats 3: naive 23.7; batch 32
                                         185.7 (7.8x), 64 365.8 (15.4x), 128 377.9 (16.0x);
                                         GEMM 216 GFLOP/s, share 23.1 / 45.6 / 47.1 %

Measured 2026-12-01 on a CPU with AVX512-BF16/AMX (2 threads, idle, load 0.1 -> 2.1;
--decode-only 0 32 128 --decode-dtypes float32 bfloat16 --tokens 64 --repeats 2):
  naive 17.8 tok/s; fp32 auto (128 rows) 273.8 (15.4x), b32 176.9 (9.9x), b128 247.1
  (13.9x); bf16 auto 380.5 (21.4x), b32 281.4 (15.8x), b128 490.2 (27.5x). GEMM fp32
  146.9, bf16 314.8 GFLOP/s; share fp32 50.1 / 32.4 / 45.2 %, bf16 32.5 / 24.1 / 41.9 %.
  bf16 sampling drift over 655 positions: total variation mean 0.0185 (p95 0.037) at T 1,
  0.0195 (p95 0.050) at T 0.7; sampled token's |d log p| 0.037.
The runs of each arm differed by up to 30 % (e.g. bf16 b128 421 and 559): medians above.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("EXNIHILO_NO_PROGRESS", "1")

from exnihilo.devices import cpu_native_bf16  # noqa: E402
from exnihilo.engines.base import Completion, SamplingParams  # noqa: E402
from exnihilo.engines.transformers import TransformersEngine  # noqa: E402
from exnihilo.models import DEFAULT_MODEL  # noqa: E402
from exnihilo.synth.magpie import MagpieConfig, synthesize  # noqa: E402
from exnihilo.templates import template_info  # noqa: E402


class NaiveEngine:
    """The baseline: one prompt at a time through `model.generate` (sampling on)."""

    def __init__(self, engine: TransformersEngine):
        self.name = "naive-batch-1"
        self.model, self.tokenizer = engine.model, engine.tokenizer
        self.stop_ids = sorted(engine._stop_ids)

    def complete(self, prompts, params: SamplingParams, seeds=None, stop_ids=True):
        outs = []
        for i, prompt in enumerate(prompts):
            torch.manual_seed(seeds[i] if seeds else params.seed + i)
            ids = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
            kwargs = dict(max_new_tokens=params.max_new_tokens, do_sample=params.temperature > 0,
                          pad_token_id=self.tokenizer.pad_token_id)
            if params.temperature > 0:
                # top_k=0 explicitly: generate() would otherwise apply the model's default
                # top-k of 50, sampling a different distribution than the engine does.
                kwargs.update(temperature=params.temperature, top_p=params.top_p,
                              top_k=params.top_k)
            if stop_ids:
                kwargs["eos_token_id"] = self.stop_ids
            else:
                kwargs.update(eos_token_id=None, min_new_tokens=params.max_new_tokens)
            with torch.inference_mode():
                out = self.model.generate(**ids, **kwargs)
            new = out[0, ids["input_ids"].shape[1]:].tolist()
            hit = [t for t in new if t in self.stop_ids] if stop_ids else []
            if hit:
                new = new[:new.index(hit[0])]
            text = self.tokenizer.decode(new, skip_special_tokens=False)
            for s in params.stop:
                if s in text:
                    text = text[:text.find(s)]
            reason = "stop" if hit or len(new) < params.max_new_tokens else "length"
            outs.append(Completion(text, ids["input_ids"].shape[1], len(new), reason))
        return outs

    def chat(self, conversations, params, seeds=None):
        prompts = [self.tokenizer.apply_chat_template(c, tokenize=False,
                                                      add_generation_prompt=True)
                   for c in conversations]
        return self.complete(prompts, params, seeds)


def gemm_flops(size: int = 1024, repeats: int = 20, dtype: torch.dtype = torch.float32
               ) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def decode_tps(engine, prompts, tokens: int) -> tuple[float, int]:
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=tokens)
    start = time.perf_counter()
    if isinstance(engine, NaiveEngine):
        outs = engine.complete(prompts, params, stop_ids=False)
    elif hasattr(engine, "is_stop"):  # the llamacpp engine: no end-of-generation token
        engine.is_stop = lambda token: False
        try:
            outs = engine.complete(prompts, params)
        finally:
            del engine.is_stop
    else:
        saved, engine._stop_ids = engine._stop_ids, {-1}
        try:
            outs = engine.complete(prompts, params)
        finally:
            engine._stop_ids = saved
    produced = sum(o.completion_tokens for o in outs)
    return produced / (time.perf_counter() - start), produced


def replies_tps(engine, conversations, tokens: int) -> tuple[float, list]:
    """Sampled replies with real stopping: tokens/s and the completions."""
    params = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=tokens, seed=7)
    start = time.perf_counter()
    outs = engine.chat(conversations, params)
    elapsed = time.perf_counter() - start
    return sum(o.completion_tokens for o in outs) / elapsed, outs


def greedy_agreement(reference, other, conversations, tokens: int) -> dict:
    """Share of identical greedy replies, and where differing ones first diverge (tokens)."""
    params = SamplingParams(temperature=0.0, max_new_tokens=tokens)
    want = reference.chat(conversations, params)
    got = other.chat(conversations, params)
    tok = reference.tokenizer
    same, firsts = 0, []
    for a, b in zip(want, got, strict=True):
        if a.text == b.text:
            same += 1
            continue
        x = tok(a.text, add_special_tokens=False)["input_ids"]
        y = tok(b.text, add_special_tokens=False)["input_ids"]
        firsts.append(next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q),
                           min(len(x), len(y))))
    return {"replies": len(want), "identical_share": round(same / len(want), 3),
            "first_divergence_tokens": sorted(firsts),
            "first_divergence_median": statistics.median(firsts) if firsts else None}


def magpie_ppm(engine, tokenizer, pairs: int, batch: int) -> dict:
    config = MagpieConfig(n=pairs, round_size=batch, seed=1,
                          instruction=SamplingParams(temperature=1.0, max_new_tokens=96),
                          response=SamplingParams(temperature=0.7, top_p=0.9,
                                                  max_new_tokens=192))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        summary = synthesize(engine, tokenizer, config, Path(tmp) / "m.jsonl")
        elapsed = time.perf_counter() - start
    return {"pairs": summary["total"], "candidates": summary["candidates"],
            "seconds": round(elapsed, 1), "pairs_per_minute": round(60 * pairs / elapsed, 2)}


@torch.inference_mode()
def sampling_drift(engine, other_model, conversations, tokens: int) -> dict:
    """How far `other_model` (the bf16 copy) moves the next-token distributions of the
    engine's float32 weights: total variation at temperatures 1 and 0.7, over every position
    of replies the engine sampled (teacher-forced, one sequence at a time). Also the mean
    |change| of the sampled token's log-probability."""
    replies = engine.chat(conversations, SamplingParams(temperature=1.0, max_new_tokens=tokens,
                                                        seed=1))
    prompts = engine._prompt_ids(conversations)
    tv = {1.0: [], 0.7: []}
    dlogp: list[float] = []
    for prompt, reply in zip(prompts, replies, strict=True):
        ids = engine.tokenizer(reply.text, add_special_tokens=False)["input_ids"]
        if not ids:
            continue
        seq = torch.tensor([prompt + ids])
        a, b = (m(input_ids=seq).logits[0, len(prompt) - 1:-1].float()
                for m in (engine.model, other_model))
        for t, acc in tv.items():
            acc += (0.5 * (torch.softmax(a / t, -1) - torch.softmax(b / t, -1)).abs()
                    .sum(-1)).tolist()
        rows, chosen = torch.arange(len(ids)), torch.tensor(ids)
        dlogp += (torch.log_softmax(a, -1)[rows, chosen]
                  - torch.log_softmax(b, -1)[rows, chosen]).abs().tolist()
    positions = len(dlogp)

    def p95(xs: list[float]) -> float:
        return round(sorted(xs)[int(0.95 * (len(xs) - 1))], 4)

    return {"positions": positions,
            "total_variation_T1": {"mean": round(statistics.mean(tv[1.0]), 4),
                                   "p95": p95(tv[1.0])},
            "total_variation_T0.7": {"mean": round(statistics.mean(tv[0.7]), 4),
                                     "p95": p95(tv[0.7])},
            "sampled_token_logprob_abs_change_mean": round(statistics.mean(dlogp), 4)}


QUESTIONS = [
    "What is 2+2?", "Name a color.", "Write a haiku about rain.", "Say hi.",
    "List three fruits.", "What is the capital of France?", "Explain photosynthesis.",
    "Give me a tip for sleeping better.", "Translate 'good morning' into Spanish.",
    "Why is the sky blue?", "Write a short poem about the sea.", "What is a prime number?",
    "How do I boil an egg?", "Describe a cat in one sentence.", "What is gravity?",
    "Suggest a name for a dog.",
]


def timed_arms(arms: dict, run, repeats: int) -> dict:
    """Run every arm `repeats` times, alternating; {arm: [rates]}."""
    rates: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(repeats):
        for name, engine in arms.items():
            rates[name].append(round(run(engine), 1))
    return rates


def summarise(rates: dict, base: str) -> dict:
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"runs": rates, "median": med,
            "ratio_vs_" + base: {k: round(v / med[base], 2) for k, v in med.items()}}


def llamacpp_engines(args, tokenizer) -> dict:
    """{arm: engine}: the engine's default weights (F16) at batch 1, 8 and `--batch-size`,
    Q8_0 and the GGUF as shipped (Q4_1) at `--batch-size`; `--threads` each (default 1)."""
    from exnihilo.engines.llamacpp import DEFAULT_WEIGHTS, LlamaCppEngine

    threads = args.threads or 1
    arms = {f"llamacpp_{DEFAULT_WEIGHTS}_batch{b}": LlamaCppEngine(
        DEFAULT_MODEL, batch_size=b, threads=threads, tokenizer=tokenizer)
        for b in sorted({1, 8, args.batch_size})}
    for label, weights in (("q8_0", "q8_0"), ("q4_1", None)):
        arms[f"llamacpp_{label}_batch{args.batch_size}"] = LlamaCppEngine(
            DEFAULT_MODEL, batch_size=args.batch_size, threads=threads, tokenizer=tokenizer,
            weights=weights)
    for engine in arms.values():  # llama.cpp builds its compute graphs on the first call
        engine.complete(["Hello"], SamplingParams(temperature=0.0, max_new_tokens=2))
    return arms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--replies", type=int, default=32,
                        help="conversations for the real-stopping and agreement runs")
    parser.add_argument("--reply-tokens", type=int, default=128)
    parser.add_argument("--naive-prompts", type=int, default=4,
                        help="prompts for the slow baseline (its tok/s does not depend on it)")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--naive-pairs", type=int, default=8,
                        help="Magpie pairs for the naive loop (its rate hardly depends on n)")
    parser.add_argument("--drop-slack", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--llamacpp", action="store_true",
                        help="add the in-process llama.cpp engine's arms")
    parser.add_argument("--llamacpp-only", action="store_true",
                        help="llama.cpp arms against the naive loop and the fp32 engine only")
    parser.add_argument("--decode-only", type=int, nargs="+", default=None, metavar="BATCH",
                        help="only decode tok/s: the fp32 engine at these batch sizes (0: its "
                             "automatic width, the default) against the naive loop, with each "
                             "one's share of the GEMM rate")
    parser.add_argument("--decode-dtypes", nargs="+", default=["float32"],
                        choices=["float32", "bfloat16"],
                        help="--decode-only: weights for the engine arms (bfloat16 also "
                             "measures how far bf16 moves the sampling distribution)")
    parser.add_argument("--engine-pairs", type=int, default=0,
                        help="--llamacpp-only: Magpie pairs for the fp32 engine (0: skip)")
    args = parser.parse_args()
    args.llamacpp = args.llamacpp or args.llamacpp_only
    if args.quick:
        args.batch_size, args.tokens, args.naive_prompts = 8, 16, 2
        args.replies, args.reply_tokens, args.pairs, args.naive_pairs = 8, 24, 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    engine = TransformersEngine(DEFAULT_MODEL, dtype="float32", batch_size=args.batch_size)
    if args.decode_only:
        print(json.dumps(decode_only_report(args, engine, load_before), indent=2))
        return
    plain = TransformersEngine(DEFAULT_MODEL, model_obj=engine.model, tokenizer=engine.tokenizer,
                               batch_size=args.batch_size, refill=False)
    grouped = TransformersEngine(DEFAULT_MODEL, model_obj=engine.model,
                                 tokenizer=engine.tokenizer, batch_size=args.batch_size,
                                 drop_slack=args.drop_slack)
    bf16 = TransformersEngine(DEFAULT_MODEL, dtype="bfloat16", tokenizer=engine.tokenizer,
                              batch_size=args.batch_size)
    naive = NaiveEngine(engine)
    params_count = sum(p.numel() for p in engine.model.parameters())
    pre_query = template_info(engine.tokenizer).pre_query
    prompts = [pre_query] * args.batch_size
    convs = [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
             for i in range(args.replies)]

    flops = gemm_flops()
    lcpp = llamacpp_engines(args, engine.tokenizer) if args.llamacpp else {}
    decode_arms = {"engine_fp32": engine, "naive_batch1": naive} if args.llamacpp_only else \
        {"engine_fp32": engine, "engine_bf16": bf16, "naive_batch1": naive}

    def decode_run(e) -> float:
        rows = prompts[:args.naive_prompts] if e is naive else \
            prompts[:max(getattr(e, "batch_size", len(prompts)), 4)]
        return decode_tps(e, rows, args.tokens)[0]

    decode = timed_arms(dict(decode_arms, **lcpp), decode_run, args.repeats)
    if args.llamacpp_only:
        print(json.dumps(llamacpp_report(args, engine, naive, lcpp, decode, convs, flops,
                                         params_count, load_before), indent=2))
        return
    replies = timed_arms(
        {"refill_off": plain, "refill_on": engine, "refill_on_grouped_drop": grouped,
         "refill_on_bf16": bf16},
        lambda e: replies_tps(e, convs, args.reply_tokens)[0], args.repeats)
    agreement = greedy_agreement(engine, bf16, convs, args.reply_tokens)
    drift = sampling_drift(engine, bf16.model, convs, args.reply_tokens)
    engine_magpie = magpie_ppm(engine, engine.tokenizer, args.pairs, args.batch_size)
    naive_magpie = magpie_ppm(naive, engine.tokenizer, args.naive_pairs, args.batch_size)
    decode_summary = summarise(decode, "naive_batch1")

    print(json.dumps({
        "model": DEFAULT_MODEL, "params": params_count, "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "cpu_native_bf16": cpu_native_bf16(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "decode_tokens_per_s": dict(decode_summary, new_tokens_per_row=args.tokens),
        "replies_tokens_per_s": dict(summarise(replies, "refill_off"),
                                     replies=args.replies, max_new_tokens=args.reply_tokens,
                                     drop_slack=args.drop_slack),
        "bf16_vs_fp32_greedy": agreement,
        "bf16_sampling_drift": drift,
        "magpie": {"engine": engine_magpie, "naive_batch1": naive_magpie,
                   "speedup": round(engine_magpie["pairs_per_minute"]
                                    / naive_magpie["pairs_per_minute"], 2)},
        "gemm_fp32_gflops": round(flops / 1e9, 1),
        "engine_fraction_of_gemm_peak": round(
            2 * params_count * decode_summary["median"]["engine_fp32"] / flops, 4),
    }, indent=2))


def decode_only_report(args, engine, load_before) -> dict:
    """--decode-only B1 B2 …: decode tok/s of the fp32 engine at each batch size (sharing one
    model) against the naive batch-1 loop, alternating, and each arm's share of the GEMM rate
    measured in the same process."""
    from exnihilo.engines.transformers import AUTO_MAX_ROWS

    naive = NaiveEngine(engine)
    models = {"fp32": engine.model}
    if "bfloat16" in args.decode_dtypes:
        models["bf16"] = TransformersEngine(DEFAULT_MODEL, dtype="bfloat16",
                                            tokenizer=engine.tokenizer).model
    kinds = [k for k in models if k == "bf16" or "float32" in args.decode_dtypes]
    arms = {(f"engine_{k}_batch{b}" if b else f"engine_{k}_auto"): TransformersEngine(
        DEFAULT_MODEL, model_obj=models[k], tokenizer=engine.tokenizer, batch_size=b or None)
        for k in kinds for b in args.decode_only}
    pre_query = template_info(engine.tokenizer).pre_query
    arms["naive_batch1"] = naive

    def run(e) -> float:
        # The automatic width gets as many prompts as it could take; it picks its own width.
        rows = args.naive_prompts if e is naive else e.batch_size or AUTO_MAX_ROWS
        return decode_tps(e, [pre_query] * rows, args.tokens)[0]

    flops = {"fp32": gemm_flops()}
    if "bf16" in models:
        flops["bf16"] = gemm_flops(dtype=torch.bfloat16)
    summary = summarise(timed_arms(arms, run, args.repeats), "naive_batch1")
    params_count = sum(p.numel() for p in engine.model.parameters())
    prompt_ids = engine.tokenizer([pre_query], add_special_tokens=False)["input_ids"]
    auto = TransformersEngine(DEFAULT_MODEL, model_obj=engine.model, tokenizer=engine.tokenizer)
    return {
        "model": DEFAULT_MODEL, "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "cpu_native_bf16": cpu_native_bf16(),
        "automatic_width": auto.width_for(prompt_ids * AUTO_MAX_ROWS, SamplingParams(
            max_new_tokens=args.tokens)),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "decode_tokens_per_s": dict(summary, new_tokens_per_row=args.tokens),
        "gemm_gflops": {k: round(v / 1e9, 1) for k, v in flops.items()},
        # Each arm against the GEMM rate of its own dtype (the naive loop: fp32).
        "fraction_of_gemm_peak": {
            k: round(2 * params_count * v / flops["bf16" if "_bf16_" in k else "fp32"], 4)
            for k, v in summary["median"].items()},
        **({"bf16_sampling_drift": sampling_drift(
            engine, models["bf16"], [[{"role": "user", "content": q}] for q in QUESTIONS],
            48)} if "bf16" in models else {}),
    }


def llamacpp_report(args, engine, naive, lcpp: dict, decode: dict, convs, flops: float,
                    params_count: int, load_before) -> dict:
    """--llamacpp-only: decode ratios, Magpie pairs/minute (llama.cpp at `--pairs`, the
    naive loop at `--naive-pairs`, the fp32 engine at `--engine-pairs` when > 0) and greedy
    agreement."""
    from exnihilo.engines.llamacpp import DEFAULT_WEIGHTS as W

    main = lcpp[f"llamacpp_{W}_batch{args.batch_size}"]
    q8 = lcpp[f"llamacpp_q8_0_batch{args.batch_size}"]
    q41 = lcpp[f"llamacpp_q4_1_batch{args.batch_size}"]
    magpie = {f"llamacpp_{W}": magpie_ppm(main, engine.tokenizer, args.pairs, args.batch_size),
              "naive_batch1": magpie_ppm(naive, engine.tokenizer, args.naive_pairs,
                                         args.batch_size)}
    if args.engine_pairs:  # the fp32 engine takes ~6x longer: its own (smaller) n
        magpie["engine_fp32"] = magpie_ppm(engine, engine.tokenizer, args.engine_pairs,
                                           args.batch_size)
    base = magpie["naive_batch1"]["pairs_per_minute"]
    summary = summarise(decode, "naive_batch1")
    return {
        "model": DEFAULT_MODEL, "params": params_count, "batch_size": args.batch_size,
        "threads": {"torch": torch.get_num_threads(), "llama_cpp": args.threads or 1},
        "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "decode_tokens_per_s": dict(summary, new_tokens_per_row=args.tokens),
        "magpie": dict(magpie, ratio_vs_naive_batch1={
            k: round(v["pairs_per_minute"] / base, 2) for k, v in magpie.items()}),
        # How far greedy replies agree: F16 and Q8_0 against the shipped Q4_1 (all llama.cpp),
        # and Q4_1 against the fp32 engine on the same weights dequantised (backend noise).
        f"greedy_{W}_vs_q4_1": greedy_agreement(q41, main, convs, args.reply_tokens),
        "greedy_q8_0_vs_q4_1": greedy_agreement(q41, q8, convs, args.reply_tokens),
        "greedy_q4_1_vs_fp32_engine": greedy_agreement(engine, q41, convs, args.reply_tokens),
        "gemm_fp32_gflops": round(flops / 1e9, 1),
        "llamacpp_fraction_of_gemm_peak": round(
            2 * params_count * summary["median"][f"llamacpp_{W}_batch{args.batch_size}"]
            / flops, 4),
    }


if __name__ == "__main__":
    main()
