"""The pretrain / distill / prune command functions, registered on a test app the way the
integrator will register them."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from exnihilo.cli.pretrain import distill_command, pretrain_command, prune_command
from exnihilo.errors import ExnihiloError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def app():
    app = typer.Typer()
    app.command("pretrain")(pretrain_command)
    app.command("distill")(distill_command)
    app.command("prune")(prune_command)
    return app


def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    words = ["the", "river", "runs", "to", "the", "sea", "and", "light", "falls", "on",
             "green", "stones"]
    path.write_text("".join(json.dumps({"text": " ".join(words[i % 5:] + words[:i % 5])})
                            + "\n" for i in range(30)))
    return path


def test_pretrain_command_trains_a_preset(app, tmp_path, monkeypatch):
    # The token cache goes to tmp (XDG_CACHE_HOME would also move the embedded model's).
    monkeypatch.setattr("exnihilo.train.tokens.token_cache_root", lambda: tmp_path / "tok")
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["pretrain", "--arch", "gemma2-micro", "--data",
                                 str(corpus(tmp_path)), "--out", str(out), "--tokens", "0.4k",
                                 "--seq-len", "32", "--batch-size", "4", "--sliding-window",
                                 "8", "--threads", "1"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "MFU" in r.output and "held-out perplexity" in r.output
    config = json.loads((out / "config.json").read_text())
    assert config["sliding_window"] == 8 and config["model_type"] == "gemma2"
    info = json.loads((out / "exnihilo_run.json").read_text())
    assert info["kind"] == "pretrain" and info["steps"] == 4  # ceil(400 / (4 × 32))


@pytest.mark.parametrize("args,message", [
    (["pretrain", "--arch", "gemma9-giant"], "gemma2-micro, gemma2-tiny"),
    (["pretrain", "--arch", "gemma2-micro", "--from", "x"], "exactly one of --arch"),
    (["pretrain", "--from", "x", "--layers", "3"], "--layers changes an architecture"),
    (["pretrain", "--arch", "gemma2-micro", "--tokens", "many"], "--tokens 'many'"),
    (["distill", "--teacher", "t"], "exactly one of --student"),
    (["prune", "--calibration", "c.jsonl"], "nothing to prune"),
])
def test_bad_options_are_one_clear_error(app, tmp_path, args, message):
    out = tmp_path / "never"
    extra = [] if args[0] == "prune" else ["--data", str(corpus(tmp_path))]
    r = CliRunner().invoke(app, [*args, *extra, "--out", str(out)])
    assert isinstance(r.exception, ExnihiloError), r.output
    assert message in str(r.exception)
    assert not out.exists()
