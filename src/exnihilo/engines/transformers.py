"""Local generation with transformers: batched, KV-cached, per-row seeded.

Why a hand-written decode loop instead of `model.generate`: we need (1) per-row random
streams, so a record's text does not depend on which other prompts share its batch, and
(2) rows that finish (end-of-turn id or stop string) leave the batch at once — their KV
cache rows are dropped — so long-tailed lengths do not keep paying for finished rows, and
(3) waiting prompts take the freed places: when half the batch has finished, the next
group of prompts is prefilled and merged into the running batch (continuous batching, in
groups so each prefill is a batched matmul). `generate` offers none of these. Prefill uses
left padding; decode writes one token per step into a preallocated cache
(`engines.kvcache`) instead of re-concatenating the whole cache every step.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from exnihilo.engines.base import Completion, Conversation, SamplingParams, row_seeds
from exnihilo.engines.registry import register
from exnihilo.progress import token_progress


def row_uniforms(generators: list[torch.Generator]) -> torch.Tensor:
    """One U[0, 1) draw per row, each from its own row's generator ([rows])."""
    return torch.cat([torch.rand(1, generator=g) for g in generators])


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask to -inf everything outside top-k and outside the top-p nucleus."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        logits = nucleus(logits, top_p)
    return logits


def nucleus(logits: torch.Tensor, top_p: float, head: int = 256) -> torch.Tensor:
    """Keep each row's most probable tokens until their mass reaches `top_p` (a token is
    dropped when the mass before it already does; at least one is kept); the rest -> -inf.

    Sorting all 49k logits per row cost 400 ms per step at 128 rows (2 threads), about a
    decode step's own cost, so the nucleus is first sought among the `head` most probable
    tokens (`topk`, 15 ms); only rows whose head holds less than `top_p` are sorted whole."""
    vocab = logits.shape[-1]
    values, order = torch.topk(logits, min(head, vocab), dim=-1)  # descending
    probs = torch.exp(values - torch.logsumexp(logits, dim=-1, keepdim=True))
    mass = torch.cumsum(probs, dim=-1)
    kept = values.masked_fill((mass - probs) >= top_p, float("-inf"))
    out = torch.full_like(logits, float("-inf")).scatter(-1, order, kept)
    short = (mass[:, -1] < top_p).nonzero().squeeze(-1)
    if len(short) and values.shape[-1] < vocab:
        out[short] = nucleus(logits[short], top_p, head=vocab)
    return out


def sample_next(logits: torch.Tensor, params: SamplingParams,
                generators: list[torch.Generator]) -> torch.Tensor:
    """Next token per row, by inverse-CDF sampling: one uniform draw u per row, and the
    token where the row's cumulative probability first exceeds u.

    Why not Gumbel-max (argmax of logits plus one noise draw per vocabulary entry): that
    draws and takes two logs of 49k numbers per row per step: 84 ms per step at 128 rows
    (2 threads), against 10 ms for a softmax and a running sum, and 12-14 % of a batch-128
    decode step of SmolLM2-135M in torch.profiler. A draw is taken every step even when
    greedy, so each row's random stream advances identically whatever the settings of other
    calls. The generators are CPU ones, so a seed draws the same numbers on every device."""
    u = row_uniforms(generators)
    if params.temperature == 0.0:
        return torch.argmax(logits, dim=-1)
    scaled = filter_logits(logits.float() / params.temperature, params.top_k, params.top_p)
    # float32 is enough: a token's chance is the width of its step in the computed cdf,
    # which is off from its probability by one rounding (~6e-8), not by the running sum's
    # accumulated error. (float64 here cost 15 % of a batch-128 step.)
    cdf = torch.cumsum(torch.softmax(scaled, dim=-1), dim=-1)
    total = cdf[:, -1]
    # Kept strictly below the total, so some token's cdf always exceeds it.
    target = torch.minimum(u.to(cdf.device) * total, torch.nextafter(total, total.new_zeros(())))
    # right=True: the first index whose cdf exceeds the target; a zero-probability
    # (filtered) token repeats its predecessor's cdf and so can never be that index.
    return torch.searchsorted(cdf, target.unsqueeze(-1), right=True).squeeze(-1)


# The automatic decode width (`batch_size=None`). Measured in benchmarks/generation.py
# --decode-only (2 threads, idle, SmolLM2-135M, 64 new tokens): 32 rows 7.8x the naive
# batch-1 loop, 64 rows 15.4x, 128 rows 16.0x; past 128 nothing more was gained (256: 15.3x
# in an earlier run), while the KV cache keeps growing with the rows.
AUTO_MAX_ROWS = 128
# Share of the free memory the KV cache may take at the automatic width.
AUTO_KV_SHARE = 0.25
# Rows per forward when scoring log-probabilities with the automatic width (no KV cache,
# but full-length activations).
SCORING_ROWS = 32


