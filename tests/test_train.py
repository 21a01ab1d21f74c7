"""The training loop and the SFT recipe on tiny models: learning, accumulation, bit-exact
resume, LoRA merge-and-save, and every bad input the issue names."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_llama_config
from exnihilo.errors import ExnihiloError
from exnihilo.train.sft import (
    RUN_INFO,
    SFTConfig,
    add_lora,
    read_run_info,
    run_sft,
    save_final_model,
)

QA = [("What is 2+2?", "4."), ("Name a colour.", "Blue."), ("Say hi.", "Hi there!"),
      ("Capital of France?", "Paris."), ("Opposite of hot?", "Cold."),
      ("Plural of mouse?", "Mice."), ("First letter?", "A."), ("Days in a week?", "Seven.")]



pytestmark = pytest.mark.usefixtures("one_thread")

def write_records(path, pairs=QA):
    with open(path, "w") as f:
        for q, a in pairs:
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": a}]}) + "\n")
    return str(path)


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def fresh_tiny(vocab_size):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(vocab_size))


def config(tmp_path, out="out", **overrides):
    base = dict(data=write_records(tmp_path / "data.jsonl"), out=str(tmp_path / out),
                style="phi3", batch_size=4, val_fraction=0.25, eval_every=2, save_every=2,
                max_length=64, seed=0)
    base.update(overrides)
    return SFTConfig(**base)


def test_loss_goes_down_full_finetune(tmp_path, smol_tokenizer):
    cfg = config(tmp_path, full=True, lr=1e-2, epochs=4, mask_prompt=True, warmup_ratio=0.0)
    result = run_sft(cfg, model_obj=fresh_tiny(len(smol_tokenizer)), tokenizer=smol_tokenizer)
    metrics = read_metrics(tmp_path / "out")
    assert [m["step"] for m in metrics] == list(range(1, 9))  # 4 epochs × 2 batches (6 rows)
    assert metrics[0]["loss"] == pytest.approx(math.log(len(smol_tokenizer)), abs=0.3)
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 3.0
    vals = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert len(vals) == 4 and vals[-1] < vals[0] and result.val_loss == vals[-1]
    assert result.train_loss is not None
    # Per-step metrics carry what the progress bar shows.
    assert {"loss", "lr", "grad_norm", "trained_tokens_per_s"} <= set(metrics[0])
    # Warmup-free cosine from 1e-2 down to lr * 0.1.
    assert metrics[0]["lr"] == pytest.approx(1e-2)
    assert metrics[1]["lr"] == pytest.approx(1e-2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(
        math.pi / 8))), rel=1e-6)
    info = read_run_info(tmp_path / "out")
    assert info["style"] == "phi3" and info["config"]["full"] is True


def test_grad_accumulation_equals_one_big_batch(tmp_path, smol_tokenizer):
    """batch 4 × accum 1 and batch 2 × accum 2 take the same first optimizer step."""
    weights = []
    for name, bs, ga in (("big", 4, 1), ("accum", 2, 2)):
        cfg = config(tmp_path, out=name, full=True, batch_size=bs, grad_accum=ga, max_steps=1,
                     val_fraction=0.0, lr=1e-3)
        # Same examples in the first window: one epoch's order does not depend on batch size.
        run_sft(cfg, model_obj=fresh_tiny(len(smol_tokenizer)), tokenizer=smol_tokenizer)
        weights.append(load_file(str(tmp_path / name / "model.safetensors")))
    for key in weights[0]:
        assert torch.allclose(weights[0][key], weights[1][key], atol=1e-6), key


def test_packed_and_padded_runs_see_the_same_targets(tmp_path, smol_tokenizer):
    """One batch holding every example: packing changes the layout, not the loss."""
    rows = {}
    for name, pack in (("padded", False), ("packed", True)):
        cfg = config(tmp_path, out=name, full=True, pack=pack, batch_size=8, max_steps=1)
        result = run_sft(cfg, model_obj=fresh_tiny(len(smol_tokenizer)),
                         tokenizer=smol_tokenizer)
        rows[name] = (read_metrics(tmp_path / name)[0], result)
    padded, packed = rows["padded"][0], rows["packed"][0]
    assert packed["trained_tokens"] == padded["trained_tokens"]
    assert packed["loss"] == pytest.approx(padded["loss"], abs=1e-5)
    assert packed["positions"] < padded["positions"]
    assert rows["packed"][1].padding_waste < rows["padded"][1].padding_waste


def test_gradient_checkpointing_changes_memory_not_results(tmp_path, smol_tokenizer):
    weights = []
    for name, checkpointing in (("plain", False), ("checkpointed", True)):
        cfg = config(tmp_path, out=name, lora_dropout=0.1, max_steps=2, lr=1e-2,
                     gradient_checkpointing=checkpointing)
        model = fresh_tiny(len(smol_tokenizer))
        run_sft(cfg, model_obj=model, tokenizer=smol_tokenizer)
        assert model.model.gradient_checkpointing is checkpointing  # the path really ran
        weights.append(load_file(str(tmp_path / name / "model.safetensors")))
    for key in weights[0]:
        assert torch.allclose(weights[0][key], weights[1][key], atol=1e-6), key


class Killed(Exception):
    pass


def test_resume_reproduces_weights_bit_for_bit(tmp_path, smol_tokenizer):
    """LoRA with dropout (so RNG state matters), grad accumulation, two epochs: a run killed
    after step 3 (last checkpoint: step 2) and resumed ends with the same bytes."""
    common = dict(lora_dropout=0.1, lora_r=4, grad_accum=2, batch_size=2, epochs=2,
                  lr=5e-3)
    run_sft(config(tmp_path, out="whole", **common), model_obj=fresh_tiny(len(smol_tokenizer)),
            tokenizer=smol_tokenizer)

    def kill_at_3(state):
        if state.step == 3:
            raise Killed

    cut = config(tmp_path, out="cut", **common)
    with pytest.raises(Killed):
        run_sft(cut, model_obj=fresh_tiny(len(smol_tokenizer)), tokenizer=smol_tokenizer,
                on_step=kill_at_3)
    assert (tmp_path / "cut" / "checkpoints" / "step-00000002").is_dir()
    assert not (tmp_path / "cut" / "config.json").exists()  # no half-finished model
    with pytest.raises(ExnihiloError, match="--resume"):
        run_sft(cut, model_obj=fresh_tiny(len(smol_tokenizer)), tokenizer=smol_tokenizer)
    run_sft(cut, resume=True, model_obj=fresh_tiny(len(smol_tokenizer)),
            tokenizer=smol_tokenizer)

    whole = load_file(str(tmp_path / "whole" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key
    steps = [m["step"] for m in read_metrics(tmp_path / "cut")]
    assert steps == [1, 2, 3, 4]  # step 3 redone once, not duplicated
    assert ([m["loss"] for m in read_metrics(tmp_path / "whole")]
            == [m["loss"] for m in read_metrics(tmp_path / "cut")])
    assert not (tmp_path / "cut" / "checkpoints").exists()  # cleaned up when finished


def test_lora_merge_and_save_reloads_with_same_logits(tmp_path, smol_tokenizer):
    from transformers import AutoModelForCausalLM

    cfg = config(tmp_path, lora_r=4, lora_targets=["q_proj", "v_proj", "down_proj"])
    model = add_lora(fresh_tiny(len(smol_tokenizer)), cfg)
    with torch.no_grad():  # give the adapters non-zero weights, as training would
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.eval()
    ids = torch.tensor([[1, 400, 500, 600, 2]])
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        base_only = fresh_tiny(len(smol_tokenizer))(input_ids=ids).logits
    assert not torch.allclose(adapted, base_only, atol=1e-4)  # the adapters matter
    out = tmp_path / "merged"
    out.mkdir()
    save_final_model(model, smol_tokenizer, out, {"style": "phi3"}, lora=True)
    reloaded = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    assert not any("lora" in k for k in load_file(str(out / "model.safetensors")))
    with torch.no_grad():
        again = reloaded(input_ids=ids).logits
    assert torch.allclose(adapted, again, atol=1e-5)
    assert json.loads((out / RUN_INFO).read_text()) == {"style": "phi3"}
    # The adapter is kept beside the merged model: base + adapter gives the same logits.
    from peft import PeftModel

    with_adapter = PeftModel.from_pretrained(fresh_tiny(len(smol_tokenizer)), out / "adapter")
    with torch.no_grad():
        assert torch.allclose(with_adapter(input_ids=ids).logits, again, atol=1e-5)
    # The phi3 style is baked into the saved chat template: servers prompt it as trained.
    from transformers import AutoTokenizer

    from exnihilo.styles import render_prompt

    saved = AutoTokenizer.from_pretrained(out)
    conv = [{"role": "user", "content": "Name a colour."}]
    assert saved.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) == \
        render_prompt(conv, "phi3", smol_tokenizer)
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers") and "prompt style `phi3`" in card
    assert "log_history" in json.loads((out / "trainer_state.json").read_text())


def test_alpaca_style_template_matches_training_prompt(smol_tokenizer):
    import copy

    from exnihilo.styles import render_prompt, render_segments, style_chat_template

    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = style_chat_template("alpaca")
    conv = [{"role": "user", "content": "Rewrite: it's 'quoted'."},
            {"role": "assistant", "content": "It is quoted."}]
    assert tok.apply_chat_template(conv[:1], tokenize=False, add_generation_prompt=True) == \
        render_prompt(conv, "alpaca", smol_tokenizer)
    full = "".join(t for t, _ in render_segments(conv, "alpaca", smol_tokenizer))
    assert tok.apply_chat_template(conv, tokenize=False) == full + tok.eos_token
    assert style_chat_template("chat") is None


# ------------------------------------------------------------------------------ bad input

def test_bad_inputs_are_clear_errors(tmp_path, smol_tokenizer):
    tiny = fresh_tiny(len(smol_tokenizer))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ExnihiloError, match="empty"):
        run_sft(config(tmp_path, data=str(empty)), model_obj=tiny, tokenizer=smol_tokenizer)

    no_answers = tmp_path / "questions.jsonl"
    no_answers.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ExnihiloError, match="no usable training examples.*no assistant"):
        run_sft(config(tmp_path, data=str(no_answers), val_fraction=0.0), model_obj=tiny,
                tokenizer=smol_tokenizer)

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{oops\n')
    with pytest.raises(ExnihiloError, match="broken.jsonl:2"):
        run_sft(config(tmp_path, data=str(broken)), model_obj=tiny, tokenizer=smol_tokenizer)

    with pytest.raises(ExnihiloError, match="LoRA target 'qproj' matches no module.*q_proj"):
        run_sft(config(tmp_path, out="bad-target", lora_targets=["qproj"]), model_obj=tiny,
                tokenizer=smol_tokenizer)

    assert not (tmp_path / "out").exists()  # nothing was created by the failures above


def test_out_folder_is_never_overwritten(tmp_path, smol_tokenizer):
    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("mine")
    with pytest.raises(ExnihiloError, match="not empty and holds no exnihilo run"):
        run_sft(config(tmp_path, out="unrelated"), model_obj=fresh_tiny(len(smol_tokenizer)),
                tokenizer=smol_tokenizer)
    assert (unrelated / "notes.txt").read_text() == "mine"

    cfg = config(tmp_path, max_steps=1, val_fraction=0.0)
    run_sft(cfg, model_obj=fresh_tiny(len(smol_tokenizer)), tokenizer=smol_tokenizer)
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    with pytest.raises(ExnihiloError, match="already holds this finished run"):
        run_sft(cfg, resume=True, model_obj=fresh_tiny(len(smol_tokenizer)),
                tokenizer=smol_tokenizer)
    other = config(tmp_path, max_steps=1, val_fraction=0.0, lr=1e-3)
    with pytest.raises(ExnihiloError, match=r"holds a different run \(lr differ"):
        run_sft(other, model_obj=fresh_tiny(len(smol_tokenizer)), tokenizer=smol_tokenizer)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before


def test_cli_rejects_bad_flags_with_one_line(tmp_path):
    import subprocess
    import sys

    data = write_records(tmp_path / "d.jsonl")
    proc = subprocess.run(
        [sys.executable, "-c", "from exnihilo.cli import main; main()", "train", "sft",
         "--data", data, "--out", str(tmp_path / "o"), "--style", "vicuna"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown style 'vicuna'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cli_sft_on_the_real_model(tmp_path):
    """One end-to-end run of the real 135M model: 2 LoRA steps, then the folder loads."""
    from typer.testing import CliRunner

    from exnihilo.cli import app
    from exnihilo.models import load_model

    data = write_records(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "train", "sft", "--data", data, "--out", str(out), "--max-steps", "2",
        "--batch-size", "2", "--mask-prompt", "--val-fraction", "0.25", "--max-length", "128"])
    assert result.exit_code == 0, result.output
    assert "done" in result.output and "val loss" in result.output
    assert str(out) in result.output.replace("\n", "")
    model = load_model(str(out))
    assert model.config.model_type == "llama"
    info = read_run_info(out)
    assert info["base_model"] == "smollm2-135m-instruct" and info["steps"] == 2
