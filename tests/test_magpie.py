"""Magpie synthesis: quality gates, dedup, resume (fake engine) and a real kill -9 resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exnihilo.engines.base import Completion, SamplingParams
from exnihilo.synth.magpie import (
    MagpieConfig,
    candidate_seed,
    instruction_problem,
    repetition_ratio,
    skipped_path,
    synthesize,
)


class ScriptedEngine:
    """Instruction i (by seed) is scripted; every fourth is degenerate, every fifth repeats
    an earlier one; responses echo the instruction. Can be told to die after k calls."""

    name = "scripted"

    def __init__(self, die_after: int | None = None):
        self.calls = 0
        self.die_after = die_after
        self.prompts: list[str] = []

    def _tick(self):
        self.calls += 1
        if self.die_after is not None and self.calls > self.die_after:
            raise KeyboardInterrupt("simulated kill")

    def complete(self, prompts, params, seeds=None):
        self._tick()
        self.prompts.extend(prompts)
        outs = []
        for s in seeds:
            k = s % 20
            if k % 4 == 3:
                outs.append(Completion("", 10, 0, "stop"))
            elif k % 5 == 4:
                outs.append(Completion("Tell me about the same thing again please.", 10, 8,
                                       "stop"))
            else:
                outs.append(Completion(f"Write a short poem about topic {s}.", 10, 9, "stop"))
        return outs

    def chat(self, conversations, params, seeds=None):
        self._tick()
        return [Completion(f"Answer to: {c[-1]['content']}", 20, 6, "stop")
                for c in conversations]


def read_lines(path):
    lines = Path(path).read_text().splitlines()
    return [json.loads(line) for line in lines]


def config(n, **kw):
    return MagpieConfig(n=n, round_size=4, instruction=SamplingParams(temperature=1.0),
                        response=SamplingParams(temperature=0.7), **kw)


def test_quality_gates():
    ok = Completion("How do I bake sourdough bread at home?", 5, 9, "stop")
    assert instruction_problem(ok, ["<|im_end|>"], 3) is None
    assert instruction_problem(Completion("   ", 5, 1, "stop"), [], 3) == "empty_instruction"
    assert instruction_problem(Completion("Help me", 5, 2, "stop"), [], 3) == \
        "instruction_too_short"
    cut = Completion("How do I bake", 5, 128, "length")
    assert instruction_problem(cut, [], 3) == "instruction_unfinished"
    leak = Completion("Hi<|im_start|>assistant\nsure", 5, 9, "stop")
    assert instruction_problem(leak, ["<|im_start|>"], 3) == "template_leak"
    loop = Completion("I like it. " * 20, 5, 60, "stop")
    assert repetition_ratio(loop.text) > 0.8
    assert instruction_problem(loop, [], 3) == "instruction_repetitive"


def test_records_schema_skips_and_dedup(tmp_path, smol_tokenizer):
    out = tmp_path / "m.jsonl"
    summary = synthesize(ScriptedEngine(), smol_tokenizer, config(10), out)
    records = read_lines(out)
    assert len(records) == 10 == summary["total"] == summary["written_this_run"]
    assert len({r["id"] for r in records}) == 10
    for r in records:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert r["messages"][1]["content"] == "Answer to: " + r["messages"][0]["content"]
        assert r["meta"]["seed"] == candidate_seed(0, r["meta"]["index"])
        assert r["meta"]["template"]["system"] == "default"
        assert r["meta"]["template"]["pre_query"].endswith("<|im_start|>user\n")
        assert r["meta"]["sampling"]["instruction"]["temperature"] == 1.0
        assert r["meta"]["tokens"] > 0
    skipped = read_lines(skipped_path(out))
    reasons = {s["reason"] for s in skipped}
    assert reasons <= {"empty_instruction", "duplicate"} and "empty_instruction" in reasons
    assert summary["skipped"]["empty_instruction"] == sum(
        s["reason"] == "empty_instruction" for s in skipped)
    # candidate indices are never reused between kept and skipped
    kept_idx = {r["meta"]["index"] for r in records}
    assert not kept_idx & {s["index"] for s in skipped}


def test_system_prompt_and_turns(tmp_path, smol_tokenizer):
    engine = ScriptedEngine()
    out = tmp_path / "m.jsonl"
    synthesize(engine, smol_tokenizer, config(3, turns=2, system="You are a chemist."), out)
    records = read_lines(out)
    for r in records:
        assert [m["role"] for m in r["messages"]] == ["system", "user", "assistant", "user",
                                                      "assistant"]
        assert r["messages"][0]["content"] == "You are a chemist."
        assert r["meta"]["template"]["system"] == "custom"
    assert engine.prompts[0] == ("<|im_start|>system\nYou are a chemist.<|im_end|>\n"
                                 "<|im_start|>user\n")
    second_turn = [p for p in engine.prompts if p.count("<|im_start|>user") == 2]
    assert second_turn and all(p.endswith("<|im_end|>\n<|im_start|>user\n") for p in second_turn)


def test_no_system_changes_the_pre_query(tmp_path, smol_tokenizer):
    engine = ScriptedEngine()
    synthesize(engine, smol_tokenizer, config(2, use_default_system=False), tmp_path / "m.jsonl")
    assert engine.prompts[0] == "<|im_start|>user\n"
    assert read_lines(tmp_path / "m.jsonl")[0]["meta"]["template"]["system"] == "none"


def test_interrupted_run_resumes_to_the_same_file(tmp_path, smol_tokenizer):
    whole = tmp_path / "whole.jsonl"
    synthesize(ScriptedEngine(), smol_tokenizer, config(12), whole)
    part = tmp_path / "part.jsonl"
    with pytest.raises(KeyboardInterrupt):
        synthesize(ScriptedEngine(die_after=3), smol_tokenizer, config(12), part)
    assert 0 < len(read_lines(part)) < 12
    summary = synthesize(ScriptedEngine(), smol_tokenizer, config(12), part)
    assert summary["already_present"] > 0
    assert part.read_text() == whole.read_text()  # same records, same order, same bytes
    again = synthesize(ScriptedEngine(), smol_tokenizer, config(12), part)
    assert again["written_this_run"] == 0 and again["candidates"] == 0


def test_gives_up_with_reasons_when_nothing_is_usable(tmp_path, smol_tokenizer):
    class Mute(ScriptedEngine):
        def complete(self, prompts, params, seeds=None):
            return [Completion("", 1, 0, "stop") for _ in prompts]

    from exnihilo.errors import ExnihiloError

    cfg = config(2).model_copy(update={"max_candidates_factor": 3})
    with pytest.raises(ExnihiloError, match="empty_instruction"):
        synthesize(Mute(), smol_tokenizer, cfg, tmp_path / "m.jsonl")
    assert not (tmp_path / "m.jsonl").exists()


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_with_the_real_model(tmp_path):
    """A real `exnihilo synth magpie` process is SIGKILLed after its first records land;
    rerunning the same command finishes with exactly n unique, whole records."""
    out = tmp_path / "real.jsonl"
    n = 6
    cmd = [sys.executable, "-m", "exnihilo.cli", "synth", "magpie", "-n", str(n), "-o",
           str(out), "--batch-size", "4", "--instruction-max-tokens", "48",
           "--response-max-tokens", "64", "--seed", "7", "--show", "0",
           "--system", "You are a helpful assistant. Every answer is one short sentence."]
    env = dict(os.environ, EXNIHILO_NO_PROGRESS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 1:
            break
        time.sleep(0.2)
    assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read()}"
    assert out.exists(), "no record was written within 10 minutes"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = out.read_text().count("\n")
    assert 1 <= first < n
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    lines = out.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # no torn line: every line parses
    assert len(records) == n
    assert len({r["id"] for r in records}) == n
    assert len({r["meta"]["index"] for r in records}) == n
    for r in records:
        system, user, reply = r["messages"]  # the short-answer system prompt keeps it fast
        assert system["role"] == "system" and "short sentence" in system["content"]
        assert user["role"] == "user" and user["content"].strip()
        assert reply["role"] == "assistant" and reply["content"].strip()


def test_round_candidates_follow_the_keep_rate_seen_so_far():
    from exnihilo.synth.magpie import MIN_ROUND, round_candidates

    assert round_candidates(64, 128, kept=0, tried=0) == 128  # 2 per record, capped
    assert round_candidates(20, 128, kept=0, tried=0) == 42
    assert round_candidates(26, 128, kept=38, tried=128) == 128  # 1.5 * 26 / 0.297 = 131.4
    assert round_candidates(10, 128, kept=40, tried=100) == 38  # 1.5 * 10 / 0.4 = 37.5
    assert round_candidates(2, 128, kept=62, tried=192) == MIN_ROUND  # 9.3: the floor
    assert round_candidates(2, 8, kept=62, tried=192) == 8  # never above round_size
    assert round_candidates(5, 128, kept=0, tried=50) == 128  # nothing kept: rate floor 0.05