def kv_bytes_per_token(model: Any) -> int:
    """Bytes the KV cache holds per token of one row: keys and values of every layer
    (SmolLM2-135M: 30 layers x 2 x 3 KV heads x 64 x 4 bytes = 46,080)."""
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    itemsize = next(model.parameters()).element_size()
    return 2 * config.num_hidden_layers * kv_heads * head_dim * itemsize


def free_memory(device: torch.device) -> int:
    """Bytes free for new tensors on `device`: the CUDA allocator's free memory, else the
    kernel's MemAvailable (free plus reclaimable cache), else free physical pages."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30  # unknown (e.g. macOS without sysconf's page counts): assume 8 GiB


def auto_width(model: Any, tokens_per_row: int, memory: int) -> int:
    """Rows to decode together: as many as `AUTO_KV_SHARE` of `memory` holds at
    `tokens_per_row` (prompt plus reply), counting the cache's doubling growth (up to twice
    the filled length while it is copied), between 1 and `AUTO_MAX_ROWS`."""
    per_row = 2 * kv_bytes_per_token(model) * max(1, tokens_per_row)
    return max(1, min(AUTO_MAX_ROWS, int(AUTO_KV_SHARE * memory) // per_row))


def cache_argument(model: Any) -> str:
    """The forward() keyword for the KV cache: transformers 5.24 renamed `past_key_values`
    to `cache` and warns on the old name (on every call: every command printed it)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters \
        else "past_key_values"


