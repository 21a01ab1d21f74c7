"""Preference optimization on the one loop: DPO (sigmoid), IPO, hinge, robust DPO, SimPO,
an SFT term, and weighted sums of them (`sigmoid+sft`, `sigmoid+0.2*sft`).

The objective sees a batch of B pairs as 2B rows (chosen rows first, then rejected), so
chosen and rejected of a pair go through one forward pass, and log-probs come from the one
path (`forward.sequence_logprobs`). The reference log π_ref(y|x):

- LoRA (default): the same model with its adapter disabled — no second model in memory;
- full finetuning: a frozen copy of the starting weights, or `--ref-model`;
- `--precompute-ref`: computed once before training and cached on disk under a key made of
  the reference weights' hash and the tokenised data's hash, so resume and reruns reuse it;
- `--ema-anchor μ`: WARP's anchor, an exponential moving average of the policy updated after
  every optimizer step (`EMAAnchor`, a step hook whose state is checkpointed).

Formulas (TRL's `dpo_trainer._compute_loss` and CPO's SimPO, as the anchors note records):
Δ = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)) over summed token log-probs;
sigmoid −log σ(βΔ); hinge relu(1 − βΔ); robust [−(1−ε)log σ(βΔ) + ε log σ(−βΔ)]/(1−2ε);
IPO (Δ_w/|y_w| − Δ_l/|y_l| − 1/(2β))² on length-averaged log-ratios; SimPO −(1−ε)log σ(z) −
ε log σ(−z) with z = β(ā_w − ā_l) − γ on mean log-probs and no reference; sft −ā_w (the
chosen response's mean token NLL). Every loss is the mean over pairs.

Why not TRL's DPOTrainer: it keeps a second model (or recomputes reference log-probs every
run), and its loop is not ours (bit-exact resume, metrics, hooks); the formulas are short.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from exnihilo import progress
from exnihilo.devices import model_device, to_device
from exnihilo.errors import ExnihiloError
from exnihilo.models import cache_dir, load_tokenizer
from exnihilo.styles import StyleName
from exnihilo.train.collate import BatchPlan, collate_continuations
from exnihilo.train.data import split_records
from exnihilo.train.forward import sequence_logprobs
from exnihilo.train.loop import Batch, LoopResult, train_loop
from exnihilo.train.preference_data import (
    PairExample,
    PairReport,
    pairs_sha256,
    read_preferences,
    tokenize_pairs,
)
from exnihilo.train.run import (
    TrainConfig,
    add_lora,
    count_parameters,
    enable_gradient_checkpointing,
    given_model,
    load_for_training,
    prepare_out,
    run_identity,
    save_final_model,
)

LOSSES = ("sigmoid", "hinge", "ipo", "robust", "simpo", "sft")
REFERENCE_FREE = {"simpo", "sft"}  # losses that never look at π_ref


class DPOConfig(TrainConfig):
    data: str
    style: StyleName = "chat"
    max_length: int = Field(512, ge=2)
    length_policy: str = "drop"  # or "truncate" (cut responses to fit; counted)
    loss: str = "sigmoid"  # one of LOSSES, or a weighted sum: "sigmoid+0.5*sft"
    beta: float = Field(0.1, gt=0)
    gamma: float = Field(0.5, ge=0)  # SimPO's target margin
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)  # robust / SimPO ε
    ref_model: str | None = None
    precompute_ref: bool = False
    ema_anchor: float | None = Field(None, gt=0, le=1)  # WARP: θ_ema ← (1−μ)θ_ema + μθ
    steps: int = Field(1, ge=1)  # sDPO: split the data into this many steps

    default_lr_lora: ClassVar[float] = 5e-5
    default_lr_full: ClassVar[float] = 1e-6  # TRL's DPOConfig default
    # DPO's loss is a margin of policy minus reference log-probs, and a reference computed
    # apart (precomputed, --ref-model, the full-finetuning copy) is float32: bf16 base
    # products in the policy alone put rounding into the margin (0.69326 instead of
    # log 2 = 0.69315 at step 0 on the tiny test model). Float32 until measured otherwise.
    frozen_bf16_allowed: ClassVar[bool] = False

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, v: str) -> str:
        parse_loss(v)
        return v

    @field_validator("length_policy")
    @classmethod
    def _known_policy(cls, v: str) -> str:
        if v not in ("drop", "truncate"):
            raise ValueError(f"unknown length policy {v!r} (known: drop, truncate)")
        return v


def parse_loss(spec: str) -> list[tuple[str, float]]:
    """"sigmoid+0.5*sft" → [("sigmoid", 1.0), ("sft", 0.5)]."""
    terms = []
    for part in spec.replace(" ", "").split("+"):
        m = re.fullmatch(r"(?:([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\*)?([a-z]+)", part)
        if not m or m.group(2) not in LOSSES:
            raise ExnihiloError(f"--loss {spec!r}: unknown term {part!r} (known: "
                                f"{', '.join(LOSSES)}; combine as sigmoid+0.5*sft)")
        terms.append((m.group(2), float(m.group(1)) if m.group(1) else 1.0))
    if len({name for name, _ in terms}) != len(terms):
        raise ExnihiloError(f"--loss {spec!r}: a term appears twice")
    return terms


def needs_reference(terms: list[tuple[str, float]]) -> bool:
    return any(name not in REFERENCE_FREE for name, _ in terms)


# --------------------------------------------------------------------------------- losses

@dataclass
class PairLogps:
    """Summed log-probs of each pair's chosen and rejected responses, and their lengths."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_n: torch.Tensor
    rejected_n: torch.Tensor

    @property
    def chosen_mean(self) -> torch.Tensor:
        return self.chosen / self.chosen_n.clamp(min=1)

    @property
    def rejected_mean(self) -> torch.Tensor:
        return self.rejected / self.rejected_n.clamp(min=1)


