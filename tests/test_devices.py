"""`--device` and `--dtype auto`: which device auto picks, the one-line error for a device
this machine lacks (before any model loads), the precision policy, and that the CPU path is
exactly what it was. Tests marked `gpu` compare a CUDA run against the CPU one and are
skipped where torch sees no CUDA device."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_llama_config
from exnihilo import devices
from exnihilo.engines.base import SamplingParams
from exnihilo.engines.transformers import TransformersEngine
from exnihilo.errors import ExnihiloError

pytestmark = pytest.mark.usefixtures("one_thread")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

QA = [("What is 2+2?", "4."), ("Name a colour.", "Blue."), ("Say hi.", "Hi there!"),
      ("Capital of France?", "Paris."), ("Opposite of hot?", "Cold."),
      ("Plural of mouse?", "Mice."), ("First letter?", "A."), ("Days in a week?", "Seven.")]
PROMPTS = ["<|im_start|>user\nHello there, how are", "Short", "A longer prompt, with more "
           "tokens in it than the others, so that left padding matters"]


@pytest.fixture
def machine(monkeypatch):
    """Pretend to be a machine with the given accelerators (and no $EXNIHILO_DEVICE)."""
    monkeypatch.setenv(devices.ENV, "auto")  # recorded, so whatever a test sets is undone
    monkeypatch.delenv(devices.ENV)

    def have(cuda: bool = False, mps: bool = False, count: int = 1) -> None:
        monkeypatch.setattr(devices, "cuda_available", lambda: cuda)
        monkeypatch.setattr(devices, "mps_available", lambda: mps)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count if cuda else 0)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return have


# ---------------------------------------------------------------------------- resolving

def test_auto_picks_cuda_then_mps_then_cpu(machine):
    machine(cuda=True, mps=True)
    assert devices.resolve_device("auto") == torch.device("cuda", 0)
    assert devices.resolve_device(None) == torch.device("cuda", 0)  # the default is auto
    machine(mps=True)
    assert devices.resolve_device("auto") == torch.device("mps")
    machine()
    assert devices.resolve_device("auto") == torch.device("cpu")
    assert devices.available_devices() == ["cpu"]


def test_explicit_devices_resolve_with_their_index(machine):
    machine(cuda=True, count=2)
    assert devices.resolve_device("cuda") == torch.device("cuda", 0)
    assert devices.resolve_device("CUDA:1") == torch.device("cuda", 1)
    assert devices.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ExnihiloError, match=r"--device cuda:2: this machine has 2 CUDA"):
        devices.resolve_device("cuda:2")


@pytest.mark.parametrize("name, kind", [("cuda", "CUDA"), ("mps", "MPS")])
def test_an_unavailable_device_is_a_one_line_error_naming_the_option(machine, name, kind):
    machine()
    with pytest.raises(ExnihiloError) as e:
        devices.resolve_device(name)
    message = str(e.value)
    assert message.startswith(f"--device {name}: no {kind} device") and "\n" not in message
    assert "available: cpu" in message


@pytest.mark.parametrize("name", ["gpu", "cpu:0", "cuda:x", ""])
def test_unknown_device_names_are_refused(machine, name):
    machine(cuda=True)
    with pytest.raises(ExnihiloError, match="--device .*expected one of auto, cpu, cuda, mps"):
        devices.resolve_device(name)


def test_default_device_follows_set_default_and_the_environment(machine, monkeypatch):
    machine()
    assert devices.default_device() == torch.device("cpu")
    assert devices.set_default_device(None) is None  # nothing set: nothing to check
    assert devices.set_default_device("cpu") == torch.device("cpu")
    import os

    assert os.environ[devices.ENV] == "cpu"  # child processes inherit it
    monkeypatch.setenv(devices.ENV, "cuda")
    with pytest.raises(ExnihiloError, match="--device cuda"):
        devices.default_device()
    with pytest.raises(ExnihiloError, match="--device cuda"):
        devices.set_default_device(None)  # a bad $EXNIHILO_DEVICE fails at startup too
    machine(cuda=True)
    monkeypatch.setenv(devices.ENV, "cuda")
    assert devices.default_device() == torch.device("cuda", 0)


# ----------------------------------------------------------------------------- precision

def test_dtype_policy(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert devices.default_dtype_for(cpu) == "float32"
    assert devices.inference_dtype("auto", cpu) == "float32"
    assert devices.training_dtypes("auto", cpu) == ("float32", None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert devices.default_dtype_for(gpu) == "bfloat16"
    assert devices.inference_dtype("auto", gpu) == "bfloat16"
    assert devices.inference_dtype("float32", gpu) == "float32"  # explicit wins
    # Training keeps float32 master weights and autocasts; an explicit dtype means weights.
    assert devices.training_dtypes("auto", gpu) == ("float32", "bfloat16")
    assert devices.training_dtypes("bfloat16", gpu) == ("bfloat16", None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert devices.training_dtypes("auto", gpu) == ("float32", None)
    assert devices.default_dtype_for(torch.device("mps")) == "float32"


def test_sampled_decoding_dtype_is_bf16_only_for_auto_on_a_native_bf16_cpu(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.setenv("EXNIHILO_CPU_BF16", "1")
    assert devices.cpu_native_bf16()
    assert devices.sampling_dtype("auto", cpu) == "bfloat16"
    assert devices.sampling_dtype("float32", cpu) is None  # explicit wins
    assert devices.sampling_dtype("auto", gpu) is None  # a GPU loads bf16 weights instead
    assert devices.training_dtypes("auto", cpu) == ("float32", None)  # training unchanged
    monkeypatch.setenv("EXNIHILO_CPU_BF16", "0")
    assert not devices.cpu_native_bf16()
    assert devices.sampling_dtype("auto", cpu) is None
    monkeypatch.delenv("EXNIHILO_CPU_BF16")
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text().split() if cpuinfo.exists() else []
    if flags:  # torch's probes agree with what the kernel reports
        assert devices.cpu_native_bf16() == ("avx512_bf16" in flags or "amx_tile" in flags)


def test_autocast_is_a_no_op_without_a_dtype_and_real_with_one():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    cpu = torch.device("cpu")
    with devices.autocast(cpu, None):
        plain = a @ b
    with devices.autocast(cpu, "bfloat16"):
        mixed = a @ b
    assert plain.dtype == torch.float32 and torch.equal(plain, a @ b)
    assert mixed.dtype == torch.bfloat16
    assert torch.allclose(mixed.float(), plain, rtol=2e-2, atol=2e-2)


def test_to_device_moves_tensors_only_and_copies_nothing_in_place():
    batch = {"input_ids": torch.tensor([[1, 2]]), "note": "kept"}
    assert devices.to_device(batch, torch.device("cpu")) is batch  # the CPU path: no copy
    moved = devices.to_device(batch, torch.device("meta"))
    assert moved["input_ids"].device.type == "meta" and moved["note"] == "kept"
    assert batch["input_ids"].device.type == "cpu"  # the caller's batch is untouched


def test_model_device_and_place_model(tiny_llama):
    assert devices.model_device(tiny_llama) == torch.device("cpu")
    assert devices.place_model(tiny_llama, None) is tiny_llama
    assert devices.place_model(tiny_llama, "cpu") is tiny_llama
    assert devices.model_device(torch.nn.Module()) == torch.device("cpu")


def test_load_model_refuses_an_unavailable_device_before_reading_weights(machine,
                                                                        monkeypatch):
    from exnihilo import models

    machine()
    monkeypatch.setattr(models, "resolve_model", lambda name: pytest.fail("weights read"))
    with pytest.raises(ExnihiloError, match="--device cuda: no CUDA device"):
        models.load_model("smollm2-135m-instruct", device="cuda")
    with pytest.raises(ExnihiloError, match="unknown dtype 'fp8'"):
        models.load_model("smollm2-135m-instruct", dtype="fp8")


# ------------------------------------------------------------------------------------ CLI

def test_cli_device_error_comes_before_any_model_loads(machine, monkeypatch, capsys, tmp_path):
    from exnihilo import models
    from exnihilo.cli import app
    from exnihilo.cli.common import run_app

    machine()
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}))
    with pytest.raises(SystemExit) as e:
        run_app(app, ["--device", "cuda", "eval", "perplexity", "--data", str(data)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --device cuda: no CUDA device") and "\n" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cli_device_from_the_environment_in_a_real_process():
    from helpers import run_cli

    r = run_cli("models", env_extra={"EXNIHILO_DEVICE": "cuda"}, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: --device cuda: no CUDA device")


# ------------------------------------------------------------------ the CPU path unchanged

def write_records(path):
    with open(path, "w") as f:
        for q, a in QA:
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": a}]}) + "\n")
    return str(path)


def fresh_tiny(vocab_size):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(vocab_size))


def sft(tmp_path, tokenizer, out, **overrides):
    from exnihilo.train.sft import SFTConfig, run_sft

    cfg = dict(data=write_records(tmp_path / "data.jsonl"), out=str(tmp_path / out),
               style="phi3", batch_size=4, val_fraction=0.25, eval_every=1, save_every=0,
               max_length=64, seed=0, epochs=2, max_steps=3, lr=5e-3, lora_r=4,
               lora_dropout=0.1)
    cfg.update(overrides)
    run_sft(SFTConfig(**cfg), model_obj=fresh_tiny(len(tokenizer)), tokenizer=tokenizer)
    metrics = [json.loads(line) for line in
               (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
    return metrics, load_file(str(tmp_path / out / "model.safetensors"))


def test_sft_on_cpu_is_the_default_run_bit_for_bit(tmp_path, smol_tokenizer, machine,
                                                   monkeypatch):
    """device "cpu" + dtype float32 (what runs always did) and the new defaults (device from
    the process default, dtype auto) give the same losses and the same bytes on a CPU
    without native bf16 (with it, auto multiplies frozen weights in bf16: test_frozen_bf16)."""
    machine()
    monkeypatch.setenv("EXNIHILO_CPU_BF16", "0")
    old_metrics, old_weights = sft(tmp_path, smol_tokenizer, "explicit", device="cpu",
                                   dtype="float32")
    new_metrics, new_weights = sft(tmp_path, smol_tokenizer, "default")
    assert [m["loss"] for m in new_metrics] == [m["loss"] for m in old_metrics]
    assert [m.get("val_loss") for m in new_metrics] == [m.get("val_loss") for m in old_metrics]
    assert len(new_metrics) == 3
    for key in old_weights:
        assert torch.equal(old_weights[key], new_weights[key]), key
    run_config = json.loads((tmp_path / "default" / "run_config.json").read_text())
    assert "device" not in run_config  # a run may resume on another device


def test_cpu_checkpoints_hold_no_cuda_rng_state():
    from exnihilo.train.loop import rng_state, set_rng_state

    state = rng_state()
    assert set(state) == {"torch", "python", "python_version", "python_gauss"}
    first = torch.rand(3)
    set_rng_state(state)
    assert torch.equal(torch.rand(3), first)


def test_engine_on_cpu_generates_what_it_did(tiny_llama, smol_tokenizer):
    """device="cpu" changes nothing: greedy text equals transformers' own generate, and
    sampled text (per-row seeds) equals the engine without a device."""
    plain = TransformersEngine(model_obj=tiny_llama, tokenizer=smol_tokenizer, batch_size=8)
    on_cpu = TransformersEngine(model_obj=tiny_llama, tokenizer=smol_tokenizer, batch_size=8,
                                device="cpu")
    for engine in (plain, on_cpu):
        engine._stop_ids = {-1}  # a random model may emit eos early; compare full lengths
    greedy = SamplingParams(temperature=0.0, max_new_tokens=5)
    for prompt, out in zip(PROMPTS, on_cpu.complete(PROMPTS, greedy), strict=True):
        ids = torch.tensor([smol_tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        expected = tiny_llama.generate(ids, attention_mask=torch.ones_like(ids),
                                       max_new_tokens=5, do_sample=False, eos_token_id=None,
                                       pad_token_id=smol_tokenizer.pad_token_id)
        assert out.text == smol_tokenizer.decode(expected[0, ids.shape[1]:],
                                                 skip_special_tokens=False)
    sampled = SamplingParams(temperature=0.9, max_new_tokens=6, seed=3)
    assert ([c.text for c in on_cpu.complete(PROMPTS, sampled)]
            == [c.text for c in plain.complete(PROMPTS, sampled)])


# -------------------------------------------------------------------------------- CUDA

@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-4), ("auto", 3e-2)])
@pytest.mark.gpu
@needs_cuda
def test_sft_on_cuda_matches_the_cpu(tmp_path, smol_tokenizer, dtype, tolerance):
    """Full finetuning without dropout: the same losses on CUDA as on the CPU, to float32
    rounding (float32) or to bfloat16 autocast's (auto on a GPU with bfloat16)."""
    common = dict(full=True, lora_dropout=0.0, dtype=dtype)
    cpu_metrics, cpu_weights = sft(tmp_path, smol_tokenizer, "cpu", device="cpu", **common)
    gpu_metrics, gpu_weights = sft(tmp_path, smol_tokenizer, "cuda", device="cuda", **common)
    for a, b in zip(cpu_metrics, gpu_metrics, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=tolerance)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=tolerance)
    # AdamW moves a weight by ~lr whatever its gradient's size, so a near-zero gradient whose
    # sign differs between devices moves it the other way: compare the mean, not each value.
    lr = 5e-3
    for key in cpu_weights:
        gap = (cpu_weights[key] - gpu_weights[key].float()).abs().mean()
        assert gap < (0.05 if dtype == "float32" else 0.5) * lr, key


