"""Preference data in: our records, TRL's (strings, conversations, implicit prompt) and
LLMs-from-scratch's instruction/input/chosen/rejected; bad input named by file:line;
identical and too-long pairs counted, never silently truncated."""

from __future__ import annotations

import json

import pytest

from exnihilo.errors import ExnihiloError
from exnihilo.train.preference_data import (
    PairReport,
    read_preferences,
    tokenize_exchange,
    tokenize_pairs,
)

USER = [{"role": "user", "content": "Hi?"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_three_formats_read_to_the_same_record(tmp_path):
    rows = [
        {"messages": USER, "chosen": {"role": "assistant", "content": "Hello."},
         "rejected": {"role": "assistant", "content": "Go."}},
        {"messages": USER, "chosen": "Hello.", "rejected": "Go."},
        {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go."},
        {"prompt": USER, "chosen": [{"role": "assistant", "content": "Hello."}],
         "rejected": [{"role": "assistant", "content": "Go."}]},
        {"chosen": USER + [{"role": "assistant", "content": "Hello."}],
         "rejected": USER + [{"role": "assistant", "content": "Go."}]},
    ]
    records = read_preferences(write_jsonl(tmp_path / "p.jsonl", rows))
    assert len(records) == 5
    for r in records:
        assert r["messages"] == USER
        assert r["chosen"] == {"role": "assistant", "content": "Hello."}
        assert r["rejected"] == {"role": "assistant", "content": "Go."}
    assert len({r["id"] for r in records}) == 1  # the same content → the same id


def test_llms_from_scratch_preference_json(tmp_path, smol_tokenizer):
    path = tmp_path / "instruction-data-with-preference.json"
    path.write_text(json.dumps([
        {"instruction": "Rewrite politely.", "input": "Give me the salt.",
         "output": "Could you pass the salt?", "rejected": "Salt. Now.",
         "chosen": "Could you please pass the salt?"}]))
    (record,) = read_preferences(path)
    assert record["messages"][0]["content"] == "Rewrite politely.\n\nGive me the salt."
    prompt, chosen = tokenize_exchange(record["messages"], record["chosen"], "alpaca",
                                       smol_tokenizer, record["meta"]["alpaca"])
    text = smol_tokenizer.decode(prompt)
    assert "### Instruction:\nRewrite politely.\n\n### Input:\nGive me the salt." in text
    assert text.endswith("### Response:\n")
    assert smol_tokenizer.decode(chosen) == "Could you please pass the salt?<|im_end|>"


def test_chat_style_response_ends_with_one_end_of_turn(smol_tokenizer):
    prompt, chosen = tokenize_exchange(USER, {"role": "assistant", "content": "Hello."},
                                       "chat", smol_tokenizer)
    assert smol_tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    assert chosen[-1] == smol_tokenizer.eos_token_id
    assert chosen.count(smol_tokenizer.eos_token_id) == 1  # no doubled EOS


@pytest.mark.parametrize("row, message", [
    ({"prompt": "x", "chosen": "a"}, r"p.jsonl:2: a TRL preference record is missing 'rejected'"),
    ({"messages": USER, "rejected": "a"}, r"p.jsonl:2: .* missing 'chosen'"),
    ({"instruction": "x", "chosen": "a"}, r"p.jsonl:2: .* missing 'rejected'"),
    ({"text": "x"}, r"p.jsonl:2: not a preference record"),
    ({"prompt": "x", "chosen": 3, "rejected": "a"}, r"p.jsonl:2: 'chosen' must be"),
    ({"chosen": USER + [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]},
     r"p.jsonl:2: 'chosen' and 'rejected' conversations must share"),
])
def test_bad_records_name_file_and_line(tmp_path, row, message):
    good = {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go."}
    path = write_jsonl(tmp_path / "p.jsonl", [good, row])
    with pytest.raises(ExnihiloError, match=message):
        read_preferences(path)


def test_empty_file_is_an_error(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(ExnihiloError, match="empty"):
        read_preferences(tmp_path / "e.jsonl")


def test_identical_and_too_long_pairs_are_counted(tmp_path, smol_tokenizer):
    long_prompt = "word " * 80
    rows = [{"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go."},
            {"prompt": "Hi?", "chosen": "Same.", "rejected": "Same."},
            {"prompt": long_prompt, "chosen": "a", "rejected": "b"},
            {"prompt": "Hi?", "chosen": "ok " * 40, "rejected": "no"}]
    records = read_preferences(write_jsonl(tmp_path / "p.jsonl", rows))
    report = PairReport()
    pairs = tokenize_pairs(records, "phi3", smol_tokenizer, 32, "drop", report)
    assert (report.records, report.kept, report.identical, report.no_room, report.too_long) == (
        4, 1, 1, 1, 1)
    assert len(pairs) == 1 and len(report.skipped_ids) == 3
    assert "1 skipped (chosen == rejected)" in report.summary()
    # "truncate" cuts the long response to fit (no EOS: it did not end) and counts it.
    report = PairReport()
    pairs = tokenize_pairs(records, "phi3", smol_tokenizer, 32, "truncate", report)
    assert report.truncated == 1 and report.kept == 2
    cut = pairs[1]
    assert len(cut.prompt) + len(cut.chosen) == 32
    assert cut.chosen[-1] != smol_tokenizer.eos_token_id
    assert cut.rejected[-1] == smol_tokenizer.eos_token_id
