"""Run plumbing shared by every `train` verb (SFT, DPO, distillation, pretraining …):
the settings every method has, the output-folder guard, run identity and info files, LoRA
setup and target checks, parameter counts, and the final save.

A run folder holds `run_config.json` (written when the run starts: what identifies it),
`metrics.jsonl`, `checkpoints/` while unfinished, and, once finished, a plain Hugging Face
model folder plus `exnihilo_run.json` (written last: the model is complete) recording the
method, prompt style, base model and config — `read_run_info` / `run_style` read it back.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, Field, field_validator

from exnihilo.devices import (
    place_model,
    resolve_device,
    training_dtypes,
    wants_frozen_bf16,
)
from exnihilo.errors import ExnihiloError
from exnihilo.models import DEFAULT_MODEL, load_model
from exnihilo.records import source_sha256
from exnihilo.train.loop import LoopConfig
from exnihilo.train.lora_dropout import use_lane_dropout

RUN_CONFIG = "run_config.json"  # written when a run starts: identifies it
RUN_INFO = "exnihilo_run.json"  # written last when a run finishes: the model is complete

DEFAULT_LR_LORA = 2e-4
DEFAULT_LR_FULL = 5e-5  # ch07's full-finetuning rate


class TrainConfig(BaseModel):
    """Settings every training method shares; each method's config extends it."""

    out: str
    model: str = DEFAULT_MODEL
    full: bool = False
    epochs: int = Field(1, ge=1)
    lr: float | None = Field(None, gt=0)  # None: the method's LoRA / full default
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lora_r: int = Field(16, ge=1)
    lora_alpha: float = Field(32, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_targets: list[str] = ["all-linear"]
    dora: bool = False  # peft's weight-decomposed LoRA (arXiv 2402.09353)
    lora_plus_ratio: float | None = Field(None, gt=0)  # LoRA+: lr of B = ratio × lr
    val_fraction: float = Field(0.05, ge=0, lt=1)
    eval_every: int = Field(50, ge=0)
    save_every: int = Field(50, ge=0)
    seed: int = 0
    max_steps: int | None = Field(None, ge=1)
    # auto: float32 weights, with bfloat16 autocast on a GPU that supports it, and frozen
    # weights multiplied in bfloat16 on a CPU with native bf16 (exnihilo.devices)
    dtype: str = "auto"
    device: str | None = None  # None: the process default (exnihilo --device, else auto)
    # Recompute layer activations in backward. None: automatic for SFT (on from
    # CHECKPOINT_FROM_POSITIONS positions per micro-batch); True/False force it.
    gradient_checkpointing: bool | None = None
    warmup_ratio: float = Field(0.05, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    # Experiment trackers fed each metrics row (tensorboard, trackio, wandb); checked to be
    # installed when the config is built, before any model loads.
    report_to: list[str] = []

    # The method's default rates; subclasses override.
    default_lr_lora: ClassVar[float] = DEFAULT_LR_LORA
    default_lr_full: ClassVar[float] = DEFAULT_LR_FULL
    # Whether `--dtype auto` may multiply frozen weights in bf16 on a native-bf16 CPU.
    frozen_bf16_allowed: ClassVar[bool] = True

    @field_validator("report_to", mode="before")
    @classmethod
    def _known_trackers(cls, value: Any) -> list[str]:
        from exnihilo.train.tracking import parse_report_to

        return parse_report_to(value)

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return self.default_lr_full if self.full else self.default_lr_lora

    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    def loop_config(self) -> LoopConfig:
        return LoopConfig(lr=self.learning_rate, weight_decay=self.weight_decay,
                          warmup_ratio=self.warmup_ratio, grad_accum=self.grad_accum,
                          max_grad_norm=self.max_grad_norm, epochs=self.epochs,
                          max_steps=self.max_steps, eval_every=self.eval_every,
                          save_every=self.save_every, seed=self.seed,
                          lora_plus_ratio=self.lora_plus_ratio,
                          report_to=tuple(self.report_to), run_config=self.model_dump(),
                          autocast_dtype=training_dtypes(self.dtype, self.torch_device())[1],
                          bf16_frozen_matmuls=self.frozen_bf16_allowed and
                          wants_frozen_bf16(self.dtype, self.torch_device()))


def load_for_training(name: str, cfg: TrainConfig) -> Any:
    """`name` loaded for a run of `cfg`: on its device, in its training weights' dtype
    (float32 under dtype auto; the loop's autocast supplies bfloat16 where it fits)."""
    device = cfg.torch_device()
    return load_model(name, training_dtypes(cfg.dtype, device)[0], device=device)


def given_model(model_obj: Any, cfg: TrainConfig) -> Any:
    """An in-memory model handed to a run: moved to `cfg.device` when one is set."""
    return place_model(model_obj, cfg.device)


# Settings that do not change the trained weights may differ when resuming.
NOT_IDENTITY = {"out", "eval_every", "save_every", "report_to", "device"}


def run_identity(cfg: BaseModel, data_files: dict[str, str]) -> dict[str, Any]:
    """What makes two runs the same run: the config plus a hash of each data file."""
    ident = {k: v for k, v in cfg.model_dump().items() if k not in NOT_IDENTITY}
    for key, path in data_files.items():
        ident[f"{key}_sha256"] = source_sha256(path)  # a file, or hf:org/name's cached files
    return ident


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Distinct last-name parts of the Linear layers (what LoRA targets match)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear)})


