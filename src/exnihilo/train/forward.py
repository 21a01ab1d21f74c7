"""The one log-prob path: every method that needs log π(y|x) goes through these functions.

SFT's loss is the negated sum of `token_logprobs`; `eval perplexity`, DPO's policy and
reference log-probs, and reward-free scoring use `sequence_logprobs`; distillation uses
`token_divergence` / `model_divergence`. A batch is what `train.collate` emits:
`input_ids` [B, T], `labels` [B, T] (the target of each position, -100 where nothing is
trained), optionally `position_ids` (packed rows restart them per example) and
`example_index` [B, T] (which example of the batch a position belongs to; -1 for padding).

Memory: the head's output over a 49k vocabulary dominates. For models whose causal-LM head
is exactly `lm_head(decoder(x))` (Llama, Gemma 2 …; `PLAIN_HEAD`) the head runs only on
trained positions, and in chunks of `LOGIT_CHUNK` positions: each chunk's [chunk × vocab]
fp32 logits exist only inside a checkpointed function and are rebuilt during backward, so
the full [tokens × vocab] tensor never exists at once (the cost is one more head matmul per
chunk). We chunk over positions rather than over the vocabulary: log-softmax needs a whole
row, and a position chunk gives the same bound on memory with one logsumexp per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from exnihilo.train.frozen_bf16 import BF16_WEIGHT

IGNORE_INDEX = -100

# Model types whose CausalLM head is exactly `lm_head(decoder(x))` (plus Gemma 2's final
# soft-capping, applied in `head_logits`). Other models use their own full forward.
PLAIN_HEAD = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "smollm3",
              "olmo", "olmo2", "starcoder2"}

# Positions per head chunk. At 8 × 512 tokens the fp32 logits, their log-softmax and
# gradient would otherwise hold ~2.4 GB at once; batches with at most this many trained
# positions run in one piece (no recomputation).
LOGIT_CHUNK = 2048

Batch = dict[str, torch.Tensor]
Divergence = Literal["forward_kl", "reverse_kl", "jsd"]


def base_model(model: Any) -> Any:
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_inputs(batch: Batch) -> dict[str, Any]:
    # use_cache=False also matters for packing: with a cache transformers ignores the
    # restarting position ids and would let packed examples attend to each other.
    return {"input_ids": batch["input_ids"], "position_ids": batch.get("position_ids"),
            "attention_mask": batch.get("attention_mask"), "use_cache": False}


def head_logits(base: Any, hidden: torch.Tensor) -> torch.Tensor:
    """The causal-LM head on hidden states, with Gemma 2's final-logit soft-capping."""
    logits = base.get_output_embeddings()(hidden)
    cap = getattr(base.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def has_plain_head(model: Any) -> bool:
    return base_model(model).config.model_type in PLAIN_HEAD


def trained_mask(batch: Batch) -> torch.Tensor:
    return batch["labels"] != IGNORE_INDEX


def trained_hidden(model: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(last hidden states at trained positions [N, hidden], their targets [N])."""
    keep = trained_mask(batch)
    hidden = base_model(model).get_decoder()(**decoder_inputs(batch)).last_hidden_state
    return hidden[keep], batch["labels"][keep]


def trained_logits(model: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits at trained positions [N, vocab], their targets [N]), unchunked: for callers
    that need the whole distribution of few positions (tests, judges)."""
    if has_plain_head(model):
        hidden, targets = trained_hidden(model, batch)
        return head_logits(base_model(model), hidden), targets
    keep = trained_mask(batch)
    return model(**decoder_inputs(batch)).logits[keep], batch["labels"][keep]


def _target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per row, in fp32."""
    logits = logits.float()
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _chunk_logprobs(base: Any, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return _target_logprobs(head_logits(base, hidden), targets)


def chunked(fn: Any, *tensors: torch.Tensor, chunk: int) -> torch.Tensor:
    """`fn` over row chunks of `tensors`, concatenated. Under autograd each chunk is
    checkpointed (its intermediate logits rebuilt in backward); one chunk runs plainly."""
    n = tensors[0].shape[0]
    if n <= chunk:
        return fn(*tensors)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    pieces = []
    for s in range(0, n, chunk):
        parts = [t[s:s + chunk] for t in tensors]
        if needs_grad:
            from torch.utils.checkpoint import checkpoint

            pieces.append(checkpoint(fn, *parts, use_reentrant=False))
        else:
            pieces.append(fn(*parts))
    return torch.cat(pieces)


def token_logprobs(model: Any, batch: Batch, chunk: int | None = None) -> torch.Tensor:
    """log π(target) at every trained position, [N] in row-major order (fp32)."""
    chunk = chunk or LOGIT_CHUNK
    if not has_plain_head(model):
        logits, targets = trained_logits(model, batch)
        return _target_logprobs(logits, targets)
    base = base_model(model)
    hidden, targets = trained_hidden(model, batch)

    def piece(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return _chunk_logprobs(base, h, t)
    return chunked(piece, hidden, targets, chunk=chunk)


# Rows per chunk of the fused head below: its [rows × vocab] fp32 block (12.6 MB at 64 × 49k)
# stays in cache through the softmax and gradient passes.
FUSED_CHUNK = 64


class _FusedHeadLogprobSum(torch.autograd.Function):
    """Σ log softmax(cap·tanh(h Wᵀ / cap))[target] over rows, with its gradient computed in
    the same pass, chunk by chunk. This is the idea of Liger-Kernel's fused linear +
    cross-entropy; it is written here because Liger's kernels are Triton (GPU only) and this
    product trains on CPUs first.

    The output is a plain sum, so the gradient of each row's log-prob is needed with weight
    one: d/dy = onehot − softmax(y), times the soft-cap's derivative 1 − tanh², then through
    the head's matmul to h and to W. Computing it while the chunk's logits are still in cache
    replaces the [tokens × vocab] tensors that autograd would keep (or rebuild, when
    checkpointed) by one [rows × vocab] block at a time; backward only scales the stored
    gradients by the incoming scalar. Double backward is not supported (nothing here uses it).

    `weight_bf16`, when given (a frozen head under `frozen_bf16_matmuls`), is used for the
    hidden state's gradient only: that product of the gradient [rows × vocab] by W is half
    the head's work, and rounding its operands to bf16 is the rounding every other frozen
    layer's backward has there. The logits stay float32, so the loss is unchanged.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                cap: float, chunk: int, weight_bf16: torch.Tensor | None = None
                ) -> torch.Tensor:
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            h, t = hidden[s:s + chunk], targets[s:s + chunk, None]
            y = (h @ weight.T).float()
            squash = None
            if cap:
                squash = y.div_(cap).tanh_()  # tanh(z / cap), kept for its derivative
                y = squash * cap
            lse = torch.logsumexp(y, dim=-1, keepdim=True)
            total += (y.gather(1, t) - lse).sum()
            grad = y.sub_(lse).exp_().neg_()  # −softmax, in place
            grad.scatter_add_(1, t, torch.ones_like(t, dtype=grad.dtype))
            if squash is not None:
                grad.mul_(squash.mul_(squash).neg_().add_(1))  # · (1 − tanh²)
            if grad_h is not None:
                grad_h[s:s + chunk] = (grad @ weight if weight_bf16 is None
                                       else grad.to(weight_bf16.dtype) @ weight_bf16)
            grad = grad.to(weight.dtype)
            if grad_w is not None:
                grad_w.addmm_(grad.T, h)
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_out if grad_h is not None else None,
                grad_w * grad_out if grad_w is not None else None, None, None, None, None)


