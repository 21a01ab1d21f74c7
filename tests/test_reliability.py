"""Lose nothing, ever: each test is one way a careless, hurried or hostile user could lose
data or get a traceback (issue 11), checked against the real CLI in a subprocess where the
exit status matters. No model loads: commands that need an engine get a dead server."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from exnihilo import outputs
from exnihilo.engines.base import Completion, SamplingParams
from exnihilo.errors import ExnihiloError
from exnihilo.records import JsonlAppender, make_record, write_jsonl_atomic

SRC = str(Path(__file__).resolve().parents[1] / "src")
DEAD = ["--engine", "openai", "--base-url", "http://127.0.0.1:9/v1"]


def cli_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=SRC, EXNIHILO_NO_PROGRESS="1", OMP_NUM_THREADS="1",
                COLUMNS="200")


def cli(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exnihilo.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=cli_env())


def records(n: int, prefix: str = "q") -> list[dict]:
    return [make_record([{"role": "user", "content": f"{prefix}{i}"},
                         {"role": "assistant", "content": f"answer {i}"}]) for i in range(n)]


def write(path: Path, rows: list) -> bytes:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path.read_bytes()


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The run failed as a user error: status 2, one `error:` line, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# --------------------------------------------------------------------------- data destroyed

def test_synth_documents_never_empties_an_existing_output(tmp_path):
    out = tmp_path / "existing.jsonl"
    before = write(out, records(8))
    docs = tmp_path / "c.jsonl"
    docs_before = write(docs, [{"text": "Lighthouses guide ships at night. " * 5}] * 3)
    result = cli("synth", "documents", docs, "-o", out, *DEAD, cwd=tmp_path)
    assert "cannot resume it safely" in one_error_line(result)
    assert out.read_bytes() == before  # 8 records, untouched
    # its own input as output: refused, the input untouched
    result = cli("synth", "documents", docs, "-o", docs, *DEAD, cwd=tmp_path)
    assert "output is the input" in one_error_line(result)
    assert docs.read_bytes() == docs_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "existing.jsonl"]


def test_documents_refuses_records_whose_chunk_log_is_missing(tmp_path, smol_tokenizer):
    """A run's own output whose `.chunks.jsonl` was deleted: which chunks are finished is
    unknown, so resuming would drop every record. It refuses instead."""
    from exnihilo.synth import documents as D
    from exnihilo.synth.ingest import Document, chunk_documents

    chunks, _ = chunk_documents([Document("a", "Ships pass the light. " * 20)],
                                smol_tokenizer, 64, 0)
    config = D.DocumentsConfig(method="joint", context_tokens=1024, demo=False,
                               generation=SamplingParams(max_new_tokens=40))
    engine = PairEngine()
    out = tmp_path / "pairs.jsonl"
    D.synthesize_documents(engine, smol_tokenizer, chunks, config, out)
    before = out.read_bytes()
    assert len(before.splitlines()) == len(chunks)
    D.chunks_path(out).unlink()
    with pytest.raises(ExnihiloError, match="chunk log"):
        D.synthesize_documents(engine, smol_tokenizer, chunks, config, out)
    assert out.read_bytes() == before


class PairEngine:
    """Writes one question-and-answer pair per chat; numbers them so ids differ."""

    name = "scripted:pairs"

    def __init__(self):
        self.n = 0

    def chat(self, conversations, params, seeds=None):
        outs = []
        for _ in conversations:
            self.n += 1
            outs.append(Completion(f"Question: What is item {self.n}?\nAnswer: Item {self.n}.",
                                   10, 10, "stop"))
        return outs

    def complete(self, prompts, params, seeds=None):
        raise AssertionError("joint synthesis uses chat")


def test_report_refuses_to_overwrite_its_dataset(tmp_path):
    data = tmp_path / "data.jsonl"
    before = write(data, records(3))
    result = cli("report", data, "-o", data, cwd=tmp_path)
    assert "output is the input" in one_error_line(result)
    assert data.read_bytes() == before
    link = tmp_path / "link.html"
    link.symlink_to(data)  # the same file through a symlink is the same file
    assert "output is the input" in one_error_line(cli("report", data, "-o", link,
                                                       cwd=tmp_path))
    assert data.read_bytes() == before


def test_non_regular_output_is_written_in_place_not_replaced(tmp_path):
    """`-o /dev/null` as root used to replace the device with a regular file; a FIFO stands
    in for the device here (same code path, and harmless if it regresses)."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    write_jsonl_atomic(fifo, records(2))
    reader.join(timeout=10)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert len(got[0].splitlines()) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["pipe"]  # no temp file left
    with outputs.OutputLock(fifo):  # nothing to lock on a device: no side file appears
        assert [p.name for p in tmp_path.iterdir()] == ["pipe"]


