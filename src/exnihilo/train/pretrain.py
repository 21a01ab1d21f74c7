"""Pretraining: a Gemma 2 model from a preset (or an existing model, for continual
pretraining) trained on plain text packed into fixed-length rows, through the shared loop.

Architecture (Gemma 2, arXiv 2408.00118; transformers' `Gemma2Config` / `Gemma2ForCausalLM`
are the implementation — we only choose sizes): layers alternate local sliding-window and
global attention (layer 0 local), grouped-query attention (`kv_heads` < `heads`),
attention-score soft-capping `s = c·tanh(s/c)` and final-logit soft-capping, RMSNorm
before and after each block, tied input/output embeddings. Every preset runs on the
embedded SmolLM2 tokenizer (49,152 tokens), whose embedding matrix is most of a small
model's parameters. Softcapping rules out SDPA, so attention runs eagerly.

Data: `train.tokens` streams the corpus into a memmapped token file and cuts packed rows
(EOS between documents, no attention across documents). `--tokens` sets the budget: the
run takes ceil(tokens / tokens-per-step) optimizer steps, cycling the corpus (reshuffled
rows) as often as that needs.

Speed: the progress bar and every metrics line carry trained tokens/s and MFU, model
FLOPs utilization = (model FLOPs per position × positions per second) / peak FLOP/s. Model
FLOPs per position are 3 × the forward's matmul FLOPs (forward + backward ≈ 2 + 4 × params,
PaLM appendix B): 2 × every matmul weight (attention projections, MLP, the LM head; the
embedding lookup is free) plus the attention scores and weighted sums, 4 × heads ×
head_dim × the mean number of keys a query sees (causal: (T+1)/2; a sliding layer at most
its window). The peak is not a datasheet number: `measure_matmul_flops` times a square
torch.matmul on this machine, in the training dtype and thread count, once per process.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from exnihilo import progress
from exnihilo.devices import model_device, place_model, to_device, training_dtypes
from exnihilo.errors import ExnihiloError
from exnihilo.models import DEFAULT_MODEL, load_tokenizer
from exnihilo.train.loop import LoopResult, train_loop
from exnihilo.train.run import (
    TrainConfig,
    count_parameters,
    enable_gradient_checkpointing,
    given_model,
    load_for_training,
    prepare_out,
    run_identity,
    save_final_model,
)
from exnihilo.train.sft import SFTObjective
from exnihilo.train.tokens import (
    TokenStream,
    collate_rows,
    corpus_meta,
    data_files,
    open_stream,
    prepare_corpus,
)

# Gemma 2 shapes scaled down. Parameter counts on the 49,152-token vocabulary (tied):
# micro ≈ 1.7M (tests), tiny ≈ 7.3M, small ≈ 18.5M, base ≈ 56.7M.
PRESETS: dict[str, dict[str, Any]] = {
    "gemma2-micro": dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         sliding_window=32),
    "gemma2-tiny": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                        sliding_window=128),
    "gemma2-small": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                         sliding_window=256),
    "gemma2-base": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                        sliding_window=512),
}
# Shared by every preset: Gemma 2's own values.
GEMMA2_COMMON: dict[str, Any] = dict(attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                     tie_word_embeddings=True, max_position_embeddings=2048,
                                     hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6)

# CLI option name → Gemma2Config field, for overriding a preset.
ARCH_OPTIONS = {"layers": "num_hidden_layers", "hidden": "hidden_size",
                "intermediate": "intermediate_size", "heads": "num_attention_heads",
                "kv_heads": "num_key_value_heads", "head_dim": "head_dim",
                "sliding_window": "sliding_window", "attn_softcap": "attn_logit_softcapping",
                "final_softcap": "final_logit_softcapping",
                "tie_embeddings": "tie_word_embeddings",
                "max_positions": "max_position_embeddings"}


def preset_names() -> str:
    return ", ".join(PRESETS)


def gemma2_config(arch: str, tokenizer: Any, **overrides: Any) -> Any:
    """A Gemma2Config for a preset on `tokenizer`'s vocabulary. Overrides use the CLI names
    of `ARCH_OPTIONS`; a soft-cap of 0 turns that soft-capping off."""
    from transformers import Gemma2Config

    if arch not in PRESETS:
        raise ExnihiloError(f"--arch {arch!r} is not a preset (known: {preset_names()})")
    unknown = sorted(set(overrides) - set(ARCH_OPTIONS))
    if unknown:
        raise ExnihiloError(f"unknown architecture option(s) {', '.join(unknown)} (known: "
                            f"{', '.join(ARCH_OPTIONS)})")
    values = {**GEMMA2_COMMON, **PRESETS[arch]}
    for name, value in overrides.items():
        if value is not None:
            values[ARCH_OPTIONS[name]] = value
    for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
        if not values[cap]:
            values[cap] = None
    check_arch(values)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    return Gemma2Config(vocab_size=len(tokenizer), query_pre_attn_scalar=values["head_dim"],
                        bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
                        attn_implementation="eager", **values)


def check_arch(values: dict[str, Any]) -> None:
    heads, kv = values["num_attention_heads"], values["num_key_value_heads"]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "sliding_window"):
        if int(values[key]) < 1:
            raise ExnihiloError(f"architecture: {key} must be at least 1, got {values[key]}")
    if heads % kv:
        raise ExnihiloError(f"--heads {heads} must be a multiple of --kv-heads {kv} "
                            f"(grouped-query attention shares each KV head by a group)")
    if values["hidden_size"] % heads:
        raise ExnihiloError(f"--hidden {values['hidden_size']} must be a multiple of --heads "
                            f"{heads} (transformers' Gemma2Config requires it)")


def build_model(config: Any, seed: int = 0, dtype: str = "float32") -> Any:
    """A freshly initialised Gemma2ForCausalLM (seeded)."""
    from transformers import Gemma2ForCausalLM

    torch.manual_seed(seed)
    model = Gemma2ForCausalLM(config)
    return model.to(getattr(torch, dtype))


# ------------------------------------------------------------------------------ FLOPs, MFU

def matmul_params(config: Any) -> int:
    """Weights that take part in a matmul per position: attention projections, MLP and
    the LM head (tied or not, the head is a matmul; the embedding lookup is not)."""
    d, hd = config.hidden_size, config.head_dim
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    attn = d * heads * hd * 2 + d * kv * hd * 2  # q, o; k, v
    mlp = 3 * d * config.intermediate_size
    return config.num_hidden_layers * (attn + mlp) + d * config.vocab_size


def mean_context(seq_len: int, window: int | None) -> float:
    """Mean number of keys a query attends to in a causal row of `seq_len` (sliding: at
    most `window`)."""
    w = min(window or seq_len, seq_len)
    # positions 0..w-1 see i+1 keys; the rest see w.
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def flops_per_position(config: Any, seq_len: int) -> float:
    """Training FLOPs (forward + backward = 3 × forward) per input position."""
    attn = 0.0
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    for kind in types:
        window = config.sliding_window if kind == "sliding_attention" else None
        attn += 4 * config.num_attention_heads * config.head_dim * mean_context(seq_len, window)
    return 3.0 * (2.0 * matmul_params(config) + attn)


_PEAK: dict[tuple[str, int], float] = {}


def measure_matmul_flops(dtype: torch.dtype = torch.float32, size: int = 512,
                         seconds: float = 0.3, device: torch.device | None = None) -> float:
    """FLOP/s of a square `size` torch.matmul on this machine (current thread count) or on
    `device`, measured once per process, device and dtype: the denominator of MFU."""
    device = device or torch.device("cpu")
    key = (str(dtype), torch.get_num_threads(), str(device), size)
    if key not in _PEAK:
        a = torch.randn(size, size).to(device=device, dtype=dtype)
        b = torch.randn(size, size).to(device=device, dtype=dtype)
        torch.matmul(a, b)  # warm-up (allocations, kernel choice)
        sync(device)
        n, started = 0, time.perf_counter()
        while True:
            torch.matmul(a, b)
            n += 1
            sync(device)  # GPU kernels are asynchronous: time them finished
            elapsed = time.perf_counter() - started
            if elapsed >= seconds and n >= 3:
                break
        _PEAK[key] = 2.0 * size ** 3 * n / elapsed
    return _PEAK[key]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops_for(model: Any, loop_cfg: Any) -> float:
    """The MFU denominator for `model` where it trains: matmuls in the dtype they run in
    (the autocast dtype when mixed precision is on), large enough to fill a GPU."""
    device = next(model.parameters()).device
    dtype = getattr(torch, loop_cfg.autocast_dtype) if loop_cfg.autocast_dtype else \
        next(model.parameters()).dtype
    return measure_matmul_flops(dtype, 512 if device.type == "cpu" else 4096, device=device)


def build_for_training(config: Any, cfg: TrainConfig) -> Any:
    """A fresh model of `config` for a run of `cfg`: initialised on the CPU (the same
    weights whatever the device), then moved to the run's device."""
    device = cfg.torch_device()
    return place_model(build_model(config, cfg.seed, training_dtypes(cfg.dtype, device)[0]),
                       device)


