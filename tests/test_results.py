"""`<OUT>.results.json`: one schema for every eval and curate run (config, versions,
template hashes, metrics), checked on real CLI runs that need no model."""

import dataclasses
import hashlib
import json
import math

import pytest
import typer
from typer.testing import CliRunner

from exnihilo import results
from exnihilo.records import make_record, write_jsonl_atomic


def check_schema(path, command):
    """Every key present with its type; strict JSON (no NaN)."""
    text = path.read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert tuple(data) == results.REQUIRED_KEYS
    assert data["schema"] == results.SCHEMA and data["command"] == command
    assert data["created"].endswith("Z") and len(data["created"]) == 20
    assert isinstance(data["config"], dict) and isinstance(data["metrics"], dict)
    assert set(data["versions"]) == {"python", *results.VERSIONED}
    assert data["versions"]["exnihilo"]
    for entry in data["inputs"]:
        with open(entry["path"], "rb") as f:
            assert entry["sha256"] == hashlib.sha256(f.read()).hexdigest()
    return data


def test_json_safe_and_write_results(tmp_path):
    @dataclasses.dataclass
    class Summary:
        kept: int
        mean: float
        interval: tuple

    inp = tmp_path / "in.jsonl"
    inp.write_text("{}\n")
    path = results.write_results(tmp_path / "out.jsonl", "curate x",
                                 {"s": Summary(3, math.nan, (0.25, math.inf))}, inputs=[inp],
                                 config={"threshold": 0.5, "path": tmp_path})
    assert path == tmp_path / ".exnihilo" / "out.jsonl.results.json"
    data = check_schema(path, "curate x")
    assert data["metrics"] == {"s": {"kept": 3, "mean": None, "interval": [0.25, None]}}
    assert data["config"] == {"threshold": 0.5, "path": str(tmp_path)}
    assert data["inputs"] == [{"path": str(inp), "sha256": hashlib.sha256(b"{}\n").hexdigest(),
                               "bytes": 3}]


def test_prompt_hash_follows_the_prompt_text(monkeypatch):
    from exnihilo.evaluate import judging

    before = results.prompt_hash("judge")
    assert before == results.prompt_hash("judge") and len(before) == 16
    assert len({before, results.prompt_hash("pairwise"), results.prompt_hash("tag")}) == 3
    original = judging.judge_prompt
    monkeypatch.setattr(judging, "judge_prompt", lambda *a: original(*a) + " Be strict.")
    assert results.prompt_hash("judge") != before


def test_model_template_hash_reads_the_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    assert results.model_template_hash(str(tmp_path)) == \
        hashlib.sha256(template.encode()).hexdigest()[:16]
    (tmp_path / "chat_template.jinja").write_text("other")  # the newer file wins, as in HF
    assert results.model_template_hash(str(tmp_path)) == results.text_hash("other")
    assert results.model_template_hash("openai-server-model") is None


def test_curate_filter_writes_results(tmp_path):
    from exnihilo.cli.curate import app

    rows = [make_record([{"role": "user", "content": f"q{i}"},
                         {"role": "assistant", "content": "a" * (i + 1)}],
                        {"tags": {"quality": q}}) for i, q in enumerate(["good", "poor", "good"])]
    write_jsonl_atomic(tmp_path / "in.jsonl", rows)
    out = tmp_path / "kept.jsonl"
    res = CliRunner().invoke(app, ["filter", str(tmp_path / "in.jsonl"), "-o", str(out),
                                   "--where", "quality>=good"])
    assert res.exit_code == 0, res.output
    data = check_schema(results.results_path(out), "curate filter")
    assert data["config"]["where"] == ["quality>=good"] and data["config"]["missing"] == "error"
    assert data["metrics"]["input_records"] == 3 and data["metrics"]["output_records"] == 2
    assert data["output"] == str(out)


def test_ifeval_writes_results(tmp_path):
    from exnihilo.cli.ifeval import ifeval_command

    app = typer.Typer()
    app.command()(ifeval_command)
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"key": 1, "prompt": "Say hi without commas.",
                               "instruction_id_list": ["punctuation:no_comma"],
                               "kwargs": [{}]}) + "\n")
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"prompt": "Say hi without commas.", "response": "hi, x"})
                       + "\n")
    out = tmp_path / "ife.jsonl"
    res = CliRunner().invoke(app, ["--responses", str(answers), "--input", str(inp), "-o",
                                   str(out), "--resamples", "100"])
    assert res.exit_code == 0, res.output
    data = check_schema(results.results_path(out), "eval ifeval")
    assert [e["path"] for e in data["inputs"]] == [str(inp), str(answers)]
    assert data["config"]["resamples"] == 100
    assert data["metrics"]["n_prompts"] == 1
    assert data["metrics"]["strict"]["prompt_level"]["value"] == 0.0  # "hi, x" has a comma
    assert data["metrics"]["loose"]["prompt_level"]["value"] == 0.0
