"""Distillation: the top-k divergence against hand values, the teacher cache against the
live teacher, on-policy sampling, vocabulary mismatch, and a run that resumes exactly."""

from __future__ import annotations

import json
import math

import pytest
import torch

from exnihilo.errors import ExnihiloError
from exnihilo.train.distill import (
    DistillConfig,
    TeacherCache,
    build_teacher_cache,
    document_prompt,
    make_collate,
    run_distill,
)
from exnihilo.train.forward import token_divergence, topk_divergence
from exnihilo.train.pretrain import build_model, gemma2_config
from exnihilo.train.tokens import stream_from_documents

pytestmark = pytest.mark.usefixtures("one_thread")


def logits_of(probs):
    return torch.log(torch.tensor([probs]))


def test_renormalized_topk_divergence_hand_values():
    s, t = logits_of([0.1, 0.9]), logits_of([0.9, 0.1])
    idx = torch.tensor([[0, 1]])
    for kind in ("forward_kl", "reverse_kl"):
        for tail in (True, False):  # k = vocabulary: both variants are the full divergence
            assert float(topk_divergence(s, t, idx, kind, tail=tail)) == pytest.approx(
                0.8 * math.log(9), abs=1e-5)
    assert float(topk_divergence(s, t, idx, "jsd", beta=0.5)) == pytest.approx(0.368064,
                                                                              abs=1e-5)
    assert float(topk_divergence(s, s, idx, "jsd")) == pytest.approx(0.0, abs=1e-6)
    # k = 2 of 3 tokens: both sides renormalized over the kept ids {2, 0}.
    student = torch.tensor([[0.0, 0.0, 0.0]])
    teacher = torch.log(torch.tensor([[0.5, 0.2]]))  # log-probs of ids 2 and 0
    kept = torch.tensor([[2, 0]])
    expected = (0.5 / 0.7) * math.log((0.5 / 0.7) / 0.5) + (0.2 / 0.7) * math.log(
        (0.2 / 0.7) / 0.5)
    assert float(topk_divergence(student, teacher, kept, tail=False)) == pytest.approx(
        expected, abs=1e-6)


def test_topk_with_every_token_is_the_full_divergence():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 11, generator=g), torch.randn(5, 11, generator=g)
    top = torch.log_softmax(t, -1).topk(11, dim=-1)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        for tail in (True, False):
            torch.testing.assert_close(
                topk_divergence(s, top.values, top.indices, kind, 0.3, 0.7, tail),
                token_divergence(s, t, kind, 0.3, 0.7))


def docs_stream(tokenizer, seq_len=16):
    texts = ["The river runs to the sea and the sea is wide.",
             "Stones are heavy; light is fast and green is a colour.",
             "A small model learns from a larger one, token by token.",
             "Every document ends with an end of sequence token here."] * 3
    docs = [tokenizer(t)["input_ids"] for t in texts]
    return stream_from_documents(docs, tokenizer.eos_token_id, seq_len)


def test_cache_equals_live_teacher_on_kept_tokens(tmp_path, smol_tokenizer, tiny_gemma2):
    stream = docs_stream(smol_tokenizer)
    folder = build_teacher_cache(tiny_gemma2, {"train": stream}, k=5, key="abc",
                                 root=tmp_path, batch_rows=3)
    cache = TeacherCache(folder, "train")
    rows = [0, 3, stream.n_rows - 1]
    values, indices = cache.rows(rows)
    from exnihilo.train.tokens import collate_rows

    batch = collate_rows(stream, rows)
    with torch.no_grad():
        live = torch.log_softmax(tiny_gemma2(input_ids=batch["input_ids"],
                                             position_ids=batch["position_ids"],
                                             use_cache=False).logits.float(), -1)
    top = live.topk(5, dim=-1)
    assert torch.equal(indices, top.indices)
    torch.testing.assert_close(values, top.values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(live.gather(-1, indices), values, atol=1e-5, rtol=1e-5)

    # Same key → read from disk: the teacher is not run again.
    class NoTeacher(torch.nn.Module):
        def forward(self, *a, **k):
            raise AssertionError("teacher ran")
    assert build_teacher_cache(NoTeacher(), {"train": stream}, 5, "abc", tmp_path) == folder


def micro_student(tokenizer, seed=1):
    return build_model(gemma2_config("gemma2-micro", tokenizer), seed=seed)


def write_corpus(tmp_path, n=30):
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "green"]
    lines = [json.dumps({"text": f"Doc {i}: " + " ".join(words[(i + j) % 8]
                                                         for j in range(18 + i % 5))})
             for i in range(n)]
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def distill_cfg(tmp_path, path, out="kd", **kw):
    base = dict(data=str(path), out=str(tmp_path / out), teacher="in-memory", seq_len=24,
                batch_size=3, tokens=24 * 3 * 6, val_fraction=0.1, eval_every=0,
                save_every=2, lr=3e-3, warmup_ratio=0.0, top_k=8, lmbda=0.25, prompt_len=6,
                max_new_tokens=5)
    base.update(kw)
    return DistillConfig(**base)