# ----------------------------------------------------------------------------- the run

class PretrainConfig(TrainConfig):
    """`arch` set: a new model of that preset on `model`'s tokenizer. `arch` None:
    continual pretraining of `model` itself. Training is always full (no LoRA)."""

    data: str
    arch: str | None = None
    model: str = DEFAULT_MODEL
    full: bool = True
    seq_len: int = Field(512, ge=2)
    tokens: int | None = Field(None, ge=1)  # budget; None: `epochs` passes over the data
    val_fraction: float = Field(0.02, ge=0, lt=1)
    val_tokens: int = Field(65536, ge=0)  # held-out positions evaluated (at most)
    arch_options: dict[str, Any] = {}
    lr: float | None = Field(None, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup_ratio: float = Field(0.02, ge=0, le=1)
    measure_mfu: bool = True

    @property
    def learning_rate(self) -> float:
        # From scratch small models take large rates; continual pretraining uses the SFT
        # full-finetuning rate so the model does not forget what it knew.
        if self.lr is not None:
            return self.lr
        return 1e-3 if self.arch else 5e-5


@dataclass
class PretrainResult:
    out: str
    steps: int
    train_loss: float | None
    val_loss: float | None
    val_perplexity: float | None
    trained_tokens: int
    trained_tokens_per_s: float
    mfu: float | None
    train_seconds: float
    total_params: int
    data: dict[str, Any]


def steps_for_budget(tokens: int, n_rows: int, cfg: PretrainConfig) -> tuple[int, int]:
    """(optimizer steps, epochs) that train on ≈ `tokens` positions."""
    per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    steps = math.ceil(tokens / per_step)
    steps_per_epoch = math.ceil(math.ceil(n_rows / cfg.batch_size) / cfg.grad_accum)
    return steps, math.ceil(steps / steps_per_epoch)


def row_plan(n_rows: int, batch_size: int, seed: int):
    """plan(epoch) → micro-batches of row indices, shuffled per (seed, epoch)."""
    def plan(epoch: int) -> list[list[int]]:
        order = list(range(n_rows))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        return [order[k:k + batch_size] for k in range(0, n_rows, batch_size)]
    return plan


def validation_batches(stream: TokenStream, max_positions: int, batch_size: int
                       ) -> list[dict[str, torch.Tensor]]:
    """Held-out rows (the first `max_positions` positions' worth) as batches. A held-out
    stream shorter than one row is evaluated as one shorter row."""
    if stream.n_tokens < 2 or max_positions <= 0:
        return []
    if stream.n_rows == 0:
        stream = TokenStream(stream.tokens, stream.starts, stream.n_tokens - 1)
    n = min(stream.n_rows, max(1, max_positions // stream.seq_len))
    return [collate_rows(stream, range(k, min(k + batch_size, n)))
            for k in range(0, n, batch_size)]


def load_streams(cfg: PretrainConfig, tokenizer: Any) -> tuple[TokenStream, TokenStream,
                                                                dict[str, Any]]:
    """(train stream, held-out stream, corpus facts incl. its content key)."""
    folder = prepare_corpus(cfg.data, tokenizer, cfg.val_fraction, cfg.seed)
    meta = {**corpus_meta(folder), "key": folder.name}
    train = open_stream(folder, "train", cfg.seq_len)
    if train.n_rows == 0:
        raise ExnihiloError(f"{cfg.data}: {train.n_tokens} training tokens, fewer than "
                            f"one row of --seq-len {cfg.seq_len} + 1; lower --seq-len")
    return train, open_stream(folder, "val", cfg.seq_len), meta


def run_pretrain(cfg: PretrainConfig, resume: bool = False, on_step: Any = None,
                 model_obj: Any = None, tokenizer: Any = None) -> PretrainResult:
    """Pretrain (or continue pretraining) and save a plain HF folder in `cfg.out`."""
    out = Path(cfg.out)
    if cfg.arch is not None and cfg.arch not in PRESETS:
        raise ExnihiloError(f"--arch {cfg.arch!r} is not a preset (known: {preset_names()})")
    data_files(cfg.data)  # a missing DATA fails before anything loads
    identity = run_identity(cfg, {})
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
    config = gemma2_config(cfg.arch, tokenizer, **cfg.arch_options) if cfg.arch else None
    train, val, meta = load_streams(cfg, tokenizer)
    identity["corpus"] = meta  # its key hashes the data's contents, tokenizer and split
    if model_obj is not None:
        model = given_model(model_obj, cfg)
    elif config is not None:
        model = build_for_training(config, cfg)
    else:
        model = load_for_training(cfg.model, cfg)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and cfg.seq_len > max_pos:
        raise ExnihiloError(f"--seq-len {cfg.seq_len} exceeds the model's "
                            f"{max_pos} positions")
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    prepare_out(out, identity, resume)
    _, total = count_parameters(model)

    loop_cfg = cfg.loop_config()
    if cfg.tokens is not None:
        loop_cfg.max_steps, loop_cfg.epochs = steps_for_budget(cfg.tokens, train.n_rows, cfg)
    if cfg.measure_mfu and model.config.model_type == "gemma2":
        loop_cfg.flops_per_position = flops_per_position(model.config, cfg.seq_len)
        loop_cfg.peak_flops = peak_flops_for(model, loop_cfg)
    progress.note(f"{'pretraining ' + cfg.arch if cfg.arch else 'continual pretraining'}: "
                  f"{total:,} parameters · {train.n_tokens:,} training tokens in "
                  f"{meta['train_documents']:,} documents ({train.n_rows:,} rows of "
                  f"{cfg.seq_len}) · {meta['val_documents']:,} held-out documents")

    plan = row_plan(train.n_rows, cfg.batch_size, cfg.seed)
    val_batches = validation_batches(val, cfg.val_tokens, cfg.batch_size)
    result: LoopResult = train_loop(
        model, SFTObjective(), plan, lambda rows: collate_rows(train, rows), val_batches,
        out, loop_cfg, resume=resume, label="pretrain", on_step=on_step)

    mfus = [h["mfu"] for h in result.history if "mfu" in h]
    trained = int(result.history[-1]["trained_tokens"]) if result.history else 0
    ppl = math.exp(result.val_loss) if result.val_loss is not None else None
    base = cfg.arch or cfg.model
    info = {"kind": "pretrain", "style": None, "base_model": base if model_obj is None
            else f"in-memory {type(model_obj).__name__}", "config": cfg.model_dump(),
            "data": meta, "steps": result.steps, "train_loss": result.train_loss,
            "val_loss": result.val_loss, "val_perplexity": ppl, "trained_tokens": trained}
    save_final_model(model, tokenizer, out, info, lora=False)
    return PretrainResult(out=str(out), steps=result.steps, train_loss=result.train_loss,
                          val_loss=result.val_loss, val_perplexity=ppl, trained_tokens=trained,
                          trained_tokens_per_s=result.trained_tokens_per_s,
                          mfu=mfus[-1] if mfus else None, train_seconds=result.train_seconds,
                          total_params=total, data=meta)


def heldout_perplexity(model: Any, stream: TokenStream, batch_size: int = 8,
                       max_positions: int | None = None) -> tuple[float, int]:
    """(perplexity, positions) of `model` on a token stream's rows (no gradients): the
    experiments' held-out measure."""
    from exnihilo.train.forward import token_logprobs

    batches = validation_batches(stream, max_positions or stream.n_tokens, batch_size)
    if not batches:
        raise ExnihiloError("no held-out tokens to evaluate")
    total, n = 0.0, 0
    was_training = model.training
    model.eval()
    device = model_device(model)
    with torch.no_grad():
        for batch in batches:
            lp = token_logprobs(model, to_device(batch, device))
            total -= float(lp.sum())
            n += int(lp.numel())
    model.train(was_training)
    return math.exp(total / n), n
