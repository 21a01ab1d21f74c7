"""Pretraining: Gemma 2 presets against a naive reference forward, packing without
cross-document attention, the token stream, FLOPs, and a short run with exact resume."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from exnihilo.errors import ExnihiloError
from exnihilo.train.pretrain import (
    PRESETS,
    PretrainConfig,
    build_model,
    flops_per_position,
    gemma2_config,
    matmul_params,
    mean_context,
    run_pretrain,
    steps_for_budget,
)
from exnihilo.train.tokens import (
    collate_rows,
    iter_documents,
    open_stream,
    parse_token_count,
    prepare_corpus,
    row_positions,
    stream_from_documents,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def micro(tokenizer, **overrides):
    return build_model(gemma2_config("gemma2-micro", tokenizer, **overrides), seed=0).eval()


# ------------------------------------------------------------- naive Gemma 2 reference

def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1 + w)


def _rope(x, pos, theta):
    hd = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float) / hd))
    ang = pos[:, None].float() * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
    return x * cos[:, None] + torch.cat([-x2, x1], -1) * sin[:, None]


def naive_gemma2_logits(model, ids: list[int]) -> torch.Tensor:
    """Gemma 2 written out from the paper/anchors: alternating local (layer 0) / global
    attention, sliding mask kv > q − W, score soft-cap, sandwich RMSNorm (1 + w), GQA,
    √d-scaled embeddings, final soft-cap."""
    cfg = model.config
    m = model.model
    t = len(ids)
    pos = torch.arange(t)
    h = m.embed_tokens.weight[torch.tensor(ids)] * math.sqrt(cfg.hidden_size)
    theta = cfg.rope_parameters["rope_theta"]
    hd, nh, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    for i, layer in enumerate(m.layers):
        window = cfg.sliding_window if i % 2 == 0 else None
        x = _rms(h, layer.input_layernorm.weight, cfg.rms_norm_eps)
        a = layer.self_attn
        q = _rope((x @ a.q_proj.weight.T).view(t, nh, hd), pos, theta)
        k = _rope((x @ a.k_proj.weight.T).view(t, nkv, hd), pos, theta)
        v = (x @ a.v_proj.weight.T).view(t, nkv, hd)
        k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
        s = torch.einsum("qhd,khd->hqk", q, k) * cfg.query_pre_attn_scalar ** -0.5
        cap = cfg.attn_logit_softcapping
        s = cap * torch.tanh(s / cap)
        qi, ki = pos[:, None], pos[None, :]
        allowed = ki <= qi
        if window is not None:
            allowed &= ki > qi - window
        s = s.masked_fill(~allowed, float("-inf")).softmax(-1)
        o = torch.einsum("hqk,khd->qhd", s, v).reshape(t, nh * hd) @ a.o_proj.weight.T
        h = h + _rms(o, layer.post_attention_layernorm.weight, cfg.rms_norm_eps)
        x = _rms(h, layer.pre_feedforward_layernorm.weight, cfg.rms_norm_eps)
        mlp = layer.mlp
        gate = torch.nn.functional.gelu(x @ mlp.gate_proj.weight.T, approximate="tanh")
        y = (gate * (x @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
        h = h + _rms(y, layer.post_feedforward_layernorm.weight, cfg.rms_norm_eps)
    h = _rms(h, m.norm.weight, cfg.rms_norm_eps)
    logits = h @ model.lm_head.weight.T
    cap = cfg.final_logit_softcapping
    return cap * torch.tanh(logits / cap)


def randomize_norms(model):
    """Norm weights start at 0 (scale 1): give them values so the test sees them."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_preset_matches_naive_gemma2_and_the_window_matters(smol_tokenizer):
    model = micro(smol_tokenizer, sliding_window=4, attn_softcap=0.5)
    randomize_norms(model)
    ids = smol_tokenizer("The quick brown fox jumps over the lazy dog and runs far away "
                         "into the woods")["input_ids"][:16]
    assert len(ids) == 16
    with torch.no_grad():
        ours = model(torch.tensor([ids]), use_cache=False).logits[0]
        wide = micro(smol_tokenizer, sliding_window=64, attn_softcap=0.5)
        randomize_norms(wide)
        wide_logits = wide(torch.tensor([ids]), use_cache=False).logits[0]
    torch.testing.assert_close(ours, naive_gemma2_logits(model, ids), atol=1e-5, rtol=1e-5)
    # Same weights, window ≥ the sequence: identical up to the window, different after.
    torch.testing.assert_close(ours[:4], wide_logits[:4], atol=1e-6, rtol=1e-6)
    assert (ours[4:] - wide_logits[4:]).abs().amax(-1).min() > 1e-4


