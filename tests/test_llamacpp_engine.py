"""The in-process llama.cpp engine (`--engine llamacpp`) against llama.cpp itself.

Oracles: llama-cpp-python's own single-sequence greedy decode (`Llama.create_completion`
at temperature 0, same GGUF, same flash-attention setting) for rows decoded together in one
batch; for sampling, the same row decoded alone. Marked `server` (needs
scripts/test-deps/llama-server.sh, as the llama.cpp server tests), so `make test-fast`
leaves them out; the option checks at the bottom need no model and run everywhere.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
from tests.helpers import run_cli

from exnihilo.engines.base import SamplingParams
from exnihilo.errors import ExnihiloError

MODEL = "smollm2-135m-instruct"
QUESTIONS = ["What is 2+2?", "Name a color.", "Say hi.", "Why is the sky blue?",
             "Write a haiku about rain.", "List three fruits."]
needs_llama = pytest.mark.server


def conv(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


@pytest.fixture(scope="module")
def engine():
    """The embedded GGUF as it is (Q4_1), 8 slots, one thread."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.fail("llama-cpp-python is not installed: run scripts/test-deps/llama-server.sh")
    from exnihilo.engines.llamacpp import LlamaCppEngine

    eng = LlamaCppEngine(MODEL, batch_size=8, threads=1, weights=None)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def reference(engine):
    """llama.cpp's own single-sequence path on the same file."""
    import llama_cpp

    ref = llama_cpp.Llama(str(engine.gguf), n_ctx=1024, n_threads=1, flash_attn=True,
                          verbose=False)
    yield ref
    ref.close()


def prompt_ids(engine, questions: list[str]) -> list[list[int]]:
    from exnihilo.templates import render

    return [engine.tokenize(render(engine.tokenizer, conv(q), add_generation_prompt=True))
            for q in questions]


@needs_llama
def test_prompt_tokens_match_the_hf_tokenizer(engine):
    from exnihilo.templates import render

    text = render(engine.tokenizer, conv("Name a color."), add_generation_prompt=True)
    assert engine.tokenize(text) == engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert engine.detokenize(engine.tokenize("Héllo wörld")) == "Héllo wörld"


@needs_llama
def test_greedy_rows_in_one_batch_equal_llama_cpp_single_sequence(engine, reference):
    import llama_cpp
    import numpy as np

    ids = prompt_ids(engine, QUESTIONS[:4])
    params = SamplingParams(temperature=0.0, max_new_tokens=32)
    outs = engine.generate_ids(ids, params)  # four rows, one batch
    for p, out in zip(ids, outs, strict=True):
        want = reference.create_completion(p, max_tokens=32, temperature=0.0)["choices"][0]
        assert out.text == want["text"]
        assert out.finish_reason == want["finish_reason"]
    # Greedy is argmax: the first reply token is the top logit of the prompt's last position.
    reference.reset()
    reference.eval(ids[0])
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(reference.ctx, -1),
                                   shape=(reference.n_vocab(),))
    first = int(np.argmax(logits))
    assert engine.tokenize(outs[0].text)[0] == first
    finished = [o for o in outs if o.finish_reason == "stop"]
    assert finished and all("<|im_end|>" not in o.text for o in finished)


@needs_llama
def test_sampled_row_is_the_same_alone_and_in_a_batch_of_eight(engine):
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, max_new_tokens=24)
    convs = [conv(q) for q in QUESTIONS + ["Say hi.", "Explain gravity."]]
    seeds = [101, 7, 8, 9, 10, 11, 12, 13]
    together = engine.chat(convs, params, seeds=seeds)
    alone = engine.chat(convs[:1], params, seeds=seeds[:1])
    assert alone[0].text == together[0].text
    assert alone[0].completion_tokens == together[0].completion_tokens
    last = engine.chat(convs[-1:], params, seeds=seeds[-1:])
    assert last[0].text == together[-1].text
    # The seed matters: the same prompt (row 2 and row 6 are both "Say hi.") under other
    # seeds gives other text, and the same seed gives the same text.
    again = engine.chat([conv("Say hi.")] * 3, params, seeds=[8, 8, 999])
    assert again[0].text == again[1].text == together[2].text
    assert len({o.text for o in engine.chat([conv("Say hi.")] * 4, params,
                                            seeds=[1, 2, 3, 4])}) > 1


