"""Frozen linear layers multiplied in bfloat16 while everything else stays float32.

In LoRA training on the CPU about three quarters of a step is the base model's matrix
products (`benchmarks/sft.py`, profiled: `aten::mm` 76 % of a SmolLM2-135M LoRA step), and
those weights never change. On a CPU with native bfloat16 (AVX512-BF16 or AMX) a bf16
product runs about 4.5× the float32 rate (measured here, 1 thread: 441–456 against 90–103
GFLOP/s at the shapes of a batch of 8 × 153 tokens). So each frozen `nn.Linear` multiplies
its input, cast to bf16, by a bf16 copy of its weight, and returns float32; the backward
pass does the same for the input's gradient (a frozen weight needs no gradient of its own).

Why not `torch.autocast`: under autocast the LoRA branch also runs in bf16 and its small
update is added to the base output in bf16, whose 8-bit mantissa rounds most of it away
early in training (measured with the same weights after two float32 steps: the loss under
autocast was 3.16 against float32's 2.92, while for the base model alone the two agreed to
0.005). Here only the frozen product is rounded; the adapters, the residual stream, norms,
attention, the logits and the loss stay float32, so the update is added exactly. The frozen
LM head keeps its float32 forward; its bf16 copy serves only the hidden state's gradient in
the fused log-prob head. Over eight LoRA steps on the same batches the losses tracked
float32 to within 0.005, and the step ran 1.5× as fast (1 thread, 192 against 126 trained
tokens/s; an earlier prototype without the head's share: 1.93× on a different machine).

Written here because neither torch nor peft offers "bf16 for frozen products only": peft
casts the input to the adapter's dtype and adds in the base output's dtype, and torch's
CPU `mm` has no bf16-in/fp32-out variant. Installed for the length of a training run by
`frozen_bf16_matmuls` (the loop does this); leaving it restores each layer as it was, so
merging adapters into the float32 weights afterwards is unaffected.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

BF16_WEIGHT = "_frozen_bf16_weight"  # the non-persistent buffer holding the bf16 copy


class _Bf16Product(torch.autograd.Function):
    """x · Wᵀ with x and W in bf16 and the result in x's dtype; backward g · W likewise.
    Saves only W (already kept by the layer), not x: a frozen W needs no gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return F.linear(x.to(weight.dtype), weight).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (weight,) = ctx.saved_tensors
        return (grad.to(weight.dtype) @ weight).to(grad.dtype), None


def bf16_product(x: torch.Tensor, weight_bf16: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, W)` (no bias) computed with bf16 operands, returned in x's dtype."""
    return _Bf16Product.apply(x, weight_bf16)


def _bf16_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    out = bf16_product(x, getattr(self, BF16_WEIGHT))
    return out if self.bias is None else out + self.bias


def _output_head(model: nn.Module) -> nn.Module | None:
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


def _frozen_fp32_cpu(layer: nn.Module) -> bool:
    return (type(layer) is nn.Linear and not layer.weight.requires_grad
            and layer.weight.dtype == torch.float32 and layer.weight.device.type == "cpu")


def frozen_linears(model: nn.Module) -> list[nn.Linear]:
    """The float32 CPU `nn.Linear`s whose weight is frozen, the LM head excluded: its
    logits feed log-probabilities, which bf16's rounding of the logits would shift."""
    head = _output_head(model)
    return [m for m in model.modules() if _frozen_fp32_cpu(m) and m is not head]


@contextlib.contextmanager
def frozen_bf16_matmuls(model: nn.Module, on: bool = True) -> Iterator[int]:
    """Within the block, `model`'s frozen linear layers (`frozen_linears`) multiply in bf16;
    yields how many. A frozen head keeps its float32 forward but gets the bf16 copy too,
    which the fused log-prob head (`forward.token_logprob_sum`) uses for the hidden state's
    gradient only. On exit each layer is as before (its own forward, no extra buffer).
    The bf16 copies cost 2 bytes per frozen weight (0.27 GB on SmolLM2-135M)."""
    layers = frozen_linears(model) if on else []
    head = _output_head(model) if on else None
    head = head if head is not None and _frozen_fp32_cpu(head) else None
    for layer in layers:
        layer.register_buffer(BF16_WEIGHT, layer.weight.detach().to(torch.bfloat16),
                              persistent=False)
        layer.forward = types.MethodType(_bf16_forward, layer)
    if head is not None:
        head.register_buffer(BF16_WEIGHT, head.weight.detach().to(torch.bfloat16),
                             persistent=False)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            del layer.forward  # the instance attribute; the class's forward shows again
            delattr(layer, BF16_WEIGHT)
        if head is not None:
            delattr(head, BF16_WEIGHT)