def test_final_softcap_bounds_logits(smol_tokenizer):
    model = micro(smol_tokenizer, final_softcap=2.0)
    uncapped = micro(smol_tokenizer, final_softcap=0)
    assert uncapped.config.final_logit_softcapping is None
    with torch.no_grad():
        for m in (model, uncapped):
            m.model.embed_tokens.weight.mul_(50)  # tied head: logits far beyond the cap
        ids = torch.tensor([[5, 17, 400, 9000]])
        capped = model(ids, use_cache=False).logits
        free = uncapped(ids, use_cache=False).logits
    assert free.abs().max() > 10
    assert capped.abs().max() <= 2.0
    torch.testing.assert_close(capped, 2.0 * torch.tanh(free / 2.0), atol=1e-5, rtol=1e-5)


def test_parameter_count_and_tied_embeddings(smol_tokenizer):
    cfg = gemma2_config("gemma2-micro", smol_tokenizer)
    model = build_model(cfg)
    total = sum(p.numel() for p in model.parameters())  # tied: the head is the embedding
    d, n_layers = cfg.hidden_size, cfg.num_hidden_layers
    expected = matmul_params(cfg) + n_layers * 4 * d + d  # + four norms per layer + final
    assert total == expected
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    untied = build_model(gemma2_config("gemma2-micro", smol_tokenizer, tie_embeddings=False))
    assert sum(p.numel() for p in untied.parameters()) == expected + d * len(smol_tokenizer)
    assert cfg.layer_types == ["sliding_attention", "full_attention"]
    assert cfg.num_key_value_heads == 1 and cfg.num_attention_heads == 2  # GQA


def test_preset_sizes_span_a_few_million_to_sixty(smol_tokenizer):
    sizes = {}
    for name in PRESETS:
        cfg = gemma2_config(name, smol_tokenizer)
        sizes[name] = matmul_params(cfg)
    assert sizes["gemma2-micro"] < 2_000_000
    assert 5_000_000 < sizes["gemma2-tiny"] < 10_000_000
    assert 50_000_000 < sizes["gemma2-base"] <= 60_000_000


def test_unknown_preset_lists_presets(smol_tokenizer):
    with pytest.raises(ExnihiloError, match="gemma2-tiny, gemma2-small"):
        gemma2_config("gemma7-huge", smol_tokenizer)
    with pytest.raises(ExnihiloError, match="multiple of --kv-heads"):
        gemma2_config("gemma2-tiny", smol_tokenizer, kv_heads=3)


# ------------------------------------------------------------------------------ packing

def test_row_positions_restart_at_documents_and_row_start():
    starts = np.array([0, 3, 7, 12])
    assert row_positions(starts, 0, 8).tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    # A row starting inside a document restarts at 0 there.
    assert row_positions(starts, 5, 6).tolist() == [0, 1, 0, 1, 2, 3]


