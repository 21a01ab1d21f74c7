"""`export data`: every format reads back through `read_any` to the same conversations, and
`datasets.load_dataset("json")` loads every kind of file exnihilo writes."""

import json

import pytest
from tests.helpers import run_cli

from exnihilo.errors import ExnihiloError
from exnihilo.export.data import CARD_MARKER, PARQUET_FILE, export_data, trl_layout
from exnihilo.records import make_record, read_any, read_records, write_jsonl_atomic

U, A = {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}
S = {"role": "system", "content": "Be terse."}
SFT = [make_record([U, A], {"source": "magpie", "judge": {"score": 7}}),
       make_record([S, {"role": "user", "content": "Colour?"},
                    {"role": "assistant", "content": "Blue."}], {"tags": {"quality": 3}})]
MULTI = make_record([U, A, {"role": "user", "content": "And 3+3?"},
                     {"role": "assistant", "content": "6"}])
PREF = [make_record([U], {"x": 1}, chosen=A, rejected={"role": "assistant", "content": "5"})]
PROMPTS = [make_record([U]), make_record([{"role": "user", "content": "Hi"}])]


def conv(records):
    return [(r["messages"], r.get("chosen"), r.get("rejected")) for r in records]


def written(tmp_path, records, name="in.jsonl"):
    write_jsonl_atomic(tmp_path / name, records)
    return tmp_path / name


@pytest.mark.parametrize("fmt, suffix, data, layout", [
    ("alpaca", ".json", SFT, "alpaca"), ("alpaca", ".jsonl", PREF, "alpaca"),
    ("sharegpt", ".jsonl", SFT + [MULTI], "sharegpt"), ("sharegpt", ".json", PREF, "sharegpt"),
    ("trl", ".jsonl", SFT, "prompt-completion"), ("trl", ".jsonl", SFT + [MULTI], "messages"),
    ("trl", ".jsonl", PREF, "preference"), ("trl", ".jsonl", PROMPTS, "prompt"),
])
def test_every_format_reads_back_to_the_same_conversations(tmp_path, fmt, suffix, data, layout):
    out = tmp_path / f"out{suffix}"
    result = export_data(written(tmp_path, data), out, fmt)
    assert (result.rows, result.layout) == (len(data), layout)
    if suffix == ".json":
        assert isinstance(json.loads(out.read_text()), list)
    assert conv(read_any(out)) == conv(data)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if suffix != ".json" \
        else json.loads(out.read_text())
    assert all("meta" not in r for r in rows) and [r["id"] for r in rows] == [
        r["id"] for r in data]


def test_trl_rows_are_trls_conversational_shapes(tmp_path):
    export_data(written(tmp_path, SFT[:1]), tmp_path / "o.jsonl", "trl")
    assert json.loads((tmp_path / "o.jsonl").read_text()) == {
        "id": SFT[0]["id"], "prompt": [U], "completion": [A]}
    export_data(written(tmp_path, PREF), tmp_path / "p.jsonl", "trl")
    assert json.loads((tmp_path / "p.jsonl").read_text()) == {
        "id": PREF[0]["id"], "prompt": [U], "chosen": [A],
        "rejected": [{"role": "assistant", "content": "5"}]}


def test_alpaca_keeps_input_and_system(tmp_path):
    rec = read_any(written(tmp_path, [{"instruction": "Add.", "input": "2+2", "output": "4",
                                       "system": "Be brief."}]))
    assert rec[0]["messages"][0] == {"role": "system", "content": "Be brief."}
    export_data(written(tmp_path, rec, "r.jsonl"), tmp_path / "a.jsonl", "alpaca")
    row = json.loads((tmp_path / "a.jsonl").read_text())
    assert (row["instruction"], row["input"], row["output"], row["system"]) == (
        "Add.", "2+2", "4", "Be brief.")
    export_data(written(tmp_path, SFT[1:], "s.jsonl"), tmp_path / "b.jsonl", "alpaca")
    assert json.loads((tmp_path / "b.jsonl").read_text())["system"] == "Be terse."