def test_on_policy_batches_are_seeded_and_train_only_samples(smol_tokenizer):
    stream = docs_stream(smol_tokenizer)
    model = micro_student(smol_tokenizer)
    cfg = DistillConfig(data="x", out="y", teacher="t", lmbda=1.0, prompt_len=6,
                        max_new_tokens=4, seq_len=16)
    collate = make_collate(model, stream, None, cfg, pad_id=2, eos_id=2)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b = collate((0, 1, [0, 2])), collate((0, 1, [0, 2]))
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is untouched
    assert torch.equal(a["input_ids"], b["input_ids"]) and int(a["on_policy"]) == 1
    c = collate((0, 2, [0, 2]))
    assert not torch.equal(a["input_ids"], c["input_ids"])  # another batch, other samples
    for r, row in enumerate([0, 2]):
        prompt = document_prompt(stream, row, 6)
        # The prompt is one segment (positions 0, 1, …) ending at prompt_len.
        tokens, positions = stream.row(row)
        assert tokens[6 - len(prompt):6].tolist() == prompt
        assert positions[6 - len(prompt):6].tolist() == list(range(len(prompt)))
        trained = a["labels"][r][a["labels"][r] != -100]
        assert 1 <= trained.numel() <= 4
        # Trained targets are exactly the tokens after the prompt.
        n = trained.numel()
        assert a["input_ids"][r, len(prompt):len(prompt) + n - 1].tolist() == \
            trained[:-1].tolist()


def test_different_vocabularies_are_refused(tmp_path, smol_tokenizer, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=16,
                                           intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1))
    cfg = distill_cfg(tmp_path, write_corpus(tmp_path))
    with pytest.raises(ExnihiloError, match="different vocabularies"):
        run_distill(cfg, student_obj=micro_student(smol_tokenizer), teacher_obj=teacher,
                    tokenizer=smol_tokenizer)
    assert not (tmp_path / "kd").exists()


def test_distill_run_learns_and_resumes_exactly(tmp_path, smol_tokenizer, tiny_gemma2,
                                                monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    with torch.no_grad():  # a peaked teacher (tied head ×30), so there is something to learn
        tiny_gemma2.model.embed_tokens.weight.mul_(30)
    path = write_corpus(tmp_path)
    result = run_distill(distill_cfg(tmp_path, path), student_obj=micro_student(
        smol_tokenizer), teacher_obj=tiny_gemma2, tokenizer=smol_tokenizer)
    assert result.steps == 6 and result.teacher_cache is not None
    assert all(0 < r["mfu"] < 1.5 for r in json.loads("[" + ",".join(
        (tmp_path / "kd" / "metrics.jsonl").read_text().split()) + "]"))
    rows = [json.loads(x) for x in (tmp_path / "kd" / "metrics.jsonl").read_text().split()]
    assert [r["on_policy"] for r in rows].count(1.0) >= 1
    off = [r["loss"] for r in rows if r["on_policy"] == 0]
    assert len(off) >= 2 and off[-1] < off[0]
    assert result.val_loss is not None and result.val_loss >= 0

    class Killed(Exception):
        pass

    def kill(state):
        if state.step == 3:
            raise Killed

    cfg = distill_cfg(tmp_path, path, out="kd2")
    with pytest.raises(Killed):
        run_distill(cfg, student_obj=micro_student(smol_tokenizer), teacher_obj=tiny_gemma2,
                    tokenizer=smol_tokenizer, on_step=kill)
    run_distill(cfg, resume=True, student_obj=micro_student(smol_tokenizer),
                teacher_obj=tiny_gemma2, tokenizer=smol_tokenizer)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "kd").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "kd2").state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_live_teacher_matches_full_cache(tmp_path, smol_tokenizer, tiny_gemma2, monkeypatch):
    """top_k = vocabulary through the cache gives the live teacher's loss."""
    from exnihilo.train.distill import DistillObjective
    from exnihilo.train.tokens import collate_rows

    stream = docs_stream(smol_tokenizer, seq_len=8)
    v = len(smol_tokenizer)
    folder = build_teacher_cache(tiny_gemma2, {"train": stream}, k=v, key="full",
                                 root=tmp_path)
    student = micro_student(smol_tokenizer).eval()
    cfg = DistillConfig(data="x", out="y", teacher="t", loss="jsd", beta=0.3, temperature=0.8)
    objective = DistillObjective(tiny_gemma2, cfg)
    live = collate_rows(stream, [0, 1])
    cached = dict(live)
    cached["teacher_logprobs"], cached["teacher_indices"] = TeacherCache(
        folder, "train").rows([0, 1])
    with torch.no_grad():
        a, _ = objective.loss_sum(student, live)
        b, _ = objective.loss_sum(student, cached)
    assert float(a) == pytest.approx(float(b), rel=1e-4)


def test_topk_tail_bucket_is_exact_when_one_token_is_left_out():
    """Teacher [.5, .3, .2] with ids {0, 1} kept: the tail bucket is token 2 itself, so
    every divergence equals the full one (τ = 1), and the renormalized variant does not."""
    teacher_full = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    student = torch.tensor([[0.3, -1.0, 0.8]], requires_grad=True)
    kept = torch.tensor([[0, 1]])
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        full = token_divergence(student, teacher_full, kind, beta=0.3)
        tail = topk_divergence(student, teacher_full[:, :2], kept, kind, beta=0.3)
        torch.testing.assert_close(tail, full)
    renorm = topk_divergence(student, teacher_full[:, :2], kept, tail=False)
    full = token_divergence(student, teacher_full)
    assert abs(float(renorm.detach()) - float(full.detach())) > 1e-3
    # Uniform student over 3 tokens, by hand: Σ p_T ln(3 p_T).
    by_hand = sum(p * math.log(3 * p) for p in (0.5, 0.3, 0.2))
    assert float(topk_divergence(torch.zeros(1, 3), teacher_full[:, :2], kept)) == \
        pytest.approx(by_hand, abs=1e-6)
    # Gradients stay finite even when the kept set holds all the mass.
    loss = topk_divergence(student, torch.log_softmax(teacher_full, -1),
                           torch.tensor([[0, 1, 2]]), "jsd").sum()
    loss.backward()
    assert torch.isfinite(student.grad).all()