def test_packed_row_equals_documents_alone(smol_tokenizer):
    model = micro(smol_tokenizer, sliding_window=4)
    eos = smol_tokenizer.eos_token_id
    docs = [smol_tokenizer(t)["input_ids"] for t in
            ["Cats sleep most of the day in warm places.", "Rivers carry water to the sea."]]
    stream = stream_from_documents(docs, eos, seq_len=len(docs[0]) + len(docs[1]) + 2)
    assert stream.n_rows == 1
    batch = collate_rows(stream, [0])
    # Every target is trained; the target after doc 1's last token is EOS.
    assert batch["labels"][0, len(docs[0])].item() == eos
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       use_cache=False).logits[0]
        for k, doc in enumerate(docs):
            alone = model(torch.tensor([[eos, *doc]]), use_cache=False).logits[0]
            lo = 0 if k == 0 else len(docs[0]) + 1
            torch.testing.assert_close(packed[lo:lo + len(doc) + 1], alone,
                                       atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- corpora

def write_corpus(tmp_path, n=40):
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "green"]
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        text = " ".join(rng.choice(words, size=20 + i % 7))
        lines.append(json.dumps({"text": f"Document {i}. {text}."}))
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_corpus_stream_holds_eos_separated_documents(tmp_path, smol_tokenizer):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("First file text.")
    (folder / "b.jsonl").write_text(json.dumps({"text": "Line one."}) + "\n"
                                    + json.dumps({"text": "   "}) + "\n"
                                    + json.dumps({"text": "Has <|im_end|> inside."}) + "\n")
    assert list(iter_documents(folder)) == ["First file text.", "Line one.",
                                            "Has <|im_end|> inside."]
    corpus = prepare_corpus(folder, smol_tokenizer, val_fraction=0.0, seed=0,
                            cache=tmp_path / "cache")
    stream = open_stream(corpus, "train", 4)
    eos = smol_tokenizer.eos_token_id
    expected = [eos]
    for text in ["First file text.", "Line one.", "Has <|im_end|> inside."]:
        expected += smol_tokenizer(text, add_special_tokens=False,
                                   split_special_tokens=True)["input_ids"] + [eos]
    assert stream.tokens.tolist() == expected
    # The special-token string inside raw text is text: only the separators are EOS.
    assert stream.tokens.tolist().count(eos) == 4
    assert stream.starts.tolist()[0] == 0 and stream.n_documents == 3
    # Cached: a second call returns the same folder without tokenizing again.
    assert prepare_corpus(folder, smol_tokenizer, 0.0, 0, cache=tmp_path / "cache") == corpus


def test_heldout_documents_are_whole_and_seeded(tmp_path, smol_tokenizer):
    path = write_corpus(tmp_path)
    corpus = prepare_corpus(path, smol_tokenizer, 0.25, seed=3, cache=tmp_path / "c")
    meta = json.loads((corpus / "meta.json").read_text())
    assert meta["train_documents"] + meta["val_documents"] == 40
    assert 3 <= meta["val_documents"] <= 18
    val = open_stream(corpus, "val", 8)
    assert val.n_documents == meta["val_documents"]