@needs_llama
def test_freed_slots_are_reused_and_prefill_is_chunked(engine):
    """Two slots for six prompts (each finished row's KV cells cleared, its slot refilled),
    and a 16-token batch (prompts prefilled in chunks): both equal the 8-slot run."""
    from exnihilo.engines.llamacpp import LlamaCppEngine

    params = SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=20, seed=3)
    convs = [conv(q) for q in QUESTIONS]
    want = engine.chat(convs, params)
    small = LlamaCppEngine(MODEL, batch_size=2, threads=1, weights=None,
                           tokenizer=engine.tokenizer, n_batch=16)
    try:
        got = small.chat(convs, params)
    finally:
        small.close()
    assert [o.text for o in got] == [o.text for o in want]
    assert [o.finish_reason for o in got] == [o.finish_reason for o in want]


@needs_llama
def test_stop_strings_and_max_new_tokens_end_rows(engine):
    greedy = SamplingParams(temperature=0.0, max_new_tokens=40)
    full = engine.chat([conv("What is 2+2?")], greedy)[0]
    assert full.finish_reason == "stop" and len(full.text.split()) > 3
    word = full.text.split()[2]
    stopped = engine.chat([conv("What is 2+2?")],
                          greedy.model_copy(update={"stop": [word]}))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[:full.text.find(word)]
    cut = engine.chat([conv("What is 2+2?"), conv("Why is the sky blue?")],
                      greedy.model_copy(update={"max_new_tokens": 3}))
    assert [c.finish_reason for c in cut] == ["length", "length"]
    assert [c.completion_tokens for c in cut] == [3, 3]
    assert full.text.startswith(cut[0].text)


@needs_llama
def test_requantized_weights_are_cached_and_agree(engine, tmp_path, monkeypatch):
    from exnihilo.engines.llamacpp import requantized_gguf

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = requantized_gguf(engine.gguf, "f16")
    assert first.read_bytes()[:4] == b"GGUF" and first.parent.parent == tmp_path / "exnihilo"
    stamp = first.stat().st_mtime_ns
    assert requantized_gguf(engine.gguf, "f16") == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temp file left
    with pytest.raises(ExnihiloError, match="q3_k"):
        requantized_gguf(engine.gguf, "q3_k")


@needs_llama
def test_magpie_through_the_cli(tmp_path):
    out = tmp_path / "magpie.jsonl"
    args = ["synth", "magpie", "-n", "2", "-o", str(out), "--engine", "llamacpp",
            "--batch-size", "8", "--seed", "1", "--instruction-max-tokens", "48",
            "--response-max-tokens", "96", "--system",
            "You are a helpful assistant. Every answer is one short sentence."]
    done = run_cli(*args, env_extra={"EXNIHILO_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2
    for r in records:
        roles = [m["role"] for m in r["messages"]]
        assert roles == ["system", "user", "assistant"]
        assert all(m["content"].strip() for m in r["messages"])
        assert "<|im_end|>" not in json.dumps(r["messages"])
    assert "llamacpp:smollm2-135m-instruct" in out.read_text()
    before = out.read_text()
    again = run_cli(*args, env_extra={"EXNIHILO_THREADS": "1"})  # resumes: nothing to do
    assert again.returncode == 0, again.stderr[-2000:]
    assert out.read_text() == before


# ----------------------------------------------------------------- no model needed

def test_missing_llama_cpp_python_is_one_line_before_loading(monkeypatch, tmp_path):
    from exnihilo.assemble import build_engine
    from exnihilo.synth.magpie import MagpieJob, validate_magpie_job

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    job = MagpieJob(n=1, out=tmp_path / "m.jsonl", engine="llamacpp")
    with pytest.raises(ExnihiloError, match=r"pip install 'exnihilo\[llamacpp\]'") as e:
        validate_magpie_job(job)
    assert "\n" not in str(e.value)
    with pytest.raises(ExnihiloError, match="llama-cpp-python"):
        build_engine("llamacpp", MODEL)


def test_bad_model_and_weights_are_refused(tmp_path):
    from exnihilo.engines.llamacpp import resolve_gguf, seed32

    with pytest.raises(ExnihiloError, match="does not exist"):
        resolve_gguf(str(tmp_path / "none.gguf"))
    with pytest.raises(ExnihiloError, match="embedded model name"):
        resolve_gguf(str(tmp_path))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"NOPE" + bytes(16))
    with pytest.raises(ExnihiloError, match="not a GGUF"):
        resolve_gguf(str(fake))
    from exnihilo.assemble import check_engine

    with pytest.raises(ExnihiloError, match="--dtype"):
        check_engine("llamacpp", None, "int3")
    # llama.cpp's dist sampler reads 0xFFFFFFFF as "pick a random seed": never produced.
    seeds = {seed32(s) for s in range(5000)}
    assert 0xFFFFFFFF not in seeds and len(seeds) == 5000
    assert all(0 <= s < 2**32 for s in seeds)
