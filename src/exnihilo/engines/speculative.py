"""Speculative decoding: a small draft model proposes k tokens, the target model checks them
all in one forward pass, and the exact acceptance rule keeps the target's distribution
(Leviathan et al. 2023, arXiv 2211.17192; Chen et al. 2023, arXiv 2302.01318).

For each drafted token x_i (drawn from the draft's distribution q_i):
    accept with probability min(1, p_i(x_i) / q_i(x_i));
    at the first rejection, emit a token from the normalized residual max(0, p_i − q_i) and
    stop; if all k are accepted, emit one more token from p_{k+1}.
Every emitted token is then distributed exactly as the target would sample it. Greedy
decoding is the special case where p and q are one-hot at their argmax: a drafted token is
kept iff it is the target's argmax, so the output is token-identical to plain greedy.

Both distributions are the filtered ones (temperature, top-k, top-p applied as the local
engine does). The number of drafted tokens adapts: +2 after a fully accepted round, −1
after a rejection (between 1 and `max_draft`), the heuristic transformers uses.

Batch 1 by design: it is the latency lever for one request at a time; the batched engine is
the throughput lever. Each prompt draws from its own seeded generator, so results do not
depend on which other prompts were in the call.
"""

from __future__ import annotations

from typing import Any

import torch

from exnihilo.engines.base import Completion, Conversation, SamplingParams, row_seeds
from exnihilo.engines.transformers import TransformersEngine, cache_argument, filter_logits
from exnihilo.progress import token_progress


