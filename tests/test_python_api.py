"""The Python API: `import exnihilo` stays light, the verbs work on records in memory, and
docs/python-api.md runs top to bottom (scripted engine, tiny random model)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import exnihilo
from exnihilo import api
from exnihilo.errors import ExnihiloError

DOC = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"
pytestmark = pytest.mark.usefixtures("one_thread")


def test_import_is_light_and_lazy():
    code = ("import sys, exnihilo\nassert 'torch' not in sys.modules, 'torch at import'\n"
            "assert 'exnihilo.api' not in sys.modules\nf = exnihilo.filter\n"
            "assert 'exnihilo.api' in sys.modules and 'torch' not in sys.modules\n"
            "print(f.__module__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True).stdout
    assert out.strip() == "exnihilo.api"


def test_verbs_do_not_shadow_modules():
    package = Path(exnihilo.__file__).parent
    modules = {p.stem for p in package.glob("*.py")} | {p.name for p in package.iterdir()
                                                        if (p / "__init__.py").exists()}
    assert set(exnihilo._API) == set(api.__all__)
    assert not set(exnihilo._API) & modules
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        exnihilo.nope  # noqa: B018


def test_load_and_filter_in_memory():
    rows = ["Hi?", {"prompt": "Q", "completion": "A"},
            {"instruction": "Add.", "input": "1+1", "output": "2"}]
    loaded = exnihilo.load(rows)
    assert [[m["role"] for m in r["messages"]] for r in loaded] == [
        ["user"], ["user", "assistant"], ["user", "assistant"]]
    loaded[1]["meta"]["tags"] = {"quality": "good"}
    loaded[2]["meta"]["tags"] = {"quality": "poor"}
    kept = exnihilo.filter(loaded[1:], "quality>=good")
    assert [r["messages"][-1]["content"] for r in kept] == ["A"]
    assert (kept.summary.input_records, kept.summary.output_records) == (2, 1)
    with pytest.raises(ExnihiloError, match=r"records\[0\]: a plain-text record"):
        exnihilo.load([{"text": "raw"}])


def test_function_engine_and_response_map():
    engine = exnihilo.FunctionEngine(lambda m: m[-1]["content"].upper())
    assert engine.chat([[{"role": "user", "content": "hi"}]], None)[0].text == "HI"
    with pytest.raises(ExnihiloError, match="answers chats only"):
        engine.complete(["x"], None)
    assert api._response_map([{"prompt": "p", "response": "r"},
                              {"messages": [{"role": "user", "content": "q"},
                                            {"role": "assistant", "content": "a"}]}]) == {
        "p": "r", "q": "a"}


def python_blocks(text):
    return re.findall(r"```python\n(.*?)```", text, re.DOTALL)


def test_the_walkthrough_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EXNIHILO_NO_PROGRESS", "1")
    blocks = python_blocks(DOC.read_text(encoding="utf-8"))
    assert len(blocks) >= 6
    namespace: dict = {"__name__": "walkthrough"}
    for block in blocks:
        exec(compile(block, f"{DOC.name} block", "exec"), namespace)
    ns = namespace
    assert len(ns["data"]) == 4
    for record in ns["data"]:
        (q, a), (_user, answer) = [int(w) for w in record["messages"][0]["content"].replace(
            "?", "").split() if w.isdigit()], record["messages"]
        assert answer["content"] == f"{q} plus {a} is {q + a}."
    assert [r["meta"]["tags"]["quality"] for r in ns["tagged"]] == ["good"] * 4
    assert len(ns["kept"]) == 4 and len(ns["train_set"]) == 5
    assert ns["run"].steps == 2
    assert (tmp_path / "runs" / "tiny-sft" / "config.json").exists()
    assert (tmp_path / "runs" / ".exnihilo" / "tiny-sft.data.jsonl").exists()  # saved once
    assert ns["answers"][0]["messages"][-1]["content"] == "20 plus 22 is 42."
    assert ns["scores"].summary["mean"] == 85.0
    assert ns["ppl"].summary["scored"] == 5 and ns["ppl"].summary["perplexity"] > 1
    assert ns["ife"].summary["n_prompts"] == 5
    printed = capsys.readouterr().out
    assert "4 of 4 kept" in printed and "mean judge score 85.0" in printed


def test_dedup_in_memory_with_given_vectors():
    import numpy as np

    rows = exnihilo.load([{"prompt": p, "completion": "x"} for p in
                          ("Add two numbers.", "add two numbers.", "Name a colour.",
                           "Name a color.")])
    vectors = np.array([[1, 0], [1, 0], [0, 1], [0.02, 1]], dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    kept = exnihilo.dedup(rows, threshold=0.05, vectors=vectors, method="exact")
    assert [r["messages"][0]["content"] for r in kept] == ["Add two numbers.", "Name a colour."]
    assert kept.summary.exact_duplicates == 1 and kept.summary.near_duplicates == 1


def test_dpo_on_records_in_memory(tmp_path, tiny_llama, smol_tokenizer):
    pairs = [{"prompt": [{"role": "user", "content": f"Say {w}."}],
              "chosen": [{"role": "assistant", "content": w}],
              "rejected": [{"role": "assistant", "content": f"No {w}!"}]}
             for w in ("yes", "blue", "ten", "hi")]
    result = exnihilo.dpo(pairs, tmp_path / "dpo", model_obj=tiny_llama,
                          tokenizer=smol_tokenizer, max_steps=1, batch_size=2,
                          val_fraction=0.0)
    assert result.steps == 1
    saved = exnihilo.load(tmp_path / ".exnihilo" / "dpo.data.jsonl")
    assert [r["chosen"]["content"] for r in saved] == ["yes", "blue", "ten", "hi"]
    assert (tmp_path / "dpo" / "config.json").exists()
