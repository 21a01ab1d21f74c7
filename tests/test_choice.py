"""`eval choice`: multiple-choice items, option orders, accuracy by log-likelihood."""

from __future__ import annotations

import json
import random

import pytest

from exnihilo.errors import ExnihiloError
from exnihilo.evaluate import choice_accuracy, load_choice_set, option_orders
from exnihilo.records import make_record
from test_judging import LogprobScripted

pytestmark = pytest.mark.usefixtures("one_thread")

PLAIN = [
    {"question": "Capital of France?", "options": ["Berlin", "Paris", "Rome"], "answer": 1},
    {"question": "2 + 2?", "options": {"A": "3", "B": "4"}, "answer": "B"},
    {"question": "Largest planet?", "options": ["Jupiter", "Mars"], "answer": "Jupiter",
     "id": "planet"},
]


def test_plain_items_accept_index_letter_and_text_answers(tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in PLAIN), encoding="utf-8")
    items = load_choice_set(path)
    assert [i["answer"] for i in items] == [1, 1, 0]
    assert items[1]["options"] == ["3", "4"] and items[2]["id"] == "planet"


def test_a_bad_answer_is_named_with_its_line(tmp_path):
    path = tmp_path / "mc.jsonl"
    rows = PLAIN[:1] + [{"question": "q", "options": ["a", "b"], "answer": "c"}]
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    with pytest.raises(ExnihiloError, match=r"mc.jsonl:2: answer 'c'"):
        load_choice_set(path)


def test_documents_multiple_choice_records_are_read_and_free_form_ones_skipped(tmp_path):
    from exnihilo.synth.stepwise import multiple_choice

    instruction, response = multiple_choice("What do cats eat?", "Fish and meat.",
                                            ["Rocks.", "Sand.", "Glass."], random.Random(3))
    mc = make_record([{"role": "user", "content": instruction},
                      {"role": "assistant", "content": response}],
                     {"task_format": "multiple_choice"})
    free = make_record([{"role": "user", "content": "Why?"},
                        {"role": "assistant", "content": "Because."}],
                       {"task_format": "free_form"})
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps(mc) + "\n" + json.dumps(free) + "\n", encoding="utf-8")
    [item] = load_choice_set(path)
    assert item["question"] == "What do cats eat?" and len(item["options"]) == 4
    assert item["options"][item["answer"]] == "Fish and meat."


def test_as_many_shuffles_as_options_put_each_option_in_each_position_once():
    item = {"id": "x", "options": ["a", "b", "c", "d"]}
    orders = option_orders(item, 4, seed=0)
    for position in range(4):
        assert sorted(order[position] for order in orders) == [0, 1, 2, 3]
    assert option_orders(item, 4, seed=0) == orders


def items_from(rows):
    from exnihilo.evaluate.choice import _plain_item

    return [_plain_item(r, f"row{i}") for i, r in enumerate(rows)]


def test_a_model_that_knows_the_answers_is_right_in_every_order():
    right = {"Paris", "4", "Jupiter"}
    engine = LogprobScripted(reply=lambda prompt, reply: (
        -0.1 if reply.split(") ", 1)[1] in right else -3.0, 2))
    rows, summary = choice_accuracy(engine, items_from(PLAIN), shuffles=3)
    assert summary["accuracy"] == 1.0 and summary["consistent"] == 1.0
    assert summary["interval_95"] == [1.0, 1.0]
    assert all(len(r["trials"]) == 3 for r in rows)


def test_a_model_that_always_answers_a_scores_chance_when_orders_are_balanced():
    engine = LogprobScripted(reply=lambda prompt, reply: (-0.1 if reply.startswith("A)")
                                                          else -5.0, 2))
    items = items_from([{"question": f"q{i}", "options": ["w", "x", "y", "z"], "answer": i % 4}
                        for i in range(8)])
    _, summary = choice_accuracy(engine, items, shuffles=4)
    assert summary["accuracy"] == pytest.approx(0.25)  # each option shown first once
    assert summary["first_position_rate"] == 1.0 and summary["consistent"] == 0.0
    assert summary["chance"] == 0.25


def test_choice_resumes_from_its_output(tmp_path):
    engine = LogprobScripted(reply=lambda prompt, reply: (-1.0, 1))
    items = items_from(PLAIN)
    out = tmp_path / "choice.jsonl"
    choice_accuracy(engine, items[:2], out=out)
    calls = len(engine.calls)
    rows, _ = choice_accuracy(engine, items, out=out)
    assert len(engine.calls) == calls + 1 and len(rows) == 3
    with pytest.raises(ExnihiloError, match="other settings"):
        choice_accuracy(engine, items, shuffles=2, out=out)


def test_choice_on_tiny_llama_picks_the_likeliest_reply(tiny_llama, smol_tokenizer):
    from exnihilo.engines.transformers import TransformersEngine
    from exnihilo.evaluate.choice import choice_prompt

    engine = TransformersEngine("tiny", model_obj=tiny_llama, tokenizer=smol_tokenizer)
    [item] = items_from(PLAIN[:1])
    rows, _ = choice_accuracy(engine, [item], shuffles=2)
    for trial in rows[0]["trials"]:
        shown = [item["options"][j] for j in trial["order"]]
        conv = [{"role": "user", "content": choice_prompt(item["question"], shown)}]
        replies = [f"{'ABC'[i]}) {o}" for i, o in enumerate(shown)]
        sums = [s for s, _ in engine.reply_logprobs([conv] * 3, replies)]
        assert trial["picked"] == trial["order"][max(range(3), key=sums.__getitem__)]


def test_cloze_style_scores_bare_option_texts_after_the_question_alone():
    engine = LogprobScripted(reply=lambda prompt, reply: (-0.1 if reply == "Paris" else -4.0, 1))
    rows, summary = choice_accuracy(engine, items_from(PLAIN[:1]), shuffles=4, style="cloze")
    assert summary["accuracy"] == 1.0 and summary["shuffles"] == 1
    conversation = engine.calls[0][1][0]
    assert conversation == [{"role": "user", "content": "Capital of France?"}]
    with pytest.raises(ExnihiloError, match="--style must be one of"):
        choice_accuracy(engine, items_from(PLAIN[:1]), style="essay")
