"""DPO-family losses against the anchors' oracle numbers and a naive computation; the
objective on tiny models (one forward per pair, reference = adapter disabled), bit-exact
resume (LoRA dropout, EMA anchor), the on-disk reference cache, and bad options."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import tiny_llama_config
from exnihilo.errors import ExnihiloError
from exnihilo.train.dpo import (
    AdapterReference,
    DPOConfig,
    DPOObjective,
    EMAAnchor,
    ModelReference,
    PairLogps,
    check_same_tokenizer,
    collate_pairs,
    pair_loss,
    parse_loss,
    run_dpo,
)
from exnihilo.train.preference_data import PairExample

pytestmark = pytest.mark.usefixtures("one_thread")

PREFS = [("What is 2+2?", "4.", "5."), ("Name a colour.", "Blue.", "Seven."),
         ("Say hi.", "Hi there!", "No."), ("Capital of France?", "Paris.", "Rome."),
         ("Opposite of hot?", "Cold.", "Hot."), ("Plural of mouse?", "Mice.", "Mouses."),
         ("First letter?", "A.", "Z."), ("Days in a week?", "Seven.", "Ten.")]


def write_prefs(path, rows=PREFS):
    with open(path, "w") as f:
        for q, c, r in rows:
            f.write(json.dumps({"prompt": q, "chosen": c, "rejected": r}) + "\n")
    return str(path)


def fresh_tiny(vocab_size, seed=0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(vocab_size))


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def config(tmp_path, out="out", **overrides):
    base = dict(data=write_prefs(tmp_path / "prefs.jsonl"), out=str(tmp_path / out),
                style="phi3", batch_size=4, val_fraction=0.25, eval_every=2, save_every=2,
                max_length=64, seed=0)
    base.update(overrides)
    return DPOConfig(**base)


def logps(c, r, cn=1, rn=1):
    t = torch.tensor
    d = torch.float64
    return PairLogps(t([float(c)], dtype=d), t([float(r)], dtype=d), t([cn]), t([rn]))


# ------------------------------------------------------------------------ loss oracles

def test_losses_match_the_anchor_oracles():
    """logπ_w=−10, logπ_l=−12, ref −11/−11, β=0.1 (Δ=2): the anchors' computed values."""
    policy, ref = logps(-10, -12, 4, 5), logps(-11, -11, 4, 5)
    expect = {"sigmoid": 0.5981389, "hinge": 0.8, "ipo": 20.7025}
    for name, value in expect.items():
        assert float(pair_loss(name, policy, ref, 0.1)) == pytest.approx(value, abs=1e-6)
    assert float(pair_loss("robust", policy, ref, 0.1, eps=0.1)) == pytest.approx(
        0.5731388, abs=1e-6)
    # SimPO: ā_w=−1, ā_l=−1.5, β=2, γ=.5 → −log σ(0.5); no reference needed.
    simpo = pair_loss("simpo", logps(-4, -6, 4, 4), None, 2.0, gamma=0.5)
    assert float(simpo) == pytest.approx(0.4740770, abs=1e-6)
    # sft: the chosen response's mean token NLL.
    assert float(pair_loss("sft", policy, None, 0.1)) == pytest.approx(2.5)


def test_policy_equal_to_reference_gives_the_universal_values():
    same = logps(-7.3, -9.1, 3, 6)
    assert float(pair_loss("sigmoid", same, same, 0.1)) == pytest.approx(math.log(2))
    assert float(pair_loss("hinge", same, same, 0.1)) == pytest.approx(1.0)
    assert float(pair_loss("ipo", same, same, 0.1)) == pytest.approx(1 / (4 * 0.1 ** 2))
    assert float(pair_loss("robust", same, same, 0.1, eps=0.2)) == pytest.approx(math.log(2))
    with pytest.raises(ExnihiloError, match="reference"):
        pair_loss("sigmoid", same, None, 0.1)


