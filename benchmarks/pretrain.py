"""Pretraining throughput: exnihilo's pretraining step vs a plain transformers `Trainer`,
interleaved in one process, on the same model and the same packed rows.

Both sides train a Gemma 2 preset (same seeded initial weights) on the same rows of the
standard library's documentation, packed as `train pretrain` packs them (restarting
position ids, so the same block-diagonal attention), with AdamW, the same rate, clip 1.0
and a cosine schedule. The Trainer gets the rows as `input_ids`/`labels`/`position_ids`
(transformers shifts the labels itself) and `default_data_collator`; after each Trainer
step a callback runs one step of ours, timed on its own, so load drift on a shared CPU
hits both alike. The first step of each is untimed (warm-up). Threads are pinned.

Reports input positions per second of each, the ratio, and our MFU (model FLOPs per
position from `train.pretrain.flops_per_position`, over the matmul rate measured by
`measure_matmul_flops` in the same process).

    .venv/bin/python benchmarks/pretrain.py [--arch gemma2-tiny] [--steps 6] [--threads 1]

Prints one JSON object (and writes it to --json if given).
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def corpus_rows(tokenizer, seq_len: int, n_rows: int):
    import sys

    sys.path.insert(0, str(HERE.parent / "experiments"))
    from common import TRAIN_MODULES, module_docs, split_paragraph_docs  # type: ignore

    from exnihilo.train.tokens import stream_from_documents

    docs = split_paragraph_docs(module_docs(TRAIN_MODULES[:12]), 2000)
    ids = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
    stream = stream_from_documents(ids, tokenizer.eos_token_id, seq_len)
    if stream.n_rows < n_rows:
        raise SystemExit(f"only {stream.n_rows} rows of {seq_len}; lower --seq-len")
    return stream


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="gemma2-tiny")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    from exnihilo.models import load_tokenizer
    from exnihilo.train.loop import LoopConfig, make_scheduler, optimizer_step, parameter_groups
    from exnihilo.train.pretrain import (
        build_model,
        flops_per_position,
        gemma2_config,
        measure_matmul_flops,
    )
    from exnihilo.train.sft import SFTObjective
    from exnihilo.train.tokens import collate_rows

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    config = gemma2_config(args.arch, tokenizer)
    n_rows = args.batch_size * (args.steps + 1)
    stream = corpus_rows(tokenizer, args.seq_len, n_rows)
    ours_model = build_model(config, seed=0)
    hf_model = copy.deepcopy(ours_model)
    lr = 1e-3

    cfg = LoopConfig(lr=lr, weight_decay=0.1, warmup_ratio=0.0, max_grad_norm=1.0)
    groups = parameter_groups(ours_model, cfg)
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0.1)
    scheduler = make_scheduler(optimizer, args.steps + 1, cfg)
    objective = SFTObjective()
    batches = [list(range(k * args.batch_size, (k + 1) * args.batch_size))
               for k in range(args.steps + 1)]
    ours_times: list[float] = []
    hf_times: list[float] = []

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return n_rows

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            b = collate_rows(stream, [i])
            # transformers shifts labels inside the model: pass the unshifted window.
            return {"input_ids": b["input_ids"][0], "labels": b["input_ids"][0],
                    "position_ids": b["position_ids"][0]}

    class Interleave(TrainerCallback):
        started = 0.0

        def on_step_begin(self, targs, state, control, **kw):
            self.started = time.perf_counter()

        def on_step_end(self, targs, state, control, **kw):
            hf_times.append(time.perf_counter() - self.started)
            k = len(ours_times)
            if k < len(batches):
                t0 = time.perf_counter()
                optimizer_step(ours_model, objective, [collate_rows(stream, batches[k])],
                               params, optimizer, scheduler, cfg)
                ours_times.append(time.perf_counter() - t0)

    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=args.batch_size, learning_rate=lr,
            weight_decay=0.1, max_grad_norm=1.0, lr_scheduler_type="cosine",
            max_steps=args.steps + 1, logging_steps=10_000, save_strategy="no",
            report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0,
            disable_tqdm=True)
        trainer = Trainer(model=hf_model, args=targs, train_dataset=Rows(),
                          data_collator=default_data_collator, callbacks=[Interleave()])
        trainer.train()

    positions = args.batch_size * args.seq_len
    ours = positions / (sum(ours_times[1:]) / len(ours_times[1:]))
    hf = positions / (sum(hf_times[1:]) / len(hf_times[1:]))
    peak = measure_matmul_flops(torch.float32)
    fpp = flops_per_position(config, args.seq_len)
    result = {
        "arch": args.arch, "params": sum(p.numel() for p in ours_model.parameters()),
        "threads": args.threads, "batch": [args.batch_size, args.seq_len],
        "timed_steps": args.steps, "ours_positions_per_s": round(ours, 1),
        "trainer_positions_per_s": round(hf, 1), "speedup": round(ours / hf, 3),
        "ours_step_s": [round(t, 3) for t in ours_times],
        "trainer_step_s": [round(t, 3) for t in hf_times],
        "flops_per_position": fpp, "matmul_peak_flops": round(peak),
        "ours_mfu": round(ours * fpp / peak, 4), "trainer_mfu": round(hf * fpp / peak, 4),
        "mfu_note": "model FLOPs = 3 x forward (2 x matmul params + attention scores); peak "
                    "= a 512x512 fp32 torch.matmul timed here, same threads",
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
