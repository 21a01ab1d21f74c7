"""A KV cache for the local engine's decode loop: preallocated, growing by doubling, and
mergeable so waiting prompts can join a running batch (continuous batching).

transformers' `DynamicLayer.update` appends each step's keys with `torch.cat`, copying the
whole cache every step: at batch 32 × 300 tokens × 30 layers of SmolLM2-135M that is
~430 MB of memory traffic per decode step. `GrowingLayer` writes the step in place into a
buffer with spare room and returns views of its filled part, so a step copies nothing; the
buffer doubles when full (amortized O(1) per token).

`merge_rows` joins two caches of different lengths along the batch: the shorter one is
padded on the left (those positions are masked out by the attention mask the engine keeps,
and position ids are tracked per row), which is how left-padded prompts already work.
Joining rows pads them to the running batch's length, so without `drop_front` a batch that
keeps admitting prompts would grow its cache with every step of the whole run; the engine
drops the leading columns no live row attends to whenever it removes finished rows.

Only models whose every layer is a plain full-attention `DynamicLayer` use this; sliding-
window layers (Gemma 2's local layers) keep transformers' own cache and the plain loop.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class GrowingLayer(DynamicLayer):
    """A full-attention KV layer with preallocated, doubling storage."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor
                            ) -> None:
        self.device = key_states.device
        self.length = 0
        self._k = key_states.new_empty((*key_states.shape[:2], 0, key_states.shape[-1]))
        self._v = value_states.new_empty((*value_states.shape[:2], 0, value_states.shape[-1]))
        self.keys, self.values = self._k, self._v
        self.is_initialized = True

    def _reserve(self, needed: int) -> None:
        capacity = self._k.shape[-2]
        if needed <= capacity:
            return
        capacity = max(needed, 2 * capacity, 64)
        k = self._k.new_empty((*self._k.shape[:2], capacity, self._k.shape[-1]))
        v = self._v.new_empty((*self._v.shape[:2], capacity, self._v.shape[-1]))
        k[..., :self.length, :] = self._k[..., :self.length, :]
        v[..., :self.length, :] = self._v[..., :self.length, :]
        self._k, self._v = k, v

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self._reserve(end)
        self._k[..., self.length:end, :] = key_states
        self._v[..., self.length:end, :] = value_states
        self.length = end
        self.keys, self.values = self._k[..., :end, :], self._v[..., :end, :]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._k, self._v = self._k[indices], self._v[indices]
            self.keys, self.values = self._k[..., :self.length, :], self._v[..., :self.length, :]

    def drop_front(self, count: int) -> None:
        """Forget the first `count` positions of every row (columns no live row attends to).
        A view: the next copy (row selection, growth) leaves the dropped part behind."""
        if count <= 0 or not self.is_initialized:
            return
        self._k, self._v = self._k[..., count:, :], self._v[..., count:, :]
        self.length -= count
        self.keys, self.values = self._k[..., :self.length, :], self._v[..., :self.length, :]

    def left_pad(self, pad: int) -> None:
        """Prepend `pad` (masked) positions to every row."""
        if pad <= 0 or not self.is_initialized:
            return
        b, h, _, d = self._k.shape
        k = self._k.new_zeros((b, h, self.length + pad, d))
        v = self._v.new_zeros((b, h, self.length + pad, d))
        k[..., pad:, :] = self._k[..., :self.length, :]
        v[..., pad:, :] = self._v[..., :self.length, :]
        self._k, self._v, self.length = k, v, self.length + pad
        self.keys, self.values = k, v

    def append_rows(self, other: GrowingLayer) -> None:
        """Add `other`'s rows after ours; both must have the same length."""
        if other.length != self.length:
            raise ValueError("merge needs equal lengths: left-pad the shorter cache first")
        self._k = torch.cat([self._k[..., :self.length, :], other._k[..., :other.length, :]])
        self._v = torch.cat([self._v[..., :self.length, :], other._v[..., :other.length, :]])
        self.keys, self.values = self._k, self._v


def supports_growing(model: Any) -> bool:
    """True when transformers would give every layer a plain (full-attention) DynamicLayer."""
    cache = DynamicCache(config=model.config)
    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


def growing_cache(model: Any) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    cache.layers = [GrowingLayer() for _ in cache.layers]
    return cache


def merge_rows(first: DynamicCache, second: DynamicCache, first_mask: torch.Tensor,
               second_mask: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
    """`first`'s rows then `second`'s, padded on the left to a common length; returns the
    merged cache (reusing `first`) and the merged attention mask."""
    length = max(first_mask.shape[1], second_mask.shape[1])
    masks = []
    for cache, mask in ((first, first_mask), (second, second_mask)):
        pad = length - mask.shape[1]
        for layer in cache.layers:
            layer.left_pad(pad)
        masks.append(torch.cat([mask.new_zeros((mask.shape[0], pad)), mask], dim=1))
    for mine, theirs in zip(first.layers, second.layers, strict=True):
        mine.append_rows(theirs)
    return first, torch.cat(masks)