def test_parse_loss_weighted_sums():
    assert parse_loss("sigmoid") == [("sigmoid", 1.0)]
    assert parse_loss("sigmoid+0.5*sft") == [("sigmoid", 1.0), ("sft", 0.5)]
    for bad in ("sigmod", "sigmoid+sigmoid", "2*", "sigmoid+x*sft"):
        with pytest.raises(ExnihiloError):
            parse_loss(bad)


# ------------------------------------------------------------- the objective on a model

def tokenized_pairs(tokenizer, rows=PREFS[:3]):
    from exnihilo.train.preference_data import tokenize_exchange

    out = []
    for q, c, r in rows:
        prompt, chosen = tokenize_exchange([{"role": "user", "content": q}],
                                           {"role": "assistant", "content": c}, "phi3",
                                           tokenizer)
        _, rejected = tokenize_exchange([{"role": "user", "content": q}],
                                        {"role": "assistant", "content": r}, "phi3",
                                        tokenizer)
        out.append(PairExample(tuple(prompt), tuple(chosen), tuple(rejected)))
    return out


def naive_logp(model, prompt, response):
    """Σ log softmax over the full logits of one unpadded sequence."""
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    lp = F.log_softmax(logits[:-1], dim=-1)
    targets = ids[0, 1:]
    start = len(prompt) - 1
    return float(lp[torch.arange(start, len(targets)), targets[start:]].sum())


def test_objective_matches_a_naive_computation(smol_tokenizer):
    """Padded batch of 3 pairs (6 rows, one forward) vs one-by-one full-logit sums."""
    policy, reference = fresh_tiny(len(smol_tokenizer), 0), fresh_tiny(len(smol_tokenizer), 1)
    pairs = tokenized_pairs(smol_tokenizer)
    batch = collate_pairs(pairs, [0, 1, 2], smol_tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 6
    beta = 0.5
    for loss in ("sigmoid", "ipo", "hinge", "sigmoid+0.5*sft"):
        objective = DPOObjective(loss, beta=beta, reference=ModelReference(reference))
        with torch.no_grad():
            total, metrics = objective.loss_sum(policy, batch)
        expect = 0.0
        accuracy = 0
        for p in pairs:
            pc, pr = naive_logp(policy, p.prompt, p.chosen), naive_logp(policy, p.prompt,
                                                                        p.rejected)
            rc, rr = naive_logp(reference, p.prompt, p.chosen), naive_logp(
                reference, p.prompt, p.rejected)
            delta = (pc - rc) - (pr - rr)
            if loss == "sigmoid":
                expect += -math.log(1 / (1 + math.exp(-beta * delta)))
            elif loss == "hinge":
                expect += max(0.0, 1 - beta * delta)
            elif loss == "ipo":
                avg = (pc - rc) / len(p.chosen) - (pr - rr) / len(p.rejected)
                expect += (avg - 1 / (2 * beta)) ** 2
            else:
                expect += (-math.log(1 / (1 + math.exp(-beta * delta)))
                           - 0.5 * pc / len(p.chosen))
            accuracy += int(pc - rc > pr - rr)
        assert float(total) == pytest.approx(expect, rel=1e-4, abs=1e-4), loss
        assert metrics["reward_accuracy"] == accuracy


def test_lora_reference_is_the_adapter_disabled_model(smol_tokenizer):
    """A fresh LoRA adapter (B = 0) makes policy == reference: loss exactly ln 2 per pair;
    after perturbing B, the reference still equals the plain base model."""
    from peft import LoraConfig, get_peft_model

    base = fresh_tiny(len(smol_tokenizer))
    pairs = tokenized_pairs(smol_tokenizer)
    batch = collate_pairs(pairs, [0, 1, 2], smol_tokenizer.pad_token_id)
    plain = [naive_logp(base, p.prompt, p.chosen) for p in pairs] + [
        naive_logp(base, p.prompt, p.rejected) for p in pairs]
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))
    objective = DPOObjective("sigmoid", beta=0.1, reference=AdapterReference())
    total, _ = objective.loss_sum(model, batch)
    assert float(total.detach()) == pytest.approx(3 * math.log(2), abs=1e-6)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ref = AdapterReference().logps(model, batch)
    assert ref.tolist() == pytest.approx(plain, abs=1e-4)
    total, _ = objective.loss_sum(model, batch)
    assert abs(float(total.detach()) - 3 * math.log(2)) > 1e-3  # policy moved, ref not