def test_bad_corpora(tmp_path, smol_tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": " \n "}) + "\n\n")
    with pytest.raises(ExnihiloError, match="no usable text"):
        prepare_corpus(empty, smol_tokenizer, cache=tmp_path / "c")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(ExnihiloError, match=r"bad.jsonl:2: expected an object"):
        prepare_corpus(bad, smol_tokenizer, cache=tmp_path / "c")
    with pytest.raises(ExnihiloError, match="no such file"):
        prepare_corpus(tmp_path / "missing", smol_tokenizer, cache=tmp_path / "c")


def test_parse_token_count():
    assert parse_token_count("20M") == 20_000_000
    assert parse_token_count("1.5k") == 1500
    assert parse_token_count("123") == 123
    with pytest.raises(ExnihiloError, match="--tokens"):
        parse_token_count("lots")


# ------------------------------------------------------------------------------- FLOPs

def test_flops_per_position_by_hand(smol_tokenizer):
    assert mean_context(4, None) == (1 + 2 + 3 + 4) / 4
    assert mean_context(6, 2) == (1 + 2 + 2 + 2 + 2 + 2) / 6
    cfg = gemma2_config("gemma2-micro", smol_tokenizer, sliding_window=2)
    d, v = 32, len(smol_tokenizer)
    per_layer = 32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 128  # q,o (2 heads × 16); k,v; mlp
    assert matmul_params(cfg) == 2 * per_layer + d * v
    attn = 4 * 2 * 16 * (mean_context(6, 2) + mean_context(6, None))
    assert flops_per_position(cfg, 6) == 3 * (2 * matmul_params(cfg) + attn)


# ----------------------------------------------------------------------------- the run

def pretrain_cfg(tmp_path, path, out="run", **kw):
    base = dict(data=str(path), out=str(tmp_path / out), arch="gemma2-micro", seq_len=32,
                batch_size=4, tokens=128 * 6, val_fraction=0.1, eval_every=0, save_every=2,
                lr=3e-3, warmup_ratio=0.0)
    base.update(kw)
    return PretrainConfig(**base)


def test_steps_for_budget(tmp_path):
    cfg = PretrainConfig(data="x", out="y", arch="gemma2-micro", seq_len=32, batch_size=4,
                         grad_accum=2)
    # 10 rows → 3 micro-batches → 2 steps per epoch; 2000 tokens → 8 steps → 4 epochs.
    assert steps_for_budget(2000, 10, cfg) == (8, 4)


def test_pretrain_run_trains_saves_and_resumes_exactly(tmp_path, smol_tokenizer, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    path = write_corpus(tmp_path)
    result = run_pretrain(pretrain_cfg(tmp_path, path), tokenizer=smol_tokenizer)
    assert result.steps == 6 and result.trained_tokens == 6 * 4 * 32
    assert result.val_perplexity == pytest.approx(math.exp(result.val_loss))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().split()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert 0 < rows[-1]["mfu"] < 1.5
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    assert loaded.config.model_type == "gemma2" and loaded.config.sliding_window == 32

    class Killed(Exception):
        pass

    def kill(state):
        if state.step == 4:
            raise Killed

    cfg = pretrain_cfg(tmp_path, path, out="resumed")
    with pytest.raises(Killed):
        run_pretrain(cfg, tokenizer=smol_tokenizer, on_step=kill)
    run_pretrain(cfg, tokenizer=smol_tokenizer, resume=True)
    resumed = AutoModelForCausalLM.from_pretrained(tmp_path / "resumed")
    for (name, a), b in zip(loaded.state_dict().items(), resumed.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name


def test_pretrain_rejects_rows_longer_than_the_corpus(tmp_path, smol_tokenizer, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    path = tmp_path / "small.jsonl"
    path.write_text(json.dumps({"text": "only a few words"}) + "\n")
    cfg = pretrain_cfg(tmp_path, path, seq_len=64, val_fraction=0.0)
    with pytest.raises(ExnihiloError, match="fewer than one row"):
        run_pretrain(cfg, tokenizer=smol_tokenizer)
    assert not (tmp_path / "run").exists()


def test_continual_pretraining_of_an_existing_model(tmp_path, smol_tokenizer, tiny_llama,
                                                    monkeypatch):
    """--from: the given model itself trains on the packed corpus (no preset, no MFU for a
    non-Gemma model), and the result is the same architecture with changed weights."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    cfg = pretrain_cfg(tmp_path, write_corpus(tmp_path), arch=None, tokens=256, lr=1e-3)
    result = run_pretrain(cfg, model_obj=tiny_llama, tokenizer=smol_tokenizer)
    assert result.steps == 2 and result.mfu is None
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    assert after.config.model_type == "llama"
    changed = [k for k, v in after.state_dict().items() if not torch.equal(v, before[k])]
    assert "model.layers.0.mlp.down_proj.weight" in changed
    info = json.loads((tmp_path / "run" / "exnihilo_run.json").read_text())
    assert info["kind"] == "pretrain" and info["config"]["arch"] is None


def test_corpora_read_parquet_and_the_hub_cache(tmp_path, monkeypatch, smol_tokenizer):
    """Pretraining corpora ship as parquet with a text column (or as an hf: dataset): the
    documents, their order and the tokenized stream match the same texts as JSONL."""
    pa = pytest.importorskip("pyarrow", reason="pyarrow not installed (exnihilo[parquet])")
    import pyarrow.parquet as pq
    from tests.test_ecosystem_data import fake_snapshot

    texts = ["Alpha document.", "Beta document, longer.", "Gamma."]
    folder = tmp_path / "pq"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([{"text": t, "id": i} for i, t in
                                         enumerate(texts[:2])]), folder / "a.parquet")
    pq.write_table(pa.Table.from_pylist([{"text": texts[2]}, {"text": "  "}]),
                   folder / "b.parquet")
    assert list(iter_documents(folder)) == texts
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    fake_snapshot(tmp_path / "hub", "dataset", "org/corpus", {
        "data/train-00000-of-00001.jsonl": "".join(json.dumps({"text": t}) + "\n"
                                                   for t in texts)})
    assert list(iter_documents("hf:org/corpus")) == texts
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    streams = [open_stream(prepare_corpus(src, smol_tokenizer, 0.0, 0, cache=tmp_path / "k"),
                           "train", 4).tokens.tolist()
               for src in (folder, "hf:org/corpus", jsonl)]
    assert streams[0] == streams[1] == streams[2]
    pq.write_table(pa.Table.from_pylist([{"content": "no text column"}]), folder / "c.parquet")
    with pytest.raises(ExnihiloError, match=r'c\.parquet:row 1: expected an object with a '
                                            r'string "text"'):
        list(iter_documents(folder))
