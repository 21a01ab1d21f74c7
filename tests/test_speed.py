"""Speed levers that change behaviour: the dedup embedding cache embeds only new or edited
records and gives the vectors embedding afresh would; MiniLM truncates at its own limit."""

import hashlib
import json

import numpy as np
import pytest

from exnihilo.embedder import cache_key, embed_cached, read_cache, write_cache


class CountingEmbedder:
    """A deterministic stand-in for MiniLM: a unit vector seeded by the text's hash; records
    every text it embeds."""

    def __init__(self):
        self.seen: list[str] = []

    def encode(self, texts, **kwargs):
        self.seen.extend(texts)
        rows = []
        for t in texts:
            seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:4], "little")
            v = np.random.default_rng(seed).standard_normal(384).astype(np.float32)
            rows.append(v / np.linalg.norm(v))
        return np.stack(rows)


def test_cache_embeds_only_new_or_edited_records_and_gives_identical_vectors(tmp_path):
    path = tmp_path / "out.jsonl.embeddings.safetensors"
    model = CountingEmbedder()
    ids, texts = ["a", "b", "c"], ["first text", "second text", "third text"]
    first, fresh = embed_cached(ids, texts, path, model)
    assert fresh == 3 and sorted(model.seen) == sorted(texts) and path.exists()
    model.seen.clear()
    again, fresh = embed_cached(ids, texts, path, model)
    assert fresh == 0 and model.seen == [] and np.array_equal(again, first)
    # two records added, one edited (same id, new text), order changed
    ids2 = ["d", "c", "a", "b", "e"]
    texts2 = ["fourth", "third text", "first text", "second text, edited", "fifth"]
    got, fresh = embed_cached(ids2, texts2, path, model)
    # Only the new and edited ones, each once (longest first, as batches pad least).
    assert fresh == 3 and model.seen == ["second text, edited", "fourth", "fifth"]
    want = CountingEmbedder().encode(texts2)
    assert np.array_equal(got, want)  # cached rows bit-identical to embedding afresh
    assert set(read_cache(path)) == {cache_key(i, t) for i, t in zip(ids2, texts2, strict=True)}


def test_a_killed_embedding_run_keeps_its_flushed_chunks_and_resumes(tmp_path, monkeypatch):
    from exnihilo import embedder

    monkeypatch.setattr(embedder, "EMBED_CHUNK", 4)
    monkeypatch.setattr(embedder, "FLUSH_EVERY", 8)

    class DiesOnThirdChunk(CountingEmbedder):
        def encode(self, texts, **kwargs):
            if len(self.seen) >= 8:
                raise KeyboardInterrupt
            return super().encode(texts, **kwargs)

    path = tmp_path / "c.safetensors"
    ids = [f"r{i}" for i in range(20)]
    texts = [f"text number {i}" + "!" * i for i in range(20)]  # distinct lengths
    with pytest.raises(KeyboardInterrupt):
        embed_cached(ids, texts, path, DiesOnThirdChunk())
    kept = read_cache(path)  # the 8 longest, flushed after two chunks
    assert set(kept) == {cache_key(ids[i], texts[i]) for i in range(12, 20)}
    model = CountingEmbedder()
    got, fresh = embed_cached(ids, texts, path, model)
    assert fresh == 12 and sorted(model.seen) == sorted(texts[:12])
    assert np.array_equal(got, CountingEmbedder().encode(texts))
    assert set(read_cache(path)) == {cache_key(i, t) for i, t in zip(ids, texts, strict=True)}


def test_cache_from_another_embedder_is_ignored(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "c.safetensors"
    write_cache(path, [cache_key("a", "x")], np.ones((1, 384), np.float32))
    assert len(read_cache(path)) == 1
    save_file({"keys": np.zeros((1, 16), np.uint8), "vectors": np.ones((1, 384), np.float32)},
              str(path), metadata={"format": "exnihilo-embeddings-1", "embedder": "other"})
    assert read_cache(path) == {}


def test_dedup_file_reuses_the_cache_beside_the_output(tmp_path, monkeypatch):
    from exnihilo.curate import embed
    from exnihilo.curate.embed import dedup_file, embedding_cache_path

    model = CountingEmbedder()
    monkeypatch.setattr("exnihilo.embedder.load_embedder", lambda device="cpu": model)
    rows = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"question {i}"},
                                         {"role": "assistant", "content": "answer"}]}
            for i in range(5)]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    first = dedup_file(src, out, 0.05)
    assert first.embedded == 3 and embedding_cache_path(out).exists()
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model.seen.clear()
    second = dedup_file(src, out, 0.05)
    assert second.embedded == 2 and model.seen == ["question 3", "question 4"]
    assert second.output_records == 5
    assert embed.embedding_cache_path("/dev/null") is None
    none = dedup_file(src, tmp_path / "o2.jsonl", 0.05, embedding_cache=False)
    assert none.embedded is None and not embedding_cache_path(tmp_path / "o2.jsonl").exists()


