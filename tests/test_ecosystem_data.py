"""Data in from the ecosystem's formats (TRL, axolotl, parquet, the HF cache) and hub model
ids from the local cache: every row becomes a record without losing text, or an error
naming its file and line."""

import json
import os
import subprocess
import sys

import pytest

from exnihilo.errors import ExnihiloError
from exnihilo.models import offline_by_default, resolve_model
from exnihilo.records import read_any, split_files
from exnihilo.train.data import LengthReport, prepare_examples
from exnihilo.train.preference_data import read_preferences

pytestmark = pytest.mark.usefixtures("one_thread")

Q1, A1 = "What is 2+2?", "4"
Q2, A2 = "Name a colour.", "Blue."
SYSTEM = "Be terse."


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def conversation_texts(records):
    return [[(m["role"], m["content"]) for m in r["messages"]] for r in records]


def test_trl_prompt_completion_becomes_whole_conversation_and_trains(tmp_path, smol_tokenizer):
    path = write_jsonl(tmp_path / "pc.jsonl", [
        {"prompt": Q1, "completion": A1},
        {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": Q2}],
         "completion": [{"role": "assistant", "content": A2}], "label": 1},
    ])
    records = read_any(path)
    assert conversation_texts(records) == [
        [("user", Q1), ("assistant", A1)],
        [("system", SYSTEM), ("user", Q2), ("assistant", A2)]]
    assert records[1]["meta"]["fields"] == {"label": 1}
    report = LengthReport()
    examples = prepare_examples(records, "chat", smol_tokenizer, 256, report=report)
    assert report.kept == 2 and report.no_answer == 0 and report.skipped_ids == []
    # The trained-on tokens are exactly the completion (+ the end-of-turn/EOS tokens).
    for example, answer in zip(examples, (A1, A2), strict=True):
        trained = [t for t, on in zip(example.input_ids, example.trained, strict=True) if on]
        assert smol_tokenizer.decode(trained).startswith(answer)


def test_prompt_completion_errors_name_the_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"prompt": Q1, "completion": A1},
        {"prompt": Q1, "completion": [{"role": "user", "content": "x"}]}])
    with pytest.raises(ExnihiloError, match=r"bad\.jsonl:2: 'completion' must hold only"):
        read_any(path)


def test_text_record_is_an_error_naming_line_and_pretrain(tmp_path):
    path = write_jsonl(tmp_path / "lm.jsonl", [{"prompt": Q1, "completion": A1},
                                               {"text": "Once upon a time"}])
    with pytest.raises(ExnihiloError, match=r"lm\.jsonl:2: a plain-text record.*train pretrain"):
        read_any(path)


def test_conversational_preference_agrees_with_the_preference_reader(tmp_path):
    path = write_jsonl(tmp_path / "pref.jsonl", [
        {"prompt": [{"role": "user", "content": Q1}],
         "chosen": [{"role": "assistant", "content": "4"}],
         "rejected": [{"role": "assistant", "content": "5"}]},
        {"chosen": [{"role": "user", "content": Q2}, {"role": "assistant", "content": "Blue."}],
         "rejected": [{"role": "user", "content": Q2}, {"role": "assistant", "content": "7"}]},
    ])
    records = read_any(path)
    assert records == read_preferences(path)
    assert conversation_texts(records) == [[("user", Q1)], [("user", Q2)]]
    assert [(r["chosen"]["content"], r["rejected"]["content"]) for r in records] == [
        ("4", "5"), ("Blue.", "7")]


def test_axolotl_messages_with_from_value(tmp_path):
    path = write_jsonl(tmp_path / "ax.jsonl", [{"messages": [
        {"from": "human", "value": Q1}, {"from": "gpt", "value": A1}]}])
    assert conversation_texts(read_any(path)) == [[("user", Q1), ("assistant", A1)]]


def test_json_lines_in_a_dot_json_file(tmp_path):
    # `datasets.Dataset.to_json("x.json")` writes JSON lines, not an array.
    path = write_jsonl(tmp_path / "x.json", [{"prompt": Q1, "completion": A1},
                                             {"instruction": Q2, "output": A2}])
    assert conversation_texts(read_any(path)) == [[("user", Q1), ("assistant", A1)],
                                                  [("user", Q2), ("assistant", A2)]]


