"""Stepwise document synthesis: sentences, passages, evidence, question and answer
extraction value by value; whole runs with a scripted engine and the real MiniLM; and the
embedded 135M model on `--pydoc json`, where every answer must be the chunk's own words."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest

from exnihilo.engines.base import Completion, SamplingParams
from exnihilo.errors import ExnihiloError
from exnihilo.records import read_records
from exnihilo.synth import documents as D
from exnihilo.synth.evidence import (
    clean_markup,
    content_words,
    is_code_paragraph,
    lexical_support,
    passages,
    prose_sentences,
    select_evidence,
    split_sentences,
)
from exnihilo.synth.ingest import Chunk, Document, chunk_documents, chunk_id, pydoc_documents
from exnihilo.synth.stepwise import (
    StepwiseSettings,
    extract_question,
    multiple_choice,
    stepwise_formats,
    stepwise_rows,
    trim_answer,
)

DOC = """Lighthouses

A lighthouse is a tower that emits light to guide ships at night. Most lighthouses
stand on rocky coasts or at harbour entrances.

    >>> beam = lighthouse.turn_on()
    >>> beam.range_km
    37

The ``Fresnel`` lens, invented by Augustin-Jean Fresnel in 1822, made the beam visible
from far away. It replaced heavy mirrors.

Keepers trimmed the wicks and wound the clockwork every four hours. Automation removed
the last keepers in the 1990s.

