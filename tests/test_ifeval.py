"""IFEval: each of the 25 checkers passing and failing (with the benchmark's edge cases),
loose variants, the summary's bootstrap against a naive loop, bad input, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from exnihilo.errors import ExnihiloError
from exnihilo.ifeval import (
    DEFAULT_INPUT,
    INSTRUCTIONS,
    Prompt,
    check_instruction,
    evaluate_responses,
    follow_list,
    loose_variants,
    match_responses,
    paired_difference,
    read_inputs,
    read_responses,
    read_results,
    score_response,
    summarize,
)
from exnihilo.ifeval.text import count_capital_words, count_sentences, count_words, word_tokens

# (instruction id, kwargs, a response that follows it, a response that does not)
CASES = [
    # keyword checks are case-insensitive substring matches: "CATegory" holds "cat"
    ("keywords:existence", {"keywords": ["cat", "dog"]}, "A CATegory of Dogs.", "A cat."),
    ("keywords:frequency", {"keyword": "the", "frequency": 3, "relation": "at least"},
     "The THE there", "The the end"),
    # "less than" is strict: 3 occurrences are not less than 3
    ("keywords:frequency", {"keyword": "the", "frequency": 3, "relation": "less than"},
     "the the", "the the the"),
    # forbidden words alone use word boundaries: "Category" does not contain the word "cat"
    ("keywords:forbidden_words", {"forbidden_words": ["cat", "dog"]}, "Category theory.",
     "My Cat sleeps."),
    ("keywords:letter_frequency", {"letter": "a", "let_frequency": 3, "let_relation": "at least"},
     "bAnana", "banan"),
    ("keywords:letter_frequency", {"letter": "#", "let_frequency": 2, "let_relation": "less than"},
     "#one", "#one #two"),
    ("language:response_language", {"language": "ru"},
     "Привет! Это ответ на русском языке, без других языков.",
     "Hello, this answer is written in English only."),
    # Punkt: "Dr." does not end a sentence, so this is 2 sentences
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     "Dr. Smith went home. He was tired.", "One. Two. Three."),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "at least"},
     "Dr. Smith went home. He was tired.", "Dr. Smith went home."),
    # paragraphs split on *** and counted exactly; a divider at the very start/end is ignored
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3},
     "***\nOne.\n***\nTwo.\n***\nThree.\n***", "One.\n***\nTwo."),
    ("length_constraints:number_words", {"num_words": 4, "relation": "at least"},
     "one two, three-four", "one two three"),
    ("length_constraints:number_words", {"num_words": 4, "relation": "less than"},
     "one two three", "one two, three-four"),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "summary"},
     "Intro text.\n\n\"Summary, then more.", "Intro text.\n\nIn summary, more."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2},
     "Dear [name], at [address].", "Dear [name]."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."},
     "Thanks.\n\np. s. see you", "Thanks.\n\nPS see you"),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"},
     "Thanks.\nP.P.S. more", "Thanks.\nP.S. more"),
    # "* " and "-" bullets; a **bold** line is not a bullet; the count must be exact
    ("detectable_format:number_bullet_lists", {"num_bullets": 3},
     "**Plan**\n* one\n* two\n- three", "* one\n* two"),
    ("detectable_format:constrained_response", {}, "Well. My answer is maybe.",
     "my answer is yes."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     "*first* and **second**", "*first* and * * and **"),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "Intro\nSECTION 1\nfoo\nSECTION 2\nbar", "Section 1\nfoo\nSection 2\nbar"),
    # JSON may sit in a code fence
    ("detectable_format:json_format", {}, '```json\n{"a": [1, 2]}\n```',
     '{"a": 1} and more'),
    ("detectable_format:title", {}, "<<Poem of Joy>>\nLa la.", "<< >>\n<<broken\ntitle>>"),
    ("combination:two_responses", {}, "First answer.\n******\nSecond answer.",
     "Same.\n******\nSame."),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem."},
     "write a POEM. Roses are red.", "Sure! Write a poem."),
    ("startend:end_checker", {"end_phrase": "Any other questions?"},
     '"All done. Any other questions?"', "Any other questions? Bye."),
    ("startend:quotation", {}, '  "wrapped"  ', '"half'),
    # "NASA's" -> "NASA" + "'s", "DON'T" -> "DO" + "N'T": I, LOVE, NASA, DO, N'T = 5
    ("change_case:capital_word_frequency", {"capital_frequency": 5, "capital_relation": "at least"},
     "I LOVE NASA's work, DON'T you?", "I LOVE NASA's work, don't you?"),
    ("change_case:capital_word_frequency",
     {"capital_frequency": 2, "capital_relation": "less than"}, "I like it.", "I LIKE it."),
    ("change_case:english_capital", {}, "THIS ANSWER IS WRITTEN IN ENGLISH, ALL IN CAPITALS.",
     "This answer is written in English, not all in capitals."),
    ("change_case:english_lowercase", {}, "this answer is written in english, all lower case.",
     "This answer is written in English with capitals."),
    ("punctuation:no_comma", {}, "No commas here.", "One, two."),
]


def test_cases_cover_all_25_instructions():
    assert len(INSTRUCTIONS) == 25
    assert {case[0] for case in CASES} == set(INSTRUCTIONS)


@pytest.mark.parametrize(("iid", "kwargs", "good", "bad"), CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_checker_passes_and_fails(iid, kwargs, good, bad):
    assert check_instruction(iid, kwargs, good) is True
    assert check_instruction(iid, kwargs, bad) is False


def test_blank_response_follows_nothing():
    assert check_instruction("punctuation:no_comma", {}, "  \n") is False


@pytest.mark.parametrize(("iid", "kwargs", "response", "expected"), [
    # less than is strict / at least is >= at the exact threshold
    ("length_constraints:number_words", {"num_words": 3, "relation": "less than"}, "a b c",
     False),
    ("length_constraints:number_words", {"num_words": 3, "relation": "at least"}, "a b c", True),
    # an empty paragraph between two dividers fails, whatever the count
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "A\n***\n***\nB", False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "A ***B", True),
    # more paragraphs than asked fails too (exact count)
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "A\n***\nB\n***\nC", False),
    # nth paragraph: right word but wrong paragraph count
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "summary"},
     "Intro.\n\nSummary here.", False),
    # nth paragraph beyond the paragraphs present
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 1, "nth_paragraph": 2, "first_word": "intro"}, "Intro.", False),
    # JSON: a bare code fence, and a plain object
    ("detectable_format:json_format", {}, "```\n[1, 2]\n```", True),
    ("detectable_format:json_format", {}, '{"k": "v"}', True),
    ("detectable_format:json_format", {}, "Here is JSON: {}", False),
    # section markers are case-sensitive and need a number
    ("detectable_format:multiple_sections", {"section_spliter": "Day", "num_sections": 2},
     "Day 1: go. Day 2: stay.", True),
    ("detectable_format:multiple_sections", {"section_spliter": "Day", "num_sections": 2},
     "Day one: go. Day two: stay.", False),
    # a blank answer between ****** fails
    ("combination:two_responses", {}, "A\n******\n******\nB", False),
    ("combination:two_responses", {}, "******\nA\n******\nB\n******", True),
    # end phrase compared case-insensitively
    ("startend:end_checker", {"end_phrase": "Peace!"}, "Bye. PEACE!", True),
    # text without letters: the language is undecidable and the reference counts it followed
    ("language:response_language", {"language": "ko"}, "12345 !!!", True),
    ("change_case:english_capital", {}, "ЭТО ОТВЕТ НА РУССКОМ ЯЗЫКЕ, А НЕ НА АНГЛИЙСКОМ.", False),
    # case is tested before language: no letters -> not upper case -> not followed
    ("change_case:english_capital", {}, "123 !!!", False),
    ("change_case:english_lowercase", {}, "123 !!!", False),
    ("detectable_format:constrained_response", {}, "My answer is no.", True),
    ("detectable_content:postscript", {"postscript_marker": "Note:"}, "A\nnote: b", True),
])
def test_checker_edge_cases(iid, kwargs, response, expected):
    assert check_instruction(iid, kwargs, response) is expected


def test_counts_match_the_reference_tokenizers():
    # Hello, world, It, s, 3, 5, o, clock_now
    assert count_words("Hello, world! It's 3.5 o'clock_now") == 8
    # Punkt with NLTK's English parameters: numbered items are sentences of their own
    assert count_sentences("1. First item\n2. Second item") == 3
    assert count_sentences("I like the U.S. It is big.") == 2
    assert count_sentences("Wait... what? Yes!") == 2
    assert word_tokens("CANNOT wait... U.S.A. 3,000 a,b") == \
        ["CAN", "NOT", "wait", "...", "U.S.A.", "3,000", "a", ",", "b"]
    assert count_capital_words('"HELLO," SHE SAID: \'OK\' -- STATE-OF-THE-ART') == 5


# ------------------------------------------------------------------------------ loose

def test_loose_variants_in_reference_order():
    assert loose_variants("a\n*b*\nc") == [
        "a\n*b*\nc", "a\nb\nc", "*b*\nc", "a\n*b*", "*b*", "b\nc", "a\nb", "b"]


@pytest.mark.parametrize(("iid", "kwargs", "response"), [
    ("startend:quotation", {}, 'Here you go:\n"The whole answer."'),  # drop the first line
    ("punctuation:no_comma", {}, "Sure, here it is:\nNo commas below"),
    ("startend:end_checker", {"end_phrase": "Any other questions?"},
     "Done. **Any other questions?**"),  # remove the asterisks
    ("detectable_format:json_format", {}, 'Here is the JSON:\n{"a": 1}\nHope it helps.'),  # both
])
def test_loose_passes_where_strict_fails(iid, kwargs, response):
    assert follow_list([iid], [kwargs], response, loose=False) == [False]
    assert follow_list([iid], [kwargs], response, loose=True) == [True]


def test_loose_still_fails_when_no_variant_passes():
    assert follow_list(["punctuation:no_comma"], [{}], "a, b\nc, d\ne, f", loose=True) == [False]


def test_score_response_is_the_fraction_followed():
    ids = ["punctuation:no_comma", "startend:quotation", "detectable_format:title"]
    kwargs = [{}, {}, {}]
    assert score_response(ids, kwargs, '"<<T>> a, b"', loose=False) == pytest.approx(2 / 3)
    assert score_response(ids, kwargs, 'Intro, sure:\n"<<T>> no commas"', loose=True) == 1.0
    # strict: the comma and the unquoted first line fail; only the title passes
    assert score_response(ids, kwargs, 'Intro, sure:\n"<<T>> no commas"', loose=False) == \
        pytest.approx(1 / 3)


# ------------------------------------------------------------------------------ summary

def _rows(mode: str, follows: list[list[bool]]) -> list[dict]:
    return [{"mode": mode, "prompt": f"p{i}", "instruction_id_list": ["x"] * len(f),
             "follow_all_instructions": all(f), "follow_instruction_list": f}
            for i, f in enumerate(follows)]


FOLLOWS = [[True, True], [False], [True, False], [True]]


def test_summary_values_and_bootstrap_match_a_naive_loop():
    results = _rows("strict", FOLLOWS) + _rows("loose", [[True, True], [True], [True, False],
                                                         [True]])
    s = summarize(results, resamples=500, seed=3)
    assert s["n_prompts"] == 4 and s["n_instructions"] == 6
    assert s["strict"]["prompt_level"]["value"] == 0.5       # prompts 0 and 3
    assert s["strict"]["instruction_level"]["value"] == pytest.approx(4 / 6)
    assert s["loose"]["prompt_level"]["value"] == 0.75
    assert s["loose"]["instruction_level"]["value"] == pytest.approx(5 / 6)
    # naive percentile bootstrap with the same resampled prompt indices
    idx = np.random.default_rng(3).integers(0, 4, size=(500, 4))
    prompt_acc, instr_acc = [], []
    for draw in idx:
        picked = [FOLLOWS[i] for i in draw]
        prompt_acc.append(sum(all(f) for f in picked) / 4)
        instr_acc.append(sum(sum(f) for f in picked) / sum(len(f) for f in picked))
    assert s["strict"]["prompt_level"]["ci95"] == pytest.approx(
        tuple(np.percentile(prompt_acc, [2.5, 97.5])))
    assert s["strict"]["instruction_level"]["ci95"] == pytest.approx(
        tuple(np.percentile(instr_acc, [2.5, 97.5])))
    low, high = s["strict"]["prompt_level"]["ci95"]
    assert 0.0 <= low < 0.5 < high <= 1.0
    assert s["by_instruction"] == {"x": {"n": 6, "strict": pytest.approx(4 / 6),
                                         "loose": pytest.approx(5 / 6)}}


def test_paired_difference():
    a = _rows("strict", [[True, True], [True], [True, False], [True]])
    b = _rows("strict", FOLLOWS)
    diff = paired_difference(a, b, resamples=300, seed=0)
    assert diff["strict"]["prompt_level"]["value"] == pytest.approx(0.25)
    assert diff["strict"]["instruction_level"]["value"] == pytest.approx(1 / 6)
    low, high = diff["strict"]["prompt_level"]["ci95"]
    assert 0.0 <= low <= 0.25 <= high  # A never does worse on any prompt
    same = paired_difference(b, b, resamples=100)
    assert same["strict"]["prompt_level"]["ci95"] == (0.0, 0.0)
    with pytest.raises(ExnihiloError, match="1 prompts are in only one"):
        paired_difference(a[:3], b, resamples=100)


# ------------------------------------------------------------------------------ inputs

def _write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


ROW = {"key": 1, "prompt": "Say hi without commas.", "instruction_id_list":
       ["punctuation:no_comma"], "kwargs": [{}]}


def test_all_541_shared_prompts_validate():
    # The shared eval sets are part of the project's setup (conftest's `shared_dir` fails
    # without them too): a missing file is a broken checkout, not a reason to skip.
    assert DEFAULT_INPUT.is_file(), f"{DEFAULT_INPUT} not present"
    rows = read_inputs(DEFAULT_INPUT)
    assert len(rows) == 541
    assert {i for row in rows for i in row.instruction_id_list} == set(INSTRUCTIONS)
    assert sum(len(row.instruction_id_list) for row in rows) == 834


def test_hf_style_null_kwargs_are_dropped(tmp_path):
    row = dict(ROW, kwargs=[{"num_words": None, "relation": None, "keywords": None}])
    assert read_inputs(_write(tmp_path / "in.jsonl", [row]))[0].kwargs == [{}]


@pytest.mark.parametrize(("change", "message"), [
    ({"instruction_id_list": ["punctuation:no_semicolon"]},
     r"in\.jsonl:2: unknown instruction id 'punctuation:no_semicolon'"),
    ({"instruction_id_list": ["length_constraints:number_words"], "kwargs": [{"num_words": 5}]},
     r"in\.jsonl:2: length_constraints:number_words: missing kwargs relation"),
    ({"instruction_id_list": ["length_constraints:number_words"],
      "kwargs": [{"num_words": 5, "relation": "at most"}]}, r"kwarg relation must be"),
    ({"instruction_id_list": ["keywords:letter_frequency"],
      "kwargs": [{"letter": "ab", "let_frequency": 2, "let_relation": "at least"}]},
     r"keywords:letter_frequency: kwarg letter must be a single character"),
    ({"kwargs": [{"extra": 1}]}, r"punctuation:no_comma: unexpected kwargs extra"),
    ({"kwargs": []}, r"in\.jsonl:2: 'kwargs' must be a list with one object per"),
    ({"kwargs": None}, r"in\.jsonl:2: missing 'kwargs'"),
])
def test_bad_input_rows_name_file_line_and_id(tmp_path, change, message):
    path = _write(tmp_path / "in.jsonl", [ROW, dict(ROW, prompt="Other.", **change)])
    with pytest.raises(ExnihiloError, match=message):
        read_inputs(path)


def test_unmatched_responses_are_counted_never_skipped(tmp_path):
    inputs = read_inputs(_write(tmp_path / "in.jsonl",
                                [ROW, dict(ROW, prompt="Two."), dict(ROW, prompt="Three.")]))
    with pytest.raises(ExnihiloError, match="2 of 3 prompts have no response"):
        match_responses(inputs, {"Two.": "x"}, "r.jsonl")
    answers = {row.prompt: "ok" for row in inputs}
    with pytest.raises(ExnihiloError, match="1 responses answer prompts that are not in"):
        match_responses(inputs, dict(answers, **{"Elsewhere.": "x"}), "r.jsonl")
    assert match_responses(inputs, answers) == ["ok"] * 3


def test_read_responses_both_formats(tmp_path):
    path = _write(tmp_path / "r.jsonl", [
        {"prompt": "A?", "response": "a"},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "B?"},
                      {"role": "assistant", "content": "b"}]},
    ])
    assert read_responses(path) == {"A?": "a", "B?": "b"}
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "A?", "response": "a"},
                                          {"prompt": "A?", "response": "other"}])
    with pytest.raises(ExnihiloError, match=r"bad\.jsonl:2: prompt already answered"):
        read_responses(bad)
    no_answer = _write(tmp_path / "q.jsonl", [{"messages": [{"role": "user", "content": "Q"}]}])
    with pytest.raises(ExnihiloError, match=r"q\.jsonl:1: record has no assistant answer"):
        read_responses(no_answer)


def test_evaluate_responses_writes_benchmark_rows():
    rows = [Prompt(7, "P", ["punctuation:no_comma", "startend:quotation"], [{}, {}])]
    results = evaluate_responses(rows, ['Sure, here:\n"no commas"'])
    strict, loose = results
    assert strict == {"mode": "strict", "key": 7, "prompt": "P",
                      "response": 'Sure, here:\n"no commas"',
                      "instruction_id_list": ["punctuation:no_comma", "startend:quotation"],
                      "follow_all_instructions": False, "follow_instruction_list": [False, False]}
    assert loose["mode"] == "loose" and loose["follow_instruction_list"] == [True, True]
    assert loose["follow_all_instructions"] is True


# ------------------------------------------------------------------------------ CLI

def _app() -> typer.Typer:
    from exnihilo.cli.ifeval import ifeval_command

    app = typer.Typer()
    app.command()(ifeval_command)
    return app


def test_cli_checks_responses_writes_results_and_compares(tmp_path):
    inp = _write(tmp_path / "in.jsonl", [ROW, dict(ROW, prompt="Two [b]?", key=2)])
    good = _write(tmp_path / "good.jsonl", [{"prompt": ROW["prompt"], "response": "hi there"},
                                            {"prompt": "Two [b]?", "response": "yes [b]"}])
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": ROW["prompt"], "response": "hi, there"},
                                          {"prompt": "Two [b]?", "response": "yes [b]"}])
    runner = CliRunner()
    out_b = tmp_path / "b.results.jsonl"
    res = runner.invoke(_app(), ["--responses", str(bad), "--input", str(inp), "-o", str(out_b)])
    assert res.exit_code == 0, res.output
    assert "50.0" in res.output and "punctuation:no_comma" in res.output
    out_a = tmp_path / "a.results.jsonl"
    res = runner.invoke(_app(), ["--responses", str(good), "--input", str(inp), "-o", str(out_a),
                                 "--compare", str(out_b)])
    assert res.exit_code == 0, res.output
    assert "+50.0" in res.output
    rows = read_results(out_a)
    assert [r["mode"] for r in rows] == ["strict", "strict", "loose", "loose"]
    assert all(r["follow_all_instructions"] for r in rows)


def test_cli_refuses_bad_combinations_before_any_model(tmp_path):
    inp = _write(tmp_path / "in.jsonl", [ROW])
    app = _app()
    res = CliRunner().invoke(app, ["--input", str(inp)])
    assert isinstance(res.exception, ExnihiloError)
    assert "exactly one of --model" in str(res.exception)
    other = _write(tmp_path / "r.jsonl", [{"prompt": "Not in the file.", "response": "x"}])
    res = CliRunner().invoke(app, ["--responses", str(other), "--input", str(inp)])
    assert "1 of 1 prompts have no response" in str(res.exception)
    bad = _write(tmp_path / "bad.jsonl", [dict(ROW, instruction_id_list=["nope:x"])])
    res = CliRunner().invoke(app, ["--model", "no-such-model", "--input", str(bad)])
    assert "bad.jsonl:1: unknown instruction id 'nope:x'" in str(res.exception)


def test_cli_compare_with_other_prompts_fails_before_generating(tmp_path):
    inp = _write(tmp_path / "in.jsonl", [ROW, dict(ROW, prompt="Two.")])
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"mode": "strict", "prompt": "Elsewhere.",
                                 "instruction_id_list": ["x"], "follow_all_instructions": True,
                                 "follow_instruction_list": [True]}) + "\n", encoding="utf-8")
    res = CliRunner().invoke(_app(), ["--model", "no-such-model", "--input", str(inp),
                                      "--compare", str(other)])
    assert "3 prompts are in only one of the two runs" in str(res.exception)


def test_cli_generates_with_a_model_and_resumes(tmp_path, tiny_llama, smol_tokenizer,
                                                one_thread):
    model_dir = tmp_path / "tiny"
    tiny_llama.save_pretrained(model_dir)
    smol_tokenizer.save_pretrained(model_dir)
    inp = _write(tmp_path / "in.jsonl", [ROW, dict(ROW, prompt="Two."), dict(ROW, prompt="3.")])
    out = tmp_path / "run.jsonl"
    args = ["--model", str(model_dir), "--input", str(inp), "--limit", "2", "-o", str(out),
            "--max-new-tokens", "3", "--threads", "1"]
    res = CliRunner().invoke(_app(), args)
    assert res.exit_code == 0, res.output
    answers = read_responses(tmp_path / "run.responses.jsonl")
    assert set(answers) == {ROW["prompt"], "Two."}  # --limit 2
    rows = read_results(out)
    assert len(rows) == 4
    assert [r["response"] for r in rows[:2]] == [answers[ROW["prompt"]], answers["Two."]]
    before = (tmp_path / "run.responses.jsonl").read_text(encoding="utf-8")
    res = CliRunner().invoke(_app(), args)  # a rerun reuses every answer
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run.responses.jsonl").read_text(encoding="utf-8") == before


# ------------------------------------------------------------------------------ reference oracle

REFERENCE_ROWS = Path(__file__).parent / "fixtures" / "ifeval_reference_rows.jsonl"


def test_agrees_with_the_reference_implementation_on_gpt4_answers():
    """48 of the IFEval authors' GPT-4 answers (google-research `instruction_following_eval/
    data/input_response_data_gpt4_20231107_145030.jsonl`, Apache-2.0) with the booleans the
    reference `evaluation_main.py` wrote for them (`eval_results_{strict,loose}.jsonl`), chosen
    so that every instruction id appears followed and (where GPT-4 ever failed it) not
    followed, plus answers that pass loose only. Left out: the one row where the reference's
    loose result is False but its strict one True, which its own definition rules out."""
    rows = [json.loads(line) for line in REFERENCE_ROWS.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 48
    assert {i for row in rows for i in row["instruction_id_list"]} == set(INSTRUCTIONS)
    for row in rows:
        ids, kwargs = row["instruction_id_list"], row["kwargs"]
        assert follow_list(ids, kwargs, row["response"]) == row["strict"], row["prompt"][:60]
        assert follow_list(ids, kwargs, row["response"], loose=True) == row["loose"], \
            row["prompt"][:60]
