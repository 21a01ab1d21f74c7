"""Multi-turn question sets (MT-Bench style): loading, turn-by-turn generation, resume,
judging and pairwise."""

from __future__ import annotations

import json

import pytest

from exnihilo.engines.base import SamplingParams
from exnihilo.errors import ExnihiloError
from exnihilo.evaluate import (
    generate_responses,
    judge_scores,
    load_eval_set,
    pairwise_compare,
    prompt_id,
)
from exnihilo.records import iter_jsonl
from helpers import ScriptedEngine

QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Write a haiku.", "Now in French."]},
    {"question_id": 82, "category": "math", "turns": ["What is 2+2?", "Times 3?", "Minus 1?"],
     "reference": ["4", "12", "11"]},
    {"question_id": 83, "category": "writing", "turns": ["Write a haiku.", "Now shorter."]},
    {"instruction": "Say hi.", "input": "", "output": "Hi."},
]
PARAMS = SamplingParams(temperature=0.0, max_new_tokens=8)


@pytest.fixture
def question_file(tmp_path):
    path = tmp_path / "mt.jsonl"
    path.write_text("\n".join(json.dumps(q) for q in QUESTIONS) + "\n", encoding="utf-8")
    return path


def numbered_answers(conv_text: str) -> str:
    return f"answer to {conv_text}"


def test_a_question_file_with_turns_loads_every_turn_and_the_last_reference(question_file):
    records = load_eval_set(question_file)
    assert len(records) == 4  # same first turn, different second: two questions
    assert records[0]["meta"]["turns"] == ["Write a haiku.", "Now in French."]
    assert records[0]["messages"] == [{"role": "user", "content": "Write a haiku."}]
    assert records[1]["meta"]["reference"] == "11"
    assert records[0]["meta"]["reference"] is None
    assert prompt_id(records[0]) != prompt_id(records[2])
    assert records[3]["meta"]["reference"] == "Hi."


def test_bad_turns_are_named_with_their_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"turns": ["a", "b"], "reference": ["x"]}) + "\n"
                    + json.dumps({"turns": []}) + "\n", encoding="utf-8")
    with pytest.raises(ExnihiloError, match=r"bad.jsonl:1: 'reference' must list one answer"):
        load_eval_set(path)


def test_each_turn_sees_the_models_own_earlier_answers(question_file):
    engine = ScriptedEngine(numbered_answers, name="fake:gen")
    results = generate_responses(engine, load_eval_set(question_file), PARAMS)
    math = results[1]["messages"]
    assert [m["role"] for m in math] == ["user", "assistant"] * 3
    assert math[3]["content"] == "answer to Times 3?"
    # the third turn's call carried both earlier answers
    third = [c for call in engine.calls for c in call[1] if len(c) == 5]
    assert third == [[{"role": "user", "content": "What is 2+2?"},
                      {"role": "assistant", "content": "answer to What is 2+2?"},
                      {"role": "user", "content": "Times 3?"},
                      {"role": "assistant", "content": "answer to Times 3?"},
                      {"role": "user", "content": "Minus 1?"}]]
    assert results[1]["meta"]["turn_finish_reasons"] == ["stop"] * 3
    assert results[1]["meta"]["prompt_id"] == prompt_id(load_eval_set(question_file)[1])
    assert results[3]["messages"][-1]["content"] == "answer to Say hi."  # single-turn too
    assert results[0]["meta"]["seed"] != results[2]["meta"]["seed"]


def test_a_killed_multi_turn_run_resumes_whole_questions(question_file, tmp_path):
    out = tmp_path / "gen.jsonl"
    records = load_eval_set(question_file)
    engine = ScriptedEngine(numbered_answers, name="fake:gen", die_after=2)
    with pytest.raises(KeyboardInterrupt):
        generate_responses(engine, records, PARAMS, out=out, chunk_size=1)
    assert len([o for _, o in iter_jsonl(out)]) == 1  # question 81, both turns, kept whole
    again = ScriptedEngine(numbered_answers, name="fake:gen")
    results = generate_responses(again, records, PARAMS, out=out, chunk_size=1)
    assert again.rows_seen == 3 + 2 + 1  # the others' turns; nothing of question 81 again
    assert len(results[0]["messages"]) == 4


def test_multi_turn_needs_the_chat_style(question_file):
    with pytest.raises(ExnihiloError, match="--style chat"):
        generate_responses(ScriptedEngine(numbered_answers), load_eval_set(question_file),
                           PARAMS, style="alpaca")


def test_judge_and_pairwise_read_multi_turn_answers(question_file):
    records = load_eval_set(question_file)[:2]
    a = generate_responses(ScriptedEngine(numbered_answers, name="fake:a"), records, PARAMS)
    b = generate_responses(ScriptedEngine(lambda t: f"B says {t}", name="fake:b"), records,
                           PARAMS)
    judge = ScriptedEngine(lambda _: "70")
    scored = judge_scores(judge, a)
    shown = judge.calls[0][1][1][0]["content"]
    assert "answer to Times 3?" in shown and "answer to Minus 1?" in shown  # context + final
    assert scored[1]["meta"]["tags"]["score"] == 70
    pair_judge = ScriptedEngine(lambda _: "A")
    rows, summary = pairwise_compare(pair_judge, a, b)
    assert summary["n"] == 2 and summary["unmatched_a"] == 0
    prompt = pair_judge.calls[0][1][2][0]["content"]  # question 82, A first
    assert "answer to Times 3?" in prompt and "B says Times 3?" in prompt
    # the question, then each side: the user turn and its own answer
    assert prompt.count("Minus 1?") == 5