def logsigmoid_smoothed(z: torch.Tensor, eps: float) -> torch.Tensor:
    """−(1−ε)·log σ(z) − ε·log σ(−z): cDPO / SimPO's label smoothing (ε = 0: plain)."""
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def pair_loss(name: str, policy: PairLogps, ref: PairLogps | None, beta: float,
              gamma: float = 0.5, eps: float = 0.0) -> torch.Tensor:
    """One loss term per pair [B]."""
    if name == "sft":
        return -policy.chosen_mean
    if name == "simpo":
        z = beta * (policy.chosen_mean - policy.rejected_mean) - gamma
        return logsigmoid_smoothed(z, eps)
    if ref is None:
        raise ExnihiloError(f"loss {name!r} needs a reference model")
    delta = (policy.chosen - ref.chosen) - (policy.rejected - ref.rejected)
    if name == "sigmoid":
        return -F.logsigmoid(beta * delta)
    if name == "hinge":
        return torch.relu(1 - beta * delta)
    if name == "robust":
        return ((-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta))
                / (1 - 2 * eps))
    if name == "ipo":
        avg = ((policy.chosen - ref.chosen) / policy.chosen_n.clamp(min=1)
               - (policy.rejected - ref.rejected) / policy.rejected_n.clamp(min=1))
        return (avg - 1 / (2 * beta)) ** 2
    raise ExnihiloError(f"unknown loss {name!r} (known: {', '.join(LOSSES)})")


def pair_rewards(policy: PairLogps, ref: PairLogps | None, beta: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) implicit rewards: β·(log π − log π_ref), or β·mean log π without a
    reference (what CPO/SimPO log)."""
    if ref is None:
        return beta * policy.chosen_mean, beta * policy.rejected_mean
    return beta * (policy.chosen - ref.chosen), beta * (policy.rejected - ref.rejected)


# ------------------------------------------------------------------------------ references

def split_pairs(sums: torch.Tensor, counts: torch.Tensor) -> PairLogps:
    """2B rows (chosen first) → per-pair log-probs."""
    b = sums.shape[0] // 2
    return PairLogps(sums[:b], sums[b:], counts[:b], counts[b:])


def no_grad_eval_logps(model: Any, batch: Batch) -> torch.Tensor:
    """Summed log-probs without gradients, in eval mode (no dropout in a reference)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return sequence_logprobs(model, to_device(batch, model_device(model))).sums
    finally:
        model.train(was)