def check_lora_targets(model: torch.nn.Module, targets: list[str]) -> None:
    if targets == ["all-linear"]:
        return
    names = [name for name, _ in model.named_modules()]
    for target in targets:
        if not any(n == target or n.endswith("." + target) for n in names):
            raise ExnihiloError(
                f"LoRA target {target!r} matches no module of the model; its linear layers "
                f"are: {', '.join(linear_module_names(model))} (or use all-linear)")


def add_lora(model: Any, cfg: TrainConfig) -> Any:
    """Wrap `model` with peft LoRA (or DoRA with `cfg.dora`) adapters per `cfg`, their
    dropout layers drawn by `LaneDropout` (on the CPU about a tenth faster per step at 0.05)."""
    from peft import LoraConfig, get_peft_model

    check_lora_targets(model, cfg.lora_targets)
    targets: Any = "all-linear" if cfg.lora_targets == ["all-linear"] else cfg.lora_targets
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM", use_dora=cfg.dora)
    with warnings.catch_warnings():
        # peft 0.21 calls a transformers 5.23 property that warns about its own rename.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                                category=FutureWarning)
        model = get_peft_model(model, lora)
    use_lane_dropout(model)  # same distribution, drawn with a quarter of the RNG calls
    return model


def enable_gradient_checkpointing(model: Any) -> None:
    """Keep only each decoder layer's input and recompute the rest in backward: at 8 × 512
    tokens on SmolLM2-135M this is most of the peak memory (see benchmarks/sft.py), for
    about a third more compute. Non-reentrant checkpointing works with frozen embeddings
    (LoRA) and restores the RNG state, so dropout masks (and resume) stay exact."""
    kwargs = {"use_reentrant": False}
    # transformers 5.24 renamed it and warns on the old name (every training run printed it).
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# Micro-batches of at least this many positions (rows × width) are checkpointed when the
# setting is automatic: at 8 × 512 on SmolLM2-135M LoRA it cut the peak RSS from 11.0 to
# 2.95 GiB (with `limit_heap_growth`), see benchmarks/sft.py. Smaller micro-batches run
# without it, a quarter faster per step.
CHECKPOINT_FROM_POSITIONS = 2048


def wants_checkpointing(cfg: TrainConfig, max_length: int) -> bool:
    """Whether to set gradient checkpointing up: when asked for (True/False win), else when
    some micro-batch may be large enough (batch × max length) that activations, not
    weights, set the peak memory. Under the automatic setting the loop then turns it on
    only for the micro-batches that are (`checkpoint_from_positions`)."""
    if cfg.gradient_checkpointing is not None:
        return cfg.gradient_checkpointing
    return cfg.batch_size * max_length >= CHECKPOINT_FROM_POSITIONS


def checkpoint_from_positions(cfg: TrainConfig, max_length: int) -> int | None:
    """The loop's per-micro-batch threshold, or None to leave checkpointing as set up (an
    explicit True/False, or automatic with no micro-batch large enough)."""
    if cfg.gradient_checkpointing is None and wants_checkpointing(cfg, max_length):
        return CHECKPOINT_FROM_POSITIONS
    return None


