"""The one log-prob path and the loop seams: log-probs and divergences against a naive
full-logits computation (padded and packed), the divergence oracle, LoRA+ parameter
groups, named metrics, and a step hook's state surviving a kill and resume bit-exactly."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_llama_config
from exnihilo.errors import ExnihiloError
from exnihilo.train import forward
from exnihilo.train.collate import (
    collate_continuations,
    collate_packed,
    collate_padded,
)
from exnihilo.train.data import Example, append_eos
from exnihilo.train.forward import (
    model_divergence,
    sequence_logprobs,
    token_divergence,
    token_logprobs,
)
from exnihilo.train.loop import LoopConfig, parameter_groups, train_loop

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 96
EOS, PAD = 2, 2


def tiny(seed=0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(VOCAB, **overrides))
    model.eval()
    return model


def examples(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, split in ((7, 3), (12, 5), (4, 1), (9, 9)):
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        out.append(Example(ids, [t >= split for t in range(n)]))
    return out


def naive_token_logprobs(model, batch):
    """Full logits of the whole batch, log-softmax, gather: the obvious computation."""
    logits = model(input_ids=batch["input_ids"], position_ids=batch.get("position_ids"),
                   use_cache=False).logits.float()
    logp = F.log_softmax(logits, dim=-1)
    keep = batch["labels"] != -100
    return logp[keep].gather(-1, batch["labels"][keep][:, None]).squeeze(-1)


@pytest.mark.parametrize("mask_prompt", [False, True])
@pytest.mark.parametrize("chunk", [10_000, 5])
def test_token_logprobs_match_naive_padded(chunk, mask_prompt):
    model = tiny()
    batch = collate_padded(examples(), PAD, EOS, mask_prompt)
    got = token_logprobs(model, batch, chunk=chunk)
    want = naive_token_logprobs(model, batch)
    assert got.shape == want.shape and len(got) > 10
    assert torch.allclose(got, want, atol=1e-5)


def test_sequence_sums_padded_are_per_row():
    model = tiny()
    batch = collate_padded(examples(), PAD, EOS, mask_prompt=True)
    seq = sequence_logprobs(model, batch, chunk=4)
    naive = naive_token_logprobs(model, batch)
    keep = batch["labels"] != -100
    rows = torch.arange(4)[:, None].expand_as(keep)[keep]
    for r in range(4):
        assert float(seq.sums[r]) == pytest.approx(float(naive[rows == r].sum()), abs=1e-4)
        assert int(seq.counts[r]) == int(keep[r].sum())
    assert torch.allclose(seq.means, seq.sums / seq.counts)


def test_packed_examples_get_their_own_sums_equal_to_running_alone():
    """Each example of a packed row sums exactly what it sums when run on its own."""
    model = tiny()
    exs = examples()
    packed = collate_packed([[exs[0], exs[1]], [exs[2], exs[3]]], PAD, EOS, mask_prompt=True)
    assert packed["example_index"].max() == 3
    got = sequence_logprobs(model, packed, chunk=3)
    for i, ex in enumerate(exs):
        alone = sequence_logprobs(model, collate_padded([ex], PAD, EOS, mask_prompt=True))
        assert float(got.sums[i]) == pytest.approx(float(alone.sums[0]), abs=1e-4)
        assert int(got.counts[i]) == int(alone.counts[0])


def test_chunked_gradients_equal_unchunked():
    model = tiny()
    batch = collate_padded(examples(), PAD, EOS, mask_prompt=False)
    grads = []
    for chunk in (10_000, 6):
        model.zero_grad()
        sequence_logprobs(model, batch, chunk=chunk).sums.sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_gemma2_soft_capping_is_applied(tiny_gemma2):
    batch = collate_padded(examples(), PAD, EOS, mask_prompt=False)
    got = token_logprobs(tiny_gemma2, batch, chunk=5)
    assert torch.allclose(got, naive_token_logprobs(tiny_gemma2, batch), atol=1e-5)


def test_continuation_batch_scores_exactly_the_continuation():
    model = tiny()
    prompt, cont = [5, 6, 7, 8], [9, 10, 11]
    batch = collate_continuations([(prompt, cont), ([4], [12, 13])], PAD)
    seq = sequence_logprobs(model, batch)
    assert seq.counts.tolist() == [3, 2]
    logits = model(input_ids=torch.tensor([prompt + cont])).logits.float()
    logp = F.log_softmax(logits[0], dim=-1)
    want = sum(float(logp[len(prompt) - 1 + t, tok]) for t, tok in enumerate(cont))
    assert float(seq.sums[0]) == pytest.approx(want, abs=1e-5)


def test_one_eos_rule():
    assert append_eos([1, 5], 2) == [1, 5, 2]
    assert append_eos([1, 2], 2) == [1, 2]  # already ends in EOS
    assert append_eos([1, 5], 2, complete=False) == [1, 5]  # truncated: never learns to stop
    assert append_eos([], 2) == [2]


# ------------------------------------------------------------------------------ divergences

def test_divergence_oracle_values():
    """GKD's oracle: student [0.1, 0.9], teacher [0.9, 0.1]: forward and reverse KL are
    both 0.8·ln 9; identical distributions give 0."""
    student = torch.log(torch.tensor([[0.1, 0.9]]))
    teacher = torch.log(torch.tensor([[0.9, 0.1]]))
    for kind in ("forward_kl", "reverse_kl"):
        assert float(token_divergence(student, teacher, kind)) == pytest.approx(
            0.8 * math.log(9), abs=1e-6)
    assert float(token_divergence(student, teacher, "jsd", beta=0.0)) == pytest.approx(
        0.8 * math.log(9), abs=1e-6)
    # JSD(0.5) by hand: M = [0.5, 0.5]; 0.5·KL(T‖M) + 0.5·KL(S‖M) = 0.368064…
    kl_tm = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert float(token_divergence(student, teacher, "jsd", beta=0.5)) == pytest.approx(
        kl_tm, abs=1e-6)
    assert kl_tm == pytest.approx(0.368064, abs=1e-6)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        assert float(token_divergence(student, student, kind)) == pytest.approx(0, abs=1e-7)


def test_forward_kl_is_the_asymmetric_direction():
    s = torch.log(torch.tensor([[0.5, 0.5, 1e-9]]))
    t = torch.log(torch.tensor([[0.4, 0.3, 0.3]]))
    forward_kl = sum(p * math.log(p / q) for p, q in ((0.4, 0.5), (0.3, 0.5), (0.3, 1e-9)))
    assert float(token_divergence(s, t, "forward_kl")) == pytest.approx(forward_kl, rel=1e-4)


@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5),
                                       ("jsd", 0.3)])
def test_model_divergence_matches_naive(kind, beta):
    student, teacher = tiny(0), tiny(1)
    batch = collate_padded(examples(), PAD, EOS, mask_prompt=True)
    got = model_divergence(student, teacher, batch, kind, beta, temperature=2.0, chunk=4)
    keep = batch["labels"] != -100
    s_logits = student(input_ids=batch["input_ids"]).logits[keep]
    t_logits = teacher(input_ids=batch["input_ids"]).logits[keep]
    p_s = F.softmax(s_logits.double() / 2.0, -1)
    p_t = F.softmax(t_logits.double() / 2.0, -1)
    if kind == "forward_kl":
        want = (p_t * (p_t.log() - p_s.log())).sum(-1)
    elif kind == "reverse_kl":
        want = (p_s * (p_s.log() - p_t.log())).sum(-1)
    else:
        m = (1 - beta) * p_s + beta * p_t
        want = beta * (p_t * (p_t.log() - m.log())).sum(-1) + (1 - beta) * (
            p_s * (p_s.log() - m.log())).sum(-1)
    assert torch.allclose(got.double(), want, atol=1e-5)
    got.sum().backward()  # the student gets gradients, the teacher none
    assert any(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_model_divergence_refuses_other_vocabularies():
    from transformers import LlamaForCausalLM

    other = LlamaForCausalLM(tiny_llama_config(VOCAB + 8))
    batch = collate_padded(examples(), PAD, EOS, mask_prompt=True)
    with pytest.raises(ExnihiloError, match="different vocabularies"):
        model_divergence(tiny(), other, batch)


# ------------------------------------------------------------------------------ loop seams

def test_lora_plus_groups_and_no_decay():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                              task_type="CAUSAL_LM"))
    cfg = LoopConfig(lr=1e-3, weight_decay=0.1, lora_plus_ratio=16.0)
    groups = {g["name"]: g for g in parameter_groups(model, cfg)}
    names = {id(p): n for n, p in model.named_parameters()}
    b_params = [names[id(p)] for p in groups["decay+lora_B"]["params"]]
    assert b_params and all("lora_B" in n for n in b_params)
    assert groups["decay+lora_B"]["lr"] == pytest.approx(16e-3)
    assert all("lora_A" in names[id(p)] for p in groups["decay"]["params"])
    assert groups["decay"]["lr"] == pytest.approx(1e-3)
    # Full model: norms, embeddings and 1-d parameters are not decayed.
    full = parameter_groups(tiny(), LoopConfig(lr=1e-3, weight_decay=0.1))
    by_name = {g["name"]: g for g in full}
    assert by_name["no_decay"]["weight_decay"] == 0.0 and by_name["decay"]["weight_decay"] == 0.1
    decayed = {tuple(p.shape) for p in by_name["decay"]["params"]}
    assert all(len(s) == 2 for s in decayed)
    assert (VOCAB, 64) not in decayed  # the (tied) embedding


def test_lora_plus_ratio_survives_the_schedule_and_hooks_run_each_step(tmp_path):
    from peft import LoraConfig, get_peft_model

    from exnihilo.train.loop import make_scheduler

    model = get_peft_model(tiny(), LoraConfig(r=4, target_modules=["q_proj"],
                                              task_type="CAUSAL_LM"))
    cfg = LoopConfig(lr=1e-3, lora_plus_ratio=4.0, warmup_ratio=0.5, save_every=0,
                     eval_every=0)
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg), lr=cfg.lr)
    scheduler = make_scheduler(optimizer, 10, cfg)
    for _ in range(7):
        optimizer.step()
        scheduler.step()
        lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
        assert lrs["decay+lora_B"] == pytest.approx(4.0 * lrs["decay"])
    seen = []

    class Probe:
        def after_step(self, model, state):
            seen.append(state.step)

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    batches = [collate_padded(examples(s), PAD, EOS, True) for s in range(3)]
    train_loop(model, _SumObjective(), lambda e: batches, lambda b: b, [], tmp_path / "o", cfg,
               hooks=[Probe()])
    assert seen == [1, 2, 3]


class _SumObjective:
    """SFT-like loss plus named metrics and a piece of state (a call counter)."""

    def __init__(self):
        self.calls = 0

    def weight(self, batch):
        return float((batch["labels"] != -100).sum())

    def loss_sum(self, model, batch):
        self.calls += 1
        lp = token_logprobs(model, batch)
        return -lp.sum(), {"confident": float((lp > -4.0).sum())}

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = int(state["calls"])


class EmaHook:
    """An exponential moving average of the trainable weights (WARP's anchor)."""

    def __init__(self, model, mu=0.3):
        self.mu = mu
        self.ema = {n: p.detach().clone() for n, p in model.named_parameters()
                    if p.requires_grad}

    def after_step(self, model, state):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in self.ema:
                    self.ema[n].mul_(1 - self.mu).add_(p.detach(), alpha=self.mu)

    def state_dict(self):
        return {"ema": self.ema}

    def load_state_dict(self, state):
        self.ema = {k: v.clone() for k, v in state["ema"].items()}


class Killed(Exception):
    pass


def test_hook_and_objective_state_survive_kill_and_resume_bit_exactly(tmp_path):
    batches = [collate_padded(examples(s), PAD, EOS, True) for s in range(6)]
    cfg = LoopConfig(lr=5e-3, save_every=2, eval_every=3, epochs=1)
    val = batches[:1]

    def run(out, kill_at=None, resume=False, model=None, hook=None, objective=None):
        model = model or tiny(3)
        hook = hook or EmaHook(model)
        objective = objective or _SumObjective()

        def on_step(state):
            if kill_at is not None and state.step == kill_at:
                raise Killed
        train_loop(model, objective, lambda e: batches, lambda b: b, val, out, cfg,
                   resume=resume, on_step=on_step, hooks=[hook])
        return model, hook, objective

    whole_model, whole_hook, whole_obj = run(tmp_path / "whole")
    with pytest.raises(Killed):
        run(tmp_path / "cut", kill_at=5)  # last checkpoint at step 4
    # A fresh process: new model, new hook (EMA = init weights), new objective (calls 0).
    model, hook, objective = run(tmp_path / "cut", resume=True)
    for (n, a), (_, b) in zip(whole_model.named_parameters(), model.named_parameters(),
                              strict=True):
        assert torch.equal(a, b), n
    for name, tensor in whole_hook.ema.items():
        assert torch.equal(tensor, hook.ema[name]), name
    assert objective.calls == whole_obj.calls
    rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text()
            .splitlines()]
    whole_rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl")
                  .read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    # Named metrics reach metrics.jsonl, divided by the weight (a share in [0, 1]).
    assert all(0.0 <= r["confident"] <= 1.0 for r in rows)
    assert "val_confident" in rows[2] and "val_confident" in rows[5]
    assert [r["loss"] for r in rows] == [r["loss"] for r in whole_rows]