@register("transformers")
class TransformersEngine:
    """The default engine: a local Hugging Face causal LM on `device` (None: the process
    default, `exnihilo --device`; auto picks CUDA, else MPS, else the CPU). dtype auto:
    bfloat16 on a GPU that supports it, else float32; on a CPU with native bf16 (AVX512-BF16
    or AMX) sampled decoding runs a bfloat16 copy of the weights (`devices.sampling_dtype`),
    while greedy decoding and log-probabilities stay float32. An in-memory `model_obj` is
    used as it is (its weights may be training: no copy) and stays where it is unless
    `device` is given. The KV cache is allocated where the model is.

    `batch_size` is the number of rows decoded together; None (the default) picks it per
    call from the prompts' length, the reply budget and the free memory (`auto_width`)."""

    def __init__(self, model: str = "smollm2-135m-instruct", dtype: str = "auto",
                 batch_size: int | None = None, model_obj: Any = None, tokenizer: Any = None,
                 progress_label: str = "generating", refill: bool = True,
                 drop_slack: float = 0.25, device: str | None = None):
        from exnihilo.devices import place_model
        from exnihilo.models import load_model, load_tokenizer

        self.name = f"transformers:{model}"
        self.model_name = model
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model)
        self.model = place_model(model_obj, device) if model_obj is not None else \
            load_model(model, dtype=dtype, device=device)
        self.batch_size = batch_size
        self.progress_label = progress_label
        self.label = progress_label
        self.context_length = getattr(self.model.config, "max_position_embeddings", None)
        self._stop_ids = self._base_stop_ids()
        self._cache_kw = cache_argument(self.model)
        from exnihilo.devices import sampling_dtype

        weights = next(self.model.parameters())
        self._sampling_dtype = None if model_obj is not None or weights.dtype != torch.float32 \
            else sampling_dtype(dtype, weights.device)
        self._sampling_model: Any = None
        from exnihilo.engines.kvcache import supports_growing

        # Continuous batching needs mergeable caches: plain full-attention layers only.
        self.refill = refill and supports_growing(self.model)
        # Finished rows may wait in the batch until more than this share of it has finished
        # (0: removed at once). Measured in benchmarks/generation.py (1 thread, load 4-7):
        # 0.25 gave 1.05x the tokens/s of 0 on long-tailed replies (both repeats faster).
        self.drop_slack = drop_slack

    # ------------------------------------------------------------------ protocol
    def complete(self, prompts: list[str], params: SamplingParams,
                 seeds: list[int] | None = None) -> list[Completion]:
        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        return self.generate_ids(ids, params, seeds)

    def chat(self, conversations: list[list[dict[str, str]]], params: SamplingParams,
             seeds: list[int] | None = None) -> list[Completion]:
        from exnihilo.templates import render

        prompts = [render(self.tokenizer, c, add_generation_prompt=True) for c in conversations]
        return self.complete(prompts, params, seeds)

    # ------------------------------------------------------------------ log-probabilities
    def _prompt_ids(self, conversations: list[Conversation]) -> list[list[int]]:
        from exnihilo.templates import render

        return [self.tokenizer(render(self.tokenizer, c, add_generation_prompt=True),
                               add_special_tokens=False)["input_ids"] for c in conversations]

    @torch.inference_mode()
    def next_token_logprobs(self, conversations: list[Conversation], top_k: int = 20
                            ) -> list[dict[str, float]]:
        """The first reply token's top-k {text: log p}, from the model's own logits."""
        results: list[dict[str, float]] = []
        prompts = self._prompt_ids(conversations)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        device = next(self.model.parameters()).device
        rows_per_forward = self.batch_size or SCORING_ROWS
        for start in range(0, len(prompts), rows_per_forward):
            chunk = prompts[start:start + rows_per_forward]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, p in enumerate(chunk):  # left padding: the last position is the prompt's
                ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
                mask[r, width - len(p):] = 1
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                position_ids=positions.to(device), use_cache=False,
                                logits_to_keep=1).logits[:, -1, :].float()
            logp = torch.log_softmax(logits, dim=-1)
            values, indices = torch.topk(logp, min(top_k, logp.shape[-1]), dim=-1)
            for vals, idx in zip(values.tolist(), indices.tolist(), strict=True):
                top: dict[str, float] = {}
                for v, i in zip(vals, idx, strict=True):
                    text = self.tokenizer.decode([i])
                    top[text] = max(top.get(text, float("-inf")), v)
                results.append(top)
        return results

    @torch.inference_mode()
    def reply_logprobs(self, conversations: list[Conversation], replies: list[str]
                       ) -> list[tuple[float, int]]:
        """(Σ log p, tokens) of each reply after its conversation, through the shared
        log-prob path (`train.forward.sequence_logprobs`)."""
        from exnihilo.train.collate import collate_continuations
        from exnihilo.train.forward import sequence_logprobs

        if len(replies) != len(conversations):
            raise ValueError("one reply per conversation")
        prompts = self._prompt_ids(conversations)
        rows = [(p, self.tokenizer(r, add_special_tokens=False)["input_ids"])
                for p, r in zip(prompts, replies, strict=True)]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        device = next(self.model.parameters()).device
        out: list[tuple[float, int]] = []
        rows_per_forward = self.batch_size or SCORING_ROWS
        for start in range(0, len(rows), rows_per_forward):
            chunk = rows[start:start + rows_per_forward]
            if any(not c for _, c in chunk):
                raise ValueError("an empty reply has no log-probability to score")
            batch = {k: v.to(device) for k, v in collate_continuations(chunk, pad).items()}
            seq = sequence_logprobs(self.model, batch)
            out.extend(zip(seq.sums.tolist(), seq.counts.tolist(), strict=True))
        return out

    # ------------------------------------------------------------------ internals
    def _base_stop_ids(self) -> set[int]:
        from exnihilo.templates import template_info

        ids: set[int] = set()
        for source in (self.tokenizer.eos_token_id,
                       getattr(self.model.generation_config, "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, list):
                ids.update(source)
        if getattr(self.tokenizer, "chat_template", None):
            info = template_info(self.tokenizer)
            vocab = self.tokenizer.get_vocab()
            for marker in (info.user_end, info.assistant_end):
                if marker in vocab:
                    ids.add(vocab[marker])
        return ids

    def decoder_for(self, params: SamplingParams) -> Any:
        """The model that decodes under `params`: a bfloat16 copy (made once) for sampled
        decoding where `devices.sampling_dtype` asks for it, else the weights as loaded."""
        if self._sampling_dtype is None or params.temperature == 0.0:
            return self.model
        if self._sampling_model is None:
            self._sampling_model = copy.deepcopy(self.model).to(
                getattr(torch, self._sampling_dtype)).eval()
        return self._sampling_model

    def width_for(self, prompt_ids: list[list[int]], params: SamplingParams) -> int:
        """Rows decoded together for this call: `batch_size` when set, else `auto_width`."""
        if self.batch_size:
            return self.batch_size
        longest = max((len(p) for p in prompt_ids), default=0)
        model = self.decoder_for(params)
        device = next(model.parameters()).device
        return auto_width(model, longest + params.max_new_tokens, free_memory(device))

    def generate_ids(self, prompt_ids: list[list[int]], params: SamplingParams,
                     seeds: list[int] | None = None) -> list[Completion]:
        """Generate for token-id prompts; results in input order."""
        seeds = row_seeds(len(prompt_ids), params, seeds)
        width = self.width_for(prompt_ids, params)
        model = self.decoder_for(params)
        # Longest first: batches hold similar lengths (less padding) and the slowest batch
        # runs while the progress estimate is still honest.
        order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
        results: list[Completion | None] = [None] * len(prompt_ids)
        with token_progress(self.progress_label, len(prompt_ids)) as bar:
            if self.refill:
                outs = self._generate_refill(model, [prompt_ids[i] for i in order], params,
                                             [seeds[i] for i in order], bar, width)
                for i, out in zip(order, outs, strict=True):
                    results[i] = out
                return [r for r in results if r is not None]
            for start in range(0, len(order), width):
                chunk = order[start:start + width]
                outs = self._generate_batch(model, [prompt_ids[i] for i in chunk], params,
                                            [seeds[i] for i in chunk], bar)
                for i, out in zip(chunk, outs, strict=True):
                    results[i] = out
        return [r for r in results if r is not None]

    def _prefill(self, model: Any, prompts: list[list[int]], cache: Any
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded prefill; (last-position logits [n, vocab], mask, last position ids)."""
        device = next(model.parameters()).device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):  # left padding: every row's last token is aligned
            input_ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[r, width - len(p):] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                    use_cache=True, logits_to_keep=1, **{self._cache_kw: cache})
        return out.logits[:, -1, :].float(), mask, positions[:, -1]

    @torch.inference_mode()
    def _generate_refill(self, model: Any, prompts: list[list[int]], params: SamplingParams,
                         seeds: list[int], bar: Any, width: int) -> list[Completion]:
        """Continuous batching over all `prompts` (in the given order): up to `width`
        rows decode together; whenever at most half remain and prompts are waiting, the
        next group is prefilled and merged into the running batch.

        Finished rows leave the batch in groups: removing rows copies the whole KV cache, so
        a finished row stays (its tokens ignored) until more than `drop_slack` of the batch
        has finished, the batch admits new prompts, or no live row is left."""
        from exnihilo.engines.kvcache import growing_cache, merge_rows

        device = next(model.parameters()).device
        stop_ids = torch.tensor(sorted(self._stop_ids), dtype=torch.long, device=device)
        stop_strings = [s for s in params.stop if s]
        tail_tokens = max((len(s) for s in stop_strings), default=0) + 4
        n = len(prompts)
        generated: list[list[int]] = [[] for _ in range(n)]
        finish: list[str | None] = [None] * n
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        spare = torch.Generator()  # noise for finished rows still in the batch (discarded)
        waiting = 0  # next prompt to admit
        rows: list[int | None] = []  # prompt index of each batch row; None: finished
        cache: Any = None
        mask = last_pos = logits = next_tokens = None

        def compact() -> None:
            nonlocal mask, last_pos, logits, next_tokens, rows
            keep = [b for b, r in enumerate(rows) if r is not None]
            if len(keep) == len(rows):
                return
            index = torch.tensor(keep, dtype=torch.long, device=device)
            mask = mask[index]
            # Columns before every live row's first token are padding for all of them:
            # drop them, or admitted rows (padded to the running length) grow it forever.
            front = int(mask.any(dim=0).int().argmax())
            if front:
                for layer in cache.layers:
                    layer.drop_front(front)
                mask = mask[:, front:]
            cache.batch_select_indices(index)
            last_pos = last_pos[index]
            logits = logits[index] if logits is not None else None
            next_tokens = next_tokens[index] if next_tokens is not None else None
            rows = [rows[b] for b in keep]

        while True:
            live = sum(r is not None for r in rows)
            if waiting < n and live <= width // 2:
                if live:
                    compact()
                else:
                    rows, cache = [], None
                group = list(range(waiting, min(n, waiting + width - live)))
                waiting = group[-1] + 1
                new_cache = growing_cache(model)
                new_logits, new_mask, new_pos = self._prefill(model, [prompts[i] for i in group],
                                                              new_cache)
                if rows:
                    cache, mask = merge_rows(cache, new_cache, mask, new_mask)
                    logits = torch.cat([logits, new_logits])
                    last_pos = torch.cat([last_pos, new_pos])
                else:
                    cache, mask, logits, last_pos = new_cache, new_mask, new_logits, new_pos
                rows += group
                live = len(rows)
            if not live:
                break
            next_tokens = sample_next(logits, params, [spare if r is None else generators[r]
                                                       for r in rows])
            is_stop = torch.isin(next_tokens, stop_ids).tolist()
            done = produced = 0
            for b, r in enumerate(rows):
                if r is None:
                    continue
                token = int(next_tokens[b])
                if is_stop[b]:
                    finish[r] = "stop"
                elif self._append(generated[r], token, stop_strings, tail_tokens):
                    produced += 1
                    finish[r] = "stop"
                else:
                    produced += 1
                    if len(generated[r]) == params.max_new_tokens:
                        finish[r] = "length"
                if finish[r] is not None:
                    rows[b] = None
                    done += 1
            bar.advance(items=done, tokens=produced)
            live = sum(r is not None for r in rows)
            if not live:
                rows, cache = [], None
                continue  # admit the next group, or finish
            if len(rows) - live > self.drop_slack * len(rows):
                compact()
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=-1)
            last_pos = last_pos + 1
            out = model(input_ids=next_tokens[:, None], attention_mask=mask,
                        position_ids=last_pos[:, None], use_cache=True,
                        **{self._cache_kw: cache})
            logits = out.logits[:, -1, :].float()
        return [self._completion(generated[r], prompts[r], finish[r], stop_strings)
                for r in range(n)]

    def _append(self, tokens: list[int], token: int, stop_strings: list[str],
                tail_tokens: int) -> bool:
        """Append `token` to a row; True when the row's text now contains a stop string."""
        tokens.append(token)
        if not stop_strings:
            return False
        tail = self.tokenizer.decode(tokens[-tail_tokens:], skip_special_tokens=False)
        return any(s in tail for s in stop_strings)

    def _completion(self, tokens: list[int], prompt: list[int], finish: str | None,
                    stop_strings: list[str]) -> Completion:
        text = self.tokenizer.decode(tokens, skip_special_tokens=False)
        for s in stop_strings:
            cut = text.find(s)
            if cut >= 0:
                text = text[:cut]
        return Completion(text=text, prompt_tokens=len(prompt), completion_tokens=len(tokens),
                          finish_reason=finish or "length")  # type: ignore[arg-type]

    @torch.inference_mode()
    def _generate_batch(self, model: Any, prompts: list[list[int]], params: SamplingParams,
                        seeds: list[int], bar: Any) -> list[Completion]:
        from transformers import DynamicCache

        tok = self.tokenizer
        device = next(model.parameters()).device
        n = len(prompts)
        width = max(len(p) for p in prompts)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        input_ids = torch.full((n, width), pad, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for r, p in enumerate(prompts):  # left padding: every row's last token is aligned
            input_ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[r, width - len(p):] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        stop_ids = torch.tensor(sorted(self._stop_ids), dtype=torch.long, device=device)
        stop_strings = [s for s in params.stop if s]
        tail_tokens = max((len(s) for s in stop_strings), default=0) + 4

        generated: list[list[int]] = [[] for _ in range(n)]
        finish: list[str | None] = [None] * n
        active = list(range(n))  # original row index of each live batch row
        cache = DynamicCache(config=model.config)
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                    use_cache=True, logits_to_keep=1, **{self._cache_kw: cache})
        last_pos = positions[:, -1]
        for step in range(params.max_new_tokens):
            logits = out.logits[:, -1, :].float()
            next_tokens = sample_next(logits, params, [generators[r] for r in active])
            is_stop = torch.isin(next_tokens, stop_ids).tolist()
            keep: list[int] = []
            produced = 0
            for b, r in enumerate(active):
                token = int(next_tokens[b])
                if is_stop[b]:
                    finish[r] = "stop"
                    continue
                generated[r].append(token)
                produced += 1
                if stop_strings:
                    tail = tok.decode(generated[r][-tail_tokens:], skip_special_tokens=False)
                    if any(s in tail for s in stop_strings):
                        finish[r] = "stop"
                        continue
                if step + 1 == params.max_new_tokens:
                    finish[r] = "length"
                    continue
                keep.append(b)
            bar.advance(items=len(active) - len(keep), tokens=produced)
            if not keep:
                break
            if len(keep) < len(active):
                index = torch.tensor(keep, dtype=torch.long, device=device)
                cache.batch_select_indices(index)
                mask, last_pos, next_tokens = mask[index], last_pos[index], next_tokens[index]
                active = [active[b] for b in keep]
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=-1)
            last_pos = last_pos + 1
            out = model(input_ids=next_tokens[:, None], attention_mask=mask,
                        position_ids=last_pos[:, None], use_cache=True,
                        **{self._cache_kw: cache})

        completions = []
        for r in range(n):
            text = tok.decode(generated[r], skip_special_tokens=False)
            for s in stop_strings:
                cut = text.find(s)
                if cut >= 0:
                    text = text[:cut]
            completions.append(Completion(text=text, prompt_tokens=len(prompts[r]),
                                          completion_tokens=len(generated[r]),
                                          finish_reason=finish[r] or "length"))  # type: ignore[arg-type]
        return completions