def _fusable_head(base: Any) -> torch.nn.Linear | None:
    """The head's Linear when the fused path computes exactly what the model would: a plain
    bias-free nn.Linear (not a LoRA-wrapped one), no autocast in effect."""
    head = base.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    if torch.is_autocast_enabled(head.weight.device.type):
        return None
    return head


def token_logprob_sum(model: Any, batch: Batch) -> torch.Tensor:
    """Σ log π(target) over every trained position: `token_logprobs(...).sum()`, computed by
    the fused head when training a plain-head model (SFT's and pretraining's loss), which
    is faster and never holds more than one [64 × vocab] block of logits."""
    if not (torch.is_grad_enabled() and has_plain_head(model)):
        return token_logprobs(model, batch).sum()
    base = base_model(model)
    head = _fusable_head(base)
    if head is None:
        return token_logprobs(model, batch).sum()
    hidden, targets = trained_hidden(model, batch)
    cap = getattr(base.config, "final_logit_softcapping", None) or 0.0
    return _FusedHeadLogprobSum.apply(hidden, head.weight, targets, float(cap), FUSED_CHUNK,
                                      getattr(head, BF16_WEIGHT, None))


def example_ids(batch: Batch) -> torch.Tensor:
    """The example each trained position belongs to, [N]. Padded batches (no
    `example_index`) hold one example per row."""
    keep = trained_mask(batch)
    if "example_index" in batch:
        return batch["example_index"][keep]
    rows = torch.arange(keep.shape[0], device=keep.device)[:, None].expand_as(keep)
    return rows[keep]