def test_resume_with_other_hooks_is_refused(tmp_path):
    batches = [collate_padded(examples(s), PAD, EOS, True) for s in range(4)]
    cfg = LoopConfig(lr=5e-3, save_every=2, eval_every=0)
    model = tiny(3)

    def stop(state):
        if state.step == 3:
            raise Killed
    with pytest.raises(Killed):
        train_loop(model, _SumObjective(), lambda e: batches, lambda b: b, [],
                   tmp_path / "o", cfg, on_step=stop, hooks=[EmaHook(model)])
    with pytest.raises(ExnihiloError, match="same options"):
        train_loop(tiny(3), _SumObjective(), lambda e: batches, lambda b: b, [],
                   tmp_path / "o", cfg, resume=True)


def test_forward_module_constants():
    assert forward.IGNORE_INDEX == -100 and "llama" in forward.PLAIN_HEAD


def test_dora_option_adds_magnitude_vectors_and_trains(tmp_path):
    from exnihilo.train.run import TrainConfig, add_lora

    cfg = TrainConfig(out=str(tmp_path), dora=True, lora_r=4, lora_targets=["q_proj"])
    model = add_lora(tiny(), cfg)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n in names)
    batches = [collate_padded(examples(s), PAD, EOS, True) for s in range(2)]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train_loop(model, _SumObjective(), lambda e: batches, lambda b: b, [], tmp_path / "o",
               LoopConfig(lr=1e-2, save_every=0, eval_every=0))
    after = dict(model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before if "magnitude" in n)


