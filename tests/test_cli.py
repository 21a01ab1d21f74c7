"""Bad input at the command line: one clear line on stderr, non-zero exit, no output file."""

import os

from helpers import run_cli


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_unknown_model(tmp_path):
    out = tmp_path / "o.jsonl"
    r = run_cli("synth", "magpie", "-n", "2", "-o", str(out), "--model", "no-such-model")
    assert_one_line_error(r, "unknown model 'no-such-model'", "smollm2-135m-instruct")
    assert not out.exists()


def test_missing_model_path(tmp_path):
    out = tmp_path / "o.jsonl"
    r = run_cli("synth", "magpie", "-n", "2", "-o", str(out), "--model",
                str(tmp_path / "absent.gguf"))
    assert_one_line_error(r, "absent.gguf", "does not exist")
    assert not out.exists()


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"NOPE" + os.urandom(64))
    out = tmp_path / "o.jsonl"
    r = run_cli("synth", "magpie", "-n", "2", "-o", str(out), "--model", str(bad),
                env_extra={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert_one_line_error(r, "broken.gguf", "not a GGUF")
    assert not out.exists()


def test_truncated_gguf_with_valid_magic(tmp_path):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 8)
    r = run_cli("synth", "magpie", "-n", "2", "-o", str(tmp_path / "o.jsonl"), "--model",
                str(bad), env_extra={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert_one_line_error(r, "cut.gguf", "cannot load GGUF")
    assert not (tmp_path / "cache" / "exnihilo" / "models").exists() or not any(
        (tmp_path / "cache" / "exnihilo" / "models").iterdir())


def test_unwritable_output(tmp_path):
    # /proc refuses new files even to root; a chmod'ed folder would not stop root.
    r = run_cli("synth", "magpie", "-n", "2", "-o", "/proc/exnihilo-o.jsonl")
    assert_one_line_error(r, "not writable")


def test_output_is_a_directory(tmp_path):
    r = run_cli("synth", "magpie", "-n", "2", "-o", str(tmp_path))
    assert_one_line_error(r, "is a directory")


def test_output_under_a_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run_cli("synth", "magpie", "-n", "2", "-o", str(blocker / "o.jsonl"))
    assert_one_line_error(r, "cannot create folder")


def test_n_zero(tmp_path):
    out = tmp_path / "o.jsonl"
    r = run_cli("synth", "magpie", "-n", "0", "-o", str(out))
    assert_one_line_error(r, "-n must be positive")
    assert not out.exists()


def test_models_lists_the_embedded_model():
    r = run_cli("models")
    assert r.returncode == 0, r.stderr
    assert "smollm2-135m-instruct" in r.stdout
    assert "ready" in r.stdout or "converts on first use" in r.stdout


def test_help_explains_magpie():
    r = run_cli("synth", "magpie", "--help")
    assert r.returncode == 0
    assert "pre-query" in r.stdout and "--no-system" in r.stdout and "resume" in r.stdout


def test_version_and_threads_options():
    from importlib.metadata import version

    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"exnihilo {version('exnihilo')}"
    assert_one_line_error(run_cli("--threads", "0", "models"), "--threads must be at least 1")
    assert_one_line_error(run_cli("models", env_extra={"EXNIHILO_THREADS": "two"}),
                          "EXNIHILO_THREADS")