@pytest.mark.slow
def test_real_minilm_truncates_at_its_own_limit_and_cache_matches():
    """sentence-transformers truncates at the model's max_seq_length (256): a text far
    longer embeds exactly like its first 256 word pieces."""
    from exnihilo.embedder import embed_texts, load_embedder

    model = load_embedder()
    assert model.max_seq_length == 256
    long = " ".join(f"word{i}" for i in range(2000))
    ids = model.tokenizer(long, add_special_tokens=False)["input_ids"][:254]
    head = model.tokenizer.decode(ids)
    a, b = embed_texts([long, head], model)
    assert float(a @ b) > 0.999


def test_checkpointing_turns_on_by_itself_for_large_micro_batches():
    from exnihilo.train.run import CHECKPOINT_FROM_POSITIONS, wants_checkpointing
    from exnihilo.train.sft import SFTConfig

    cfg = SFTConfig(data="d", out="o", batch_size=8, max_length=512)
    assert CHECKPOINT_FROM_POSITIONS == 2048
    assert wants_checkpointing(cfg, 512)  # 4096 positions: the default 8 x 512
    assert wants_checkpointing(cfg, 256)  # exactly 2048
    assert not wants_checkpointing(cfg, 255)
    forced = cfg.model_copy(update={"gradient_checkpointing": True, "batch_size": 1})
    assert wants_checkpointing(forced, 16)


def test_automatic_checkpointing_is_per_micro_batch(smol_tokenizer):
    """Set up because some micro-batch may reach 2,048 positions, checkpointing then runs
    only for those that do: a short batch keeps its activations (no recompute), a long one
    recomputes every layer; the gradients are the same either way."""
    import torch
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config
    from exnihilo.train.loop import LoopConfig, make_scheduler, optimizer_step
    from exnihilo.train.run import checkpoint_from_positions, enable_gradient_checkpointing
    from exnihilo.train.sft import SFTConfig, SFTObjective

    cfg = SFTConfig(data="d", out="o", batch_size=8, max_length=512)
    assert checkpoint_from_positions(cfg, 512) == 2048
    assert checkpoint_from_positions(cfg, 255) is None  # no batch can get there
    for forced in (True, False):  # an explicit setting is left alone
        assert checkpoint_from_positions(
            cfg.model_copy(update={"gradient_checkpointing": forced}), 512) is None

    def run(threshold: int | None, rows: int, width: int) -> tuple[int, list[torch.Tensor]]:
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_llama_config(len(smol_tokenizer)))
        enable_gradient_checkpointing(model)
        calls = []
        for module in model.modules():
            func = getattr(module, "_gradient_checkpointing_func", None)
            if func is not None and hasattr(module, "self_attn"):
                def counted(*args, _func=func, **kwargs):
                    calls.append(1)
                    return _func(*args, **kwargs)
                module._gradient_checkpointing_func = counted
        params = list(model.parameters())
        grads: list[torch.Tensor] = []

        class Recording(torch.optim.SGD):  # optimizer_step zeroes the gradients after step
            def step(self, closure=None):
                grads.extend(p.grad.clone() for p in params)

        optimizer = Recording(params, lr=0.0)
        loop_cfg = LoopConfig(checkpoint_from_positions=threshold, max_steps=1)
        ids = torch.randint(3, 500, (rows, width), generator=torch.Generator().manual_seed(1))
        optimizer_step(model, SFTObjective(), [{"input_ids": ids, "labels": ids.clone()}],
                       params, optimizer, make_scheduler(optimizer, 1, loop_cfg), loop_cfg)
        return len(calls), grads

    short_calls, short_grads = run(2048, 8, 64)  # 512 positions
    long_calls, long_grads = run(2048, 8, 256)  # 2048 positions
    always_calls, always_grads = run(None, 8, 64)  # set up and left on
    assert (short_calls, long_calls, always_calls) == (0, 2, 2)  # 2 layers each time
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(short_grads, always_grads,
                                                                strict=True))
    assert len(long_grads) == len(short_grads) and long_grads[0].abs().sum() > 0


def test_heap_limit_applies_on_glibc():
    import platform

    from exnihilo.train.run import limit_heap_growth

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    assert limit_heap_growth() is True