def limit_heap_growth(threshold: int = 1 << 20) -> bool:
    """Return freed tensor memory to the OS (glibc only; False elsewhere).

    glibc raises its mmap threshold after large frees, so later large tensors come from the
    heap, which fragments and never shrinks: a LoRA step at 8 × 512 (gradient checkpointing)
    peaked at 5.7 GiB RSS of which ~2.7 GiB was freed-but-kept heap. Fixing the threshold at
    1 MiB (mallopt M_MMAP_THRESHOLD) makes every large tensor its own mapping, unmapped on
    free: the same step peaked at 2.95 GiB. Each large allocation then maps fresh (zeroed)
    pages; that speed cost was not yet measured separately."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(-3, threshold))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = {id(p): p for p in model.parameters()}.values()
    return (sum(p.numel() for p in params if p.requires_grad),
            sum(p.numel() for p in params))


def prepare_out(out: Path, identity: dict[str, Any], resume: bool) -> None:
    """Refuse to touch a folder that holds anything but this run; record this run's identity.

    Never overwrites silently: a finished run, a different run, or an unrelated non-empty
    folder are all errors. An unfinished run of the same config needs --resume.
    """
    config_path, info_path = out / RUN_CONFIG, out / RUN_INFO
    if out.exists() and not out.is_dir():
        raise ExnihiloError(f"--out {out} is a file, expected a folder")
    if out.exists() and any(out.iterdir()):
        if not config_path.exists():
            raise ExnihiloError(f"--out {out} is not empty and holds no exnihilo run; "
                                f"choose a new folder")
        previous = json.loads(config_path.read_text())
        differs = sorted(k for k in set(previous) | set(identity)
                         if previous.get(k) != identity.get(k))
        if differs:
            raise ExnihiloError(f"--out {out} holds a different run ({', '.join(differs)} "
                                f"differ); choose a new folder or delete it")
        if info_path.exists():
            raise ExnihiloError(f"--out {out} already holds this finished run; nothing to do "
                                f"(delete it to train again)")
        if not resume:
            raise ExnihiloError(f"--out {out} holds an unfinished run of this config: pass "
                                f"--resume to continue it, or choose a new folder")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(config_path, identity)


def write_json_atomic(path: Path, obj: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def save_final_model(model: Any, tokenizer: Any, out: Path, info: dict[str, Any],
                     lora: bool) -> None:
    """Save `out` as the ecosystem expects a model folder, then exnihilo_run.json last.

    - the merged model (LoRA folded in) as a plain Hugging Face folder, safetensors;
    - with LoRA, the peft adapter itself in `out/adapter/` (vLLM `--lora-modules`, Ollama
      `ADAPTER`, `PeftModel.from_pretrained(base, out/"adapter")` read it);
    - a prompt style other than "chat" baked into the tokenizer's `chat_template`, so servers
      and `lm-eval --apply_chat_template` prompt the model the way it was trained;
    - `trainer_state.json` with the metrics history (transformers' `log_history` key) and a
      model card (README.md) with base model, data hashes, config and final metrics.
    Everything is written into a temp folder inside `out` and renamed into place.
    """
    import copy

    from transformers.utils import logging as hf_logging

    from exnihilo.styles import style_chat_template

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards" would break our own output
    tmp = Path(tempfile.mkdtemp(prefix=".final-", dir=out))
    try:
        if lora:
            model.save_pretrained(tmp / "adapter", safe_serialization=True)
        final = model.merge_and_unload() if lora else model
        final.save_pretrained(tmp, safe_serialization=True)
        template = style_chat_template(info.get("style") or "chat")
        if template is not None:
            tokenizer = copy.deepcopy(tokenizer)
            tokenizer.chat_template = template
        tokenizer.save_pretrained(tmp)
        history = read_metrics(out)
        write_json_atomic(tmp / "trainer_state.json", {
            "global_step": info.get("steps"), "log_history": history,
            "best_metric": None, "trial_name": None})
        (tmp / "README.md").write_text(model_card(info, history), encoding="utf-8")
        files = sorted(tmp.iterdir(), key=lambda p: p.name == "config.json")  # config last
        for path in files:
            if path.is_dir():
                shutil.rmtree(out / path.name, ignore_errors=True)
            os.replace(path, out / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if bars:
            hf_logging.enable_progress_bar()
    write_json_atomic(out / RUN_INFO, info)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)


def read_metrics(out: Path) -> list[dict[str, Any]]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def model_card(info: dict[str, Any], history: list[dict[str, Any]]) -> str:
    """A Hugging Face model card: YAML header, then what was trained on what, and how."""
    config = info.get("config") or {}
    hashes = {k: v for k, v in (info.get("identity") or {}).items() if k.endswith("_sha256")}
    last = history[-1] if history else {}
    vals = [h["val_loss"] for h in history if h.get("val_loss") is not None]
    lines = ["---", "library_name: transformers", "tags:", "- exnihilo",
             f"- {info.get('kind', 'trained')}", "---", "",
             f"# {Path(str(config.get('out', 'model'))).name}", "",
             f"Trained with exnihilo (`exnihilo train {info.get('kind', '')}`) from "
             f"`{info.get('base_model')}`, prompt style `{info.get('style', 'chat')}`.",
             "LoRA adapter in `adapter/`; this folder holds the merged model."
             if not config.get("full", True) else "Full finetuning.", "",
             "## Results", "",
             f"- optimizer steps: {info.get('steps')}",
             f"- final training loss: {last.get('loss')}",
             f"- final validation loss: {vals[-1] if vals else None}", "",
             "## Data", ""]
    lines += [f"- `{config.get(k[:-len('_sha256')], k)}` sha256 `{v}`"
              for k, v in hashes.items()] or ["- (not recorded)"]
    lines += ["", "## Configuration", "", "```json", json.dumps(config, indent=2,
                                                                default=str), "```", ""]
    return "\n".join(lines)


def read_run_info(folder: str | Path) -> dict[str, Any] | None:
    """The exnihilo_run.json of a trained model folder (style, base model, config), if any."""
    path = Path(folder) / RUN_INFO
    return json.loads(path.read_text()) if path.exists() else None


def run_style(folder: str | Path) -> str | None:
    """The prompt style a trained run folder records, else None (not a run folder)."""
    from exnihilo.styles import STYLES

    path = Path(folder).expanduser() / RUN_INFO
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ExnihiloError(f"{path}: unreadable ({e})") from None
    style = info.get("style") if isinstance(info, dict) else None
    if style is None and isinstance(info, dict) and isinstance(info.get("config"), dict):
        style = info["config"].get("style")
    if style is not None and style not in STYLES:
        raise ExnihiloError(f"{path}: unknown style {style!r} (known: {', '.join(STYLES)})")
    return style