def test_torn_tail_repair_keeps_a_complete_last_record(tmp_path):
    path = tmp_path / "out.jsonl"
    rows = records(3)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(text.rstrip("\n"))  # complete last record, no newline (hand-edited)
    with JsonlAppender(path) as appender:
        assert len(appender.existing()) == 3
    assert path.read_text() == text
    path.write_text(text + json.dumps(rows[0])[:20])  # genuinely torn
    assert outputs.repair_torn_tail(path) == 20
    assert path.read_text() == text


def test_atomic_write_unique_temp_mode_kept_symlink_trap_and_cleanup(tmp_path, monkeypatch):
    out = tmp_path / "report.html"
    out.write_text("old")
    os.chmod(out, 0o640)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / ".report.html.tmp").symlink_to(victim)  # the old fixed temp name
    outputs.write_text_atomic(out, "new")
    assert out.read_text() == "new" and victim.read_text() == "precious"
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    # a full disk: one error line, the old file intact, no temp file left behind
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs.os, "fsync", full)
    with pytest.raises(ExnihiloError, match="no space left on device"):
        outputs.write_text_atomic(out, "newer")
    monkeypatch.undo()
    assert out.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".report.html.tmp", "report.html",
                                                         "victim.txt"]
    # an exception while producing rows (or Ctrl-C) leaves nothing behind either
    def rows():
        yield {"a": 1}
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_jsonl_atomic(out, rows())
    assert out.read_text() == "new"
    assert len(list(tmp_path.iterdir())) == 3


# --------------------------------------------------------------------------- exit statuses

@pytest.mark.parametrize("args", [
    ["synth", "magpie", "--bogus"],
    ["synth", "magpie", "-n", "many", "-o", "x.jsonl"],
    ["synth", "magpie", "-n", "3"],
    ["no-such-command"],
    ["synth", "documents", "--pydoc", "json", "-o", "x.jsonl", "--min-evidence", "5"],
    ["synth", "magpie", "-n", "3", "-o", "x.jsonl", "--turns", "0"],
])
def test_usage_errors_are_one_line_and_status_2(tmp_path, args):
    one_error_line(cli(*args, cwd=tmp_path))
    assert not (tmp_path / "x.jsonl").exists()


