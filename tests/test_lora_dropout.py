"""LaneDropout: the same distribution as nn.Dropout (keep rate, scaling, independence),
the gradient of x · mask, reproducible masks (seed, gradient checkpointing), and
add_lora putting it in place of peft's dropout layers without changing what is saved."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import tiny_llama_config
from exnihilo.train.lora_dropout import LaneDropout, keep_mask, lane_drop_count
from exnihilo.train.run import TrainConfig, add_lora

pytestmark = pytest.mark.usefixtures("one_thread")


def test_lane_drop_count_rounds_the_rate_or_declines():
    assert lane_drop_count(0.05) == 3277  # 0.05 · 65536 = 3276.8
    assert lane_drop_count(0.5) == 32768
    assert lane_drop_count(0.1) == 6554
    for unusable in (0.0, 1.0, -0.1, 1e-6, 0.001):  # 0 / 1 / too fine for 16 bits
        assert lane_drop_count(unusable) is None
    assert lane_drop_count(2 / 65536) == 2  # exactly representable, however small


def test_keep_mask_has_the_rate_and_independent_lanes():
    torch.manual_seed(0)
    n = 4_000_000
    keep = keep_mask((n,), lane_drop_count(0.05))
    assert keep.dtype == torch.bool and keep.shape == (n,)
    rate = 1 - keep.double().mean().item()
    sd = math.sqrt(0.05 * 0.95 / n)
    assert abs(rate - 3277 / 65536) < 5 * sd
    # Lanes of one 64-bit draw (and neighbours across draws) must not be correlated: each
    # of the four lane positions drops at the rate, and adjacent elements are independent.
    for lane in range(4):
        assert abs(1 - keep[lane::4].double().mean().item() - 0.05) < 5 * sd * 2
    a, b = (~keep[:-1]).double(), (~keep[1:]).double()
    both = (a * b).mean().item()
    assert abs(both - 0.05 ** 2) < 5 * math.sqrt(0.05 ** 2 / n)
    # A half rate is a sign test on each lane: still exactly balanced in expectation.
    half = keep_mask((n,), lane_drop_count(0.5)).double().mean().item()
    assert abs(half - 0.5) < 5 * math.sqrt(0.25 / n)


def test_forward_scales_kept_values_and_zeroes_the_rest():
    torch.manual_seed(1)
    x = torch.randn(64, 33, 48)
    layer = LaneDropout(0.2).train()
    y = layer(x)
    kept = y != 0
    scale = 65536 / (65536 - lane_drop_count(0.2))
    assert torch.equal(y[kept], x[kept] * torch.tensor(scale, dtype=x.dtype))
    assert abs(1 - kept.double().mean().item() - 0.2) < 0.01
    # Unbiased: the mean of many draws over a constant input is the input.
    ones = torch.ones(2_000_000)
    assert abs(layer(ones).double().mean().item() - 1.0) < 3e-3


def test_backward_is_the_same_mask_times_the_incoming_gradient():
    torch.manual_seed(2)
    x = torch.randn(8, 16, 32, requires_grad=True)
    layer = LaneDropout(0.3).train()
    y = layer(x)
    grad = torch.randn_like(y)
    y.backward(grad)
    mask = y.detach() / x.detach()  # the scale where kept, 0 where dropped
    assert torch.allclose(x.grad, grad * mask, rtol=1e-6, atol=0)
    assert torch.equal(x.grad == 0, y.detach() == 0)


def test_same_seed_same_mask_and_eval_or_zero_rate_is_identity():
    x = torch.randn(4, 10, 20)
    layer = LaneDropout(0.1).train()
    torch.manual_seed(3)
    first = layer(x)
    torch.manual_seed(3)
    assert torch.equal(layer(x), first)
    assert not torch.equal(layer(x), first)  # the generator moved on
    assert torch.equal(layer.eval()(x), x)
    assert torch.equal(LaneDropout(0.0).train()(x), x)


def test_rates_16_bits_cannot_hold_use_torch_dropout():
    x = torch.randn(1000, 100)
    torch.manual_seed(4)
    ours = LaneDropout(0.001).train()(x)
    torch.manual_seed(4)
    torch_own = nn.functional.dropout(x, 0.001, True)
    assert torch.equal(ours, torch_own)


def tiny_lora(vocab_size: int, dropout: float = 0.1):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size))
    cfg = TrainConfig(out="unused", lora_r=4, lora_alpha=8, lora_dropout=dropout)
    model = add_lora(model, cfg)
    with torch.no_grad():  # non-zero B, so the dropout on A's input shows in the loss
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def test_add_lora_uses_lane_dropout_and_saves_the_same_keys(smol_tokenizer, tmp_path):
    model = tiny_lora(len(smol_tokenizer))
    lane = [m for m in model.modules() if isinstance(m, LaneDropout)]
    plain = [m for m in model.modules() if type(m) is nn.Dropout]
    assert len(lane) == 7 * 2 and not plain  # all-linear: 7 layers in each of 2 blocks
    assert all(m.p == 0.1 for m in lane)
    model.save_pretrained(tmp_path / "adapter")
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)  # the same base weights as tiny_lora's
    base = LlamaForCausalLM(tiny_llama_config(len(smol_tokenizer)))
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    ids = torch.tensor([[1, 40, 50, 60, 70, 2]])
    model.eval()
    with torch.no_grad():  # the adapter saved with LaneDropout loads in plain peft
        assert torch.allclose(model(input_ids=ids).logits,
                              reloaded.eval()(input_ids=ids).logits, atol=1e-6)
    assert not [m for m in tiny_lora(len(smol_tokenizer), 0.0).modules()
                if isinstance(m, nn.Dropout)]  # dropout 0: peft's Identity stays


def lora_grads(model, ids, checkpointing: bool) -> list[torch.Tensor]:
    if checkpointing:
        model.base_model.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    model(input_ids=ids, labels=ids).loss.backward()
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_gradient_checkpointing_replays_the_same_masks(smol_tokenizer):
    """Recomputation in backward must draw the masks it drew in forward, or the gradient
    would belong to no forward pass at all."""
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    plain = lora_grads(tiny_lora(len(smol_tokenizer)), ids, checkpointing=False)
    again = lora_grads(tiny_lora(len(smol_tokenizer)), ids, checkpointing=False)
    replayed = lora_grads(tiny_lora(len(smol_tokenizer)), ids, checkpointing=True)
    assert all(torch.equal(a, b) for a, b in zip(plain, again, strict=True))
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7)
               for a, b in zip(plain, replayed, strict=True))
    model = tiny_lora(len(smol_tokenizer))
    model.train()
    torch.manual_seed(6)  # and a different mask gives a different gradient
    model(input_ids=ids, labels=ids).loss.backward()
    other = [p.grad for p in model.parameters() if p.requires_grad]
    assert not all(torch.allclose(a, b) for a, b in zip(plain, other, strict=True))