# ------------------------------------------------------------------ the fused head (SFT loss)

def tiny_gemma2_capped(cap):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, max_position_embeddings=512, sliding_window=16,
                       final_logit_softcapping=cap, bos_token_id=1, eos_token_id=2,
                       pad_token_id=2, attn_implementation="eager")
    return Gemma2ForCausalLM(cfg)


def loss_and_grads(model, batch, fn):
    model.zero_grad()
    loss = fn(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


@pytest.mark.parametrize("kind", ["llama-tied", "llama-untied", "gemma2-cap", "llama-lora"])
def test_fused_head_sum_equals_the_plain_sum_in_value_and_every_gradient(kind, monkeypatch):
    """Same loss and same gradient for every parameter as `token_logprobs(...).sum()`, over
    several chunks with a remainder (chunk 5), with the soft-cap biting (cap 0.5: tanh far
    from linear) and with a frozen head under LoRA."""
    monkeypatch.setattr(forward, "FUSED_CHUNK", 5)
    if kind == "gemma2-cap":
        model = tiny_gemma2_capped(0.5)
    else:
        model = tiny(tie_word_embeddings=kind != "llama-untied")
    if kind == "llama-lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    model.train()
    exs = examples()
    batch = collate_packed([[exs[0], exs[1]], [exs[2], exs[3]]], PAD, EOS, mask_prompt=True)
    n = int((batch["labels"] != -100).sum())
    assert n > 5 and n % 5 != 0  # several chunks and a partial one
    fused, fused_grads = loss_and_grads(model, batch, forward.token_logprob_sum)
    plain, plain_grads = loss_and_grads(model, batch, lambda m, b: token_logprobs(m, b).sum())
    assert float(fused) == pytest.approx(float(plain), rel=1e-5)
    assert fused_grads.keys() == plain_grads.keys() and len(fused_grads) > 3
    for name, grad in plain_grads.items():
        assert torch.allclose(fused_grads[name], grad, atol=1e-6, rtol=1e-4), name
    if kind == "gemma2-cap":  # the cap really changes the numbers
        assert float(fused) != pytest.approx(float(forward.token_logprobs(
            tiny(), batch).sum()), rel=1e-3)


def test_fused_head_is_used_only_where_it_is_exact():
    """A LoRA-wrapped head or a head with a bias goes through the plain path."""
    model = tiny()
    assert forward._fusable_head(model) is model.lm_head
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(VOCAB))
    assert forward._fusable_head(model) is None
