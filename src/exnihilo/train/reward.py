"""Bradley–Terry reward models (`train reward`): a scalar head on a causal LM, trained on
preference pairs so that r(x, y_w) > r(x, y_l): loss −log σ(r_w − r_l) per pair (InstructGPT,
Ouyang et al. 2022), LoRA or full. Pairwise accuracy on held-out pairs is the validation
metric.

The reward of a sequence is the head applied to the last hidden state of its last token that
is not the pad token — exactly the pooling of transformers' `*ForSequenceClassification`,
so the saved folder (a plain sequence-classification model, `num_labels=1`) scores the same
in any tool, and any such model can be a `reward` scorer here (`RewardScorer`). The head
starts at zero, so every pair starts at loss ln 2.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field

from exnihilo import progress
from exnihilo.devices import inference_dtype, model_device, resolve_device
from exnihilo.errors import ExnihiloError
from exnihilo.models import load_tokenizer, resolve_model
from exnihilo.records import Record
from exnihilo.styles import StyleName
from exnihilo.train.collate import BatchPlan
from exnihilo.train.data import split_records
from exnihilo.train.forward import base_model, decoder_inputs
from exnihilo.train.loop import Batch, train_loop
from exnihilo.train.preference_data import (
    PairExample,
    PairReport,
    read_preferences,
    tokenize_exchange,
    tokenize_pairs,
)
from exnihilo.train.run import (
    RUN_INFO,
    TrainConfig,
    add_lora,
    count_parameters,
    given_model,
    load_for_training,
    prepare_out,
    run_identity,
    write_json_atomic,
)


class RewardConfig(TrainConfig):
    data: str
    style: StyleName = "chat"
    max_length: int = Field(512, ge=2)
    length_policy: str = "drop"

    default_lr_lora: ClassVar[float] = 1e-4
    default_lr_full: ClassVar[float] = 1e-5


class RewardModel(torch.nn.Module):
    """A causal LM's decoder (possibly LoRA-wrapped) plus a zero-initialised scalar head."""

    def __init__(self, lm: Any):
        super().__init__()
        self.lm = lm
        hidden = base_model(lm).config.hidden_size
        self.score = torch.nn.Linear(hidden, 1, bias=False)
        torch.nn.init.zeros_(self.score.weight)

    def forward(self, batch: Batch) -> torch.Tensor:
        """One reward per row [rows]: the head on the last non-pad token's hidden state."""
        inputs = {k: v for k, v in decoder_inputs(batch).items() if k != "position_ids"}
        hidden = base_model(self.lm).get_decoder()(**inputs).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last = hidden[rows, batch["last_index"]]
        return self.score(last.to(self.score.weight.dtype)).squeeze(-1).float()


def last_non_pad(ids: list[int], pad_id: int) -> int:
    """transformers' sequence-classification pooling: the last token that is not pad."""
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] != pad_id:
            return i
    return len(ids) - 1


def collate_sequences(rows: list[list[int]], pad_id: int) -> Batch:
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    last = torch.tensor([last_non_pad(r, pad_id) for r in rows], dtype=torch.long)
    return {"input_ids": input_ids, "last_index": last}


def collate_reward_pairs(pairs: list[PairExample], indices: list[int], pad_id: int) -> Batch:
    """B pairs → 2B full sequences (chosen rows first)."""
    rows = ([list(pairs[i].prompt + pairs[i].chosen) for i in indices]
            + [list(pairs[i].prompt + pairs[i].rejected) for i in indices])
    return collate_sequences(rows, pad_id)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """−log σ(r_w − r_l) per pair."""
    return -F.logsigmoid(chosen - rejected)


