"""Model merging: hand-computed method values, mergekit config semantics, whole tiny models
merged and checked tensor by tensor against the formulas, LoRA folded in first, WARP, and
bad input leaving no output folder."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from exnihilo.errors import ExnihiloError
from exnihilo.merge import methods
from exnihilo.merge.config import lookup, parse_config

pytestmark = pytest.mark.usefixtures("one_thread")


# --- small pure functions against hand computation -------------------------------------


def test_slerp_oracle_half_way():
    out = methods.slerp(0.5, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]))
    assert out.tolist() == pytest.approx([0.707107, 1.414214], abs=1e-6)


def test_slerp_nearly_parallel_takes_the_linear_path():
    v0, v1 = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.01])
    assert methods.slerp_coefficients(0.3, v0, v1) is None
    assert methods.slerp(0.3, v0, v1).tolist() == pytest.approx([1.0, 0.003], abs=1e-7)
    # anti-parallel also counts as colinear (|dot|), and identical inputs give no NaN
    assert methods.slerp_coefficients(0.3, v0, -v0) is None
    same = methods.slerp(0.5, torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.0]))
    assert same.tolist() == [3.0, 4.0]
    # just below the threshold the spherical path is taken
    angle = math.acos(0.999)
    assert methods.slerp_coefficients(0.5, v0, torch.tensor([math.cos(angle),
                                                             math.sin(angle)])) is not None


def test_slerp_whole_tensor_keeps_magnitudes_and_ends():
    torch.manual_seed(0)
    v0, v1 = torch.randn(3, 4), 3 * torch.randn(3, 4)
    assert torch.equal(methods.slerp(0.0, v0, v1), v0)
    assert torch.allclose(methods.slerp(1.0, v0, v1), v1, atol=1e-6)
    # mergekit's formula on the flattened tensor, written out in numpy float32
    a, b = v0.numpy().ravel(), v1.numpy().ravel()
    dot = np.sum(a / np.linalg.norm(a) * (b / np.linalg.norm(b)))
    theta = np.arccos(dot)
    expected = (np.sin(0.3 * theta) * a + np.sin(0.7 * theta) * b) / np.sin(theta)
    got = methods.slerp(0.7, v0, v1)
    assert got.shape == (3, 4)
    assert np.allclose(got.numpy().ravel(), expected, atol=1e-6)


def test_linear_weighted_and_normalized():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    assert methods.linear([a, b], [1, 3]).tolist() == [2.5, 5.0]
    assert methods.linear([a, b], [1, 3], normalize=False).tolist() == [10.0, 20.0]
    with pytest.raises(ValueError, match="sum to zero"):
        methods.linear([a, b], [1, -1])


def test_task_arithmetic_by_hand():
    base = torch.tensor([1.0, 1.0])
    models = [torch.tensor([2.0, 0.0]), torch.tensor([1.0, 3.0])]
    # δ1 = [1, -1], δ2 = [0, 2]; 0.5·δ1 + 1·δ2 = [0.5, 1.5]; λ = 2 → base + [1, 3]
    out = methods.task_arithmetic(base, models, [0.5, 1.0], lam=2.0)
    assert out.tolist() == [2.0, 4.0]


def test_ties_sign_election_and_disjoint_mean():
    base = torch.zeros(3)
    d1, d2 = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([-2.0, 1.0, 1.0])
    assert methods.ties(base, [d1, d2], [1, 1], [1, 1]).tolist() == [-2.0, -2.0, 2.0]


def test_ties_trim_and_weighted_vote():
    base = torch.zeros(3)
    d1, d2 = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([-2.0, 1.0, 1.5])
    # density .67 keeps 2 of 3: [0, -2, 3] and [-2, 0, 1.5]; signs [-, -, +]
    assert methods.ties(base, [d1, d2], [1, 1], [0.67, 0.67]).tolist() == [-2.0, -2.0, 2.25]
    # weights 1 and 3: weighted [0,-2,3], [-6,0,4.5]; entry 2 = (3 + 4.5) / (1 + 3)
    assert methods.ties(base, [d1, d2], [1, 3], [0.67, 0.67]).tolist() == \
        pytest.approx([-2.0, -2.0, 1.875])
    # the weights vote on the sign (mergekit issue #474)
    one, other = torch.tensor([1.0]), torch.tensor([-0.5])
    assert methods.ties(torch.zeros(1), [one, other], [1, 1], [1, 1]).tolist() == [1.0]
    assert methods.ties(torch.zeros(1), [one, other], [1, 3], [1, 1]).tolist() == [-0.5]
    # a tie (Σ wδ = 0) elects +, as mergekit's `>= 0`
    assert methods.ties(torch.zeros(1), [one, -one], [1, 1], [1, 1]).tolist() == [1.0]


def test_magnitude_mask_keeps_exactly_the_top_k():
    delta = torch.tensor([1.0, -1.0, 1.0, 0.5, 0.0])
    # k = int(0.5·5) = 2 of three equal magnitudes: the first two win
    assert methods.magnitude_mask(delta, 0.5).tolist() == [True, True, False, False, False]
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(3))
    mask = methods.magnitude_mask(x, 0.3)
    top = set(np.argsort(-x.abs().numpy())[:3000].tolist())
    assert set(mask.nonzero().squeeze(1).tolist()) == top
    # the bisection used for large tensors finds the same k-th magnitude as topk
    for k in (1, 2999, 3000, 10_000):
        bisected = methods.kth_largest_magnitude(x, k, chunk=1000, small=0)
        assert bisected == methods.kth_largest_magnitude(x, k), k
    zeros = methods.magnitude_mask(torch.zeros(7), 0.5)  # all ties at zero: still exactly k
    assert int(zeros.sum()) == 3


def test_ties_optional_l1_rescale():
    base, delta = torch.zeros(4), torch.tensor([4.0, -1.0, 2.0, 1.0])
    # density .5 keeps 4 and 2 (L1 6 of 8); rescale multiplies them by 8/6
    assert methods.ties(base, [delta], [1], [0.5]).tolist() == [4.0, 0.0, 2.0, 0.0]
    assert methods.ties(base, [delta], [1], [0.5], rescale=True).tolist() == \
        pytest.approx([16 / 3, 0.0, 8 / 3, 0.0])


def test_dare_keep_rate_and_l1_rescale():
    delta = torch.ones(200_000)
    g = torch.Generator().manual_seed(1)
    out = methods.dare(torch.zeros_like(delta), [delta], [1.0], [0.3], [g], consensus=False)
    kept = (out != 0).float().mean().item()
    assert abs(kept - 0.3) < 0.005  # binomial sd ≈ 0.001
    assert out.abs().sum().item() == pytest.approx(delta.sum().item(), rel=1e-5)
    assert out[out != 0].mean().item() == pytest.approx(1 / kept, rel=1e-5)
    # no rescale: the kept entries keep their value
    g = torch.Generator().manual_seed(1)
    plain = methods.dare(torch.zeros_like(delta), [delta], [1.0], [0.3], [g],
                         consensus=False, rescale=False)
    assert set(plain.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(plain != 0, out != 0)  # same seed, same mask


def test_dare_seeded_and_ties_consensus():
    delta = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    run = [methods.dare(torch.zeros(1000), [delta], [1.0], [0.5],
                        [torch.Generator().manual_seed(s)], consensus=False) for s in (7, 7, 8)]
    assert torch.equal(run[0], run[1]) and not torch.equal(run[0], run[2])
    base, up, down = torch.zeros(4), torch.ones(4), -0.5 * torch.ones(4)
    gens = [None, None]
    linear = methods.dare(base, [up, down], [1, 1], [1, 1], gens, consensus=False)
    ties = methods.dare(base, [up, down], [1, 1], [1, 1], gens, consensus=True)
    assert linear.tolist() == [0.5] * 4  # plain sum of deltas
    assert ties.tolist() == [1.0] * 4  # the minority sign is dropped


def test_gradient_interpolation():
    values = [0, 0.5, 0.3, 0.7, 1]
    assert methods.evaluate_gradient(values, 0.0) == 0
    assert methods.evaluate_gradient(values, 0.25) == pytest.approx(0.5)
    assert methods.evaluate_gradient(values, 0.375) == pytest.approx(0.4)
    assert methods.evaluate_gradient(values, 1.0) == pytest.approx(1.0)
    assert methods.evaluate_gradient([0.4], 0.7) == pytest.approx(0.4)


def test_config_parameters_with_filters():
    config = parse_config({
        "merge_method": "slerp", "base_model": "A",
        "slices": [{"sources": [{"model": "A", "layer_range": [0, 32]},
                                {"model": "B", "layer_range": [0, 32]}]}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                             {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                             {"value": 0.5}]},
        "dtype": "bfloat16", "tokenizer_source": "base"})
    levels = [config.parameters]
    assert lookup("t", "model.layers.3.self_attn.q_proj.weight", 0.375, levels) == \
        pytest.approx(0.4)
    assert lookup("t", "model.layers.3.mlp.up_proj.weight", 0.375, levels) == \
        pytest.approx(0.6)
    assert lookup("t", "model.norm.weight", 0.375, levels) == 0.5
    assert config.dtype == "bfloat16" and config.referenced_models() == ["A", "B"]


@pytest.mark.parametrize("data, fragment", [
    ({"merge_method": "frankenstein", "models": [{"model": "A"}]}, "unknown merge_method"),
    ({"merge_method": "ties", "models": [{"model": "A"}]}, "needs a base_model"),
    ({"merge_method": "linear", "models": [{"model": "A", "parameters": {"wieght": 1}}]},
     "models.0.parameters.wieght"),
    ({"merge_method": "linear", "modelz": []}, "modelz: unknown key"),
    ({"merge_method": "linear", "models": [{"model": "A"}], "tokenizer_source": "union"},
     "union is not supported"),
    ({"merge_method": "linear", "models": [{"model": "A", "parameters": {"weight": []}}]},
     "empty gradient"),
])
def test_config_errors(data, fragment):
    with pytest.raises(ExnihiloError, match=fragment):
        parse_config(data, "m.yaml")


# --- whole tiny models ------------------------------------------------------------------


def _save(model, folder, tokenizer=None):
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def _perturbed(model, seed, scale=0.05):
    import copy

    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return other


@pytest.fixture
def folders(tmp_path, tiny_llama, smol_tokenizer):
    """base (with the tokenizer), a and b: the tiny Llama and two perturbed copies."""
    base = _save(tiny_llama, tmp_path / "base", smol_tokenizer)
    a = _save(_perturbed(tiny_llama, 1), tmp_path / "a")
    b = _save(_perturbed(tiny_llama, 2), tmp_path / "b")
    return {"base": base, "a": a, "b": b, "root": tmp_path}


def _state(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _write_yaml(path, text):
    path.write_text(text)
    return path


def _np_slerp(t, v0, v1):
    """mergekit's slerp, written out in numpy float32 as the oracle."""
    a, b = v0.numpy().astype(np.float32).ravel(), v1.numpy().astype(np.float32).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    dot = np.sum((a / na if na > 1e-8 else a) * (b / nb if nb > 1e-8 else b))
    if abs(dot) > 0.9995:
        res = (1 - t) * a + t * b
    else:
        theta = np.arccos(dot)
        res = (np.sin((1 - t) * theta) * a + np.sin(t * theta) * b) / np.sin(theta)
    return torch.from_numpy(res.reshape(v0.shape))