def token_distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The sampling distribution of each row of `logits` ([n, vocab] → probabilities): one-hot
    at the argmax when greedy, else softmax of the temperature-scaled, filtered logits."""
    logits = logits.float()
    if params.temperature == 0.0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    filtered = filter_logits(logits / params.temperature, params.top_k, params.top_p)
    return torch.softmax(filtered, dim=-1)


def accept_drafted(target: torch.Tensor, draft: torch.Tensor, drafted: list[int],
                   generator: torch.Generator) -> tuple[list[int], int]:
    """The acceptance rule on distributions: `target` [k+1, V] (p_1..p_{k+1}), `draft` [k, V]
    (q_1..q_k), the k drafted tokens. Returns (the tokens to emit, how many drafts were
    accepted); the emitted list is the accepted drafts plus one token from the target."""
    emitted: list[int] = []
    for i, token in enumerate(drafted):
        p, q = float(target[i, token]), float(draft[i, token])
        u = float(torch.rand((), generator=generator))
        if q > 0 and u < min(1.0, p / q):
            emitted.append(token)
            continue
        residual = (target[i] - draft[i]).clamp(min=0)
        total = float(residual.sum())
        dist = residual / total if total > 0 else target[i]
        emitted.append(int(torch.multinomial(dist, 1, generator=generator)))
        return emitted, i
    emitted.append(int(torch.multinomial(target[len(drafted)], 1, generator=generator)))
    return emitted, len(drafted)


def keep_first(cache: Any, n: int) -> None:
    """Drop every cached position from `n` on (`Cache.crop` takes a negative count)."""
    extra = cache.get_seq_length() - n
    if extra > 0:
        cache.crop(-extra)


class SpeculativeEngine:
    """The local engine's protocol with a draft model: `complete`/`chat` decode each prompt
    speculatively. The target and the draft must share a tokenizer (vocabulary)."""

    def __init__(self, target: TransformersEngine, draft_model: Any, max_draft: int = 8,
                 start_draft: int = 4):
        from exnihilo.errors import ExnihiloError

        t_vocab = target.model.get_output_embeddings().weight.shape[0]
        d_vocab = draft_model.get_output_embeddings().weight.shape[0]
        if t_vocab != d_vocab:
            raise ExnihiloError(f"the draft model's vocabulary ({d_vocab} tokens) differs from "
                                f"the target's ({t_vocab}): speculative decoding compares "
                                f"their token distributions, so they must share a tokenizer")
        self.target, self.draft = target, draft_model
        self.tokenizer = target.tokenizer
        self.name = f"{target.name}+draft"
        self.label = target.label
        self.context_length = target.context_length
        self.max_draft, self.start_draft = max_draft, start_draft
        self.stats = {"drafted": 0, "accepted": 0, "target_passes": 0, "tokens": 0}
        self._target_kw = cache_argument(target.model)
        self._draft_kw = cache_argument(draft_model)

    @property
    def acceptance_rate(self) -> float:
        return self.stats["accepted"] / max(self.stats["drafted"], 1)

    def complete(self, prompts: list[str], params: SamplingParams,
                 seeds: list[int] | None = None) -> list[Completion]:
        seeds = row_seeds(len(prompts), params, seeds)
        out = []
        with token_progress(self.label, len(prompts)) as bar:
            for prompt, seed in zip(prompts, seeds, strict=True):
                ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
                completion = self.generate_one(ids, params, seed)
                bar.advance(items=1, tokens=completion.completion_tokens)
                out.append(completion)
        return out

    def chat(self, conversations: list[Conversation], params: SamplingParams,
             seeds: list[int] | None = None) -> list[Completion]:
        from exnihilo.templates import render

        prompts = [render(self.tokenizer, c, add_generation_prompt=True) for c in conversations]
        return self.complete(prompts, params, seeds)

    def _forward(self, model: Any, ids: list[int], cache: Any, start: int, kw: str
                 ) -> torch.Tensor:
        """Logits of `ids` placed at positions start.. (the cache holds 0..start-1)."""
        device = next(model.parameters()).device
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        positions = torch.arange(start, start + len(ids), device=device)[None]
        out = model(input_ids=input_ids, position_ids=positions, use_cache=True,
                    **{kw: cache})
        # On the CPU: the acceptance rule samples with a CPU generator (same draws anywhere).
        return out.logits[0].float().cpu()

    @torch.inference_mode()
    def generate_one(self, prompt: list[int], params: SamplingParams, seed: int) -> Completion:
        """Decode one prompt. Invariant at the start of each round: both caches hold every
        committed token but the last (`seq[-1]`), which is fed first in the round."""
        from transformers import DynamicCache

        generator = torch.Generator().manual_seed(int(seed))
        stop_ids = self.target._stop_ids
        stop_strings = [s for s in params.stop if s]
        t_cache = DynamicCache(config=self.target.model.config)
        d_cache = DynamicCache(config=self.draft.config)
        if len(prompt) > 1:
            self._forward(self.target.model, prompt[:-1], t_cache, 0, self._target_kw)
            self._forward(self.draft, prompt[:-1], d_cache, 0, self._draft_kw)
        seq = list(prompt)
        generated: list[int] = []
        finish = "length"
        k = self.start_draft
        while True:
            left = params.max_new_tokens - len(generated)
            k_now = max(0, min(k, left - 1))  # the target always adds one token itself
            start = len(seq) - 1  # position of seq[-1]
            drafted: list[int] = []
            q_rows: list[torch.Tensor] = []
            token = seq[-1]
            for j in range(k_now):  # the draft proposes k tokens, one at a time
                q = token_distribution(self._forward(self.draft, [token], d_cache, start + j,
                                                     self._draft_kw)[-1:], params)[0]
                token = int(torch.multinomial(q, 1, generator=generator))
                drafted.append(token)
                q_rows.append(q)
            # One target pass over seq[-1] and the drafts gives p_1 .. p_{k+1}.
            t_logits = self._forward(self.target.model, [seq[-1], *drafted], t_cache, start,
                                     self._target_kw)
            self.stats["target_passes"] += 1
            draft_dist = torch.stack(q_rows) if q_rows else t_logits.new_zeros((0, 1))
            emitted, accepted = accept_drafted(token_distribution(t_logits, params),
                                               draft_dist, drafted, generator)
            self.stats["drafted"] += len(drafted)
            self.stats["accepted"] += accepted
            if drafted:
                k = k + 2 if accepted == len(drafted) else k - 1
                k = max(1, min(k, self.max_draft))
            # Both caches keep seq plus the accepted drafts (all but the new last token).
            keep_first(t_cache, len(seq) + accepted)
            if accepted == len(drafted) and drafted:  # the draft never fed its last token
                self._forward(self.draft, [drafted[-1]], d_cache, start + len(drafted),
                              self._draft_kw)
            keep_first(d_cache, len(seq) + accepted)
            stop = False
            for tok in emitted:
                if tok in stop_ids:
                    finish, stop = "stop", True
                    break
                generated.append(tok)
                seq.append(tok)
                if stop_strings:
                    tail = self.tokenizer.decode(generated[-32:], skip_special_tokens=False)
                    if any(s in tail for s in stop_strings):
                        finish, stop = "stop", True
                        break
                if len(generated) >= params.max_new_tokens:
                    stop = True
                    break
            if stop:
                break
        self.stats["tokens"] += len(generated)
        self.last_tokens = generated  # the ids behind the last completion (tests, benchmarks)
        return self.target._completion(generated, prompt, finish, stop_strings)
