"""GGUF export: hand-computed permutation, exact read-back, metadata, errors, and the round trip
through the real llama.cpp (llama-cpp-python, a test dependency; those tests skip without it)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from exnihilo.errors import ExnihiloError
from exnihilo.export.gguf import (
    CHATML_GO_TEMPLATE,
    PRE_GPT2,
    PRE_SMOLLM,
    chatml_default_system,
    export_gguf,
    gguf_tensor_name,
    llama_permute,
    llama_unpermute,
    pre_tokenizer_name,
    vocab_metadata,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# Digits, runs of spaces, newlines, punctuation, non-ASCII and special tokens: the places
# where two byte-level BPE tokenizers with different split rules would disagree.
TEXTS = [
    "Hello world! The year 2024 had 366 days; pi is 3.14159.",
    "  two  spaces,\tand a tab\n\nthen   three spaces 12  34\n",
    "Ünïcödé — émigré café, naïve 東京 🙂 ok",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n    return x ** 2  # square\n",
]
PASSAGE = (
    "The Python tutorial: Python is an easy to learn, powerful programming language. It has "
    "efficient high-level data structures and a simple but effective approach to "
    "object-oriented programming. Python's elegant syntax and dynamic typing, together with "
    "its interpreted nature, make it an ideal language for scripting and rapid application "
    "development in many areas on most platforms. In 2024, 3 of 4 surveyed users said so.")


def tiny_folder(tmp_path: Path, model, tokenizer, run_info: dict | None = None) -> Path:
    folder = tmp_path / "run"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if run_info is not None:
        (folder / "exnihilo_run.json").write_text(json.dumps(run_info))
    return folder


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, smol_tokenizer):
    """conftest's `tiny_llama` (same seed and config) saved as a trained run folder, built
    once per module: every export of it reads the 49,152-token vocabulary, which is the slow
    part on a busy CPU."""
    import torch
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(smol_tokenizer))).eval()
    folder = tiny_folder(tmp_path_factory.mktemp("tiny"), model, smol_tokenizer,
                         {"kind": "sft", "style": "chat"})
    return folder, model


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    """qtype → the tiny run exported in that type (each written once per module)."""
    out_dir = tmp_path_factory.mktemp("gguf")
    cache: dict[str, Path] = {}

    def get(qtype: str) -> Path:
        if qtype not in cache:
            cache[qtype] = export_gguf(tiny_run[0], out_dir / f"tiny-{qtype}.gguf", qtype).path
        return cache[qtype]

    return get


@pytest.fixture
def run_folder(tiny_run, tmp_path) -> Path:
    """A private copy of the tiny run folder, for tests that write beside it or change it."""
    import shutil

    return Path(shutil.copytree(tiny_run[0], tmp_path / "run"))


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """Reading a GGUF back converts it into the model cache: keep that cache per test."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def read_fields(path: Path) -> tuple[dict, dict]:
    """(metadata scalars and strings, tensor name → GGML type name) of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(path)
    meta = {}
    for key, f in reader.fields.items():
        if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
            meta[key] = len(f.data)
        else:
            meta[key] = f.contents()
    return meta, {t.name: t.tensor_type.name for t in reader.tensors}


# ------------------------------------------------------------------------- pure functions

def test_permute_matches_the_hand_computed_row_order():
    # One head of dimension 4: HF pairs (0,2), (1,3) become llama.cpp's adjacent (0,1), (2,3).
    rows = np.arange(4, dtype=np.float32)[:, None]
    assert llama_permute(rows, 1)[:, 0].tolist() == [0, 2, 1, 3]
    # Two heads of dimension 4 are permuted separately; one of dimension 8 interleaves halves.
    rows8 = np.arange(8, dtype=np.float32)[:, None]
    assert llama_permute(rows8, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert llama_permute(rows8, 1)[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_unpermute_inverts_permute_and_matches_transformers_reader():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.random.default_rng(0).standard_normal((12 * 4, 5)).astype(np.float32)
    for heads in (1, 3, 12):
        permuted = llama_permute(w, heads)
        assert not np.array_equal(permuted, w)
        np.testing.assert_array_equal(llama_unpermute(permuted, heads), w)
        reader = LlamaTensorProcessor()._reverse_permute_weights(permuted, heads, heads)
        np.testing.assert_array_equal(reader, w)


def test_pre_tokenizer_names():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert pre_tokenizer_name(byte_level) == PRE_GPT2
    smollm = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, byte_level]}
    assert pre_tokenizer_name(smollm) == PRE_SMOLLM
    with pytest.raises(ExnihiloError, match="pre-tokenizer"):
        pre_tokenizer_name({"type": "Metaspace", "replacement": "▁"})
    with pytest.raises(ExnihiloError, match="pre-tokenizer"):
        pre_tokenizer_name({**byte_level, "add_prefix_space": True})


def test_vocab_metadata_types_padding_and_special_ids(smol_tokenizer):
    n = len(smol_tokenizer)
    vocab = vocab_metadata(smol_tokenizer, n + 3)  # an embedding padded beyond the tokenizer
    assert len(vocab.tokens) == n + 3
    assert vocab.tokens[-3:] == [f"[PAD{n}]", f"[PAD{n + 1}]", f"[PAD{n + 2}]"]
    assert vocab.token_types[-3:] == [5, 5, 5]  # UNUSED
    assert vocab.tokens[1] == "<|im_start|>" and vocab.token_types[1] == 3  # CONTROL
    assert vocab.token_types[0:17] == [3] * 17  # SmolLM2's 17 special tokens
    assert set(vocab.token_types[17:n]) == {1}  # NORMAL
    assert vocab.special_ids == {"bos": 1, "eos": 2, "unk": 0, "pad": 2}
    assert (vocab.add_bos, vocab.add_eos) == (False, False)
    assert vocab.pre == PRE_GPT2
    assert vocab.merges[0] == "Ġ t" and len(vocab.merges) == 48900
    with pytest.raises(ExnihiloError, match="rows"):
        vocab_metadata(smol_tokenizer, n - 1)


def test_chatml_detection_finds_smollm_default_system(smol_tokenizer):
    assert chatml_default_system(smol_tokenizer, smol_tokenizer.chat_template) == SMOL_SYSTEM
    plain_chatml = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] "
                    "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
                    "{{ '<|im_start|>assistant\n' }}{% endif %}")
    assert chatml_default_system(smol_tokenizer, plain_chatml) == ""
    llama3ish = ("{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
                 "'<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}{% endfor %}")
    assert chatml_default_system(smol_tokenizer, llama3ish) is None


# ------------------------------------------------------------------ writing and reading back

def test_f32_reads_back_exactly_and_f16_within_f16_rounding(tiny_run, exported,
                                                            private_cache):
    import torch

    from exnihilo.models import load_model

    reference = tiny_run[1].state_dict()
    for qtype in ("f32", "f16"):
        back = load_model(str(exported(qtype))).state_dict()
        assert set(back) == set(reference)
        for name, w in reference.items():
            expected = w if qtype == "f32" or w.ndim == 1 else w.to(torch.float16).float()
            assert torch.equal(back[name], expected), (qtype, name)


def test_q8_0_stays_within_half_a_block_step(tiny_run, exported):
    import gguf

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    stored = {t.name: t for t in gguf.GGUFReader(exported("q8_0")).tensors}
    for name, w in tiny_run[1].state_dict().items():
        if name == "lm_head.weight":
            continue  # tied: the embedding
        tensor = stored[gguf_tensor_name(name, name_map)]
        back = gguf.dequantize(tensor.data, tensor.tensor_type).reshape(w.shape)
        if ".q_proj." in name or ".k_proj." in name:
            back = llama_unpermute(back, 4 if ".q_proj." in name else 2)
        if w.ndim == 1:
            assert tensor.tensor_type.name == "F32" and np.array_equal(back, w.numpy())
            continue
        assert tensor.tensor_type.name == "Q8_0"
        blocks = w.numpy().reshape(-1, 32)
        err = np.abs(back.reshape(-1, 32) - blocks)
        step = np.abs(blocks).max(axis=1, keepdims=True) / 127  # Q8_0's per-block step
        assert (err <= 0.6 * step + 1e-7).all(), name  # half a step, plus f16 rounding of it
        assert err.max() > 0  # it did quantize


def test_metadata_tensor_types_and_chat_template(exported, smol_tokenizer):
    out = exported("q4_0")
    meta, types = read_fields(out)
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == 2 and meta["llama.embedding_length"] == 64
    assert meta["llama.attention.head_count"] == 4 and meta["llama.attention.head_count_kv"] == 2
    assert meta["llama.rope.dimension_count"] == 16
    assert meta["llama.vocab_size"] == len(smol_tokenizer)
    assert meta["general.file_type"] == 2  # MOSTLY_Q4_0
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.tokens"] == len(smol_tokenizer)
    assert meta["tokenizer.ggml.eos_token_id"] == smol_tokenizer.eos_token_id
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.chat_template"] == smol_tokenizer.chat_template
    # Tied head: no output.weight. Norms F32; the embedding Q8_0; every other matrix Q4_0.
    assert "output.weight" not in types and len(types) == 2 * 9 + 2
    assert types["token_embd.weight"] == "Q8_0"
    assert types["output_norm.weight"] == types["blk.1.attn_norm.weight"] == "F32"
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == "Q4_0"
    assert sorted(Counter(types.values()).items()) == [("F32", 5), ("Q4_0", 14), ("Q8_0", 1)]
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []


def test_alpaca_run_embeds_the_template_it_was_trained_with(run_folder, smol_tokenizer,
                                                            tmp_path):
    from exnihilo.styles import render_prompt

    (run_folder / "exnihilo_run.json").write_text(json.dumps({"style": "alpaca"}))
    out = tmp_path / "alpaca.gguf"
    result = export_gguf(run_folder, out, "f16", ollama=True)
    messages = [{"role": "user", "content": "Name a prime."}]
    rendered = smol_tokenizer.apply_chat_template(messages, chat_template=result.chat_template,
                                                  tokenize=False, add_generation_prompt=True)
    assert rendered == render_prompt(messages, "alpaca", smol_tokenizer)
    assert read_fields(out)[0]["tokenizer.chat_template"] == result.chat_template
    modelfile = (tmp_path / "Modelfile").read_text()
    assert "### Instruction:\n{{ .Prompt }}\n\n### Response:\n" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile


# ----------------------------------------------------------------------------------- errors

def test_unsupported_architecture_fails_before_writing(tmp_path, tiny_gemma2, smol_tokenizer):
    folder = tiny_folder(tmp_path, tiny_gemma2, smol_tokenizer)
    out = tmp_path / "out" / "gemma.gguf"
    with pytest.raises(ExnihiloError, match="Gemma2ForCausalLM is not supported"):
        export_gguf(folder, out, "f16")
    assert not out.parent.exists()


def test_bad_inputs_fail_with_one_clear_line(run_folder, tmp_path):
    with pytest.raises(ExnihiloError, match="unknown GGUF type 'q3_k'.*q8_0"):
        export_gguf(run_folder, tmp_path / "x.gguf", "q3_k")
    with pytest.raises(ExnihiloError, match="is a folder"):
        export_gguf(run_folder, tmp_path, "f16")
    with pytest.raises(ExnihiloError, match="unknown model"):
        export_gguf(str(tmp_path / "nope"), tmp_path / "x.gguf", "f16")
    (run_folder / "model.safetensors").unlink()
    with pytest.raises(ExnihiloError, match="no safetensors weights"):
        export_gguf(run_folder, tmp_path / "x.gguf", "f16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_error_midway_through_the_tensors_leaves_no_file(run_folder, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(run_folder / "model.safetensors")
    weights["model.layers.1.extra_proj.weight"] = torch.zeros(4, 4)
    save_file(weights, run_folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExnihiloError, match="extra_proj.weight' has no GGUF name"):
        export_gguf(run_folder, tmp_path / "x.gguf", "f16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no file, no temp file


def test_ollama_with_a_non_chatml_template_writes_nothing(run_folder, tmp_path):
    config = json.loads((run_folder / "tokenizer_config.json").read_text())
    (run_folder / "chat_template.jinja").unlink(missing_ok=True)
    config["chat_template"] = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n"
                               "{% endfor %}")
    (run_folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ExnihiloError, match="not ChatML"):
        export_gguf(run_folder, tmp_path / "x.gguf", "f16", ollama=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_cli_writes_the_file_and_a_chatml_modelfile(run_folder, tmp_path):
    from typer.testing import CliRunner

    from exnihilo.cli.export import app

    out = tmp_path / "chat.gguf"
    result = CliRunner().invoke(app, ["gguf", str(run_folder), "-o", str(out), "--type", "q8_0",
                                      "--ollama"])
    assert result.exit_code == 0, result.output
    assert "q8_0" in result.output and "Modelfile" in result.output
    assert read_fields(out)[0]["general.file_type"] == 7  # MOSTLY_Q8_0
    assert (tmp_path / "Modelfile").read_text() == (
        "FROM ./chat.gguf\n\n"
        f'TEMPLATE """{CHATML_GO_TEMPLATE}"""\n'
        f'SYSTEM """{SMOL_SYSTEM}"""\n\n'
        'PARAMETER stop "<|im_end|>"\nPARAMETER stop "<|im_start|>"\n')


# ------------------------------------------------------------------- through llama.cpp itself

def llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    """Next-token logits at every position, from llama.cpp."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(64, len(ids) + 8), n_batch=512,
                          logits_all=True, n_threads=1, verbose=False, seed=0)
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float64)


def hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def mean_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean over positions of KL(p || q), from logits."""
    def log_softmax(x):
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return float((np.exp(lp) * (lp - lq)).sum(axis=-1).mean())


def test_llama_cpp_tokenizes_like_the_hf_tokenizer(exported, smol_tokenizer):
    llama_cpp = pytest.importorskip("llama_cpp")
    out = exported("q8_0")
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, vocab_only=True, verbose=False)
    for text in TEXTS + [PASSAGE]:
        expected = smol_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == expected, text
        assert llm.detokenize(expected, special=True).decode() == text


def test_llama_cpp_chat_template_renders_like_transformers(exported, smol_tokenizer):
    llama_cpp = pytest.importorskip("llama_cpp")
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    out = exported("q8_0")
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, vocab_only=True, verbose=False)
    template = llm.metadata["tokenizer.chat_template"]
    assert template == smol_tokenizer.chat_template
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Name a prime."}]
    formatter = Jinja2ChatFormatter(template, eos_token="<|im_end|>", bos_token="<|im_start|>")
    assert formatter(messages=messages).prompt == smol_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)


def test_llama_cpp_logits_match_transformers(tiny_run, exported, smol_tokenizer):
    pytest.importorskip("llama_cpp")
    ids = smol_tokenizer(PASSAGE, add_special_tokens=False)["input_ids"]
    reference = hf_logits(tiny_run[1], ids)
    qtypes = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
    logits = {q: llama_logits(exported(q), ids) for q in qtypes}
    # f32 is the same computation: any layout mistake (Q/K order, tied head) shows here.
    assert np.abs(logits["f32"] - reference).max() < 1e-3
    top1 = {q: float((x.argmax(-1) == reference.argmax(-1)).mean()) for q, x in logits.items()}
    kl = {q: mean_kl(reference, x) for q, x in logits.items()}
    print(f"tiny model, {len(ids)} positions: top-1 {top1}, mean KL {kl}")
    assert top1["f32"] == 1.0 and top1["f16"] >= 0.99
    assert np.abs(logits["f16"] - reference).max() < 5e-3
    assert kl["f32"] < 1e-7 and kl["f16"] < 1e-5
    assert top1["bf16"] >= 0.95 and kl["bf16"] < 1e-4
    assert all(kl[q] < 1e-3 for q in qtypes)
    # Fewer bits, further from the model (each step halves the rounding step, KL ~ step²).
    assert kl["f16"] < kl["q8_0"] < kl["q5_0"] < kl["q4_0"]
    assert kl["q5_1"] < kl["q4_1"]


@pytest.mark.slow
def test_real_smollm2_f16_and_q8_0_agree_with_transformers(smol_tokenizer, tmp_path):
    """The issue's bar on the real 135M model: f16 top-1 ≥ 99% of positions; q8_0 bounded
    loosely on this short text (benchmarks/export.py: 97% and KL 0.003 on 1,024 positions)."""
    pytest.importorskip("llama_cpp")
    from exnihilo.models import load_model

    model = load_model("smollm2-135m-instruct")
    text = smol_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Describe the Python language in a paragraph."},
         {"role": "assistant", "content": PASSAGE}], tokenize=False)
    ids = smol_tokenizer(text, add_special_tokens=False)["input_ids"]
    reference = hf_logits(model, ids)
    for qtype, min_top1, max_kl in (("f16", 0.99, 1e-3), ("q8_0", 0.9, 2e-2)):
        out = export_gguf("smollm2-135m-instruct", tmp_path / f"smol-{qtype}.gguf", qtype).path
        logits = llama_logits(out, ids)
        top1 = float((logits.argmax(-1) == reference.argmax(-1)).mean())
        kl = mean_kl(reference, logits)
        print(f"SmolLM2-135M {qtype}, {len(ids)} positions: top-1 {top1:.4f}, mean KL {kl:.2e}")
        assert top1 >= min_top1 and kl < max_kl, (qtype, top1, kl)
        out.unlink()