def test_slerp_merge_with_gradient_matches_formula_and_generates(folders, smol_tokenizer):
    from transformers import AutoModelForCausalLM

    from exnihilo.merge import merge

    root = folders["root"]
    config = _write_yaml(root / "slerp.yaml", """
merge_method: slerp
base_model: base
slices:
  - sources:
      - {model: base, layer_range: [0, 2]}
      - {model: a, layer_range: [0, 2]}
parameters:
  t:
    - filter: self_attn
      value: [0, 1]
    - value: [0.2, 0.8]
tokenizer_source: base
""")
    summary = merge(config, root / "merged")
    base, a, out = _state(folders["base"]), _state(folders["a"]), _state(root / "merged")
    assert set(out) == set(base) and summary.tensors == len(base)

    def expected_t(name):
        if ".layers." not in name:
            return 0.2  # embeddings and the final norm are evaluated at t = 0
        layer = int(name.split(".layers.")[1].split(".")[0])
        return float(layer) if "self_attn" in name else [0.2, 0.8][layer]

    for name, tensor in out.items():
        t = expected_t(name)
        assert torch.allclose(tensor, _np_slerp(t, base[name], a[name]), atol=1e-6), name
    # layer 0 attention is the base exactly (t = 0), layer 1 attention is `a` exactly (t = 1)
    q = "model.layers.{}.self_attn.q_proj.weight"
    assert torch.equal(out[q.format(0)], base[q.format(0)])
    assert torch.equal(out[q.format(1)], a[q.format(1)])

    model = AutoModelForCausalLM.from_pretrained(root / "merged")
    ids = smol_tokenizer("Hello", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 4
    assert (root / "merged" / "tokenizer.json").exists()
    assert "slerp" in (root / "merged" / "merge_config.yaml").read_text()
    assert not [p for p in root.iterdir() if p.name.startswith(".merged")]


def _ties_numpy(base, deltas, weights, density):
    """TIES written out naively: sort magnitudes, vote with weighted sums, masked mean."""
    trimmed = []
    for d in deltas:
        flat = d.numpy().ravel().copy()
        k = int(density * flat.size)
        keep = np.argsort(-np.abs(flat), kind="stable")[:k]
        mask = np.zeros(flat.size, bool)
        mask[keep] = True
        trimmed.append(np.where(mask, flat, 0.0))
    w = np.array(weights, np.float32)[:, None]
    weighted = np.stack(trimmed) * w
    sign = np.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(weighted) == sign
    divisor = (w * agree).sum(0)
    divisor[divisor == 0] = 1
    merged = (weighted * agree).sum(0) / divisor
    return base + torch.from_numpy(merged.reshape(base.shape).astype(np.float32))


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties"])
def test_models_merge_matches_formula_on_every_tensor(folders, method):
    from exnihilo.merge import merge

    root = folders["root"]
    config = _write_yaml(root / "m.yaml", f"""
merge_method: {method}
base_model: base
models:
  - model: a
    parameters: {{weight: 0.6, density: 0.5}}
  - model: b
    parameters: {{weight: 0.4, density: 0.5}}
parameters: {{lambda: 1.5}}
""")
    merge(config, root / "out")
    base, a, b = (_state(folders[k]) for k in ("base", "a", "b"))
    out = _state(root / "out")
    for name, tensor in out.items():
        if method == "linear":  # normalize defaults to true; the base is not a source
            expected = (0.6 * a[name] + 0.4 * b[name]) / 1.0
        elif method == "task_arithmetic":  # normalize false, lambda 1.5
            expected = base[name] + 1.5 * (0.6 * (a[name] - base[name])
                                            + 0.4 * (b[name] - base[name]))
        else:
            merged = _ties_numpy(base[name], [a[name] - base[name], b[name] - base[name]],
                                 [0.6, 0.4], 0.5)
            expected = base[name] + 1.5 * (merged - base[name])
        assert torch.allclose(tensor, expected, atol=1e-6), name


def test_dare_merge_is_seeded(folders):
    from exnihilo.merge import merge

    root = folders["root"]
    config = _write_yaml(root / "d.yaml", """
merge_method: dare_ties
base_model: base
models:
  - {model: a, parameters: {weight: 1.0, density: 0.4}}
  - {model: b, parameters: {weight: 1.0, density: 0.4}}
dtype: bfloat16
""")
    merge(config, root / "s0", seed=0)
    merge(config, root / "s0bis", seed=0)
    merge(config, root / "s1", seed=1)
    s0, s0bis, s1 = (_state(root / k) for k in ("s0", "s0bis", "s1"))
    name = "model.layers.0.mlp.up_proj.weight"
    assert s0[name].dtype == torch.bfloat16
    assert json.loads((root / "s0" / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(torch.equal(s0[k], s0bis[k]) for k in s0)
    assert not torch.equal(s0[name], s1[name])
    base = _state(folders["base"])[name]
    changed = (s0[name].float() != base.bfloat16().float()).float().mean().item()
    # an entry changes unless both deltas were dropped: 1 - 0.6² = 0.64 of entries
    assert abs(changed - 0.64) < 0.02


def test_sharded_input_and_output(folders, tiny_llama, smol_tokenizer):
    from transformers import AutoModelForCausalLM

    from exnihilo.merge.shards import ShardWriter, read_header_index

    root = folders["root"]
    tiny_llama.save_pretrained(root / "sharded", safe_serialization=True, max_shard_size="2MB")
    index = read_header_index(root / "sharded")
    assert len({info.file for info in index.values()}) > 1
    writer_dir = root / "written"
    writer_dir.mkdir()
    state = tiny_llama.state_dict()
    names = [n for n in index]
    with ShardWriter(writer_dir, [(n, index[n].shape, index[n].dtype) for n in names],
                     max_shard_bytes=3 * 1024**2) as writer:
        for n in names:
            writer.write(n, state[n])
    assert (writer_dir / "model.safetensors.index.json").exists()
    (writer_dir / "config.json").write_text((root / "sharded" / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(writer_dir)
    for n, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, state[n]), n


def test_lora_adapter_is_merged_into_its_base_first(folders, tiny_llama):
    from peft import LoraConfig, get_peft_model

    from exnihilo.merge import merge

    root = folders["root"]
    peft_model = get_peft_model(_perturbed(tiny_llama, 0, 0.0), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.peft_config["default"].base_model_name_or_path = str(folders["base"])
    peft_model.save_pretrained(root / "adapter")
    ids = torch.tensor([[1, 5, 9, 200, 4000]])
    with torch.no_grad():
        adapter_logits = peft_model(ids).logits
    folded = peft_model.merge_and_unload().state_dict()

    config = _write_yaml(root / "l.yaml", """
merge_method: linear
models:
  - {model: adapter, parameters: {weight: 1.0}}
""")
    merge(config, root / "out")
    out = _state(root / "out")
    for name, tensor in out.items():
        assert torch.allclose(tensor, folded[name], atol=1e-6), name
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(out[q], _state(folders["base"])[q])  # the update is there

    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(root / "out")
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapter_logits, atol=1e-5)

    # mergekit's `base+adapter` spelling, in a task-arithmetic merge with another model
    config = _write_yaml(root / "t.yaml", f"""
merge_method: task_arithmetic
base_model: base
models:
  - {{model: "{folders['base']}+{root / 'adapter'}", parameters: {{weight: 1.0}}}}
  - {{model: a, parameters: {{weight: 0.5}}}}
""")
    merge(config, root / "out2")
    out2, base, a = _state(root / "out2"), _state(folders["base"]), _state(folders["a"])
    expected = folded[q] + 0.5 * (a[q] - base[q])
    assert torch.allclose(out2[q], expected, atol=1e-6)


def _leftovers(root, name):
    return [p.name for p in root.iterdir() if p.name == name or p.name.startswith(f".{name}.")]


@pytest.mark.parametrize("yaml_text, fragment", [
    ("merge_method: linear\nmodels:\n  - {model: nowhere, parameters: {weight: 1}}\n",
     "unknown model 'nowhere'"),
    ("merge_method: slerp\nbase_model: base\nslices:\n  - sources: [{model: base, layer_range: "
     "[0, 2]}, {model: a, layer_range: [0, 2]}]\nparameters: {t: [0, 0.5, 1]}\n",
     "a gradient of 3 values does not fit 2 layers"),
    ("merge_method: linear\nmodels:\n  - {model: a, parameters: {weight: 1}}\n"
     "  - {model: b, parameters: {weight: -1}}\n", "weights sum to zero"),
    ("merge_method: ties\nbase_model: base\nmodels:\n  - {model: a}\n",
     "missing parameter 'weight'"),
    ("merge_method: slerp\nbase_model: base\nmodels:\n  - {model: a}\n  - {model: b}\n"
     "parameters: {t: 0.5}\n", "slerp needs exactly two models"),
    ("merge_method: slerp\nbase_model: base\nslices:\n  - sources: [{model: base, layer_range: "
     "[0, 3]}, {model: a, layer_range: [0, 3]}]\nparameters: {t: 0.5}\n", "exceeds its 2 layers"),
])
def test_bad_config_leaves_no_output(folders, yaml_text, fragment):
    from exnihilo.merge import merge

    root = folders["root"]
    config = _write_yaml(root / "bad.yaml", yaml_text)
    with pytest.raises(ExnihiloError, match=fragment):
        merge(config, root / "out")
    assert _leftovers(root, "out") == []


def test_different_vocabulary_or_architecture_names_the_tensor(folders, tiny_gemma2):
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config
    from exnihilo.merge import merge

    root = folders["root"]
    torch.manual_seed(0)
    _save(LlamaForCausalLM(tiny_llama_config(1000)), root / "small_vocab")
    _save(tiny_gemma2, root / "gemma")
    _save(LlamaForCausalLM(tiny_llama_config(49152, tie_word_embeddings=False)),
          root / "untied")
    _save(LlamaForCausalLM(tiny_llama_config(49152, num_hidden_layers=3)), root / "deeper")
    for other, fragment in (("small_vocab", "tensor model.embed_tokens.weight has shape"),
                            ("gemma", "differ in architecture"),
                            ("untied", "tensor lm_head.weight is in untied but not in base"),
                            ("deeper", "different numbers of layers")):
        config = _write_yaml(root / "x.yaml", "merge_method: task_arithmetic\nbase_model: base"
                             f"\nmodels:\n  - {{model: {other}, parameters: {{weight: 1}}}}\n")
        with pytest.raises(ExnihiloError, match=fragment):
            merge(config, root / "out")
        assert _leftovers(root, "out") == []


def test_failure_mid_merge_leaves_no_output(folders, monkeypatch):
    from exnihilo.merge import merge, run

    calls = {"n": 0}
    original = run.merge_tensor

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        return original(*args, **kwargs)

    monkeypatch.setattr(run, "merge_tensor", failing)
    root = folders["root"]
    config = _write_yaml(root / "m.yaml", "merge_method: linear\nmodels:\n"
                         "  - {model: a, parameters: {weight: 1}}\n"
                         "  - {model: b, parameters: {weight: 1}}\n")
    with pytest.raises(OSError, match="disk full"):
        merge(config, root / "out")
    assert _leftovers(root, "out") == []
    (root / "out").mkdir()  # an existing output folder is refused, not overwritten
    monkeypatch.setattr(run, "merge_tensor", original)
    with pytest.raises(ExnihiloError, match="already exists"):
        merge(config, root / "out")


# --- WARP -------------------------------------------------------------------------------


def test_warp_slerp_of_task_vectors_oracles():
    d1, d2 = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 3.0])
    # orthogonal, equal norms, λ = ½: (δ1 + δ2)/√2, norm kept (lerp would shrink it by √2)
    out = methods.slerp_task_vectors([d1, d2])
    assert out.tolist() == pytest.approx([3 / math.sqrt(2), 3 / math.sqrt(2)], abs=1e-6)
    assert methods.slerp_task_vectors([d1, d1]).tolist() == [3.0, 0.0]  # no NaN
    # M = 3: slerp(½, δ1, δ2), then slerp at ⅓ with δ3
    d3 = torch.tensor([-1.0, 2.0])
    expected = _np_slerp(1 / 3, _np_slerp(0.5, d1, d2), d3)
    assert torch.allclose(methods.slerp_task_vectors([d1, d2, d3]), expected, atol=1e-6)
    init, merged = torch.tensor([1.0, -2.0]), torch.tensor([5.0, 2.0])
    assert torch.equal(methods.liti(init, merged, 0.0), init)
    assert methods.liti(init, merged, 0.25).tolist() == [2.0, -1.0]


def test_warp_and_sweep_on_tiny_models(folders):
    from transformers import AutoModelForCausalLM

    from exnihilo.merge import warp, warp_sweep

    root = folders["root"]
    init, a, b = (str(folders[k]) for k in ("base", "a", "b"))
    summary = warp(init, [a, b], 0.3, root / "warp")
    assert summary.tensors == len(_state(folders["base"]))
    s_init, s_a, s_b = (_state(folders[k]) for k in ("base", "a", "b"))
    out = _state(root / "warp")
    for name, tensor in out.items():
        slerped = s_init[name] + _np_slerp(0.5, s_a[name] - s_init[name],
                                           s_b[name] - s_init[name])
        expected = 0.7 * s_init[name] + 0.3 * slerped
        assert torch.allclose(tensor, expected, atol=1e-6), name
    meta = json.loads((root / "warp" / "warp.json").read_text())
    assert meta["eta"] == 0.3 and meta["policies"] == [a, b]
    AutoModelForCausalLM.from_pretrained(root / "warp")

    results = warp_sweep(init, [a, b], [0.0, 0.3, 1.0], root / "sweep")
    assert [r.out.name for r in results] == ["eta-0.00", "eta-0.30", "eta-1.00"]
    zero, mid = _state(root / "sweep" / "eta-0.00"), _state(root / "sweep" / "eta-0.30")
    assert all(torch.equal(zero[k], s_init[k]) for k in s_init)  # η = 0 is the init exactly
    assert all(torch.equal(mid[k], out[k]) for k in out)  # same pass, same numbers
    # the result of one iteration seeds the next
    warp(str(root / "warp"), [a, b], 0.3, root / "warp2")
    assert (root / "warp2" / "model.safetensors").exists()


def test_warp_errors_leave_no_output(folders, tiny_gemma2):
    from exnihilo.merge import warp

    root = folders["root"]
    _save(tiny_gemma2, root / "gemma")
    with pytest.raises(ExnihiloError, match="eta 1.5"):
        warp(str(folders["base"]), [str(folders["a"])], 1.5, root / "w")
    with pytest.raises(ExnihiloError, match="differ in architecture"):
        warp(str(folders["base"]), [str(folders["a"]), str(root / "gemma")], 0.3, root / "w")
    with pytest.raises(ExnihiloError, match="unknown model 'missing-policy'"):
        warp(str(folders["base"]), ["missing-policy"], 0.3, root / "w")
    assert _leftovers(root, "w") == []


# --- command line -----------------------------------------------------------------------


def test_cli_merge_and_warp(folders):
    import typer
    from typer.testing import CliRunner

    from exnihilo.cli.merge import merge_command, warp_command

    app = typer.Typer()
    app.command("merge")(merge_command)
    app.command("warp")(warp_command)
    root = folders["root"]
    config = _write_yaml(root / "m.yaml", "merge_method: linear\nmodels:\n"
                         "  - {model: a, parameters: {weight: 1}}\n"
                         "  - {model: b, parameters: {weight: 1}}\n")
    runner = CliRunner()
    result = runner.invoke(app, ["merge", str(config), "-o", str(root / "cli")])
    assert result.exit_code == 0, result.output
    assert "linear" in result.output and (root / "cli" / "model.safetensors").exists()
    result = runner.invoke(app, ["warp", "--init", str(folders["base"]), "--policies",
                                 str(folders["a"]), str(folders["b"]), "--eta-sweep", "0,0.5",
                                 "-o", str(root / "wsweep")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (root / "wsweep").iterdir()) == ["eta-0.00", "eta-0.50"]
    meta = json.loads((root / "wsweep" / "eta-0.50" / "warp.json").read_text())
    assert len(meta["policies"]) == 2


def test_warp_sweep_table_reward_against_kl(folders, tmp_path):
    """The η sweep, measured on held-out pairs: η = 0 is the init (no reward, no KL); KL to
    the init grows along the interpolation; the HTML page escapes what it shows."""
    from exnihilo.merge import warp_sweep
    from exnihilo.merge.sweep import sweep_report, sweep_table

    root = folders["root"]
    init, a, b = (str(folders[k]) for k in ("base", "a", "b"))
    etas = [0.0, 0.5, 1.0]
    results = warp_sweep(init, [a, b], etas, root / "sweep-eval")
    pairs = tmp_path / "pairs.jsonl"
    with open(pairs, "w") as f:
        for i in range(4):
            f.write(json.dumps({"prompt": f"Question {i}: <b>colour</b>?",
                                "chosen": f"Blue number {i}.",
                                "rejected": f"I refuse {i}."}) + "\n")
    rows = sweep_table(init, [(e, str(r.out)) for e, r in zip(etas, results, strict=True)],
                       str(pairs))
    assert [r["eta"] for r in rows] == etas and rows[0]["pairs"] == 4
    assert rows[0]["reward_margin"] == 0.0 and rows[0]["kl_to_init"] == pytest.approx(0, abs=1e-7)
    assert 0 < rows[1]["kl_to_init"] < rows[2]["kl_to_init"]
    page = sweep_report(rows, tmp_path / "sweep.html").read_text()
    assert "<svg" in page and "η=0.5" in page and "<b>" not in page