# ------------------------------------------------------------------------ training runs

def test_dpo_learns_the_preferences_full_finetune(tmp_path, smol_tokenizer):
    cfg = config(tmp_path, full=True, lr=3e-3, epochs=6, beta=0.5, warmup_ratio=0.0,
                 val_fraction=0.0)
    result = run_dpo(cfg, model_obj=fresh_tiny(len(smol_tokenizer)), tokenizer=smol_tokenizer)
    metrics = read_metrics(tmp_path / "out")
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # frozen copy == policy
    assert metrics[0]["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert metrics[-1]["loss"] < 0.3
    assert metrics[-1]["reward_accuracy"] == 1.0
    assert metrics[-1]["reward_margin"] > 1.0
    assert {"reward_chosen", "reward_rejected", "logp_chosen", "logp_rejected"} <= set(
        metrics[0])
    assert result.reference == "frozen copy of the starting weights"
    info = json.loads((tmp_path / "out" / "exnihilo_run.json").read_text())
    assert info["kind"] == "dpo" and info["data"]["kept"] == 8


def test_validation_metrics_and_simpo_without_reference(tmp_path, smol_tokenizer):
    cfg = config(tmp_path, loss="simpo", beta=2.0, gamma=0.5, max_steps=2, lr=1e-2)
    run_dpo(cfg, model_obj=fresh_tiny(len(smol_tokenizer)), tokenizer=smol_tokenizer)
    last = read_metrics(tmp_path / "out")[-1]
    assert {"val_loss", "val_reward_accuracy", "val_reward_margin"} <= set(last)
    # SimPO's reward is β·mean log-prob: the margin is β(ā_w − ā_l).
    assert last["reward_chosen"] < 0 and last["reward_rejected"] < 0


class Killed(Exception):
    pass


def _kill_at(step):
    def hook(state):
        if state.step == step:
            raise Killed
    return hook


@pytest.mark.parametrize("extra", [dict(), dict(ema_anchor=0.3)], ids=["lora", "ema"])
def test_resume_is_bit_exact(tmp_path, smol_tokenizer, extra):
    """LoRA with dropout and grad accumulation (and the EMA anchor's state): killed after
    step 3 (checkpoint at 2), resumed, the same bytes and the same losses."""
    common = dict(lora_dropout=0.1, lora_r=4, grad_accum=2, batch_size=1, epochs=2, lr=5e-3,
                  beta=0.5, **extra)
    run_dpo(config(tmp_path, out="whole", **common), model_obj=fresh_tiny(len(smol_tokenizer)),
            tokenizer=smol_tokenizer)
    cut = config(tmp_path, out="cut", **common)
    with pytest.raises(Killed):
        run_dpo(cut, model_obj=fresh_tiny(len(smol_tokenizer)), tokenizer=smol_tokenizer,
                on_step=_kill_at(3))
    assert (tmp_path / "cut" / "checkpoints" / "step-00000002").is_dir()
    run_dpo(cut, resume=True, model_obj=fresh_tiny(len(smol_tokenizer)),
            tokenizer=smol_tokenizer)
    whole = load_file(str(tmp_path / "whole" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "cut" / "model.safetensors"))
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key
    a, b = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "cut")
    assert [m["step"] for m in b] == list(range(1, len(a) + 1))
    assert [m["loss"] for m in a] == [m["loss"] for m in b]
    assert a[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # anchor starts at the policy


def test_ema_anchor_update_rule(smol_tokenizer):
    model = torch.nn.Linear(2, 2)
    anchor = EMAAnchor(0.25).attach(model)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(4.0)
    anchor.after_step(model, None)
    assert torch.allclose(anchor.ema["weight"], start + 1.0)  # (1−μ)θ_ema + μθ
    state = anchor.state_dict()
    other = EMAAnchor(0.25)
    other.load_state_dict(state)
    assert torch.equal(other.ema["weight"], anchor.ema["weight"])


def test_precomputed_reference_is_cached_and_reused(tmp_path, smol_tokenizer, monkeypatch):
    monkeypatch.setenv("EXNIHILO_REF_CACHE", str(tmp_path / "cache"))
    # Even where the CPU would multiply frozen weights in bf16 for SFT, DPO's policy and its
    # float32 precomputed reference must agree (bf16 base products made 0.69326 vs log 2).
    monkeypatch.setenv("EXNIHILO_CPU_BF16", "1")
    common = dict(max_steps=2, lr=1e-2, beta=0.5, val_fraction=0.25)
    run_dpo(config(tmp_path, out="live", **common),
            model_obj=fresh_tiny(len(smol_tokenizer)), tokenizer=smol_tokenizer)
    first = run_dpo(config(tmp_path, out="pre1", precompute_ref=True, **common),
                    model_obj=fresh_tiny(len(smol_tokenizer)), tokenizer=smol_tokenizer)
    assert first.ref_cached is False
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    second = run_dpo(config(tmp_path, out="pre2", precompute_ref=True, **common),
                     model_obj=fresh_tiny(len(smol_tokenizer)), tokenizer=smol_tokenizer)
    assert second.ref_cached is True
    live_m, pre_m = read_metrics(tmp_path / "live"), read_metrics(tmp_path / "pre1")
    for a, b in zip(live_m, pre_m, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5) if "val_loss" in a \
            else True
    # Other reference weights → another key, never a stale table.
    run_dpo(config(tmp_path, out="pre3", precompute_ref=True, **common),
            model_obj=fresh_tiny(len(smol_tokenizer), seed=5), tokenizer=smol_tokenizer)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2


def test_bad_options_are_clear_errors(tmp_path, smol_tokenizer):
    with pytest.raises(ExnihiloError, match="--ema-anchor"):
        run_dpo(config(tmp_path, loss="simpo", ema_anchor=0.1), tokenizer=smol_tokenizer)
    with pytest.raises(ExnihiloError, match="--ema-anchor"):
        run_dpo(config(tmp_path, precompute_ref=True, ema_anchor=0.1),
                tokenizer=smol_tokenizer)
    with pytest.raises(ExnihiloError, match="--precompute-ref"):
        run_dpo(config(tmp_path, loss="simpo", precompute_ref=True), tokenizer=smol_tokenizer)
    with pytest.raises(Exception, match="sigmod"):
        config(tmp_path, loss="sigmod")
    assert not (tmp_path / "out").exists()  # nothing claimed before the errors


def test_reference_with_another_tokenizer_is_refused(smol_tokenizer):
    class Other:
        def get_vocab(self):
            return {"a": 0, "b": 1}

        def __len__(self):
            return 2

    check_same_tokenizer(smol_tokenizer, smol_tokenizer, "same")
    with pytest.raises(ExnihiloError, match="--ref-model other uses another tokenizer"):
        check_same_tokenizer(smol_tokenizer, Other(), "other")


# ------------------------------------------------------------------------------------ sDPO

def test_sdpo_steps_start_at_ln2_with_the_previous_model_as_reference(tmp_path,
                                                                      smol_tokenizer):
    """K = 2: each step starts from (and is referenced to) the previous step's model, so each
    step's first loss is ln 2; the last model is published in --out; a kill inside step 2
    resumes there with the same final bytes."""
    from exnihilo.train.sdpo import split_parts, step_dir

    rows = [{"prompt": q, "chosen": c, "rejected": r} for q, c, r in PREFS]
    parts = split_parts(rows, 3, seed=0)
    assert sorted(len(p) for p in parts) == [2, 3, 3]
    assert sorted(json.dumps(r) for p in parts for r in p) == sorted(json.dumps(r)
                                                                     for r in rows)
    common = dict(steps=2, val_fraction=0.0, lr=1e-2, beta=0.5, batch_size=2, save_every=1,
                  lora_dropout=0.0)
    run_dpo(config(tmp_path, out="whole", **common),
            model_obj=fresh_tiny(len(smol_tokenizer)), tokenizer=smol_tokenizer)
    whole = tmp_path / "whole"
    for t in (1, 2):
        metrics = read_metrics(step_dir(whole, t))
        assert len(metrics) == 2  # 4 pairs per step, batch 2
        assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert abs(metrics[-1]["loss"] - math.log(2)) > 1e-4  # the step trained
    info = json.loads((whole / "exnihilo_run.json").read_text())
    assert info["kind"] == "sdpo" and len(info["steps"]) == 2
    final = load_file(str(whole / "model.safetensors"))
    step2 = load_file(str(step_dir(whole, 2) / "model.safetensors"))
    assert all(torch.equal(final[k], step2[k]) for k in final)

    calls = {"n": 0}

    def kill_in_step_2(state):
        calls["n"] += 1
        if calls["n"] == 3:  # step 2's first optimizer step (checkpointed: save_every 1)
            raise Killed
    cut = config(tmp_path, out="cut", **common)
    with pytest.raises(Killed):
        run_dpo(cut, model_obj=fresh_tiny(len(smol_tokenizer)), tokenizer=smol_tokenizer,
                on_step=kill_in_step_2)
    assert (step_dir(tmp_path / "cut", 1) / "exnihilo_run.json").exists()
    run_dpo(cut, resume=True, model_obj=fresh_tiny(len(smol_tokenizer)),
            tokenizer=smol_tokenizer)
    resumed = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert all(torch.equal(final[k], resumed[k]) for k in final)


def test_precomputed_reference_survives_a_kill(tmp_path, smol_tokenizer, monkeypatch):
    """Killed after step 3 (checkpoint at 2): the resumed run reads the cached table (no
    second reference pass) and ends with the uninterrupted run's bytes."""
    monkeypatch.setenv("EXNIHILO_REF_CACHE", str(tmp_path / "cache"))
    common = dict(precompute_ref=True, lora_dropout=0.1, lora_r=4, batch_size=1, lr=5e-3,
                  beta=0.5, max_steps=4)
    run_dpo(config(tmp_path, out="whole", **common), model_obj=fresh_tiny(len(smol_tokenizer)),
            tokenizer=smol_tokenizer)
    cut = config(tmp_path, out="cut", **common)
    with pytest.raises(Killed):
        run_dpo(cut, model_obj=fresh_tiny(len(smol_tokenizer)), tokenizer=smol_tokenizer,
                on_step=_kill_at(3))
    resumed = run_dpo(cut, resume=True, model_obj=fresh_tiny(len(smol_tokenizer)),
                      tokenizer=smol_tokenizer)
    assert resumed.ref_cached is True
    a = load_file(str(tmp_path / "whole" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ref_model_with_another_tokenizer_fails_before_anything_loads(tmp_path,
                                                                       smol_tokenizer):
    class Other:
        def get_vocab(self):
            return {"a": 0}

        def __len__(self):
            return 1

    with pytest.raises(ExnihiloError, match="another tokenizer"):
        run_dpo(config(tmp_path, ref_model="some/other"), tokenizer=smol_tokenizer,
                ref_tokenizer=Other())
    assert not (tmp_path / "out").exists()


def test_full_finetuning_with_a_given_reference(tmp_path, smol_tokenizer):
    """--ref-model (here in memory, another random model): the reference is that model, not
    the starting weights, so step 1's loss is not ln 2 (the naive-computation test checks
    the value itself)."""
    ref = fresh_tiny(len(smol_tokenizer), seed=7)
    result = run_dpo(config(tmp_path, full=True, max_steps=1, val_fraction=0.0, beta=0.5),
                     model_obj=fresh_tiny(len(smol_tokenizer)), tokenizer=smol_tokenizer,
                     ref_model_obj=ref)
    first = read_metrics(tmp_path / "out")[0]
    assert abs(first["loss"] - math.log(2)) > 1e-3
    assert result.reference == "--ref-model in-memory"
