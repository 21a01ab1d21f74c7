"""SFT throughput: exnihilo's training step vs TRL's SFTTrainer, interleaved in one process.

Measures trained (non-masked) target tokens per second on the embedded SmolLM2-135M-Instruct,
for LoRA and full finetuning, padded and packed, on the same records (ch07's Alpaca set,
rendered with the model's chat template, loss on every token) with the same hyperparameters
(AdamW, lr 2e-4 LoRA / 5e-5 full, r 16, alpha 32, dropout 0.05, all-linear, batch 8, max
length 512, clip 1.0, cosine). TRL runs its real `SFTTrainer.train()` with its defaults
(which include gradient checkpointing, bf16 autocast on a CPU with native bf16, and its
chunked "fused LM head" loss); a callback runs one step of ours beside each TRL step,
timed on its own, after TRL's step on even steps and before it on odd ones: on a shared
CPU load drifts over minutes, so both systems must see the same drift, and a fixed order
was measured to favour the second runner (the first arm of an A/A/A round ran ~14 %
slower). Arms ending in `_no_gc` turn TRL's checkpointing off (ours keeps its automatic
choice); arms with `fp32` run both in float32 (ours `--dtype float32`, TRL `bf16=False`).
The first step of each is untimed (allocation warm-up).

Also: padding waste padded vs packed over a whole epoch plan, and the peak RSS of a LoRA
step at 8 × 512 tokens (in a fresh subprocess, so the figure is that step's own peak).

    .venv/bin/pip install trl     # benchmark only; it leaves torch alone
    .venv/bin/python benchmarks/sft.py [--steps 2] [--records 128] [--threads 1]

Prints one JSON object. Without TRL, ours is timed alone and the TRL rows say why.

Peak RSS of one LoRA step at 8 x 512, measured 2026-11-30 (`--rss-only --threads 1`, a
subprocess each, load 4-7): old default (dropout 0.05, no checkpointing) 14.53 GiB;
dropout 0: 11.20; checkpointing: 7.11; both: 5.47; heap limit without checkpointing: 10.47;
both + heap limit: 2.95; today's default (checkpointing on by itself at 8 x 512, heap
limit, dropout 0.05): 2.82 GiB. Re-measured 2026-12-05 (idle, AMX machine, today's
code, so lane dropout where dropout > 0): old default 13.78; dropout 0: 9.69;
checkpointing: 7.63; both: 5.31; both + heap limit: 1.43; today's default, now with bf16
frozen products: 1.80 GiB.

Throughput measured 2026-12-05 (idle 2-core CPU with AMX, 1 thread, TRL 1.16.0, 6 timed
steps per arm; `--threads 1 --steps 6 --only lora,lora_trl_no_gc,full,full_no_gc,
lora_fp32_no_gc --no-rss`), trained tokens/s, ours vs TRL:
LoRA as shipped (ours bf16 frozen products, TRL bf16 autocast + checkpointing): 183.7 vs
95.7, 1.92x; TRL checkpointing off: 191.7 vs 116.0, 1.65x; both float32, TRL checkpointing
off: 133.9 vs 85.8, 1.56x. Full finetuning (ours float32, TRL bf16 autocast): 97.0 vs 104.9,
0.92x, and 103.9 vs 112.2 (0.93x) with TRL's checkpointing off -- TRL is faster there;
both float32 (`--only full_fp32_no_gc`, another run): 70.3 vs 57.5, 1.22x.
Ours, LoRA vs full on the same batches: 183.7 vs 97.0, 1.89x.
Our full step under CPU bf16 autocast (`--full-autocast-ab --steps 5`): 159.5 vs 107.9
tok/s, 1.48x, but losses 2.79/1.99/1.52/1.49/1.51 against float32's 2.64/1.86/1.50/1.41/
1.40 after steps 1-5, so full finetuning ships float32.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from exnihilo.devices import wants_frozen_bf16
from exnihilo.models import DEFAULT_MODEL, load_model, load_tokenizer, resolve_model
from exnihilo.train.collate import BatchPlan, collate_packed, padding_waste, shifted_length
from exnihilo.train.data import prepare_examples
from exnihilo.train.frozen_bf16 import frozen_bf16_matmuls
from exnihilo.train.loop import (
    make_optimizer,
    make_scheduler,
    optimizer_step,
    parameter_groups,
)
from exnihilo.train.sft import (
    SFTConfig,
    SFTObjective,
    add_lora,
    checkpoint_from_positions,
    enable_gradient_checkpointing,
    epoch_plan,
    limit_heap_growth,
    make_collate,
    wants_checkpointing,
)

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "evalsets" / "rasbt-instruction-data.json"


def load_data(n: int) -> list[dict]:
    from exnihilo.records import read_any

    return read_any(DATA)[:n]


PACKED_ROWS = 2  # rows of 512 per packed batch: about the tokens of 8 padded examples


def hyper(full: bool, pack: bool, steps: int) -> SFTConfig:
    """Same settings for both systems; a packed batch holds 2 full rows of 512 positions,
    about the same number of tokens as a padded batch of 8 of these short examples, so
    padded and packed steps do comparable work."""
    return SFTConfig(data=str(DATA), out="unused", full=full, pack=pack,
                     batch_size=PACKED_ROWS if pack else 8, max_length=512,
                     max_steps=steps + 1, val_fraction=0.0, seed=0)


class OursStepper:
    """exnihilo's per-step path (collate → SFTObjective → optimizer_step), as train_loop
    runs it, driven one step at a time so it can interleave with TRL."""

    def __init__(self, records, tokenizer, full: bool, pack: bool, steps: int,
                 checkpointing: bool | None = None, dtype: str = "auto"):
        """`checkpointing` None: ours as it ships (`run_sft`'s automatic rule, per
        micro-batch); True/False: forced, as `--[no-]gradient-checkpointing` does.
        `dtype` "auto" as it ships (frozen products in bf16 where the CPU has it natively),
        "float32" as `--dtype float32`."""
        cfg = hyper(full, pack, steps).model_copy(
            update={"gradient_checkpointing": checkpointing, "dtype": dtype})
        self.held = contextlib.ExitStack()
        examples = prepare_examples(records, "chat", tokenizer, cfg.max_length)
        torch.manual_seed(0)
        model = load_model(DEFAULT_MODEL)
        if wants_checkpointing(cfg, cfg.max_length):
            enable_gradient_checkpointing(model)
        self.model = model if full else add_lora(model, cfg)
        self.model.train()
        plan, _, _ = epoch_plan(examples, cfg, tokenizer.eos_token_id)
        self.batches = iter(plan(0))
        self.model_checkpointing = wants_checkpointing(cfg, cfg.max_length)
        self.collate = make_collate(tokenizer.pad_token_id, tokenizer.eos_token_id,
                                    cfg.mask_prompt, pack)
        self.loop_cfg = replace(cfg.loop_config(), checkpoint_from_positions=(
            checkpoint_from_positions(cfg, cfg.max_length)))  # what run_sft passes
        # What train_loop holds for a whole run; this stepper lives as long as the process.
        self.bf16_layers = self.held.enter_context(
            frozen_bf16_matmuls(self.model, self.loop_cfg.bf16_frozen_matmuls))
        self.checkpointed: list[bool] = []
        groups = parameter_groups(self.model, self.loop_cfg)
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = make_optimizer(groups, self.loop_cfg)
        self.scheduler = make_scheduler(self.optimizer, steps + 1, self.loop_cfg)
        self.seconds: list[float] = []
        self.tokens: list[float] = []
        self.positions: list[int] = []
        self.losses: list[float] = []

    def step(self) -> None:
        batch = self.collate(next(self.batches))
        threshold = self.loop_cfg.checkpoint_from_positions
        self.checkpointed.append(self.model_checkpointing if threshold is None else
                                 batch["input_ids"].numel() >= threshold)
        started = time.perf_counter()
        step = optimizer_step(
            self.model, SFTObjective(), [batch], self.params,
            self.optimizer, self.scheduler, self.loop_cfg)
        self.seconds.append(time.perf_counter() - started)
        self.tokens.append(step.weight)
        self.positions.append(step.positions)
        self.losses.append(step.loss)

    def figures(self) -> dict:
        secs = sum(self.seconds[1:])
        return {"trained_tokens_per_s": sum(self.tokens[1:]) / secs,
                "positions_per_s": sum(self.positions[1:]) / secs,
                "steps_timed": len(self.seconds) - 1, "losses": self.losses,
                "checkpointed_steps": sum(self.checkpointed[1:]),
                "bf16_frozen_layers": self.bf16_layers}


def run_pair(records, tokenizer, full: bool, pack: bool, steps: int, with_trl: bool,
             trl_checkpointing: bool = True, ours_checkpointing: bool | None = None,
             float32: bool = False) -> dict:
    """Ours and TRL on the same records and settings; TRL with gradient checkpointing on
    (its default) or off, ours as it ships (None) or forced on/off. Precision as each
    ships (TRL: bf16 autocast; ours: frozen products in bf16, where the CPU has native
    bf16), or `float32` for both."""
    ours = OursStepper(records, tokenizer, full, pack, steps, ours_checkpointing,
                       "float32" if float32 else "auto")
    trl_bf16 = not float32 and wants_frozen_bf16("auto", torch.device("cpu"))
    if not with_trl:
        for _ in range(steps + 1):
            ours.step()
        return {"ours": ours.figures(), "trl": {"error": "skipped (--no-trl)"}}
    try:
        from datasets import Dataset
        from peft import LoraConfig
        from transformers import TrainerCallback
        from trl import SFTConfig as TRLConfig
        from trl import SFTTrainer
    except ImportError as e:
        for _ in range(steps + 1):
            ours.step()
        return {"ours": ours.figures(),
                "trl": {"error": f"TRL not installed ({e.name}); pip install trl to compare"}}
    cfg = hyper(full, pack, steps)

    class Interleave(TrainerCallback):
        """Times each TRL optimizer step (forward → optimizer step) and runs one of ours
        beside it: after TRL's on even steps, before it on odd ones (untimed for TRL). The
        order matters: in an A/A test of three identical arms run in a fixed order, the
        first of each round ran 14 % slower; alternating gives each side both places."""

        def __init__(self):
            self.begin, self.seconds = 0.0, []

        def on_step_begin(self, args, state, control, **kw):
            if len(self.seconds) % 2 == 1:
                ours.step()
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.seconds.append(time.perf_counter() - self.begin)
            if len(self.seconds) % 2 == 1:
                ours.step()

    trained: list[int] = []

    def counting(collator):
        def collate(rows):
            batch = collator(rows)
            # The causal LM loss counts labels[:, 1:] != -100 (labels are shifted inside).
            trained.append(int((batch["labels"][:, 1:] != -100).sum()))
            return batch
        return collate

    dataset = Dataset.from_list([{"messages": r["messages"]} for r in records])
    with tempfile.TemporaryDirectory() as out:
        args = TRLConfig(
            output_dir=out, per_device_train_batch_size=cfg.batch_size,
            gradient_accumulation_steps=1,
            learning_rate=cfg.learning_rate, max_steps=steps + 1, max_length=cfg.max_length,
            packing=pack, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
            max_grad_norm=1.0, logging_steps=1, report_to=[],
            save_strategy="no", use_cpu=True, bf16=trl_bf16, fp16=False, seed=0,
            dataloader_num_workers=0, disable_tqdm=True,
            gradient_checkpointing=trl_checkpointing)
        torch.manual_seed(0)
        peft_config = None if full else LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules="all-linear", task_type="CAUSAL_LM")
        clock = Interleave()
        trainer = SFTTrainer(model=load_model(DEFAULT_MODEL), args=args, train_dataset=dataset,
                             processing_class=tokenizer, peft_config=peft_config,
                             callbacks=[clock])
        trainer.data_collator = counting(trainer.data_collator)
        with contextlib.redirect_stdout(sys.stderr):  # TRL prints its logs; stdout is JSON
            trainer.train()
    n = len(clock.seconds)
    trl = {"trained_tokens_per_s": sum(trained[1:n]) / sum(clock.seconds[1:]),
           "steps_timed": n - 1, "gradient_checkpointing": args.gradient_checkpointing,
           "bf16_autocast": trl_bf16, "optim": str(getattr(args.optim, "value", args.optim)),
           "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}
    ours_fig = ours.figures() | {"gradient_checkpointing": ours_checkpointing or "automatic",
                                 "dtype": "float32" if float32 else "auto"}
    return {"ours": ours_fig, "trl": trl,
            "speedup_vs_trl": ours_fig["trained_tokens_per_s"] / trl["trained_tokens_per_s"]}


def step_alternating(arms: list[OursStepper], steps: int) -> None:
    """`steps` steps of each arm, in order on even steps and reversed on odd ones: a fixed
    order was measured to slow the first arm of each round by ~14 % (an A/A test)."""
    for i in range(steps):
        for arm in arms if i % 2 == 0 else arms[::-1]:
            arm.step()


def full_autocast_ab(records, tokenizer, steps: int) -> dict:
    """Our full-finetuning step in float32 (as shipped) against the same step under CPU
    bf16 autocast (what TRL does on a native-bf16 CPU), on the same batches: speed, and
    the losses step by step (autocast was faster but learned less per step)."""
    arms = {name: OursStepper(records, tokenizer, True, False, steps)
            for name in ("float32", "bf16_autocast")}
    arms["bf16_autocast"].loop_cfg = replace(arms["bf16_autocast"].loop_cfg,
                                             autocast_dtype="bfloat16")
    step_alternating(list(arms.values()), steps + 1)
    figures = {name: arm.figures() for name, arm in arms.items()}
    return figures | {"bf16_autocast_vs_float32":
                      figures["bf16_autocast"]["trained_tokens_per_s"]
                      / figures["float32"]["trained_tokens_per_s"]}


def dropout_ab(records, tokenizer, steps: int) -> dict:
    """Our LoRA step with peft's own `nn.Dropout` against `LaneDropout` (what `add_lora`
    installs), and with no dropout at all (the ceiling), interleaved step by step on the same
    batches; no gradient checkpointing."""
    from peft.tuners.lora import LoraLayer

    arms = {name: OursStepper(records, tokenizer, False, False, steps)
            for name in ("torch_dropout", "lane_dropout", "no_dropout")}
    for module in arms["torch_dropout"].model.modules():
        if isinstance(module, LoraLayer):
            for key, layer in module.lora_dropout.items():
                module.lora_dropout[key] = torch.nn.Dropout(layer.p)
    for module in arms["no_dropout"].model.modules():
        if isinstance(module, LoraLayer):
            for key in module.lora_dropout:
                module.lora_dropout[key] = torch.nn.Identity()
    step_alternating(list(arms.values()), steps + 1)
    figures = {name: arm.figures() for name, arm in arms.items()}
    base = figures["torch_dropout"]["trained_tokens_per_s"]
    return figures | {f"{name}_vs_torch_dropout": figures[name]["trained_tokens_per_s"] / base
                      for name in ("lane_dropout", "no_dropout")}


def padding_figures(records, tokenizer) -> dict:
    examples = prepare_examples(records, "chat", tokenizer, 512)
    lengths = [shifted_length(e, tokenizer.eos_token_id) for e in examples]
    out = {}
    for pack in (False, True):
        cfg = hyper(False, pack, 1)
        plan = BatchPlan(cfg.batch_size, pack, cfg.max_length, cfg.seed)
        pad, total = padding_waste(plan.epoch(lengths, 0), lengths)
        out["packed" if pack else "padded"] = {"padding_fraction": pad / total,
                                               "positions": total, "pad_positions": pad}
    return out


def rss_probe(checkpointing: bool, steps: int = 1, dropout: float | None = None,
              heap_limit: bool = False, bf16: bool = False) -> None:
    """Child process: LoRA on rows of exactly 8 × 512 trained tokens; print peak RSS
    (`dropout`: LoRA dropout instead of the default; `heap_limit`: `limit_heap_growth`)."""
    if heap_limit:
        limit_heap_growth()
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    torch.manual_seed(0)
    model = load_model(DEFAULT_MODEL)
    if checkpointing:
        enable_gradient_checkpointing(model)
    cfg = hyper(False, False, steps)
    if dropout is not None:
        cfg = cfg.model_copy(update={"lora_dropout": dropout})
    model = add_lora(model, cfg)
    objective = SFTObjective()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    g = torch.Generator().manual_seed(0)
    from exnihilo.train.data import Example

    rows = [[Example(torch.randint(3, len(tokenizer), (513,), generator=g).tolist(),
                     [True] * 513, complete=False)] for _ in range(8)]
    batch = collate_packed(rows, tokenizer.pad_token_id, tokenizer.eos_token_id, False)
    assert tuple(batch["input_ids"].shape) == (8, 512)
    model.train()
    with frozen_bf16_matmuls(model, bf16):
        for _ in range(steps):
            (objective.loss_sum(model, batch) / objective.weight(batch)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rss_gib": peak_kib / 2**20, "lora_dropout": cfg.lora_dropout,
                      "heap_limit": heap_limit, "bf16_frozen_matmuls": bf16}))


def peak_rss_lora(checkpointing: bool, dropout: float | None = None,
                  heap_limit: bool = False, bf16: bool = False) -> dict:
    command = [sys.executable, __file__, "--rss-probe", "--threads",
               str(torch.get_num_threads())]
    if dropout is not None:
        command += ["--rss-dropout", str(dropout)]
    if heap_limit:
        command.append("--rss-heap-limit")
    if bf16:
        command.append("--rss-bf16")
    proc = subprocess.run(command + (["--rss-checkpointing"] if checkpointing else []),
                          capture_output=True, text=True,
                          env={**os.environ, "EXNIHILO_NO_PROGRESS": "1"})
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1]) | {
        "shape": "8 x 512", "dtype": "float32", "gradient_checkpointing": checkpointing}


def rss_variants() -> list[dict]:
    """Peak RSS of one LoRA step, each lever alone and together, a subprocess each. The
    last row is today's default (`run_sft`: checkpointing on by itself at 8 × 512, heap
    limit on, LoRA dropout 0.05, frozen products in bf16 where the CPU has it)."""
    default_gc = wants_checkpointing(hyper(False, False, 1), 512)
    return [peak_rss_lora(False), peak_rss_lora(False, dropout=0.0), peak_rss_lora(True),
            peak_rss_lora(True, dropout=0.0), peak_rss_lora(True, dropout=0.0, heap_limit=True),
            dict(peak_rss_lora(default_gc, heap_limit=True,
                               bf16=wants_frozen_bf16("auto", torch.device("cpu"))),
                 default_settings=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="timed steps per measurement")
    parser.add_argument("--records", type=int, default=128)
    parser.add_argument("--rss-probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rss-checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rss-dropout", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rss-heap-limit", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rss-bf16", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rss-only", action="store_true",
                        help="only the peak-RSS probes (default, dropout 0, checkpointing)")
    parser.add_argument("--no-trl", action="store_true")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS probe")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--only", default="", help="comma list of run names, e.g. lora,full")
    parser.add_argument("--dropout-ab", action="store_true",
                        help="only our LoRA step with torch's dropout vs LaneDropout vs none")
    parser.add_argument("--full-autocast-ab", action="store_true",
                        help="only our full-finetuning step, float32 vs CPU bf16 autocast")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_probe:
        rss_probe(args.rss_checkpointing, dropout=args.rss_dropout,
                  heap_limit=args.rss_heap_limit, bf16=args.rss_bf16)
        return
    if args.rss_only:
        print(json.dumps({"threads": torch.get_num_threads(), "load_avg": os.getloadavg(),
                          "peak_rss_lora_8x512": rss_variants(),
                          "load_avg_end": os.getloadavg()}, indent=2))
        return
    os.environ.setdefault("EXNIHILO_NO_PROGRESS", "1")
    resolve_model(DEFAULT_MODEL)
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    records = load_data(args.records)
    started = time.perf_counter()
    ab_modes = {"full": (args.full_autocast_ab, full_autocast_ab),
                "lora_dropout": (args.dropout_ab, dropout_ab)}
    for key, (wanted, measure) in ab_modes.items():
        if wanted:
            print(json.dumps({"threads": torch.get_num_threads(), "load_avg": os.getloadavg(),
                              "steps": args.steps, key: measure(records, tokenizer, args.steps),
                              "load_avg_end": os.getloadavg()}, indent=2))
            return
    report: dict = {"model": DEFAULT_MODEL, "records": len(records), "steps": args.steps,
                    "threads": torch.get_num_threads(), "load_avg_start": os.getloadavg(),
                    "padding": padding_figures(records, tokenizer), "runs": {}}
    # (name, full, pack, TRL's gradient checkpointing, ours: None as shipped or forced,
    # both float32). TRL's default turns checkpointing on for every step. Ours turns it on
    # for micro-batches of 2,048 positions or more (`checkpoint_from_positions`), which
    # these short records never reach. Precision: each as it ships (TRL bf16 autocast, ours
    # bf16 frozen products) unless the name says fp32 (`--dtype float32` / bf16=False).
    plan = [("lora", False, False, True, None, False),
            ("lora_trl_no_gc", False, False, False, None, False),
            ("lora_gc", False, False, True, True, False),
            ("lora_fp32", False, False, True, None, True),
            ("lora_fp32_no_gc", False, False, False, False, True),
            ("lora_fp32_gc", False, False, True, True, True),
            ("full", True, False, True, None, False),
            ("full_no_gc", True, False, False, False, False),
            ("full_fp32_no_gc", True, False, False, False, True),
            ("lora_packed", False, True, True, None, False),
            ("full_packed", True, True, True, None, False)]
    only = {s for s in args.only.split(",") if s}
    for name, full, pack, trl_gc, ours_gc, fp32 in plan:
        if only and name not in only:
            continue
        runs = run_pair(records, tokenizer, full, pack, args.steps, not args.no_trl, trl_gc,
                        ours_gc, fp32)
        report["runs"][name] = runs
        print(json.dumps({name: runs}), file=sys.stderr)
    runs = report["runs"]
    for kind in ("lora", "full"):
        packed, padded = runs.get(f"{kind}_packed", {}), runs.get(kind, {})
        if "trained_tokens_per_s" in packed.get("ours", {}) and \
                "trained_tokens_per_s" in padded.get("trl", {}):
            # TRL's default is packing=False: ours with --pack against TRL as it ships.
            report[f"{kind}_ours_packed_vs_trl_default"] = (
                packed["ours"]["trained_tokens_per_s"] / padded["trl"]["trained_tokens_per_s"])
    lora, full = runs.get("lora", {}).get("ours", {}), runs.get("full", {}).get("ours", {})
    if "trained_tokens_per_s" in lora and "trained_tokens_per_s" in full:
        # Run beside different TRL arms, so only roughly side by side; same batches.
        report["ours_lora_vs_full"] = (lora["trained_tokens_per_s"]
                                       / full["trained_tokens_per_s"])
    if not args.no_rss:
        report["peak_rss_lora_8x512"] = rss_variants()
    report["load_avg_end"] = os.getloadavg()
    report["seconds"] = time.perf_counter() - started
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