def n_examples(batch: Batch) -> int:
    if "example_index" in batch:
        return int(batch["example_index"].max()) + 1
    return int(batch["input_ids"].shape[0])


@dataclass
class SequenceLogprobs:
    """Per-example sums of trained-token log-probs and how many tokens each sums."""

    sums: torch.Tensor  # [E] fp32, differentiable
    counts: torch.Tensor  # [E] long

    @property
    def means(self) -> torch.Tensor:
        return self.sums / self.counts.clamp(min=1)


def per_example_sums(values: torch.Tensor, batch: Batch) -> SequenceLogprobs:
    """Sum per-position `values` [N] (in trained-position order) into their examples."""
    ids = example_ids(batch)
    e = n_examples(batch)
    sums = torch.zeros(e, dtype=values.dtype, device=values.device).index_add(0, ids, values)
    counts = torch.zeros(e, dtype=torch.long, device=ids.device).index_add(
        0, ids, torch.ones_like(ids))
    return SequenceLogprobs(sums, counts)


def sequence_logprobs(model: Any, batch: Batch, chunk: int | None = None) -> SequenceLogprobs:
    """Σ log π(y_t | y_<t, x) over each example's trained tokens (padded or packed rows)."""
    return per_example_sums(token_logprobs(model, batch, chunk), batch)


# --------------------------------------------------------------------- divergences

def token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     kind: Divergence = "forward_kl", beta: float = 0.5,
                     temperature: float = 1.0) -> torch.Tensor:
    """Divergence between teacher and student next-token distributions, per row [N].

    forward_kl: KL(P_T ‖ P_S) (mean-seeking; classic distillation). reverse_kl: KL(P_S ‖ P_T)
    (mode-seeking). jsd: generalized JSD(β) as GKD defines it, with the mixture
    M = (1−β)·P_S + β·P_T and JSD_β = β·KL(P_T ‖ M) + (1−β)·KL(P_S ‖ M); β = 0 and β = 1 are
    the forward and reverse KL themselves (GKD's special cases). Logits are divided by the
    temperature τ; no τ² factor (as TRL's GKD loss).
    """
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return _kl(log_t, log_s)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return _kl(log_s, log_t)
    if kind != "jsd":
        raise ValueError(f"unknown divergence {kind!r} (known: forward_kl, reverse_kl, jsd)")
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
    log_m = torch.logsumexp(torch.stack([log_s + torch.log(torch.tensor(1.0 - beta)),
                                         log_t + torch.log(torch.tensor(beta))]), dim=0)
    return beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(P ‖ Q) per row from log-probabilities; 0·log 0 counts as 0."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(dim=-1)