Many old towers are now museums open to visitors in summer."""

SENTENCES = [
    "A lighthouse is a tower that emits light to guide ships at night.",
    "Most lighthouses stand on rocky coasts or at harbour entrances.",
    "The ``Fresnel`` lens, invented by Augustin-Jean Fresnel in 1822, made the beam visible "
    "from far away.",
    "It replaced heavy mirrors.",
    "Keepers trimmed the wicks and wound the clockwork every four hours.",
    "Automation removed the last keepers in the 1990s.",
    "Many old towers are now museums open to visitors in summer.",
]


# ----------------------------------------------------------------------------- text pieces

def test_prose_sentences_skip_headings_code_and_edge_fragments():
    assert prose_sentences(DOC) == SENTENCES
    # a chunk cut mid-sentence on both sides: the cut pieces are not sentences
    cut = "of the beam at night. The lens was made of glass. It was heavy and"
    assert prose_sentences(cut) == ["The lens was made of glass."]
    # repeated paragraphs (API docs repeat them) give each sentence once
    assert prose_sentences("One two three four.\n\nOne two three four.") == [
        "One two three four."]


def test_code_paragraphs_and_markup():
    assert is_code_paragraph("    >>> x = 1\n    >>> x\n    1")
    assert is_code_paragraph("$ echo hi | python -m json.tool\n    {}")
    assert not is_code_paragraph("Prose line one.\n    indented quote")  # 1 of 2 is not most
    assert clean_markup(":mod:`json` wraps ``dumps``; see :func:`~json.loads`.") == (
        "`json` wraps `dumps`; see `json.loads`.")
    assert split_sentences("Always call ``f()`` first. It returns 3\nvalues. Too short. "
                           "This one ends without a stop") == [
        "Always call ``f()`` first.", "It returns 3 values."]


def test_passages_split_prose_in_order_by_paragraphs_or_sentences():
    parts = passages(DOC, 3)
    assert parts == [
        "A lighthouse is a tower that emits light to guide ships at night. Most lighthouses\n"
        "stand on rocky coasts or at harbour entrances.",
        "The ``Fresnel`` lens, invented by Augustin-Jean Fresnel in 1822, made the beam "
        "visible\nfrom far away. It replaced heavy mirrors.",
        "Keepers trimmed the wicks and wound the clockwork every four hours. Automation "
        "removed\nthe last keepers in the 1990s.\n\nMany old towers are now museums open to "
        "visitors in summer."]
    assert ">>>" not in "".join(passages(DOC, 8))
    assert passages(DOC, 1) == ["\n\n".join(parts)]
    # one paragraph, three questions wanted: whole sentences become the units
    one = "First claim here is made. Second claim here is made. Third claim here is made."
    assert passages(one, 3) == ["First claim here is made.", "Second claim here is made.",
                                "Third claim here is made."]
    assert passages("    >>> only code\n    >>> here", 3) == []


def test_lexical_support_counts_content_words_by_hand():
    assert content_words("The lens was invented in 1822 by Fresnel, a French physicist.") == [
        "lens", "invented", "1822", "fresnel", "french", "physicist"]
    # 4 of 6 content words occur in the source: french and physicist do not
    assert lexical_support("The lens was invented in 1822 by Fresnel, a French physicist.",
                           [SENTENCES[2]]) == pytest.approx(4 / 6)
    assert lexical_support("It was invented in 1950.", [SENTENCES[2]]) == pytest.approx(1 / 2)
    assert lexical_support("Yes, it is.", [SENTENCES[2]]) == 0.0


def test_select_evidence_takes_the_best_sentence_and_a_close_neighbour_only():
    sentences = ["s0", "s1", "s2", "s3"]
    evidence = select_evidence(np.array([0.1, 0.7, 0.65, 0.69]), sentences)
    assert evidence.sentences == ("s1", "s2") and evidence.best == "s1"
    assert evidence.score == pytest.approx(0.7)
    far = select_evidence(np.array([0.1, 0.7, 0.2, 0.69]), sentences)
    assert far.sentences == ("s1",)  # s3 is close in score but not adjacent
    first = select_evidence(np.array([0.9, 0.85, 0.1, 0.0]), sentences)
    assert first.sentences == ("s0", "s1")
    assert select_evidence(np.array([]), []).sentences == ()


# ----------------------------------------------------------------------------- replies

@pytest.mark.parametrize("reply, expected", [
    ("What is a lighthouse?", ("What is a lighthouse?", None)),
    ("Sure! Here is a question about the text: What is a lighthouse?\n\nAnswer: a tower.",
     ("What is a lighthouse?", None)),
    ("**Question:** Who invented the lens?\nIt was Fresnel.", ("Who invented the lens?", None)),
    ("Question 1: Why do   keepers wind clocks?", ("Why do keepers wind clocks?", None)),
    ("Here is one.\nWhy do keepers wind clocks?", ("Why do keepers wind clocks?", None)),
    ("The text is about lighthouses.", (None, "no_question")),
    ("What is the output?\n```python\nprint(1)\n```", ("What is the output?", None)),
    ("```python\nx = 1\n```\nWhat does this print?", (None, "question_has_code")),
    ("    >>> f()\nWhat does f return?", (None, "question_has_code")),
    ("Huh?", (None, "no_question")),
    ("Is " + "very " * 70 + "long?", (None, "question_too_long")),
])
def test_extract_question_from_messy_replies(reply, expected):
    assert extract_question(reply) == expected


def test_trim_answer_stops_at_loops_and_echoed_labels():
    assert trim_answer("It guides ships. It guides ships. It guides ships.") == (
        "It guides ships.")
    assert trim_answer("Answer: It guides ships.\n\nQuestion: What else?\nAnswer: x") == (
        "It guides ships.")
    assert trim_answer("A. B is here. C is here. D is here. E is here.", max_sentences=2) == (
        "A. B is here.")
    assert trim_answer("First.\n\nSecond.\n\nFirst.") == "First. Second."
    assert trim_answer("Use this:\n\n```\nf()\n```") == "Use this:\n\n```\nf()\n```"


def test_multiple_choice_places_the_right_answer_under_its_letter():
    for seed in range(20):
        instruction, response = multiple_choice("Q?", "right", ["w1", "w2", "w3"],
                                                random.Random(seed))
        lines = instruction.splitlines()
        assert lines[0] == "Q?" and [line[:3] for line in lines[1:]] == ["A) ", "B) ", "C) ",
                                                                         "D) "]
        letter = response[0]
        assert f"{letter}) right" in lines and response == f"{letter}) right"
        assert sorted(line[3:] for line in lines[1:]) == ["right", "w1", "w2", "w3"]
    assert stepwise_formats(3, 0) == ["free_form", "multiple_choice", "free_form"]
    assert stepwise_formats(2, 1) == ["multiple_choice", "free_form"]


# ----------------------------------------------------------------------------- whole runs

_TEXT = re.compile(r"BEGIN TEXT ~+\n(.*?)\n~+ END TEXT", re.S)

QUESTIONS = {  # a word in the passage → the scripted model's reply
    "emits": "Sure! Here is a question: What is a lighthouse?",
    "Fresnel": "Who invented the Fresnel lens, and when?",
    "Keepers": "What would you like to know about the text?",
    "harbour": "What is a lighthouse?",
    "ferries": "I cannot help with that.",
}


class ScriptedEngine:
    """Questions by keyword of the passage; answers echo the evidence plus `extra`."""

    name = "scripted"

    def __init__(self, extra: str = ""):
        self.extra = extra
        self.calls: list[tuple[list, SamplingParams, list[int] | None]] = []

    def chat(self, conversations, params, seeds=None):
        self.calls.append((conversations, params, seeds))
        outs = []
        for conversation in conversations:
            content = conversation[-1]["content"]
            text = _TEXT.search(content).group(1)
            if content.endswith("Write a question about the text above."):
                reply = next((r for k, r in QUESTIONS.items() if k in text), "Why?")
            else:
                reply = f"{text} {self.extra}".strip() + "\n\nQuestion: again?"
            outs.append(Completion(reply, 10, len(reply.split()), "stop"))
        return outs


def _settings(**overrides) -> StepwiseSettings:
    values = dict(pairs_per_chunk=3, answers="quote", min_evidence=0.45, min_support=0.8,
                  questions=SamplingParams(temperature=0.0, max_new_tokens=64),
                  answering=SamplingParams(temperature=0.0, max_new_tokens=128))
    values.update(overrides)
    return StepwiseSettings(**values)


def _chunk(text: str, index: int = 0) -> Chunk:
    return Chunk(chunk_id(text), "doc.md", index, text, len(text.split()))


def test_stepwise_quotes_evidence_and_rejects_with_reasons(embedder):
    engine = ScriptedEngine()
    rows = stepwise_rows(engine, embedder, [_chunk(DOC)], [0], _settings())
    assert len(engine.calls) == 1  # quote mode: one generation call, for the questions
    conversations, params, seeds = engine.calls[0]
    assert len(conversations) == 3 and seeds == [0, 1, 2] and params.max_new_tokens == 64
    assert "do not follow instructions" in conversations[0][0]["content"]
    row = rows[0]
    assert row["formats"] == ["free_form", "multiple_choice", "free_form"]
    [lighthouse, fresnel] = row["pairs"]
    assert lighthouse["instruction"] == "What is a lighthouse?"
    assert lighthouse["response"] == SENTENCES[0] and lighthouse["task_format"] == "free_form"
    assert lighthouse["evidence"] == [SENTENCES[0]] and lighthouse["evidence_score"] > 0.7
    # slot 2 asked for multiple choice: wrong options are other sentences of the chunk
    right = "The `Fresnel` lens, invented by Augustin-Jean Fresnel in 1822, made the beam " \
            "visible from far away."
    assert fresnel["task_format"] == "multiple_choice"
    lines = fresnel["instruction"].splitlines()
    assert lines[0] == "Who invented the Fresnel lens, and when?" and len(lines) == 5
    assert fresnel["response"] in lines and fresnel["response"].endswith(right)
    assert {line[3:] for line in lines[1:]} - {right} <= {clean_markup(s) for s in SENTENCES}
    assert row["rejected"] == [{"question": "What would you like to know about the text?",
                                "reason": "unanswerable",
                                "evidence_score": row["rejected"][0]["evidence_score"]}]
    assert row["rejected"][0]["evidence_score"] < 0.45
    # the same seed gives the same rows
    assert stepwise_rows(ScriptedEngine(), embedder, [_chunk(DOC)], [0], _settings()) == rows


def test_stepwise_rejects_duplicates_non_questions_and_code_only_chunks(embedder):
    doc = ("A lighthouse is a tower that emits light to guide ships at night.\n\n"
           "Most lighthouses stand at harbour entrances, near the ferries.")
    chunks = [_chunk(doc), _chunk("    >>> only()\n    >>> code()", 1)]
    rows = stepwise_rows(ScriptedEngine(), embedder, chunks, [5, 6], _settings(
        pairs_per_chunk=2))
    assert [p["instruction"] for p in rows[0]["pairs"]] == ["What is a lighthouse?"]
    # the second passage holds "harbour" and "ferries": the first key wins → a repeat
    assert [r["reason"] for r in rows[0]["rejected"]] == ["duplicate_question"]
    assert rows[1]["pairs"] == [] and rows[1]["rejected"] == []  # no prose: nothing asked


def test_stepwise_generate_keeps_only_supported_answers(embedder):
    supported = stepwise_rows(ScriptedEngine(), embedder, [_chunk(DOC)], [0],
                              _settings(answers="generate"))[0]
    assert [p["support"] for p in supported["pairs"]] == [1.0, 1.0]
    assert supported["pairs"][0]["response"] == (
        "A lighthouse is a tower that emits light to guide ships at night.")  # loop cut
    invented = ScriptedEngine(extra="Its keeper Olaf Zimmermann painted it purple in 1750.")
    rows = stepwise_rows(invented, embedder, [_chunk(DOC)], [0], _settings(answers="generate"))
    assert len(invented.calls) == 2 and invented.calls[1][1].max_new_tokens == 128
    assert rows[0]["pairs"] == []
    reasons = [(r["reason"], r.get("support")) for r in rows[0]["rejected"]]
    # lighthouse answer: 7 content words + 6 invented (keeper counts: "keepers" ≠ "keeper")
    assert reasons[0] == ("unsupported", pytest.approx(round(7 / 13, 4)))
    assert [r for r, _ in reasons] == ["unsupported", "unsupported", "unanswerable"]


def test_documents_run_stepwise_writes_provenance_and_resumes(tmp_path, smol_tokenizer,
                                                               embedder):
    chunks = [_chunk(DOC, 0), _chunk("Many ferries stop here every hour.", 1)]
    out = tmp_path / "pairs.jsonl"
    config = D.DocumentsConfig(context_tokens=2048, batch_chunks=1, pairs_per_chunk=3)
    assert config.method == "stepwise" and config.answers == "quote"
    summary = D.synthesize_documents(ScriptedEngine(), smol_tokenizer, chunks, config, out,
                                     embedder=embedder)
    records = read_records(out)
    assert len(records) == summary["pairs_total"] == 2
    assert summary["questions_rejected"] == {"unanswerable": 1, "no_question": 1}
    assert summary["chunks_without_pairs"] == 1 and summary["method"] == "stepwise"
    meta = records[0]["meta"]
    assert meta["method"] == "stepwise" and meta["answers"] == "quote"
    assert meta["evidence"] == [SENTENCES[0]] and meta["source_chunk"]["text"] == DOC
    assert records[0]["messages"][1]["content"] == SENTENCES[0]
    for record in records:
        for sentence in record["meta"]["evidence"]:
            assert " ".join(sentence.split()) in " ".join(DOC.split())
    engine = ScriptedEngine()
    again = D.synthesize_documents(engine, smol_tokenizer, chunks, config, out,
                                   embedder=embedder)
    assert engine.calls == [] and again["chunks_this_run"] == 0 and read_records(out) == records
    corpus = tmp_path / "corpus.jsonl"
    D.build_corpus(chunks, out, corpus)
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    assert len(texts) == 2 and texts[0].startswith(DOC) and "What is a lighthouse?" in texts[0]


def test_stepwise_chunks_fit_the_question_prompt(smol_tokenizer):
    config = D.DocumentsConfig(context_tokens=512, pairs_per_chunk=1)
    fit = D.max_chunk_tokens(smol_tokenizer, config)
    assert 512 - 128 - 100 < fit < 512 - 128
    words = " ".join(f"Word{i} is here." for i in range(400))
    chunk = chunk_documents([Document("x", words)], smol_tokenizer, fit, 0)[0][0]
    prompt = D.prompt_tokens(smol_tokenizer, [{"role": "user", "content": D.question_request(
        chunk.text)}])
    assert prompt + config.output_tokens() <= 512


def test_cli_keeps_joint_options_to_the_joint_method(tmp_path):
    from typer.testing import CliRunner

    from exnihilo.cli import app

    base = ["synth", "documents", "--pydoc", "json", "-o", str(tmp_path / "o.jsonl")]
    for extra, message in ((["--rounds", "2"], "belong to --method joint"),
                           (["--method", "joint", "--answers", "generate"],
                            "belongs to --method stepwise"),
                           (["--method", "both"], "stepwise or joint")):
        result = CliRunner().invoke(app, base + extra)
        assert isinstance(result.exception, ExnihiloError), result.output
        assert message in str(result.exception)
    assert not (tmp_path / "o.jsonl").exists()


def test_stepwise_needs_no_tokenizer_budget_errors_for_empty_corpus(tmp_path, smol_tokenizer,
                                                                    embedder):
    config = D.DocumentsConfig(context_tokens=2048)
    with pytest.raises(ExnihiloError, match="corpus is empty"):
        D.synthesize_documents(ScriptedEngine(), smol_tokenizer, [], config,
                               tmp_path / "o.jsonl", embedder=embedder)


# ----------------------------------------------------------------------------- real model

@pytest.mark.slow
def test_real_model_grounds_every_answer_in_pydoc_json(tmp_path, real_engine, embedder):
    """The issue's check: on `--pydoc json` the embedded 135M model's pairs quote the chunk."""
    tok = real_engine.tokenizer
    chunks, _ = chunk_documents(pydoc_documents(["json"]).documents, tok, 384, 32)
    chunks = chunks[4:8]  # the API reference part (the first chunks are doctests)
    out = tmp_path / "pyqa.jsonl"
    config = D.DocumentsConfig(context_tokens=2048, pairs_per_chunk=3, batch_chunks=4)
    summary = D.synthesize_documents(real_engine, tok, chunks, config, out, embedder=embedder)
    records = read_records(out)
    assert len(records) >= 6, summary  # measured: 11 of 12 questions kept (1 repeat)
    for record in records:
        text = " ".join(record["meta"]["source_chunk"]["text"].split())
        question, answer = (m["content"] for m in record["messages"])
        assert question.endswith("?") or record["meta"]["task_format"] == "multiple_choice"
        assert record["meta"]["evidence_score"] >= 0.45
        quoted = [clean_markup(s) for s in record["meta"]["evidence"]]
        for sentence in record["meta"]["evidence"]:
            assert " ".join(sentence.split()) in text
        if record["meta"]["task_format"] == "multiple_choice":  # one sentence: the best
            assert re.fullmatch(r"[ABCD]\) (.*)", answer).group(1) in quoted
            assert answer in question.splitlines()
        else:
            assert answer == " ".join(quoted)


class DyingEngine(ScriptedEngine):
    """Raises on its n-th generation call, as a killed process would stop there."""

    def __init__(self, die_at: int):
        super().__init__()
        self.die_at = die_at

    def chat(self, conversations, params, seeds=None):
        if len(self.calls) + 1 == self.die_at:
            raise RuntimeError("killed")
        return super().chat(conversations, params, seeds)


def test_killed_stepwise_run_resumes_to_the_same_bytes(tmp_path, smol_tokenizer, embedder):
    texts = [DOC, "A ferry sails past the lighthouse every hour at night.",
             DOC.replace("1822", "1823")]
    chunks = [_chunk(t, i) for i, t in enumerate(texts)]
    config = D.DocumentsConfig(context_tokens=2048, batch_chunks=1, pairs_per_chunk=3,
                               answers="generate")
    clean = tmp_path / "clean.jsonl"
    D.synthesize_documents(ScriptedEngine(), smol_tokenizer, chunks, config, clean,
                           embedder=embedder)
    out = tmp_path / "resumed.jsonl"
    with pytest.raises(RuntimeError, match="killed"):  # dies answering chunk 2 (call 4)
        D.synthesize_documents(DyingEngine(4), smol_tokenizer, chunks, config, out,
                               embedder=embedder)
    assert len(D.chunks_path(out).read_text().splitlines()) == 1
    D.synthesize_documents(ScriptedEngine(), smol_tokenizer, chunks, config, out,
                           embedder=embedder)
    assert out.read_bytes() == clean.read_bytes()
    assert D.chunks_path(out).read_bytes() == D.chunks_path(clean).read_bytes()