def test_lossy_exports_are_errors(tmp_path):
    with pytest.raises(ExnihiloError, match=r"record 3 \(id .*\): alpaca holds one user turn"):
        export_data(written(tmp_path, SFT + [MULTI]), tmp_path / "a.json", "alpaca")
    with pytest.raises(ExnihiloError, match=r"record 1 .*no answer"):
        export_data(written(tmp_path, PROMPTS), tmp_path / "a.json", "alpaca")
    with pytest.raises(ExnihiloError, match="mixes answered and preference"):
        trl_layout(SFT + PREF)
    with pytest.raises(ExnihiloError, match="unknown --format 'csv'"):
        export_data(written(tmp_path, SFT), tmp_path / "a.csv", "csv")
    src = written(tmp_path, SFT)
    with pytest.raises(ExnihiloError, match="output is the input"):
        export_data(src, src, "trl")
    assert conv(read_records(src)) == conv(SFT)


def test_parquet_folder_with_card(tmp_path):
    pytest.importorskip("pyarrow", reason="pyarrow not installed (exnihilo[parquet])")
    out = tmp_path / "ds"
    result = export_data(written(tmp_path, SFT), out, "parquet")
    assert result.layout == "prompt-completion"
    card = (out / "README.md").read_text()
    assert CARD_MARKER in card and f"path: {PARQUET_FILE}" in card and "2 rows" in card
    assert conv(read_any(out / PARQUET_FILE)) == conv(SFT)
    try:  # the folder is a hub dataset: the card's YAML header names its split files
        import datasets
    except ImportError:
        datasets = None
    if datasets is not None:
        ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "c"))
        assert ds["completion"] == [[A], [SFT[1]["messages"][-1]]]
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    export_data(written(tmp_path, PREF, "p.jsonl"), out, "parquet")  # replaces its own export
    assert conv(read_any(out / PARQUET_FILE)) == conv(PREF)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    with pytest.raises(ExnihiloError, match="not empty and not an earlier export"):
        export_data(written(tmp_path, SFT), tmp_path / "mine", "parquet")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_export_data_cli(tmp_path):
    src = written(tmp_path, SFT)
    r = run_cli("export", "data", str(src), "-o", str(tmp_path / "o.json"), "--format",
                "alpaca")
    assert r.returncode == 0, r.stderr
    assert "2 rows, alpaca" in r.stdout
    r = run_cli("export", "data", str(src), "-o", str(tmp_path / "o.x"), "--format", "csv")
    assert r.returncode == 2 and "unknown --format 'csv'" in r.stderr


def test_load_dataset_reads_every_output_kind(tmp_path, smol_tokenizer):
    """Real writers (Magpie with its skipped-side file, tagging, every export format): each
    file loads with `load_dataset("json", data_files=...)` with one row per record/line."""
    datasets = pytest.importorskip("datasets", reason="datasets not installed (exnihilo[hub])")
    from tests.helpers import ScriptedEngine
    from tests.test_magpie import ScriptedEngine as MagpieEngine
    from tests.test_magpie import config

    from exnihilo.curate.tags import tag_file
    from exnihilo.synth.magpie import skipped_path, synthesize

    magpie = tmp_path / "magpie.jsonl"
    synthesize(MagpieEngine(), smol_tokenizer, config(6), magpie)
    tags = json.dumps({"quality": "good", "difficulty": "easy", "category": "math"})
    tag_file(magpie, tmp_path / "tagged.jsonl", ScriptedEngine(lambda _: tags))
    files = [magpie, skipped_path(magpie), tmp_path / "tagged.jsonl",
             written(tmp_path, SFT + [MULTI], "sft.jsonl"), written(tmp_path, PREF, "pref.jsonl"),
             written(tmp_path, PROMPTS, "prompts.jsonl")]
    exports = [("alpaca", SFT), ("alpaca", PREF), ("sharegpt", SFT + [MULTI]),
               ("sharegpt", PREF), ("trl", SFT), ("trl", SFT + [MULTI]), ("trl", PREF),
               ("trl", PROMPTS)]
    for i, (fmt, data) in enumerate(exports):
        for suffix in (".json", ".jsonl"):
            out = tmp_path / f"export-{i}-{fmt}{suffix}"
            export_data(written(tmp_path, data, f"src-{i}.jsonl"), out, fmt)
            files.append(out)
    for path in files:
        text = path.read_text()
        expected = len(json.loads(text)) if text.lstrip().startswith("[") else len(
            text.splitlines())
        assert expected > 0, path
        ds = datasets.load_dataset("json", data_files=str(path), split="train",
                                   cache_dir=str(tmp_path / "hf-cache"))
        assert len(ds) == expected, path.name


def test_parquet_without_pyarrow_fails_before_reading(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ExnihiloError, match="--format parquet needs pyarrow"):
        export_data(tmp_path / "missing.jsonl", tmp_path / "ds", "parquet")
    assert not (tmp_path / "ds").exists()
