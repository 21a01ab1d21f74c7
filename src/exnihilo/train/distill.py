"""Distillation: train a student on a teacher's next-token distributions, through the
shared loop (GKD, arXiv 2306.13649; Gemma 2's students, arXiv 2408.00118; Minitron's
recovery after pruning, arXiv 2407.14679).

The loss at each trained position is a divergence between teacher and student (all from
`train.forward`): forward KL(P_T ‖ P_S) (classic KD, Minitron's choice), reverse
KL(P_S ‖ P_T), or GKD's generalized JSD(β), at temperature τ, averaged over positions.

Data: the same packed text rows as pretraining (`train.tokens`). For a fraction λ of the
micro-batches (on-policy, as GKD) the rows are replaced by the student's own samples: each
row's prompt is the start of its current document up to `prompt_len` tokens, and the
student samples `max_new_tokens` continuation tokens, on which the divergence is taken
(the teacher runs live on those). Whether a batch is on-policy and the sampling generator
are seeded by (seed, epoch, batch), and the student's weights are restored on resume, so a
resumed run samples the same tokens: resume stays bit-exact.

Teacher cache (`top_k` > 0): before training, the teacher runs once over every training
and held-out row and its k most likely next tokens (log-probs under its full softmax, and
ids) go to safetensors shards under `$XDG_CACHE_HOME/exnihilo/teacher/<key>/`, keyed by a
hash of the teacher's weights, the tokenized corpus and (seq_len, k); later epochs and
reruns read them instead of running the teacher. The divergence is then taken over the
kept tokens plus one bucket for the rest of the vocabulary (exact masses at τ = 1), or,
with `topk_tail=False`, over the kept tokens with both sides renormalized over them
(`forward.topk_divergence` says why the tail bucket is the default).
`top_k` = 0 runs the teacher live on every batch with the full distribution.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from safetensors import safe_open
from safetensors.torch import save_file

from exnihilo import progress
from exnihilo.devices import model_device, to_device
from exnihilo.errors import ExnihiloError
from exnihilo.models import load_tokenizer
from exnihilo.train.collate import collate_continuations
from exnihilo.train.forward import (
    IGNORE_INDEX,
    base_model,
    model_divergence,
    model_topk_divergence,
    teacher_topk,
)
from exnihilo.train.loop import Batch, LoopResult, train_loop
from exnihilo.train.pretrain import (
    PRESETS,
    build_for_training,
    flops_per_position,
    gemma2_config,
    peak_flops_for,
    preset_names,
    row_plan,
    steps_for_budget,
    validation_batches,
)
from exnihilo.train.run import (
    TrainConfig,
    add_lora,
    count_parameters,
    given_model,
    load_for_training,
    prepare_out,
    run_identity,
    save_final_model,
)
from exnihilo.train.tokens import (
    TokenStream,
    collate_rows,
    corpus_meta,
    data_files,
    open_stream,
    prepare_corpus,
)

SHARD_ROWS = 256  # rows per cache shard file

LossKind = Literal["forward_kl", "reverse_kl", "jsd"]


class DistillConfig(TrainConfig):
    """`model` is the student (a model name/folder), or `student_arch` a fresh preset on
    the teacher's tokenizer. Full training by default (students are small)."""

    data: str
    teacher: str
    student_arch: str | None = None
    full: bool = True
    loss: LossKind = "forward_kl"
    beta: float = Field(0.5, ge=0, le=1)  # JSD mixture weight (GKD's β)
    temperature: float = Field(1.0, gt=0)
    lmbda: float = Field(0.0, ge=0, le=1)  # fraction of on-policy (student-sampled) batches
    prompt_len: int = Field(32, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    sample_temperature: float = Field(1.0, gt=0)
    top_k: int = Field(32, ge=0)  # 0: live teacher, full distribution
    topk_tail: bool = True  # top-k + a tail bucket (False: renormalize over the kept ids)
    seq_len: int = Field(512, ge=2)
    tokens: int | None = Field(None, ge=1)
    val_fraction: float = Field(0.02, ge=0, lt=1)
    val_tokens: int = Field(65536, ge=0)
    lr: float | None = Field(None, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup_ratio: float = Field(0.02, ge=0, le=1)

    @field_validator("student_arch")
    @classmethod
    def _known_arch(cls, v: str | None) -> str | None:
        if v is not None and v not in PRESETS:
            raise ValueError(f"{v!r} is not a preset (known: {preset_names()})")
        return v

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        if self.student_arch:
            return 1e-3
        return 1e-4 if self.full else 2e-4


# ------------------------------------------------------------------------------ objective

class DistillObjective:
    """Summed divergence over trained positions (the loop divides by their count).
    Batches carrying `teacher_logprobs`/`teacher_indices` use the cached top-k; others run
    the teacher live. Reports the share of on-policy positions as `on_policy`."""

    def __init__(self, teacher: Any, cfg: DistillConfig):
        self.teacher, self.cfg = teacher, cfg

    def weight(self, batch: Batch) -> float:
        return float((batch["labels"] != IGNORE_INDEX).sum())

    def loss_sum(self, model: Any, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.cfg
        if "teacher_logprobs" in batch:
            div = model_topk_divergence(model, batch, c.loss, c.beta, c.temperature,
                                        tail=c.topk_tail)
        else:
            div = model_divergence(model, self.teacher, batch, c.loss, c.beta, c.temperature)
        on_policy = float(batch.get("on_policy", torch.tensor(0)).item()) * div.numel()
        return div.sum(), {"on_policy": on_policy}


# ------------------------------------------------------------------------- teacher cache

def weights_fingerprint(model: Any) -> str:
    """SHA-256 over the model's parameter names, shapes and bytes (its weights' identity)."""
    h = hashlib.sha256()
    for name, tensor in base_model(model).state_dict().items():
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def teacher_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "exnihilo" / "teacher"


class TeacherCache:
    """Top-k teacher log-probs for every row of a stream, in safetensors shards of
    SHARD_ROWS rows: `values` [rows, seq_len, k] fp32, `indices` [rows, seq_len, k] int32."""

    def __init__(self, folder: Path, split: str):
        self.folder, self.split = folder, split
        self.meta = json.loads((folder / "meta.json").read_text())
        self._open: dict[int, Any] = {}

    def _shard(self, s: int) -> Any:
        if s not in self._open:
            self._open[s] = safe_open(str(self.folder / f"{self.split}-{s:05d}.safetensors"),
                                      framework="pt")
        return self._open[s]

    def rows(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        values, indices = [], []
        for r in rows:
            shard = self._shard(r // SHARD_ROWS)
            i = r % SHARD_ROWS
            values.append(shard.get_slice("values")[i:i + 1])
            indices.append(shard.get_slice("indices")[i:i + 1])
        return torch.cat(values), torch.cat(indices).long()


def build_teacher_cache(teacher: Any, streams: dict[str, TokenStream], k: int, key: str,
                        root: Path | None = None, batch_rows: int = 4) -> Path:
    """Run the teacher once over every row of each stream; write the shards atomically.
    An existing cache with the same key is reused as is."""
    root = root or teacher_cache_root()
    folder = root / key
    if (folder / "meta.json").exists():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".teacher-", dir=root))
    try:
        rows_done = 0
        total = sum(s.n_rows for s in streams.values())
        for split, stream in streams.items():
            for lo in range(0, stream.n_rows, SHARD_ROWS):
                rows = list(range(lo, min(lo + SHARD_ROWS, stream.n_rows)))
                values, indices = [], []
                for b in range(0, len(rows), batch_rows):
                    batch = collate_rows(stream, rows[b:b + batch_rows])
                    v, i = teacher_topk(teacher, to_device(batch, model_device(teacher)), k)
                    shape = (*batch["input_ids"].shape, k)
                    values.append(v.reshape(shape).cpu())
                    indices.append(i.reshape(shape).to(torch.int32).cpu())
                    rows_done += len(rows[b:b + batch_rows])
                save_file({"values": torch.cat(values).contiguous(),
                           "indices": torch.cat(indices).contiguous()},
                          str(tmp / f"{split}-{lo // SHARD_ROWS:05d}.safetensors"))
                progress.note(f"teacher cache: {rows_done}/{total} rows")
        meta = {"k": k, "rows": {s: st.n_rows for s, st in streams.items()},
                "seq_len": next(iter(streams.values())).seq_len}
        (tmp / "meta.json").write_text(json.dumps(meta))
        if not (folder / "meta.json").exists():
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def cache_key(teacher: Any, corpus_key: str, seq_len: int, k: int) -> str:
    h = hashlib.sha256(f"{weights_fingerprint(teacher)}:{corpus_key}:{seq_len}:{k}:v1".encode())
    return h.hexdigest()[:24]


# ---------------------------------------------------------------------------- on-policy

def batch_rng(seed: int, epoch: int, index: int) -> random.Random:
    return random.Random(f"{seed}:onpolicy:{epoch}:{index}")


def document_prompt(stream: TokenStream, row: int, prompt_len: int) -> list[int]:
    """The row's current document from its segment start up to `prompt_len` tokens in:
    a prompt that never spans two documents."""
    tokens, positions = stream.row(row)
    end = min(prompt_len, stream.seq_len)
    start = end - 1 - int(positions[end - 1])
    return tokens[start:end].tolist()


@torch.no_grad()
def sample_continuation(model: Any, prompt: list[int], max_new_tokens: int,
                        temperature: float, generator: torch.Generator,
                        eos_id: int | None) -> list[int]:
    """Ancestral sampling with a KV cache and an explicit generator (so it is seeded and
    leaves the global RNG alone); stops after EOS."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    out = model(input_ids=torch.tensor([prompt], device=device), use_cache=True)
    cache, new = _cache(out), []
    logits = out.logits[0, -1]
    for _ in range(max_new_tokens):
        # Sampled on the CPU with a CPU generator: the same draws on every device.
        probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
        token = int(torch.multinomial(probs, 1, generator=generator))
        new.append(token)
        if token == eos_id:
            break
        out = model(input_ids=torch.tensor([[token]], device=device), cache=cache,
                    use_cache=True)
        cache, logits = _cache(out), out.logits[0, -1]
    model.train(was_training)
    return new


def _cache(output: Any) -> Any:
    # transformers ≥ 5.2x names it `cache` (past_key_values is deprecated).
    return getattr(output, "cache", None) or output.past_key_values


def on_policy_batch(model: Any, stream: TokenStream, rows: list[int], cfg: DistillConfig,
                    generator: torch.Generator, pad_id: int, eos_id: int | None) -> Batch:
    pairs = []
    for r in rows:
        prompt = document_prompt(stream, r, cfg.prompt_len)
        pairs.append((prompt, sample_continuation(model, prompt, cfg.max_new_tokens,
                                                  cfg.sample_temperature, generator, eos_id)))
    batch = collate_continuations(pairs, pad_id)
    batch["on_policy"] = torch.tensor(1)
    return batch


def make_collate(model: Any, stream: TokenStream, cache: TeacherCache | None,
                 cfg: DistillConfig, pad_id: int, eos_id: int | None):
    """Plan items are (epoch, index, rows): a batch is on-policy with probability λ drawn
    from a generator seeded by the item, so the choice and the samples replay on resume."""
    def collate(item: tuple[int, int, list[int]]) -> Batch:
        epoch, index, rows = item
        rng = batch_rng(cfg.seed, epoch, index)
        if cfg.lmbda > 0 and rng.random() < cfg.lmbda:
            generator = torch.Generator().manual_seed(rng.getrandbits(63))
            return on_policy_batch(model, stream, rows, cfg, generator, pad_id, eos_id)
        batch = collate_rows(stream, rows)
        if cache is not None:
            batch["teacher_logprobs"], batch["teacher_indices"] = cache.rows(rows)
        return batch
    return collate


# ------------------------------------------------------------------------------------ run

@dataclass
class DistillResult:
    out: str
    steps: int
    train_loss: float | None
    val_loss: float | None
    trained_tokens_per_s: float
    train_seconds: float
    total_params: int
    teacher_cache: str | None
    data: dict[str, Any]


def check_vocabularies(teacher: Any, student: Any) -> None:
    t = base_model(teacher).get_output_embeddings().weight.shape[0]
    s = base_model(student).get_output_embeddings().weight.shape[0]
    if t != s:
        raise ExnihiloError(f"teacher and student have different vocabularies ({t} vs {s} "
                            f"tokens): distillation compares token distributions, so they "
                            f"must share a tokenizer")


def run_distill(cfg: DistillConfig, resume: bool = False, on_step: Any = None,
                student_obj: Any = None, teacher_obj: Any = None, tokenizer: Any = None,
                cache_root: Path | None = None) -> DistillResult:
    """Distill `cfg.teacher` into the student; save a plain HF folder in `cfg.out`.
    `student_obj`/`teacher_obj`/`tokenizer` let tests pass tiny in-memory models."""
    out = Path(cfg.out)
    data_files(cfg.data)  # a missing DATA fails before any model loads
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(
        cfg.teacher if cfg.student_arch else cfg.model)
    folder = prepare_corpus(cfg.data, tokenizer, cfg.val_fraction, cfg.seed)
    meta = {**corpus_meta(folder), "key": folder.name}
    train = open_stream(folder, "train", cfg.seq_len)
    if train.n_rows == 0:
        raise ExnihiloError(f"{cfg.data}: {train.n_tokens} training tokens, fewer than "
                            f"one row of --seq-len {cfg.seq_len} + 1; lower --seq-len")
    val = open_stream(folder, "val", cfg.seq_len)
    if val.n_rows == 0:
        val = TokenStream(val.tokens, val.starts, max(val.n_tokens - 1, 1))

    teacher = given_model(teacher_obj, cfg) if teacher_obj is not None else \
        load_for_training(cfg.teacher, cfg)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if student_obj is not None:
        student = given_model(student_obj, cfg)
    elif cfg.student_arch:
        student = build_for_training(gemma2_config(cfg.student_arch, tokenizer), cfg)
    else:
        student = load_for_training(cfg.model, cfg)
    check_vocabularies(teacher, student)
    torch.manual_seed(cfg.seed)
    if not cfg.full:
        student = add_lora(student, cfg)
    identity = {**run_identity(cfg, {}), "corpus": meta}
    prepare_out(out, identity, resume)
    _, total = count_parameters(student)

    cache = None
    if cfg.top_k:
        key = cache_key(teacher, folder.name, cfg.seq_len, cfg.top_k)
        streams = {"train": train} | ({"val": val} if val.n_rows else {})
        cache_folder = build_teacher_cache(teacher, streams, cfg.top_k, key, cache_root)
        cache = TeacherCache(cache_folder, "train")
        val_cache = TeacherCache(cache_folder, "val") if val.n_rows else None
    loop_cfg = cfg.loop_config()
    if cfg.tokens is not None:
        loop_cfg.max_steps, loop_cfg.epochs = steps_for_budget(cfg.tokens, train.n_rows, cfg)
    if base_model(student).config.model_type == "gemma2":
        # The student's own MFU (the teacher's forward, cached or live, is not counted).
        loop_cfg.flops_per_position = flops_per_position(base_model(student).config,
                                                         cfg.seq_len)
        loop_cfg.peak_flops = peak_flops_for(student, loop_cfg)
    rows_of = row_plan(train.n_rows, cfg.batch_size, cfg.seed)

    def plan(epoch: int) -> list[tuple[int, int, list[int]]]:
        return [(epoch, i, rows) for i, rows in enumerate(rows_of(epoch))]

    val_batches = validation_batches(val, cfg.val_tokens, cfg.batch_size)
    if cache is not None and val_batches and val_cache is not None:
        for k, batch in enumerate(val_batches):
            rows = list(range(k * cfg.batch_size, k * cfg.batch_size
                              + batch["input_ids"].shape[0]))
            batch["teacher_logprobs"], batch["teacher_indices"] = val_cache.rows(rows)
    progress.note(f"distilling {'live teacher' if cache is None else f'top-{cfg.top_k} cache'}"
                  f" · {cfg.loss} (β {cfg.beta}, τ {cfg.temperature}, λ {cfg.lmbda}) · "
                  f"student {total:,} parameters · {train.n_rows:,} rows of {cfg.seq_len}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id
    collate = make_collate(student, train, cache, cfg, pad, tokenizer.eos_token_id)
    result: LoopResult = train_loop(student, DistillObjective(teacher, cfg), plan, collate,
                                    val_batches, out, loop_cfg, resume=resume,
                                    label="distill", on_step=on_step)
    info = {"kind": "distill", "style": None,
            "base_model": cfg.student_arch or (cfg.model if student_obj is None
                                               else f"in-memory {type(student_obj).__name__}"),
            "teacher": cfg.teacher, "config": cfg.model_dump(), "data": meta,
            "steps": result.steps, "train_loss": result.train_loss,
            "val_loss": result.val_loss}
    save_final_model(student, tokenizer, out, info, lora=not cfg.full)
    return DistillResult(out=str(out), steps=result.steps, train_loss=result.train_loss,
                         val_loss=result.val_loss,
                         trained_tokens_per_s=result.trained_tokens_per_s,
                         train_seconds=result.train_seconds, total_params=total,
                         teacher_cache=str(cache.folder) if cache is not None else None,
                         data=meta)

