"""Minitron-style pruning: exact reproduction when nothing is removed, the importance
oracles (identity layer → BI 0, dead neuron / dead head group first), a saved model that
transformers loads, and bad targets or calibration refused before anything is written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from exnihilo.errors import ExnihiloError
from exnihilo.prune import (
    PruneTargets,
    apply_plan,
    calibration_batches,
    collect_stats,
    loss_importance,
    make_plan,
    run_prune,
)
from exnihilo.train.tokens import stream_from_documents

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["The river runs to the sea and the sea is wide and deep.",
         "Stones are heavy; light is fast and green is a colour of leaves.",
         "A small model learns from a larger one, one token at a time.",
         "Every document here ends with an end of sequence token."]


def batches(tokenizer, rows=4, seq_len=16):
    docs = [tokenizer(t)["input_ids"] for t in TEXTS * 3]
    return calibration_batches(stream_from_documents(docs, tokenizer.eos_token_id, seq_len),
                               rows, batch_size=2)


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                     use_cache=False).logits


def randomize_norms(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_gemma2"])
def test_keeping_everything_reproduces_logits_exactly(which, request, smol_tokenizer):
    model = request.getfixturevalue(which)
    randomize_norms(model)
    cal = batches(smol_tokenizer)
    small = apply_plan(model, make_plan(model, cal, PruneTargets()))
    assert torch.equal(logits(model, cal[0]), logits(small, cal[0]))


def test_identity_layer_has_block_and_loss_importance_zero(tiny_llama, smol_tokenizer):
    with torch.no_grad():  # layer 1 adds nothing to the residual stream: the identity
        tiny_llama.model.layers[1].self_attn.o_proj.weight.zero_()
        tiny_llama.model.layers[1].mlp.down_proj.weight.zero_()
    cal = batches(smol_tokenizer)
    bi = collect_stats(tiny_llama, cal).block_importance()
    assert bi[1] == pytest.approx(0.0, abs=1e-12)
    assert bi[0] > 1e-4
    drop = loss_importance(tiny_llama, cal)
    assert drop[1] == pytest.approx(0.0, abs=1e-9) and abs(drop[0]) > 1e-4
    # Depth 1 removes exactly that layer, and the logits do not change.
    plan = make_plan(tiny_llama, cal, PruneTargets(depth=1))
    assert plan.layers == [0]
    small = apply_plan(tiny_llama, plan)
    assert small.config.num_hidden_layers == 1
    torch.testing.assert_close(logits(small, cal[0]), logits(tiny_llama, cal[0]))


def test_dead_neuron_is_pruned_first(tiny_llama, smol_tokenizer):
    with torch.no_grad():
        for layer in tiny_llama.model.layers:
            layer.mlp.gate_proj.weight[5].zero_()
            layer.mlp.up_proj.weight[5].zero_()
    cal = batches(smol_tokenizer)
    scores = collect_stats(tiny_llama, cal).neuron_importance()
    assert float(scores[0][5]) == 0.0 and float(scores[0].min()) == 0.0
    assert int((scores[0] == 0).sum()) == 1
    plan = make_plan(tiny_llama, cal, PruneTargets(mlp=127))
    assert all(5 not in kept and len(kept) == 127 for kept in plan.neurons)
    small = apply_plan(tiny_llama, plan)
    torch.testing.assert_close(logits(small, cal[0]), logits(tiny_llama, cal[0]))


def test_dead_head_group_goes_whole(tiny_llama, smol_tokenizer):
    """4 query heads in 2 KV groups: silence group 1 (its V rows) and keep 2 heads."""
    hd = tiny_llama.config.head_dim
    with torch.no_grad():
        for layer in tiny_llama.model.layers:
            layer.self_attn.v_proj.weight[hd:2 * hd].zero_()
    cal = batches(smol_tokenizer)
    plan = make_plan(tiny_llama, cal, PruneTargets(heads=2))
    assert plan.groups == [[0], [0]]
    small = apply_plan(tiny_llama, plan)
    assert small.config.num_attention_heads == 2 and small.config.num_key_value_heads == 1
    torch.testing.assert_close(logits(small, cal[0]), logits(tiny_llama, cal[0]))


def write_corpus(tmp_path):
    path = tmp_path / "cal.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS * 4))
    return path


def test_run_prune_writes_a_model_transformers_loads(tmp_path, tiny_gemma2, smol_tokenizer,
                                                     monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    targets = PruneTargets(depth=1, mlp=0.5, heads=2, hidden=32)
    result = run_prune("tiny", str(write_corpus(tmp_path)), str(tmp_path / "pruned"), targets,
                       rows=4, seq_len=16, model_obj=tiny_gemma2, tokenizer=smol_tokenizer)
    assert result.shape_after == {"layers": 1, "hidden": 32, "intermediate": 64, "heads": 2,
                                  "kv_heads": 1, "head_dim": 16}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert sum(p.numel() for p in loaded.parameters()) == result.params_after
    assert result.params_after < result.params_before
    assert loaded.config.layer_types == [tiny_gemma2.config.layer_types[result.layers[0]]]
    ids = torch.tensor([smol_tokenizer("Stones are heavy")["input_ids"]])
    assert torch.isfinite(loaded(ids).logits).all()
    info = json.loads((tmp_path / "pruned" / "exnihilo_run.json").read_text())
    assert info["kind"] == "prune" and np.isfinite(info["calibration_loss_after"])


def test_bad_targets_and_calibration(tmp_path, tiny_llama, smol_tokenizer, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cal = str(write_corpus(tmp_path))
    out = str(tmp_path / "out")

    def prune(targets, **kw):
        return run_prune("tiny", kw.pop("cal", cal), out, targets, rows=kw.pop("rows", 4),
                         seq_len=16, model_obj=tiny_llama, tokenizer=smol_tokenizer)
    with pytest.raises(ExnihiloError, match="--depth 5: the model has 2 layers"):
        prune(PruneTargets(depth=5))
    with pytest.raises(ExnihiloError, match="--mlp 500: larger than the model"):
        prune(PruneTargets(mlp=500))
    with pytest.raises(ExnihiloError, match="multiple of 2"):
        prune(PruneTargets(heads=3))
    with pytest.raises(ExnihiloError, match="--heads 8: the model has 4 heads"):
        prune(PruneTargets(heads=8))
    with pytest.raises(ExnihiloError, match="fewer than the 500 needed"):
        prune(PruneTargets(depth=1), rows=500)
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text(json.dumps({"text": "one short line"}) + "\n")
    with pytest.raises(ExnihiloError, match="needed to estimate importance"):
        prune(PruneTargets(depth=1), cal=str(tiny))
    assert not (tmp_path / "out").exists()
