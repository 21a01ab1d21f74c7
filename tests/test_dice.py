"""`train dice` on tiny models with a scripted sampler: iterations chain (π_t, ρ_t = π_{t−1}),
replay mixing, manifests, and a run killed mid-sampling and mid-training that resumes to the
same final weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_llama_config
from exnihilo.engines.base import Completion
from exnihilo.errors import ExnihiloError
from exnihilo.train.dice import DiceConfig, iteration_dir, run_dice

pytestmark = pytest.mark.usefixtures("one_thread")

ANSWERS = ["Yes.", "No, never.", "Maybe so, friend.", "It is four.", "Blue like the sky.",
           "I do not know that one.", "Paris!", "Seven days make a week."]


class Sampler:
    name = "scripted"

    def __init__(self, log, die_after=None):
        self.log, self.die_after = log, die_after

    def chat(self, conversations, params, seeds=None):
        self.log.append(len(conversations))
        if self.die_after is not None and len(self.log) > self.die_after:
            raise RuntimeError("killed while sampling")
        return [Completion(ANSWERS[s % len(ANSWERS)], 3, 3, "stop") for s in seeds]


def model_folders(tmp_path, tokenizer):
    from transformers import LlamaForCausalLM

    folders = {}
    for name, seed in (("ref0", 1), ("pi0", 2)):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_llama_config(len(tokenizer)))
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        folders[name] = str(tmp_path / name)
    (tmp_path / "pi0" / "exnihilo_run.json").write_text(json.dumps(
        {"kind": "dpo", "base_model": folders["ref0"]}))
    return folders


def write_prompts(path, n=6):
    path.write_text("".join(json.dumps({"prompt": f"Question number {i}?"}) + "\n"
                            for i in range(n)))
    return str(path)


def write_offline(path, n=10):
    path.write_text("".join(json.dumps({"prompt": f"Old question {i}?", "chosen": "Good.",
                                        "rejected": "Bad answer."}) + "\n" for i in range(n)))
    return str(path)


def dice_config(tmp_path, folders, out, **overrides):
    base = dict(model=folders["pi0"], prompts=write_prompts(tmp_path / "q.jsonl"),
                out=str(tmp_path / out), iterations=2, n=4, alpha_step=0.01, replay=0.5,
                offline=write_offline(tmp_path / "off.jsonl"), max_new_tokens=8,
                dpo=dict(batch_size=2, lr=1e-2, beta=0.5, val_fraction=0.0, save_every=1,
                         lora_r=4, lora_dropout=0.0))
    base.update(overrides)
    return DiceConfig(**base)


class Killed(Exception):
    pass


def test_dice_chains_iterations_and_resumes_from_any_stage(tmp_path, smol_tokenizer):
    folders = model_folders(tmp_path, smol_tokenizer)
    calls = []
    manifests = run_dice(dice_config(tmp_path, folders, "whole"), lambda m: Sampler(calls),
                         tokenizer=smol_tokenizer)
    whole = tmp_path / "whole"
    assert [m["iteration"] for m in manifests] == [1, 2]
    assert manifests[0]["policy"] == folders["pi0"]
    assert manifests[0]["reference"] == folders["ref0"]  # the run's recorded base model
    assert manifests[1]["policy"] == str(iteration_dir(whole, 1) / "model")
    assert manifests[1]["reference"] == folders["pi0"]  # ρ_t = π_{t−1}
    for m in manifests:
        assert set(m["stages"]) == {"pairs", "mix", "dpo"}
        assert m["stages"]["pairs"]["pairs"] == 6
        # DICE: n_gen = min(⌊10 offline · (1 − 0.5)⌋, 6) = 5 new, n_off = 5 replayed.
        assert m["stages"]["mix"]["pairs"] == 10
    mixed = [json.loads(line) for line in
             (iteration_dir(whole, 1) / "train_pairs.jsonl").read_text().splitlines()]
    assert sum(r["meta"].get("source") == "synth-pairs" for r in mixed) == 5

    # Killed while sampling iteration 1, then while training iteration 2: resumes each time.
    cut = dice_config(tmp_path, folders, "cut")
    with pytest.raises(RuntimeError, match="killed while sampling"):
        run_dice(cut, lambda m: Sampler([], die_after=1), tokenizer=smol_tokenizer)
    assert not (iteration_dir(tmp_path / "cut", 1) / "manifest.json").exists()
    steps = {"n": 0}

    def kill_in_iteration_2(state):
        steps["n"] += 1
        if steps["n"] == 5 + 2:  # iteration 1: 10 pairs / batch 2; then iteration 2's step 2
            raise Killed
    with pytest.raises(Killed):
        run_dice(cut, lambda m: Sampler([]), on_step=kill_in_iteration_2,
                 tokenizer=smol_tokenizer)
    assert "dpo" in json.loads((iteration_dir(tmp_path / "cut", 1) / "manifest.json")
                               .read_text())["stages"]
    assert (iteration_dir(tmp_path / "cut", 2) / "model" / "checkpoints").is_dir()
    run_dice(cut, lambda m: Sampler([]), tokenizer=smol_tokenizer)
    a = load_file(str(iteration_dir(whole, 2) / "model" / "model.safetensors"))
    b = load_file(str(iteration_dir(tmp_path / "cut", 2) / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dice_refuses_bad_setups(tmp_path, smol_tokenizer):
    folders = model_folders(tmp_path, smol_tokenizer)
    with pytest.raises(ExnihiloError, match="--offline"):
        run_dice(dice_config(tmp_path, folders, "o", offline=None), lambda m: Sampler([]),
                 tokenizer=smol_tokenizer)
    (tmp_path / "pi0" / "exnihilo_run.json").unlink()
    with pytest.raises(ExnihiloError, match="--reference"):
        run_dice(dice_config(tmp_path, folders, "o"), lambda m: Sampler([]),
                 tokenizer=smol_tokenizer)