def test_parquet_rows_load_without_loss(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow not installed (exnihilo[parquet])")
    import pyarrow.parquet as pq

    rows = [{"prompt": Q1, "completion": A1}, {"prompt": Q2, "completion": A2}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert conversation_texts(read_any(tmp_path / "d.parquet")) == [
        [("user", Q1), ("assistant", A1)], [("user", Q2), ("assistant", A2)]]
    # A column a row lacks is null in parquet; the row is read as if the key were absent.
    pq.write_table(pa.table({"prompt": [Q1, None], "completion": [A1, None],
                             "text": [None, "x"]}), tmp_path / "t.parquet")
    with pytest.raises(ExnihiloError, match=r"t\.parquet:row 2: a plain-text record"):
        read_any(tmp_path / "t.parquet")


def test_missing_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(ExnihiloError, match=r"d\.parquet: reading parquet needs pyarrow"):
        read_any(tmp_path / "d.parquet")


# ------------------------------------------------------------------ the local HF hub cache

def fake_snapshot(cache, kind, repo_id, files):
    """The huggingface_hub cache layout: <kind>s--org--name/{refs/main, snapshots/<sha>/}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"{kind}s--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    for name, text in files.items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).write_text(text)
    return snap


def test_hf_dataset_from_cache_by_split(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    line = json.dumps
    fake_snapshot(tmp_path / "hub", "dataset", "org/tiny", {
        "data/train-00000-of-00002.jsonl": line({"prompt": Q1, "completion": A1}) + "\n",
        "data/train-00001-of-00002.jsonl": line({"prompt": Q2, "completion": A2}) + "\n",
        "data/test-00000-of-00001.jsonl": line({"instruction": Q2, "output": A1}) + "\n",
        "README.md": "# card"})
    assert conversation_texts(read_any("hf:org/tiny")) == [
        [("user", Q1), ("assistant", A1)], [("user", Q2), ("assistant", A2)]]
    assert conversation_texts(read_any("hf:org/tiny:test")) == [
        [("user", Q2), ("assistant", A1)]]
    with pytest.raises(ExnihiloError, match=r"no data files for split 'validation'.*test-0000"):
        read_any("hf:org/tiny:validation")
    with pytest.raises(ExnihiloError, match=r"hf:org/absent: dataset org/absent is not in the "
                                            r"local Hugging Face cache.*never downloads"):
        read_any("hf:org/absent")
    with pytest.raises(ExnihiloError, match="expected hf:org/name"):
        read_any("hf:justname")


def test_split_files_match_the_hub_naming(tmp_path):
    for name in ("train.jsonl", "train/a.parquet", "data/train-0.parquet", "trainer.jsonl",
                 "data/test.json", "notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    got = [p.relative_to(tmp_path).as_posix() for p in split_files(tmp_path, "train")]
    assert got == ["data/train-0.parquet", "train/a.parquet", "train.jsonl"]


def test_hub_model_id_resolves_from_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    snap = fake_snapshot(tmp_path / "hub", "model", "org/tiny-lm", {
        "config.json": "{}", "model.safetensors": ""})
    assert resolve_model("org/tiny-lm") == snap
    fake_snapshot(tmp_path / "hub", "model", "org/pickled", {
        "config.json": "{}", "pytorch_model.bin": ""})
    with pytest.raises(ExnihiloError, match="no safetensors weights"):
        resolve_model("org/pickled")
    with pytest.raises(ExnihiloError, match=r"org/absent: no such folder, and not in the "
                                            r"local Hugging Face cache.*--allow-download"):
        resolve_model("org/absent")


def test_importing_the_package_leaves_the_hub_online():
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    code = ("import os, exnihilo, exnihilo.models, exnihilo.records, exnihilo.cli\n"
            "print([k for k in os.environ if k.endswith('_OFFLINE')])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_cli_switches_offline_unless_told(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    offline_by_default()
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "0"