class AdapterReference:
    """π_ref = the policy with its LoRA adapter disabled: the base weights, no second copy."""

    def logps(self, model: Any, batch: Batch) -> torch.Tensor:
        with model.disable_adapter():
            return no_grad_eval_logps(model, batch)


class ModelReference:
    """π_ref = a separate frozen model (full finetuning's starting copy, or --ref-model)."""

    def __init__(self, ref_model: Any):
        self.model = ref_model.eval().requires_grad_(False)

    def logps(self, model: Any, batch: Batch) -> torch.Tensor:
        return no_grad_eval_logps(self.model, batch)


class CachedReference:
    """π_ref log-probs looked up in a precomputed table [pairs, 2] by `pair_index`."""

    def __init__(self, table: torch.Tensor):
        self.table = table

    def logps(self, model: Any, batch: Batch) -> torch.Tensor:
        index = batch["pair_index"]
        rows = self.table[index.to(self.table.device)].to(index.device)
        return torch.cat([rows[:, 0], rows[:, 1]])


class EMAAnchor:
    """WARP's EMA anchor (arXiv 2406.16768): the reference is an exponential moving average
    of the policy's trainable weights, θ_ema ← (1−μ)·θ_ema + μ·θ after every optimizer step.

    A step hook (its state is checkpointed, so resume is exact) and a reference at once: the
    reference pass swaps the averaged values into the trainable parameters, runs, and swaps
    the exact values back, so no second model is held. With LoRA the average is over the
    adapter's factors (the trainable state), not over the merged product B·A."""

    def __init__(self, mu: float):
        if not 0 < mu <= 1:
            raise ExnihiloError(f"--ema-anchor must be in (0, 1], got {mu}")
        self.mu = mu
        self.ema: dict[str, torch.Tensor] = {}

    @staticmethod
    def _trainable(model: Any) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def attach(self, model: Any) -> EMAAnchor:
        self.ema = {n: p.detach().clone() for n, p in self._trainable(model).items()}
        return self

    def _follow(self, params: dict[str, torch.nn.Parameter]) -> None:
        """Keep each average on its parameter's device (a resumed state loads on the CPU)."""
        for name, param in params.items():
            if self.ema[name].device != param.device:
                self.ema[name] = self.ema[name].to(param.device)

    def after_step(self, model: Any, state: Any) -> None:
        params = self._trainable(model)
        self._follow(params)
        with torch.no_grad():
            for name, param in params.items():
                self.ema[name].lerp_(param.detach(), self.mu)

    def state_dict(self) -> dict[str, Any]:
        return {"mu": self.mu, "ema": self.ema}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema = {k: v.clone() for k, v in state["ema"].items()}

    def logps(self, model: Any, batch: Batch) -> torch.Tensor:
        params = self._trainable(model)
        self._follow(params)
        with torch.no_grad():
            saved = {n: p.detach().clone() for n, p in params.items()}
            try:
                for n, p in params.items():
                    p.copy_(self.ema[n])
                return no_grad_eval_logps(model, batch)
            finally:
                for n, p in params.items():
                    p.copy_(saved[n])


# ------------------------------------------------------------------------------ objective

