"""`--config FILE.yaml` (flags override it, it overrides defaults), `--print-config` (its
output is a valid config file) and `--allow-download` (hub ids fetched only when asked)."""

import json

import pytest
from tests.helpers import run_cli

from exnihilo import models
from exnihilo.errors import ExnihiloError
from exnihilo.records import make_record, write_jsonl_atomic


def tagged(quality):
    meta = {"tags": {"quality": quality}} if quality else {}
    return make_record([{"role": "user", "content": f"q {quality}"},
                        {"role": "assistant", "content": "a"}], meta)


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "in.jsonl"
    write_jsonl_atomic(path, [tagged("good"), tagged("poor"), tagged(None)])
    return path


def kept(path):
    return [json.loads(line)["messages"][0]["content"] for line in path.read_text().splitlines()]


def test_file_sets_options_and_flags_override_it(tmp_path, data):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("curate:\n  filter:\n    where: ['quality>=good']\n    missing: drop\n")
    out = tmp_path / "a.jsonl"
    r = run_cli("--config", str(cfg), "curate", "filter", str(data), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert kept(out) == ["q good"]  # the file's rule, and its missing: drop
    r = run_cli("--config", str(cfg), "curate", "filter", str(data), "-o", str(out),
                "--missing", "keep")
    assert r.returncode == 0, r.stderr
    assert kept(out) == ["q good", "q None"]  # the flag beats the file
    r = run_cli("curate", "filter", str(data), "-o", str(out), "--where", "quality>=good")
    assert r.returncode == 2 and "quality" in r.stderr  # built-in default: missing=error


def test_print_config_round_trips(tmp_path, data):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("curate:\n  filter:\n    where: ['quality>=good']\n    missing: drop\n")
    out = tmp_path / "b.jsonl"
    r = run_cli("--config", str(cfg), "--print-config", "curate", "filter", str(data), "-o",
                str(out), "--missing", "keep")
    assert r.returncode == 0, r.stderr
    assert r.stdout == (f"curate:\n  filter:\n    data: {data}\n    out: {out}\n    where:\n"
                        f"    - quality>=good\n    missing: keep\n")
    assert not out.exists()  # printed, not run
    printed = tmp_path / "printed.yaml"
    printed.write_text(r.stdout)
    r = run_cli("--config", str(printed), "curate", "filter")
    assert r.returncode == 0, r.stderr
    assert kept(out) == ["q good", "q None"]


@pytest.mark.parametrize("text, message", [
    ("curate:\n  filtr: {}\n", "unknown command 'curate.filtr' (known: dedup, filter"),
    ("curate:\n  filter:\n    wher: x\n", "'curate.filter' has no option 'wher'"),
    ("curate:\n  filter: [1]\n", "'curate.filter' must be a mapping of options"),
    ("curate:\n  filter:\n    where: [\n", "run.yaml:4: not valid YAML"),
    ("- 1\n", "expected a mapping of commands to options"),
])
def test_bad_config_is_one_line_naming_the_key(tmp_path, text, message):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text)
    r = run_cli("--config", str(cfg), "models")
    assert r.returncode == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_allow_download_is_explicit(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv(models.ALLOW_DOWNLOAD_VAR, raising=False)
    calls = []

    def fake_download(repo_id, **kw):
        if kw.get("local_files_only"):  # the cache lookup: nothing cached
            raise LocalEntryNotFoundError("not cached")
        calls.append((repo_id, kw.get("allow_patterns")))
        folder = tmp_path / "dl"
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_text("")
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    with pytest.raises(ExnihiloError, match="not in the local Hugging Face cache"):
        models.resolve_model("org/remote")
    assert calls == []
    monkeypatch.setattr(models, "_set_offline", ["HF_HUB_OFFLINE"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Recorded by monkeypatch first (unset), so the switch below does not leak into other
    # tests: allow_downloads() writes os.environ directly.
    monkeypatch.setenv(models.ALLOW_DOWNLOAD_VAR, "1")
    models.allow_downloads()  # what --allow-download does
    assert "HF_HUB_OFFLINE" not in __import__("os").environ
    assert models.resolve_model("org/remote") == tmp_path / "dl"
    assert calls[0][0] == "org/remote" and "*.safetensors" in calls[0][1]
    assert not any(p.endswith((".bin", ".pt", ".py")) for p in calls[0][1])


def test_quiet_prints_only_errors(tmp_path, data):
    out = tmp_path / "q.jsonl"
    r = run_cli("--quiet", "curate", "filter", str(data), "-o", str(out), "--where",
                "quality>=good", "--missing", "drop")
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""
    assert kept(out) == ["q good"]
    r = run_cli("-q", "curate", "filter", str(data), "-o", str(out), "--where", "quality>=good")
    assert r.returncode == 2 and r.stderr.startswith("error:")
