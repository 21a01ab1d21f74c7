"""`--report-to`: choosing trackers (errors before any model loads), the secret-free config,
a recording backend fed by a real tiny SFT run at the real steps, the wandb / trackio
adapters against stand-in modules, and TensorBoard for real when it is installed."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import math
import sys
import types

import pytest
import torch

from conftest import tiny_llama_config
from exnihilo.errors import ExnihiloError
from exnihilo.train.tracking import (
    BACKENDS,
    Backend,
    Trackers,
    numeric_metrics,
    open_trackers,
    parse_report_to,
    safe_config,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class Recorder:
    """A backend that keeps what it was given (class-level list of every opened run)."""

    runs: list[Recorder] = []

    def __init__(self, out, name, config):
        self.out, self.name, self.config = out, name, config
        self.logged: list[tuple[int, dict[str, float]]] = []
        self.closed = 0
        Recorder.runs.append(self)

    def log(self, metrics, step):
        self.logged.append((step, dict(metrics)))

    def close(self):
        self.closed += 1


@pytest.fixture
def recorder(monkeypatch):
    Recorder.runs = []
    monkeypatch.setitem(BACKENDS, "recorder", Backend("recorder", "recorder-pkg",
                                                      lambda: True, Recorder))
    monkeypatch.setitem(BACKENDS, "ghost", Backend("ghost", "ghost-tracker", lambda: False,
                                                   Recorder))
    return Recorder


# ------------------------------------------------------------------------------- choosing

def test_parse_report_to_splits_dedupes_and_checks(recorder):
    assert parse_report_to(None) == [] and parse_report_to([]) == []
    assert parse_report_to(["none"]) == [] and parse_report_to("None") == []
    assert parse_report_to(["recorder, Recorder", "recorder"]) == ["recorder"]
    with pytest.raises(ExnihiloError, match=r"^--report-to mlflow: unknown tracker \(choose "
                                            r"from .*recorder.*\)"):
        parse_report_to(["recorder,mlflow"])
    with pytest.raises(ExnihiloError, match=r"^--report-to ghost: the ghost-tracker package "
                                            r"is not installed \(pip install ghost-tracker\)$"):
        parse_report_to("ghost")


def test_missing_backend_fails_on_the_command_line_before_any_model_loads(
        recorder, tmp_path, monkeypatch, capsys):
    from exnihilo.cli import app
    from exnihilo.cli.common import run_app

    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("exnihilo.train.sft.load_for_training", no_model)
    monkeypatch.setattr("exnihilo.train.sft.load_tokenizer", no_model)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "a"},
                                             {"role": "assistant", "content": "b"}]}) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        run_app(app, ["train", "sft", "--data", str(data), "--out", str(tmp_path / "o"),
                      "--report-to", "recorder", "--report-to", "ghost"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "--report-to ghost: the ghost-tracker package is not installed" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_safe_config_drops_secrets_at_any_depth():
    config = {"lr": 1e-4, "api_key": "sk-1", "openai": {"OPENAI_API_KEY": "sk-2",
                                                          "base_url": "http://x"},
              "hf_token": "hf_3", "max_new_tokens": 64, "path": tmp_path_like(),
              "targets": ["q_proj", {"secret": "s"}]}
    clean = safe_config(config)
    assert clean == {"lr": 1e-4, "openai": {"base_url": "http://x"}, "max_new_tokens": 64,
                     "path": "/tmp/x", "targets": ["q_proj", {}]}
    assert "sk-" not in json.dumps(clean) and "hf_3" not in json.dumps(clean)


def tmp_path_like():
    from pathlib import PurePosixPath

    return PurePosixPath("/tmp/x")


def test_numeric_metrics_keeps_finite_numbers_but_not_the_step():
    row = {"step": 3, "epoch": 0, "loss": 2.5, "lr": 1e-4, "val_loss": None,
           "grad_norm": math.nan, "flag": True, "note": "x", "trained_tokens": 120}
    assert numeric_metrics(row) == {"epoch": 0.0, "loss": 2.5, "lr": 1e-4,
                                    "trained_tokens": 120.0}


def test_a_failing_tracker_is_dropped_and_the_others_keep_logging(recorder):
    class Broken(Recorder):
        def log(self, metrics, step):
            raise OSError("disk full")

    good, bad = Recorder(None, "g", {}), Broken(None, "b", {})
    trackers = Trackers([("bad", bad), ("good", good)])
    trackers.log({"step": 1, "loss": 3.0}, 1)
    trackers.log({"step": 2, "loss": 2.0}, 2)
    trackers.close()
    assert good.logged == [(1, {"loss": 3.0}), (2, {"loss": 2.0})]
    assert good.closed == 1 and bad.closed == 0  # dropped after its first failure


# ------------------------------------------------------------------ fed by a real training run

def write_records(path):
    pairs = [("What is 2+2?", "4."), ("Name a colour.", "Blue."), ("Say hi.", "Hi there!"),
             ("Capital of France?", "Paris."), ("Opposite of hot?", "Cold."),
             ("Plural of mouse?", "Mice."), ("First letter?", "A."), ("Days?", "Seven.")]
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]})
                            + "\n" for q, a in pairs))
    return str(path)


def test_sft_run_feeds_every_metrics_row_to_the_tracker(recorder, tmp_path, smol_tokenizer):
    from transformers import LlamaForCausalLM

    from exnihilo.train.sft import SFTConfig, run_sft

    cfg = SFTConfig(data=write_records(tmp_path / "d.jsonl"), out=str(tmp_path / "run"),
                    style="phi3", batch_size=2, val_fraction=0.25, eval_every=2,
                    save_every=0, max_length=64, seed=0, full=True, lr=1e-3,
                    report_to=["recorder"])
    torch.manual_seed(0)
    run_sft(cfg, model_obj=LlamaForCausalLM(tiny_llama_config(len(smol_tokenizer))),
            tokenizer=smol_tokenizer)

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
            .splitlines()]
    [run] = recorder.runs
    assert run.closed == 1 and run.name == "run" and run.out == tmp_path / "run"
    assert run.config["lr"] == 1e-3 and run.config["report_to"] == ["recorder"]
    assert run.config["data"] == cfg.data and run.config["max_length"] == 64
    # Every optimizer step, in order, with exactly the numbers metrics.jsonl holds.
    assert [step for step, _ in run.logged] == [r["step"] for r in rows] == [1, 2, 3]
    for (_, logged), row in zip(run.logged, rows, strict=True):
        assert logged == {k: float(v) for k, v in row.items() if k != "step"}
    # Validation at steps 2 and 3 (every 2, and the last), under metrics.jsonl's names.
    assert [step for step, m in run.logged if "val_loss" in m] == [2, 3]
    assert run.logged[1][1]["val_loss"] == pytest.approx(rows[1]["val_loss"])
    assert run.logged[0][1]["loss"] > 0 and run.logged[0][1]["lr"] == pytest.approx(1e-3)
    # Trackers are not part of the run's identity: resuming may add or drop them.
    identity = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert "report_to" not in identity


# ------------------------------------------------------------- the real backends' adapters

def fake_module(name, monkeypatch, **attrs):
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    for key, value in attrs.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def test_wandb_runs_offline_in_the_run_folder_unless_the_env_says(tmp_path, monkeypatch):
    calls = []

    class Run:
        def __init__(self, **kwargs):
            self.kwargs, self.logged, self.finished = kwargs, [], False
            calls.append(self)

        def log(self, metrics, step):
            self.logged.append((step, metrics))

        def finish(self):
            self.finished = True

    fake_module("wandb", monkeypatch, init=lambda **kw: Run(**kw),
                Settings=lambda **kw: ("settings", kw))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    trackers = open_trackers(["wandb"], tmp_path, {"lr": 0.1, "wandb_api_key": "k"})
    trackers.log({"step": 4, "loss": 1.5, "val_loss": None}, 4)
    trackers.close()
    run = calls[0]
    assert run.kwargs["mode"] == "offline" and run.kwargs["dir"] == str(tmp_path)
    assert run.kwargs["config"] == {"lr": 0.1} and run.kwargs["project"] == "exnihilo"
    assert run.kwargs["settings"] == ("settings", {"save_code": False, "disable_git": True})
    assert run.logged == [(4, {"loss": 1.5})] and run.finished

    monkeypatch.setenv("WANDB_MODE", "online")
    open_trackers(["wandb"], tmp_path, {}).close()
    assert "mode" not in calls[1].kwargs  # the user's WANDB_MODE decides


def test_trackio_gets_config_once_and_metrics_at_their_steps(tmp_path, monkeypatch):
    seen = []
    fake_module("trackio", monkeypatch,
                init=lambda **kw: seen.append(("init", kw)),
                log=lambda metrics, step: seen.append(("log", step, metrics)),
                finish=lambda: seen.append(("finish",)))
    trackers = open_trackers(["trackio"], tmp_path / "my-run", {"seed": 3})
    trackers.log({"step": 7, "loss": 0.25}, 7)
    trackers.close()
    assert seen == [("init", {"project": "exnihilo", "name": "my-run",
                              "config": {"seed": 3}}),
                    ("log", 7, {"loss": 0.25}), ("finish",)]


def test_a_backend_that_cannot_start_is_one_line_naming_it(tmp_path, monkeypatch):
    def refuse(**kw):
        raise RuntimeError("no credentials\nsecond line")

    fake_module("trackio", monkeypatch, init=refuse)
    with pytest.raises(ExnihiloError, match=r"^--report-to trackio: could not start a run "
                                            r"\(RuntimeError: no credentials"):
        open_trackers(["trackio"], tmp_path, {})


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                    reason="tensorboard is not installed (pip install tensorboard)")
def test_tensorboard_event_file_holds_the_logged_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trackers = open_trackers(["tensorboard"], tmp_path, {"lr": 0.5})
    trackers.log({"step": 1, "loss": 3.0, "lr": 0.5}, 1)
    trackers.log({"step": 2, "loss": 2.0, "lr": 0.25, "val_loss": 2.5}, 2)
    trackers.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("loss")]
    assert loss == [(1, 3.0), (2, 2.0)]
    assert [(e.step, e.value) for e in events.Scalars("val_loss")] == [(2, 2.5)]
    assert [(e.step, e.value) for e in events.Scalars("lr")] == [(1, 0.5), (2, 0.25)]

