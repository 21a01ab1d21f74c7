"""Frozen products in bf16: the values and gradients of a bf16 product, which layers it
takes (frozen, not the LM head), that a small LoRA update survives where torch.autocast
rounds it away, that leaving restores the float32 model exactly, and when training turns
it on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_llama_config
from exnihilo.devices import wants_frozen_bf16
from exnihilo.train.frozen_bf16 import bf16_product, frozen_bf16_matmuls, frozen_linears
from exnihilo.train.run import TrainConfig, add_lora

pytestmark = pytest.mark.usefixtures("one_thread")

BF16_EPS = 2.0 ** -8  # bf16 keeps 8 significant bits


def test_bf16_product_values_and_gradient():
    torch.manual_seed(0)
    x = torch.randn(5, 7, 48, requires_grad=True)
    w = torch.randn(32, 48)
    wb = w.to(torch.bfloat16)
    out = bf16_product(x, wb)
    assert out.dtype == torch.float32
    expected = F.linear(x.detach().to(torch.bfloat16), wb).float()
    assert torch.equal(out, expected)  # the bf16 product, returned in float32
    # ... which is float32's product to within bf16 rounding of inputs and output
    assert (out - F.linear(x.detach(), w)).abs().max() < 8 * BF16_EPS * F.linear(
        x.detach().abs(), w.abs()).max()
    g = torch.randn_like(out)
    out.backward(g)
    assert torch.equal(x.grad, (g.to(torch.bfloat16) @ wb).float())


def tiny_lora_model(vocab_size: int, b_scale: float):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size))
    model = add_lora(model, TrainConfig(out="unused", lora_r=4, lora_alpha=8,
                                        lora_dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, b_scale)
    return model.eval()


def test_takes_the_frozen_linears_and_restores_them(smol_tokenizer):
    model = tiny_lora_model(len(smol_tokenizer), 0.1)
    ids = torch.tensor([[1, 40, 50, 60, 70, 80, 2]])
    keys = set(model.state_dict())
    with torch.no_grad():
        before = model(input_ids=ids).logits
    layers = frozen_linears(model)
    head = model.get_output_embeddings()
    assert len(layers) == 7 * 2 and head not in layers  # the LoRA base layers, not the head
    with frozen_bf16_matmuls(model) as n, torch.no_grad():
        assert n == 14
        inside = model(input_ids=ids).logits
        assert set(model.state_dict()) == keys  # the bf16 copies are not saved
    assert not torch.equal(inside, before)  # bf16 products did run ...
    assert (inside - before).abs().max() < 0.05 * before.abs().max()  # ... close to float32
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)  # restored exactly
    assert not any(hasattr(m, "_frozen_bf16_weight") for m in model.modules())
    with frozen_bf16_matmuls(model, on=False) as n:
        assert n == 0
    full = tiny_lora_model(len(smol_tokenizer), 0.1).base_model.model
    for p in full.parameters():
        p.requires_grad_(True)
    assert frozen_linears(full) == []  # full finetuning: nothing frozen, nothing taken


def test_a_small_lora_update_is_added_in_float32(smol_tokenizer):
    """Early in training LoRA's B is tiny: its contribution must reach the layer's output.
    Here it is added in float32 to the (bf16-multiplied) base output; under torch.autocast
    it is added in bf16, which loses most of it."""
    from peft.tuners.lora import Linear as LoraLinear

    model = tiny_lora_model(len(smol_tokenizer), 1e-4)
    layer = next(m for m in model.modules() if isinstance(m, LoraLinear))
    x = torch.randn(3, 9, layer.in_features, generator=torch.Generator().manual_seed(2))

    def delta() -> torch.Tensor:  # the layer's output minus its base layer's
        with torch.no_grad():
            return layer(x) - layer.base_layer(x)

    exact = delta()
    with frozen_bf16_matmuls(model):
        ours = delta()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = delta().float()

    def error(d: torch.Tensor) -> float:
        return ((d - exact).norm() / exact.norm()).item()

    assert error(ours) < 1e-3
    assert error(autocast) > 0.5


def test_lora_gradients_follow_float32(smol_tokenizer):
    model = tiny_lora_model(len(smol_tokenizer), 0.1)
    model.train()
    ids = torch.randint(3, 1000, (2, 24), generator=torch.Generator().manual_seed(1))

    def grads():
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

    exact = grads()
    with frozen_bf16_matmuls(model):
        ours = grads()
    assert F.cosine_similarity(exact, ours, dim=0) > 0.999
    assert not torch.equal(exact, ours)


def test_training_turns_it_on_under_dtype_auto_on_a_bf16_cpu(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("EXNIHILO_CPU_BF16", "1")
    assert wants_frozen_bf16("auto", cpu)
    assert TrainConfig(out="x", device="cpu").loop_config().bf16_frozen_matmuls
    assert not TrainConfig(out="x", device="cpu", dtype="float32").loop_config(
    ).bf16_frozen_matmuls  # --dtype float32: every product in float32
    from exnihilo.train.dpo import DPOConfig

    # DPO stays float32: its margin compares the policy with a float32 reference.
    assert not DPOConfig(out="x", data="d.jsonl", device="cpu").loop_config(
    ).bf16_frozen_matmuls
    monkeypatch.setenv("EXNIHILO_CPU_BF16", "0")
    assert not TrainConfig(out="x", device="cpu").loop_config().bf16_frozen_matmuls


def test_the_head_keeps_float32_logits_and_uses_bf16_for_the_hidden_gradient(smol_tokenizer):
    """The frozen head is not swapped (its logits feed log-probs); it gets a bf16 copy that
    the fused log-prob head uses for the hidden state's gradient alone."""
    from exnihilo.train.forward import FUSED_CHUNK, _FusedHeadLogprobSum

    model = tiny_lora_model(len(smol_tokenizer), 0.1)
    head = model.get_output_embeddings()
    torch.manual_seed(3)
    hidden = torch.randn(2 * FUSED_CHUNK + 5, head.in_features)
    targets = torch.randint(0, head.out_features, (hidden.shape[0],))

    def value_and_grad(weight_bf16):
        h = hidden.clone().requires_grad_(True)
        total = _FusedHeadLogprobSum.apply(h, head.weight, targets, 0.0, FUSED_CHUNK,
                                           weight_bf16)
        total.backward()
        return total.detach(), h.grad

    exact_value, exact_grad = value_and_grad(None)
    with frozen_bf16_matmuls(model):
        copy = head._frozen_bf16_weight
        assert copy.dtype == torch.bfloat16 and "forward" not in vars(head)
        value, grad = value_and_grad(copy)
    assert not hasattr(head, "_frozen_bf16_weight")
    assert torch.equal(value, exact_value)  # float32 logits: the loss is unchanged
    assert not torch.equal(grad, exact_grad)  # the bf16 product did run ...
    assert F.cosine_similarity(grad.flatten(), exact_grad.flatten(), dim=0) > 0.9999
    assert ((grad - exact_grad).norm() / exact_grad.norm()) < 4 * BF16_EPS  # ... closely