def test_bad_inputs_are_error_lines_not_tracebacks(tmp_path):
    (tmp_path / "latin1.jsonl").write_bytes(
        b'{"messages":[{"role":"user","content":"caf\xe9"}]}\n')
    write(tmp_path / "sharegpt.jsonl", [{"conversations": ["hi", "there"]}])
    (tmp_path / "folder").mkdir()
    for name, message in (("latin1.jsonl", "latin1.jsonl:1: not UTF-8"),
                          ("sharegpt.jsonl", "conversations[0] must be an object"),
                          ("folder", "no metrics.jsonl")):
        line = one_error_line(cli("report", name, "-o", "r.html", cwd=tmp_path))
        assert message in line
    rows = records(3)
    rows[0]["meta"] = {"tags": {"score": "high"}}  # a string where a number tag belongs
    rows[1]["meta"] = {"tags": {"score": 90}}
    rows[2]["meta"] = {"tags": {"score": 10}}
    write(tmp_path / "tagged.jsonl", rows)
    result = cli("curate", "filter", "tagged.jsonl", "-o", "kept.jsonl", "-w", "score>=50",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    kept = [json.loads(line) for line in (tmp_path / "kept.jsonl").read_text().splitlines()]
    assert [r["id"] for r in kept] == [rows[1]["id"]]  # "high" reads as unreadable (null)


def test_unexpected_exception_is_one_line_and_a_traceback_file(tmp_path, monkeypatch, capsys):
    import typer

    from exnihilo.cli.common import run_app

    app = typer.Typer()

    @app.command()
    def boom() -> None:
        raise RuntimeError("something broke\nsecond line")

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.delenv("EXNIHILO_DEBUG", raising=False)
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    with pytest.raises(SystemExit) as exit_info:
        run_app(app, args=[])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "RuntimeError: something broke" in err
    saved = list(tmp_path.glob("exnihilo-traceback-*.txt"))
    assert len(saved) == 1 and saved[0].name in err
    assert "Traceback" in saved[0].read_text() and "second line" in saved[0].read_text()


def test_markup_in_file_names_rules_and_data_is_printed_literally(tmp_path):
    rows = records(2, prefix="[/x] [link=http://evil]L[/link] ")
    name = "d[/x]/a[bold].jsonl"  # a folder "d[" holding "x]": the path reads "[/x]"
    (tmp_path / "d[" / "x]").mkdir(parents=True)
    write(tmp_path / name, rows)
    result = cli("curate", "filter", name, "-o", "b[/y].jsonl", "-w",
                 "instruction contains '[/x]'", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "b[/y].jsonl" in result.stdout and "[/x]" in result.stdout
    assert (tmp_path / "b[/y].jsonl").read_text().count("\n") == 2
    result = cli("report", name, "-o", "r[/z].html", cwd=tmp_path)
    assert result.returncode == 0 and "r[/z].html" in result.stdout, result.stderr


# --------------------------------------------------------------------------- lock and Ctrl-C

def test_second_writer_fails_at_once_and_ctrl_c_exits_130(tmp_path):
    """Two `synth magpie` runs on one output: the second fails at once naming the first;
    Ctrl-C on the first prints "interrupted" and exits 130 (so `&&` chains stop)."""
    # The first run talks to a server that accepts and never answers, so it is still waiting
    # when the Ctrl-C comes, however long the second run takes to start on a loaded machine
    # (a dead port made it give up first).
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    hanging = ["--engine", "openai", "--base-url",
               f"http://127.0.0.1:{silent.getsockname()[1]}/v1"]
    # pytest-xdist workers ignore SIGINT and a child inherits that (as a background job in a
    # shell script does); give the run the disposition an interactive shell gives it.
    first = subprocess.Popen([sys.executable, "-m", "exnihilo.cli", "synth", "magpie", "-n",
                              "4", "-o", "m.jsonl", *hanging], cwd=tmp_path, env=cli_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lock = tmp_path / ".m.jsonl.lock"
    try:
        deadline = time.time() + 60
        while not lock.exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert lock.exists(), first.communicate()
        started = time.perf_counter()
        second = cli("synth", "magpie", "-n", "4", "-o", "m.jsonl", *DEAD, cwd=tmp_path)
        line = one_error_line(second)
        assert f"process {first.pid} is writing it" in line
        assert time.perf_counter() - started < 60  # no model, no server wait (loaded CI: slack)
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
        silent.close()
    assert first.returncode == 130, err
    assert "interrupted" in err and "rerun the same command to resume" in err
    assert "Traceback" not in err
    assert not lock.exists()


def test_lock_is_reentrant_in_one_process_and_exclusive_across_processes(tmp_path):
    out = tmp_path / "o.jsonl"
    with outputs.OutputLock(out), JsonlAppender(out) as appender:  # CLI lock + library lock
        appender.append({"id": "a"})
        code = ("import sys; sys.path.insert(0, sys.argv[1]);"
                "from exnihilo.records import JsonlAppender; JsonlAppender(sys.argv[2])")
        other = subprocess.run([sys.executable, "-c", code, SRC, str(out)],
                               capture_output=True, text=True, timeout=60)
        assert other.returncode != 0 and f"process {os.getpid()}" in other.stderr
    assert not outputs.lock_path(out).exists()
    with JsonlAppender(out) as appender:  # released: the next writer gets it
        appender.append({"id": "b"})
    assert out.read_text().count("\n") == 2


# --------------------------------------------------------------------------- resume settings

class EchoEngine:
    """Magpie-shaped scripted engine: instruction i from its seed; answers echo it."""

    def __init__(self, name: str = "scripted:echo"):
        self.name = name

    def complete(self, prompts, params, seeds=None):
        return [Completion(f"Write a short note about topic number {s}.", 5, 9, "stop")
                for s in seeds]

    def chat(self, conversations, params, seeds=None):
        return [Completion(f"Answer to: {c[-1]['content']}", 20, 6, "stop")
                for c in conversations]


def test_magpie_refuses_to_resume_with_other_settings(tmp_path, smol_tokenizer):
    from exnihilo.synth.magpie import MagpieConfig, synthesize

    out = tmp_path / "m.jsonl"

    def config(**kw):
        return MagpieConfig(n=kw.pop("n", 3), round_size=4, **kw)

    synthesize(EchoEngine(), smol_tokenizer, config(seed=0), out)
    before = out.read_bytes()
    for engine, cfg, what in ((EchoEngine(), config(seed=1), "seed: 0 → 1"),
                              (EchoEngine(), config(system="Be terse."), "system"),
                              (EchoEngine(), config(turns=2), "turns: 1 → 2"),
                              (EchoEngine("scripted:other"), config(), "generator")):
        with pytest.raises(ExnihiloError, match="made with other settings") as e:
            synthesize(engine, smol_tokenizer, cfg, out)
        assert what in str(e.value)
        assert out.read_bytes() == before
    # same settings, larger -n: resumes
    summary = synthesize(EchoEngine(), smol_tokenizer, config(n=5), out)
    assert summary["already_present"] == 3 and summary["total"] == 5


def test_magpie_resumes_rows_without_ids(tmp_path, smol_tokenizer):
    from exnihilo.synth.magpie import MagpieConfig, synthesize

    out = tmp_path / "m.jsonl"
    synthesize(EchoEngine(), smol_tokenizer, MagpieConfig(n=3, round_size=4), out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for row in rows:
        del row["id"]  # a tool that dropped ids on the way
    write(out, rows)
    summary = synthesize(EchoEngine(), smol_tokenizer, MagpieConfig(n=4, round_size=4), out)
    assert summary["already_present"] == 3 and summary["total"] == 4
    assert out.read_text().count("\n") == 4


class TagJudge:
    name = "fake:tagger"

    def __init__(self, name: str = "fake:tagger"):
        self.name = name

    def chat(self, conversations, params, seeds=None):
        return [Completion('{"quality": "good", "difficulty": "easy", "category": "math"}',
                           5, 5, "stop") for _ in conversations]


def test_tag_refuses_other_settings_and_never_duplicates_rows_without_ids(tmp_path):
    from exnihilo.curate.tags import tag_file

    src = tmp_path / "in.jsonl"
    rows = records(4)
    for row in rows:
        del row["id"]
    write(src, rows)
    out = tmp_path / "tagged.jsonl"
    tag_file(src, out, TagJudge(), batch_size=2)
    before = out.read_bytes()
    for kwargs, judge, what in (({"seed": 3}, TagJudge(), "seed"),
                                ({"score": True}, TagJudge(), "score"),
                                ({}, TagJudge("fake:other"), "judge")):
        with pytest.raises(ExnihiloError, match="made with other settings") as e:
            tag_file(src, out, judge, batch_size=2, **kwargs)
        assert what in str(e.value) and out.read_bytes() == before
    tagged = [json.loads(line) for line in out.read_text().splitlines()]
    for row in tagged:
        del row["id"]
    write(out, tagged[:2])  # a killed run whose rows lost their ids on the way
    summary = tag_file(src, out, TagJudge(), batch_size=2)
    assert (summary.already_tagged, summary.tagged, summary.output_records) == (2, 2, 4)


def test_validation_before_loading(tmp_path):
    """Bad options, a clashing output and a foreign output fail before any model loads (the
    model named here does not exist, so loading it would be a different error)."""
    data = tmp_path / "d.jsonl"
    write(data, records(2))
    missing = str(tmp_path / "no-model")
    for args, message in (
            (["synth", "documents", data, "-o", "o.jsonl", "-m", missing, "--chunk-tokens",
              "64", "--overlap", "64"], "--overlap 64 must be smaller"),
            (["synth", "documents", "--pydoc", "json", "-o", data, "-m", missing],
             "cannot resume it safely"),
            (["curate", "tag", data, "-o", data, "--judge", missing], "output is the input"),
            (["synth", "magpie", "-n", "2", "-o", data, "-m", missing],
             "cannot resume it safely"),
            (["synth", "magpie", "-n", "2", "-o", "m.jsonl", "--engine", "openai"],
             "needs at least one --base-url"),
            (["synth", "magpie", "-n", "2", "-o", "m.jsonl", "-m", missing, "--dtype", "fp8"],
             "--dtype 'fp8'"),
            (["curate", "tag", data, "-o", "t.jsonl", "--judge", missing, "--dtype", "fp8"],
             "--dtype 'fp8'"),
            (["generate", data, "-o", data, "-m", missing], "output is the input")):
        line = one_error_line(cli(*args, cwd=tmp_path))
        assert message in line


# --------------------------------------------------------------------------- ingest

def test_ingest_skips_symlinks_out_of_the_folder_and_oversized_files(tmp_path, monkeypatch):
    from exnihilo.synth import ingest

    docs = tmp_path / "docs"
    docs.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0")
    (docs / "passwd.txt").symlink_to(secret)
    (docs / "inner.md").write_text("A note inside the folder.")
    (docs / "alias.md").symlink_to(docs / "inner.md")  # stays inside: kept
    (docs / "big.txt").write_text("word " * 1000)
    report = ingest.read_paths([docs], max_bytes=1000)
    assert sorted(Path(d.source).name for d in report.documents) == ["alias.md", "inner.md"]
    assert [Path(p).name for p in report.skipped_links] == ["passwd.txt"]
    assert [Path(p).name for p in report.skipped_large] == ["big.txt"]
    assert all("root:x" not in d.text for d in report.documents)
    # binary detection reads a prefix, never the whole file
    blob = docs / "image.txt"
    blob.write_bytes(b"\x00" + b"x" * 5_000_000)
    read = []
    real_open = Path.open

    def counting_open(self, *a, **kw):
        f = real_open(self, *a, **kw)
        real_read = f.read

        def read_some(n=-1):
            data = real_read(n)
            read.append(len(data))
            return data

        f.read = read_some
        return f

    monkeypatch.setattr(Path, "open", counting_open)
    assert ingest.read_text_file(blob) is None
    assert sum(read) <= ingest.BINARY_SNIFF_BYTES


def test_process_resumable_is_a_drop_in_for_evaluate(tmp_path):
    """The shared helper evaluate can switch to: reuses finished results, refuses rows the
    per-row check rejects and files made with other settings, processes duplicates once."""
    from exnihilo.resume import process_resumable

    items = [{"id": k} for k in ("a", "b", "a", "c")]
    calls: list[list[str]] = []

    def process(batch):
        calls.append([r["id"] for r in batch])
        return [{"id": r["id"], "v": r["id"].upper()} for r in batch]

    out = tmp_path / "o.jsonl"
    results, reused = process_resumable(items[:2], lambda r: r["id"], process, out, 1,
                                        settings={"m": 1})
    assert (reused, calls) == (0, [["a"], ["b"]])
    results, reused = process_resumable(items, lambda r: r["id"], process, out, 8,
                                        settings={"m": 1})
    assert reused == 3 and calls[-1] == ["c"]  # "a" twice in the input: reused twice
    assert [r["v"] for r in results] == ["A", "B", "A", "C"]
    with pytest.raises(ExnihiloError, match="m: 1 → 2"):
        process_resumable(items, lambda r: r["id"], process, out, 8, settings={"m": 2})
    with pytest.raises(ExnihiloError, match="o.jsonl:1: not mine"):
        process_resumable(items, lambda r: r["id"], process, out, 8,
                          mismatch=lambda r: "not mine", settings={"m": 1})
    assert out.read_text().count("\n") == 3