def model_divergence(student: Any, teacher: Any, batch: Batch, kind: Divergence = "forward_kl",
                     beta: float = 0.5, temperature: float = 1.0,
                     chunk: int | None = None) -> torch.Tensor:
    """Per trained position [N], the divergence between `teacher`'s and `student`'s
    next-token distributions on the same batch; the teacher runs without gradients. Both
    models must share a vocabulary. Chunked like `token_logprobs`."""
    chunk = chunk or LOGIT_CHUNK
    s_vocab = base_model(student).get_output_embeddings().weight.shape[0]
    t_vocab = base_model(teacher).get_output_embeddings().weight.shape[0]
    if s_vocab != t_vocab:
        from exnihilo.errors import ExnihiloError

        raise ExnihiloError(f"teacher and student have different vocabularies ({t_vocab} vs "
                            f"{s_vocab} tokens): distillation compares token distributions, "
                            f"so they must share a tokenizer")
    with torch.no_grad():
        if has_plain_head(teacher):
            t_hidden, _ = trained_hidden(teacher, batch)
        else:
            t_full, _ = trained_logits(teacher, batch)
    if not has_plain_head(student):
        s_logits, _ = trained_logits(student, batch)
        t_logits = t_full if not has_plain_head(teacher) else head_logits(
            base_model(teacher), t_hidden).detach()
        return token_divergence(s_logits, t_logits, kind, beta, temperature)
    s_base, t_base = base_model(student), base_model(teacher)
    s_hidden, _ = trained_hidden(student, batch)
    teacher_side = t_hidden if has_plain_head(teacher) else t_full

    def piece(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t_logits = head_logits(t_base, t) if has_plain_head(teacher) else t
        return token_divergence(head_logits(s_base, h), t_logits, kind, beta, temperature)
    return chunked(piece, s_hidden, teacher_side, chunk=chunk)


# ------------------------------------------------------------- top-k (cached) teacher

def teacher_topk(teacher: Any, batch: Batch, k: int, chunk: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's k most likely next tokens at every trained position: (log-probs
    [N, k] fp32 under the full softmax at τ = 1, token ids [N, k]), descending. What
    distillation caches so the teacher runs once (Gemma 2 stores such a subset)."""
    chunk = chunk or LOGIT_CHUNK
    with torch.no_grad():
        if not has_plain_head(teacher):
            logits, _ = trained_logits(teacher, batch)
            top = torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)
            return top.values, top.indices
        base = base_model(teacher)
        hidden, _ = trained_hidden(teacher, batch)
        values, indices = [], []
        for s in range(0, hidden.shape[0], chunk):
            logp = torch.log_softmax(head_logits(base, hidden[s:s + chunk]).float(), dim=-1)
            top = logp.topk(k, dim=-1)
            values.append(top.values)
            indices.append(top.indices)
        if not values:
            return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long)
        return torch.cat(values), torch.cat(indices)


def topk_divergence(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor,
                    teacher_indices: torch.Tensor, kind: Divergence = "forward_kl",
                    beta: float = 0.5, temperature: float = 1.0, tail: bool = True
                    ) -> torch.Tensor:
    """`token_divergence` from the teacher's cached top-k, per row [N].

    `tail=True` (default): both distributions over k + 1 outcomes — the kept ids and one
    "everything else" bucket. The teacher's kept log-probs are exact (cached under its
    full softmax) and its tail mass is 1 − Σ kept; the student's are its full softmax at
    the kept ids and its remaining mass. So the student pays for probability it puts
    outside the teacher's top-k, and when the ids left out are a single token the result
    is exactly the full divergence. Exact at τ = 1; at τ ≠ 1 the k + 1 outcomes are
    tempered (the tail as one outcome), an approximation.

    `tail=False`: both distributions renormalized over the kept ids only — softmax(log
    p_T[kept]/τ) and softmax(z_S[kept]/τ). The student's mass outside the kept set is then
    free, which (measured in experiments/distill_vs_hard.py) leaves a student's full-vocab
    perplexity far worse; kept for comparison.

    With k = vocabulary both variants are exactly `token_divergence`."""
    if not tail:
        kept = student_logits.gather(-1, teacher_indices.long())
        return token_divergence(kept, teacher_logprobs, kind, beta, temperature)
    s_logp = torch.log_softmax(student_logits.float(), dim=-1).gather(
        -1, teacher_indices.long())
    t_logp = teacher_logprobs.float()
    student = torch.cat([s_logp, _log_rest(s_logp)], dim=-1)
    teacher = torch.cat([t_logp, _log_rest(t_logp)], dim=-1)
    return token_divergence(student, teacher, kind, beta, temperature)


# log(mass) floor for an empty tail bucket: exp(-1e4) is 0 in fp32, and a finite value keeps
# the gradient of 0·log 0 terms free of NaN.
_LOG_ZERO = -1e4


def _log_rest(logp: torch.Tensor) -> torch.Tensor:
    """log(1 − Σ exp(logp)) per row, [N, 1], stably (log1mexp), floored at _LOG_ZERO."""
    total = torch.logsumexp(logp, dim=-1, keepdim=True)
    # Each branch gets an input it is finite on, so torch.where's unused branch cannot put
    # NaN into the gradient.
    near = torch.log(-torch.expm1(total.clamp(min=-0.6931, max=-1e-30)))
    far = torch.log1p(-torch.exp(total.clamp(max=-0.6931)))
    return torch.where(total > -0.6931, near, far).clamp(min=_LOG_ZERO)


def model_topk_divergence(student: Any, batch: Batch, kind: Divergence = "forward_kl",
                          beta: float = 0.5, temperature: float = 1.0,
                          chunk: int | None = None, tail: bool = True) -> torch.Tensor:
    """Per trained position [N], `topk_divergence` of the student against the cached
    teacher top-k carried in the batch (`teacher_logprobs`, `teacher_indices`, [B, T, k]).
    Chunked like `token_logprobs`."""
    chunk = chunk or LOGIT_CHUNK
    keep = trained_mask(batch)
    t_values = batch["teacher_logprobs"][keep]
    t_indices = batch["teacher_indices"][keep]
    if not has_plain_head(student):
        s_logits, _ = trained_logits(student, batch)
        return topk_divergence(s_logits, t_values, t_indices, kind, beta, temperature, tail)
    base = base_model(student)
    hidden, _ = trained_hidden(student, batch)

    def piece(h: torch.Tensor, v: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return topk_divergence(head_logits(base, h), v, i, kind, beta, temperature, tail)
    return chunked(piece, hidden, t_values, t_indices, chunk=chunk)