class RewardObjective:
    """Summed Bradley–Terry loss; metrics: pairwise accuracy and mean margin."""

    def weight(self, batch: Batch) -> float:
        return float(batch["input_ids"].shape[0] // 2)

    def loss_sum(self, model: RewardModel, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        rewards = model(batch)
        b = rewards.shape[0] // 2
        chosen, rejected = rewards[:b], rewards[b:]
        with torch.no_grad():
            metrics = {"accuracy": float((chosen > rejected).float().sum()),
                       "margin": float((chosen - rejected).sum())}
        return bradley_terry_loss(chosen, rejected).sum(), metrics


def save_reward_model(model: RewardModel, tokenizer: Any, out: Path, info: dict[str, Any],
                      lora: bool) -> None:
    """A plain `AutoModelForSequenceClassification` folder (num_labels=1); run info last."""
    from transformers import AutoModelForSequenceClassification

    lm = model.lm.merge_and_unload() if lora else model.lm
    config = lm.config
    config.num_labels = 1
    config.pad_token_id = tokenizer.pad_token_id
    seq = AutoModelForSequenceClassification.from_config(config)
    seq.model.load_state_dict(base_model(lm).get_decoder().state_dict())
    with torch.no_grad():
        seq.score.weight.copy_(model.score.weight)
    tmp = Path(tempfile.mkdtemp(prefix=".final-", dir=out))
    try:
        seq.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for path in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):
            os.replace(path, out / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_json_atomic(out / RUN_INFO, info)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)


@dataclass
class RewardResult:
    out: str
    steps: int
    train_loss: float | None
    val_loss: float | None
    val_accuracy: float | None
    train_seconds: float
    trainable_params: int
    data: dict[str, Any]


def run_reward(cfg: RewardConfig, resume: bool = False, on_step: Any = None,
               model_obj: Any = None, tokenizer: Any = None) -> RewardResult:
    out = Path(cfg.out)
    identity = run_identity(cfg, {"data": cfg.data})
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
    records = read_preferences(cfg.data)
    train_records, val_records = split_records(records, cfg.val_fraction, cfg.seed)
    report = PairReport()
    train = tokenize_pairs(train_records, cfg.style, tokenizer, cfg.max_length,
                           cfg.length_policy, report)
    val = tokenize_pairs(val_records, cfg.style, tokenizer, cfg.max_length, cfg.length_policy,
                         report)
    if not train:
        raise ExnihiloError(f"{cfg.data}: no usable preference pairs ({report.summary()})")
    progress.note(report.summary())
    torch.manual_seed(cfg.seed)
    lm = given_model(model_obj, cfg) if model_obj is not None else \
        load_for_training(cfg.model, cfg)
    if not cfg.full:
        lm = add_lora(lm, cfg)
    model = RewardModel(lm).to(model_device(lm))  # the new head joins the LM's device
    prepare_out(out, identity, resume)
    trainable, _ = count_parameters(model)
    pairs = train + val
    pad_id = tokenizer.pad_token_id
    plan_obj = BatchPlan(cfg.batch_size, False, cfg.max_length, cfg.seed)

    def plan(epoch: int) -> list[list[list[int]]]:
        return plan_obj.epoch([0] * len(train), epoch)

    def collate(batch: list[list[int]]) -> Batch:
        return collate_reward_pairs(pairs, [row[0] for row in batch], pad_id)

    val_idx = list(range(len(train), len(pairs)))
    val_batches = [collate_reward_pairs(pairs, val_idx[k:k + cfg.batch_size], pad_id)
                   for k in range(0, len(val_idx), cfg.batch_size)]
    result = train_loop(model, RewardObjective(), plan, collate, val_batches, out,
                        cfg.loop_config(), resume=resume, label="reward", on_step=on_step)
    vals = [h["val_accuracy"] for h in result.history if "val_accuracy" in h]
    info = {"kind": "reward", "style": cfg.style, "base_model": cfg.model,
            "config": cfg.model_dump(), "steps": result.steps,
            "train_loss": result.train_loss, "val_loss": result.val_loss,
            "val_accuracy": vals[-1] if vals else None,
            "data": {k: v for k, v in asdict(report).items() if k != "skipped_ids"}}
    save_reward_model(model, tokenizer, out, info, lora=not cfg.full)
    return RewardResult(str(out), result.steps, result.train_loss, result.val_loss,
                        info["val_accuracy"], result.train_seconds, trainable, asdict(report))


class RewardScorer:
    """Scores responses with any sequence-classification reward model (num_labels=1), e.g.
    one trained by `train reward`; the prompt is rendered in `style`."""

    name = "reward"

    def __init__(self, model: str, style: str = "chat", batch_size: int = 8,
                 dtype: str = "auto", device: str | None = None):
        from transformers import AutoModelForSequenceClassification

        from exnihilo.models import DTYPES

        if dtype not in DTYPES:
            raise ExnihiloError(f"--dtype {dtype!r}: known {', '.join(DTYPES)}")
        target = resolve_device(device)
        folder = resolve_model(model)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            folder, dtype=getattr(torch, inference_dtype(DTYPES[dtype], target)),
            local_files_only=True, use_safetensors=True, trust_remote_code=False).eval()
        self.model.to(target)
        if self.model.config.num_labels != 1:
            raise ExnihiloError(f"--reward-model {model}: expected one output (a scalar "
                                f"reward), it has {self.model.config.num_labels} labels")
        self.tokenizer = load_tokenizer(model)
        self.style, self.batch_size = style, batch_size

    def score(self, record: Record, responses: list[str]) -> list[float | None]:
        pad = self.model.config.pad_token_id
        pad = self.tokenizer.pad_token_id if pad is None else pad
        rows = []
        for r in responses:
            prompt, resp = tokenize_exchange(record["messages"],
                                             {"role": "assistant", "content": r}, self.style,
                                             self.tokenizer)
            rows.append(prompt + resp)
        scores: list[float | None] = []
        for k in range(0, len(rows), self.batch_size):
            chunk = rows[k:k + self.batch_size]
            batch = collate_sequences(chunk, pad)
            with torch.no_grad():
                ids = batch["input_ids"].to(model_device(self.model))
                logits = self.model(input_ids=ids).logits[:, 0].float().cpu()
            scores += [float(v) for v in logits]
        return scores