class DPOObjective:
    """Summed preference loss over a batch's pairs (the loop divides by the pair count),
    with named metrics: reward accuracy and margin, chosen/rejected log-probs and rewards."""

    def __init__(self, loss: str = "sigmoid", beta: float = 0.1, gamma: float = 0.5,
                 label_smoothing: float = 0.0, reference: Any = None):
        self.terms = parse_loss(loss)
        self.beta, self.gamma, self.eps = beta, gamma, label_smoothing
        if needs_reference(self.terms) and reference is None:
            raise ExnihiloError(f"--loss {loss} needs a reference")
        self.reference = reference if needs_reference(self.terms) else None

    def weight(self, batch: Batch) -> float:
        return float(batch["input_ids"].shape[0] // 2)

    def loss_sum(self, model: Any, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        # The reference runs first: the EMA anchor swaps weights in and out, which must
        # happen before the policy's graph holds those parameters.
        ref_sums = self.reference.logps(model, batch) if self.reference is not None else None
        out = sequence_logprobs(model, batch)  # chosen and rejected: one forward
        policy = split_pairs(out.sums, out.counts)
        ref = None if ref_sums is None else split_pairs(ref_sums.to(out.sums.dtype), out.counts)
        total = sum(w * pair_loss(name, policy, ref, self.beta, self.gamma, self.eps).sum()
                    for name, w in self.terms)
        return total, pair_metrics(policy, ref, self.beta)


def pair_metrics(policy: PairLogps, ref: PairLogps | None, beta: float) -> dict[str, float]:
    """Named metrics summed over pairs (the loop turns them into means)."""
    with torch.no_grad():
        chosen, rejected = pair_rewards(policy, ref, beta)
        return {"reward_accuracy": float((chosen > rejected).float().sum()),
                "reward_margin": float((chosen - rejected).sum()),
                "reward_chosen": float(chosen.sum()), "reward_rejected": float(rejected.sum()),
                "logp_chosen": float(policy.chosen.sum()),
                "logp_rejected": float(policy.rejected.sum())}


# ---------------------------------------------------------------------------------- batches

def collate_pairs(pairs: list[PairExample], indices: list[int], pad_id: int) -> Batch:
    """B pairs → 2B right-padded rows (chosen first) whose trained targets are exactly the
    responses, plus `pair_index` [B] (for a precomputed reference)."""
    rows = ([(pairs[i].prompt, pairs[i].chosen) for i in indices]
            + [(pairs[i].prompt, pairs[i].rejected) for i in indices])
    batch = collate_continuations(rows, pad_id)
    batch["pair_index"] = torch.tensor(indices, dtype=torch.long)
    return batch


def pair_batches(pairs: list[PairExample], indices: list[int], batch_size: int, pad_id: int
                 ) -> list[Batch]:
    return [collate_pairs(pairs, indices[k:k + batch_size], pad_id)
            for k in range(0, len(indices), batch_size)]


# ------------------------------------------------------------------- precomputed reference

def weights_sha256(model: Any) -> str:
    """A hash of a model's weights (names, dtypes, bytes), LoRA adapters excluded."""
    h = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        if "lora_" in name:
            continue
        t = state[name].detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{t.numel()};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def ref_cache_root() -> Path:
    return Path(os.environ.get("EXNIHILO_REF_CACHE") or cache_dir().parent / "ref-logps")


def reference_table(reference: Any, model: Any, pairs: list[PairExample], batch_size: int,
                    pad_id: int) -> torch.Tensor:
    """[pairs, 2] reference log-prob sums (chosen, rejected), one pass without gradients."""
    table = torch.zeros(len(pairs), 2, dtype=torch.float32)
    for batch in pair_batches(pairs, list(range(len(pairs))), batch_size, pad_id):
        sums = reference.logps(model, batch).float().cpu()
        b = batch["pair_index"].shape[0]
        table[batch["pair_index"]] = torch.stack([sums[:b], sums[b:]], dim=1)
    return table


def cached_reference_table(key: str, compute: Any) -> tuple[torch.Tensor, bool]:
    """(table, was it cached): read `<cache>/<key>.safetensors`, or compute and write it
    atomically."""
    from safetensors.torch import load_file, save_file

    path = ref_cache_root() / f"{key}.safetensors"
    if path.exists():
        return load_file(str(path))["ref_logps"], True
    table = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{key}.", dir=path.parent)
    os.close(fd)
    try:
        save_file({"ref_logps": table.contiguous()}, tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return table, False


def check_same_tokenizer(tokenizer: Any, ref_tokenizer: Any, ref_name: str) -> None:
    """Log-probs of the same token ids only compare under the same vocabulary."""
    if tokenizer.get_vocab() != ref_tokenizer.get_vocab():
        raise ExnihiloError(f"--ref-model {ref_name} uses another tokenizer than --model "
                            f"({len(ref_tokenizer)} vs {len(tokenizer)} tokens): reference "
                            f"log-probs must score the same token ids")


# --------------------------------------------------------------------------------------- run

@dataclass
class DPOData:
    pairs: list[PairExample]  # train pairs first, then validation pairs
    n_train: int
    report: PairReport

    @property
    def train_indices(self) -> list[int]:
        return list(range(self.n_train))

    @property
    def val_indices(self) -> list[int]:
        return list(range(self.n_train, len(self.pairs)))


def build_pair_data(cfg: DPOConfig, tokenizer: Any, records: list[Any] | None = None
                    ) -> DPOData:
    records = records if records is not None else read_preferences(cfg.data)
    train_records, val_records = split_records(records, cfg.val_fraction, cfg.seed)
    report = PairReport()
    train = tokenize_pairs(train_records, cfg.style, tokenizer, cfg.max_length,
                           cfg.length_policy, report)
    val = tokenize_pairs(val_records, cfg.style, tokenizer, cfg.max_length, cfg.length_policy,
                         report)
    if not train:
        raise ExnihiloError(f"{cfg.data}: no usable preference pairs ({report.summary()})")
    return DPOData(train + val, len(train), report)


def check_options(cfg: DPOConfig) -> None:
    """Option combinations that cannot work, before any model loads."""
    terms = parse_loss(cfg.loss)
    if cfg.ema_anchor is not None:
        if not needs_reference(terms):
            raise ExnihiloError(f"--ema-anchor needs a loss with a reference; {cfg.loss} "
                                f"has none")
        if cfg.precompute_ref or cfg.ref_model:
            raise ExnihiloError("--ema-anchor moves the reference every step: it cannot be "
                                "combined with --precompute-ref or --ref-model")
    if cfg.precompute_ref and not needs_reference(terms):
        raise ExnihiloError(f"--precompute-ref: loss {cfg.loss} uses no reference")


@dataclass
class DPOResult:
    out: str
    steps: int
    train_loss: float | None
    val_loss: float | None
    final_metrics: dict[str, float]
    train_seconds: float
    pairs_per_s: float
    trainable_params: int
    total_params: int
    reference: str
    ref_cached: bool | None
    data: dict[str, Any]


def make_reference(cfg: DPOConfig, model: Any, ref_model_obj: Any) -> tuple[Any, str]:
    """(reference, its description) before LoRA is added to `model`."""
    if not needs_reference(parse_loss(cfg.loss)):
        return None, "none"
    if cfg.ema_anchor is not None:
        return EMAAnchor(cfg.ema_anchor), f"EMA anchor μ={cfg.ema_anchor}"
    if ref_model_obj is not None or cfg.ref_model:
        ref = given_model(ref_model_obj, cfg) if ref_model_obj is not None else \
            load_for_training(cfg.ref_model, cfg)
        return ModelReference(ref), f"--ref-model {cfg.ref_model or 'in-memory'}"
    if cfg.full:
        return ModelReference(copy.deepcopy(model)), "frozen copy of the starting weights"
    return AdapterReference(), "the model with its LoRA adapter disabled"


def run_dpo(cfg: DPOConfig, resume: bool = False, on_step: Any = None, model_obj: Any = None,
            tokenizer: Any = None, ref_model_obj: Any = None, ref_tokenizer: Any = None,
            records: list[Any] | None = None) -> DPOResult:
    """Train and save. `model_obj`/`tokenizer`/`ref_model_obj` let tests pass tiny models;
    `records` replaces reading `cfg.data` (sDPO's parts). `cfg.steps` > 1 runs sDPO
    (`train.sdpo`) and returns its last step's result."""
    check_options(cfg)
    if cfg.steps > 1:
        from exnihilo.train.sdpo import run_sdpo

        results = run_sdpo(cfg, resume, on_step, model_obj, tokenizer, ref_model_obj)
        last = results[-1]
        if last is None:
            raise ExnihiloError(f"--out {cfg.out}: every sDPO step had already finished")
        return last
    out = Path(cfg.out)
    identity = run_identity(cfg, {"data": cfg.data})
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
    if cfg.ref_model and ref_model_obj is None:
        ref_tokenizer = ref_tokenizer or load_tokenizer(cfg.ref_model)
    if ref_tokenizer is not None:
        check_same_tokenizer(tokenizer, ref_tokenizer, cfg.ref_model or "in-memory")
    data = build_pair_data(cfg, tokenizer, records)
    progress.note(data.report.summary())
    torch.manual_seed(cfg.seed)  # LoRA init and dropout draw from here; resume restores it
    model = given_model(model_obj, cfg) if model_obj is not None else \
        load_for_training(cfg.model, cfg)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    reference, ref_text = make_reference(cfg, model, ref_model_obj)
    ref_weights = model if isinstance(reference, AdapterReference) else getattr(
        reference, "model", None)
    ref_hash = weights_sha256(ref_weights) if cfg.precompute_ref else ""
    del ref_weights  # a frozen copy must not outlive the precomputed table
    if not cfg.full:
        model = add_lora(model, cfg)
    prepare_out(out, identity, resume)
    trainable, total = count_parameters(model)
    progress.note(f"{'full finetuning' if cfg.full else 'LoRA'}: {trainable:,} of {total:,} "
                  f"parameters trainable; reference: {ref_text}")

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
        tokenizer.eos_token_id)
    ref_cached = None
    if cfg.precompute_ref:
        key = hashlib.sha256(f"{ref_hash}:{pairs_sha256(data.pairs)}:{cfg.dtype}".encode()
                             ).hexdigest()[:32]
        table, ref_cached = cached_reference_table(key, lambda: reference_table(
            reference, model, data.pairs, cfg.batch_size, pad_id))
        progress.note(f"reference log-probs {'read from' if ref_cached else 'cached in'} "
                      f"{ref_cache_root() / key}.safetensors")
        reference = CachedReference(table)  # the frozen copy (if any) can go now
    hooks = []
    if isinstance(reference, EMAAnchor):
        hooks.append(reference.attach(model))

    objective = DPOObjective(cfg.loss, cfg.beta, cfg.gamma, cfg.label_smoothing, reference)
    batch_plan = BatchPlan(cfg.batch_size, False, cfg.max_length, cfg.seed)
    train_idx = data.train_indices

    def plan(epoch: int) -> list[list[list[int]]]:
        return batch_plan.epoch([0] * len(train_idx), epoch)

    def collate(batch: list[list[int]]) -> Batch:
        return collate_pairs(data.pairs, [train_idx[row[0]] for row in batch], pad_id)

    val_batches = pair_batches(data.pairs, data.val_indices, cfg.batch_size, pad_id)
    result: LoopResult = train_loop(model, objective, plan, collate, val_batches, out,
                                    cfg.loop_config(), resume=resume, label="dpo",
                                    on_step=on_step, hooks=hooks)
    last = result.history[-1] if result.history else {}
    final_metrics = {k: v for k, v in last.items() if isinstance(v, float)}
    base_model = cfg.model if model_obj is None else f"in-memory {type(model_obj).__name__}"
    info = {"kind": "dpo", "style": cfg.style, "base_model": base_model,
            "config": cfg.model_dump(), "reference": ref_text,
            # What the implicit reward of this model is measured against (DICE's scorer).
            "reference_model": cfg.ref_model or (None if ref_model_obj is not None
                                                 else cfg.model),
            "data": {k: v for k, v in asdict(data.report).items() if k != "skipped_ids"},
            "steps": result.steps, "train_loss": result.train_loss,
            "val_loss": result.val_loss, "final_metrics": final_metrics}
    save_final_model(model, tokenizer, out, info, lora=not cfg.full)
    pairs_seen = sum(h.get("trained_tokens", 0) for h in result.history[-1:])
    return DPOResult(
        out=str(out), steps=result.steps, train_loss=result.train_loss,
        val_loss=result.val_loss, final_metrics=final_metrics,
        train_seconds=result.train_seconds,
        pairs_per_s=pairs_seen / max(result.train_seconds, 1e-9),
        trainable_params=trainable, total_params=total, reference=ref_text,
        ref_cached=ref_cached, data=asdict(data.report))
