"""Supervised finetuning (SFT): config → data → collate → the shared loop → a plain HF folder.

LoRA (peft) is the default; `full=True` trains every weight. Either way the result in `out`
is an ordinary Hugging Face model folder (LoRA merged in), loadable by `exnihilo generate
--model <out>`, with `exnihilo_run.json` recording the prompt style, base model and config.
The prompt style matters at generation time: a model tuned on "alpaca" must be prompted in
Alpaca form (`exnihilo.styles.render_prompt(messages, info["style"], tokenizer)`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from exnihilo import progress
from exnihilo.errors import ExnihiloError
from exnihilo.models import load_tokenizer
from exnihilo.styles import StyleName
from exnihilo.train.collate import (
    BatchPlan,
    collate_padded,
    make_collate,
    padding_waste,
    shifted_length,
)
from exnihilo.train.data import (
    Example,
    LengthReport,
    load_training_records,
    prepare_examples,
    split_records,
)
from exnihilo.train.forward import (  # noqa: F401  (trained_logits re-exported)
    IGNORE_INDEX,
    token_logprob_sum,
    trained_logits,
)
from exnihilo.train.loop import Batch, LoopResult, train_loop
from exnihilo.train.run import (  # noqa: F401  (re-exported: the SFT recipe's public names)
    RUN_CONFIG,
    RUN_INFO,
    TrainConfig,
    add_lora,
    checkpoint_from_positions,
    count_parameters,
    enable_gradient_checkpointing,
    given_model,
    limit_heap_growth,
    load_for_training,
    prepare_out,
    read_run_info,
    run_identity,
    save_final_model,
    wants_checkpointing,
)


class SFTConfig(TrainConfig):
    data: str
    style: StyleName = "chat"
    mask_prompt: bool = False
    max_length: int = Field(512, ge=2)
    length_policy: str = "truncate"  # or "drop"
    pack: bool = False


# ----------------------------------------------------------------------------- the objective

class SFTObjective:
    """Summed cross-entropy over trained (non -100) target tokens; the loop divides by the
    count, which gives ch07's mean loss."""

    def weight(self, batch: Batch) -> float:
        return float((batch["labels"] != IGNORE_INDEX).sum())

    def loss_sum(self, model: Any, batch: Batch) -> torch.Tensor:
        return -token_logprob_sum(model, batch)


# ------------------------------------------------------------------------------------- run

@dataclass
class SFTData:
    train: list[Example]
    val: list[Example]
    report: LengthReport


def build_data(cfg: SFTConfig, tokenizer: Any) -> SFTData:
    records = load_training_records(cfg.data)
    train_records, val_records = split_records(records, cfg.val_fraction, cfg.seed)
    report = LengthReport()
    train = prepare_examples(train_records, cfg.style, tokenizer, cfg.max_length,
                             cfg.length_policy, report)
    val = prepare_examples(val_records, cfg.style, tokenizer, cfg.max_length,
                           cfg.length_policy, report)
    if not train:
        raise ExnihiloError(f"{cfg.data}: no usable training examples ({report.summary()})")
    return SFTData(train, val, report)


@dataclass
class SFTResult:
    out: str
    steps: int
    train_loss: float | None
    val_loss: float | None
    trained_tokens_per_s: float
    train_seconds: float
    trainable_params: int
    total_params: int
    padding_waste: float
    data: dict[str, Any]


def epoch_plan(data: list[Example], cfg: SFTConfig, eos_id: int):
    """plan(epoch) → that epoch's micro-batches, each a list of rows of examples."""
    lengths = [shifted_length(e, eos_id) for e in data]
    batch_plan = BatchPlan(cfg.batch_size, cfg.pack, cfg.max_length, cfg.seed)

    def plan(epoch: int) -> list[list[list[Example]]]:
        return [[[data[i] for i in row] for row in batch]
                for batch in batch_plan.epoch(lengths, epoch)]
    return plan, lengths, batch_plan


def run_sft(cfg: SFTConfig, resume: bool = False, on_step: Any = None,
            model_obj: Any = None, tokenizer: Any = None) -> SFTResult:
    """Train and save. `model_obj`/`tokenizer` let tests pass tiny in-memory models."""
    out = Path(cfg.out)
    identity = run_identity(cfg, {"data": cfg.data})
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
    data = build_data(cfg, tokenizer)
    progress.note(data.report.summary())
    torch.manual_seed(cfg.seed)  # LoRA init and dropout draw from here; resume restores it
    model = given_model(model_obj, cfg) if model_obj is not None else \
        load_for_training(cfg.model, cfg)
    limit_heap_growth()
    if wants_checkpointing(cfg, cfg.max_length):
        enable_gradient_checkpointing(model)
    if not cfg.full:
        model = add_lora(model, cfg)
    # Only now, with data, model and LoRA targets known good, claim the out folder.
    prepare_out(out, identity, resume)
    trainable, total = count_parameters(model)
    progress.note(f"{'full finetuning' if cfg.full else 'LoRA'}: {trainable:,} of {total:,} "
                  f"parameters trainable")

    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    plan, lengths, batch_plan = epoch_plan(data.train, cfg, eos_id)
    pad, positions = padding_waste(batch_plan.epoch(lengths, 0), lengths)
    val_batches = [collate_padded(data.val[k:k + cfg.batch_size], pad_id, eos_id,
                                  cfg.mask_prompt)
                   for k in range(0, len(data.val), cfg.batch_size)]
    result: LoopResult = train_loop(
        model, SFTObjective(), plan, make_collate(pad_id, eos_id, cfg.mask_prompt, cfg.pack),
        val_batches, out, replace(cfg.loop_config(), checkpoint_from_positions=(
            checkpoint_from_positions(cfg, cfg.max_length))),
        resume=resume, label="sft", on_step=on_step)

    base_model = cfg.model if model_obj is None else f"in-memory {type(model_obj).__name__}"
    info = {"kind": "sft", "style": cfg.style, "base_model": base_model,
            "config": cfg.model_dump(),
            "data": {k: v for k, v in asdict(data.report).items() if k != "skipped_ids"},
            "steps": result.steps, "train_loss": result.train_loss,
            "val_loss": result.val_loss, "identity": identity}
    save_final_model(model, tokenizer, out, info, lora=not cfg.full)
    return SFTResult(out=str(out), steps=result.steps, train_loss=result.train_loss,
                     val_loss=result.val_loss,
                     trained_tokens_per_s=result.trained_tokens_per_s,
                     train_seconds=result.train_seconds, trainable_params=trainable,
                     total_params=total, padding_waste=pad / positions if positions else 0.0,
                     data=asdict(data.report))