@pytest.mark.gpu
@needs_cuda
def test_resume_on_cuda_restores_dropout_and_optimizer(tmp_path, smol_tokenizer):
    """LoRA dropout draws from the CUDA generator: a run killed after step 2 and resumed
    from its checkpoint (CUDA RNG and optimizer state inside) ends where the whole run does."""
    from exnihilo.train.sft import SFTConfig, run_sft

    class Killed(Exception):
        pass

    def kill_at_3(state):
        if state.step == 3:
            raise Killed

    common = dict(max_steps=4, save_every=2, device="cuda", dtype="float32", batch_size=2)
    _, whole = sft(tmp_path, smol_tokenizer, "whole", **common)
    cfg = SFTConfig(data=str(tmp_path / "data.jsonl"), out=str(tmp_path / "cut"), style="phi3",
                    val_fraction=0.25, eval_every=1, max_length=64, seed=0, epochs=2, lr=5e-3,
                    lora_r=4, lora_dropout=0.1, **common)
    with pytest.raises(Killed):
        run_sft(cfg, model_obj=fresh_tiny(len(smol_tokenizer)), tokenizer=smol_tokenizer,
                on_step=kill_at_3)
    run_sft(cfg, resume=True, model_obj=fresh_tiny(len(smol_tokenizer)),
            tokenizer=smol_tokenizer)
    resumed = load_file(str(tmp_path / "cut" / "model.safetensors"))
    for key in whole:
        assert torch.allclose(whole[key], resumed[key], atol=1e-6), key


