"""`curate tag --mode logprob`: tags read from option likelihoods, never unreadable."""

from __future__ import annotations

import math

import pytest

from exnihilo.curate.tags import TAG_LABELS, single_tag_prompt, tag_file
from exnihilo.engines.transformers import TransformersEngine
from exnihilo.errors import ExnihiloError
from exnihilo.records import iter_jsonl, make_record
from helpers import ScriptedEngine

pytestmark = pytest.mark.usefixtures("one_thread")


def write(path, n=3):
    with open(path, "w") as f:
        for i in range(n):
            rec = make_record([{"role": "user", "content": f"Write a poem about {i} cats."},
                               {"role": "assistant", "content": "Cats purr."}])
            f.write(__import__("json").dumps(rec) + "\n")
    return path


def test_logprob_tags_are_the_likeliest_labels_and_never_null(tmp_path, tiny_llama,
                                                              smol_tokenizer):
    engine = TransformersEngine(model_obj=tiny_llama, tokenizer=smol_tokenizer, batch_size=4)
    src, out = write(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    summary = tag_file(src, out, engine, score=True, mode="logprob")
    assert summary.tagged == 3 and not summary.unparsed
    rows = [obj for _, obj in iter_jsonl(out)]
    for row in rows:
        tags, tagger = row["meta"]["tags"], row["meta"]["tagger"]
        assert tagger["mode"] == "logprob"
        # A random tiny model may put no top-20 mass on digits: then no score, confidence 0.
        if tags["score"] is None:
            assert tagger["score_confidence"] == 0
        else:
            assert 0 <= tags["score"] <= 100 and 0 < tagger["score_confidence"] <= 1
        instruction = row["messages"][0]["content"]
        for tag, labels in TAG_LABELS.items():
            assert tags[tag] in labels
            conv = single_tag_prompt(instruction, tag)
            scored = engine.reply_logprobs([conv] * len(labels), list(labels))
            probs = [math.exp(s) for s, _ in scored]
            best = max(range(len(labels)), key=probs.__getitem__)
            assert tags[tag] == labels[best]
            assert tagger["probabilities"][tag] == pytest.approx(
                probs[best] / sum(probs), abs=1e-3)


def test_logprob_mode_refuses_an_engine_without_logprobs(tmp_path):
    src = write(tmp_path / "in.jsonl", 1)
    with pytest.raises(ExnihiloError, match="needs log-probabilities.*fake:judge"):
        tag_file(src, tmp_path / "o.jsonl", ScriptedEngine(lambda t: "x"), mode="logprob")
