"""The preference CLI functions, mounted on a small typer app as the integrator will mount
them: bad flags are one line and exit 2, before any model loads; constraints end to end."""

from __future__ import annotations

import json

import pytest
import typer

from exnihilo.cli.common import run_app
from exnihilo.cli.preference import dpo_command, synth_constraints_command, synth_pairs_command


def app() -> typer.Typer:
    a = typer.Typer()
    a.command("dpo")(dpo_command)
    a.command("pairs")(synth_pairs_command)
    a.command("constraints")(synth_constraints_command)
    return a


def run(monkeypatch, capsys, *args):
    monkeypatch.setattr("sys.argv", ["exnihilo", *args])
    with pytest.raises(SystemExit) as exit_info:
        run_app(app())
    return exit_info.value.code, capsys.readouterr()


@pytest.mark.parametrize("args, message", [
    (["--loss", "sigmod"], "unknown term 'sigmod'"),
    (["--loss", "simpo", "--ema-anchor", "0.1"], "--ema-anchor needs a loss with a reference"),
    (["--beta", "0"], "--beta"),
    (["--style", "vicuna"], "unknown style 'vicuna'"),
])
def test_dpo_bad_flags_are_one_line(tmp_path, monkeypatch, capsys, args, message):
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    code, out = run(monkeypatch, capsys, "dpo", "--data", str(data), "--out",
                    str(tmp_path / "o"), *args)
    assert code == 2 and message in out.err and "Traceback" not in out.err
    assert not (tmp_path / "o").exists()


def test_pairs_bad_scorer_options(tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "q.jsonl"
    prompts.write_text(json.dumps({"prompt": "a"}) + "\n")
    code, out = run(monkeypatch, capsys, "pairs", "--prompts", str(prompts), "-o",
                    str(tmp_path / "p.jsonl"), "--scorer", "implicit")
    assert code == 2 and "--reference" in out.err
    code, out = run(monkeypatch, capsys, "pairs", "--prompts", str(prompts), "-o",
                    str(tmp_path / "p.jsonl"), "--scorer", "vibes")
    assert code == 2 and "known scorers" in out.err


def test_constraints_command_writes_ifeval_rows(tmp_path, monkeypatch, capsys):
    source = tmp_path / "inst.jsonl"
    source.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Tell me about topic {i}."},
        {"role": "assistant", "content": "ok"}]}) + "\n" for i in range(5)))
    monkeypatch.setattr("sys.argv", ["exnihilo", "constraints", "--from", str(source), "-o",
                                     str(tmp_path / "c.jsonl")])
    run_app(app())
    rows = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert len(rows) == 5
    assert all(r["prompt"].startswith("Tell me about topic") and r["instruction_id_list"]
               for r in rows)
    from exnihilo.records import read_any

    record = read_any(tmp_path / "c.jsonl")[0]  # what `synth pairs --prompts` reads
    from exnihilo.synth.preference import constraint_fields

    assert constraint_fields(record) == (rows[0]["instruction_id_list"], rows[0]["kwargs"])