@pytest.mark.gpu
@needs_cuda
def test_engine_and_perplexity_on_cuda_match_the_cpu(tiny_llama, smol_tokenizer):
    from exnihilo.evaluate.perplexity import perplexity

    cpu = TransformersEngine(model_obj=tiny_llama, tokenizer=smol_tokenizer, device="cpu")
    import copy

    gpu = TransformersEngine(model_obj=copy.deepcopy(tiny_llama), tokenizer=smol_tokenizer,
                             device="cuda")
    assert devices.model_device(gpu.model).type == "cuda"
    for engine in (cpu, gpu):
        engine._stop_ids = {-1}
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    assert ([c.text for c in gpu.complete(PROMPTS, greedy)]
            == [c.text for c in cpu.complete(PROMPTS, greedy)])
    convs = [[{"role": "user", "content": q}] for q, _ in QA[:3]]
    cpu_lp = cpu.reply_logprobs(convs, [a for _, a in QA[:3]])
    gpu_lp = gpu.reply_logprobs(convs, [a for _, a in QA[:3]])
    for (a, n), (b, m) in zip(cpu_lp, gpu_lp, strict=True):
        assert n == m and b == pytest.approx(a, abs=1e-3)
    records = [{"id": str(i), "messages": [{"role": "user", "content": q},
                                           {"role": "assistant", "content": a}]}
               for i, (q, a) in enumerate(QA)]
    _, on_cpu = perplexity(cpu.model, smol_tokenizer, records, style="chat")
    _, on_gpu = perplexity(gpu.model, smol_tokenizer, records, style="chat")
    assert on_gpu["mean_nll"] == pytest.approx(on_cpu["mean_nll"], abs=1e-3)
