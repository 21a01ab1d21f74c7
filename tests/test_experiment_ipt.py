"""experiments/instruct_pt.py's (b) cloze multiple choice and (c) tuning data: item
construction, the prompt format, scoring through the one log-prob path, and the stats."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))

import instruct_pt as ipt  # noqa: E402
from common import accuracy_row, module_docs  # noqa: E402

from exnihilo.synth.pairs import PAIR_TEMPLATES, Pair, render_pairs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


class WordTokenizer:
    """Counts whitespace-separated words as tokens: budgets can be worked by hand."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[str]]:
        return {"input_ids": text.split()}


def test_salient_words_drop_stopwords_and_short_words_in_first_seen_order():
    text = "The queue holds items; which items? getmembers() and Queue and queue."
    assert ipt.salient_words(text) == ["queue", "holds", "items", "getmembers", "Queue"]


def test_context_window_grows_next_then_previous_within_budget():
    paras = ["a b", "c d e", "f", "g h i j"]
    tok = WordTokenizer()
    assert ipt.context_window(paras, 1, tok, 6) == "a b\n\nc d e\n\nf"
    assert ipt.context_window(paras, 1, tok, 3) == "c d e"
    assert ipt.context_window(paras, 3, tok, 3) is None


def test_cloze_item_blanks_the_one_salient_word_and_draws_other_distractors():
    doc = "First paragraph here.\n\nIt is on to be the frobnicator."
    vocab = ["frobnicator", "alpha", "beta", "gamma", "delta", "paragraph"]
    item = ipt.cloze_item(doc, vocab, WordTokenizer(), __import__("random").Random(0), 50, "x")
    assert item["question"] == "It is on to be the ____."
    assert item["options"][item["answer"]] == "frobnicator"
    assert len(set(item["options"])) == 4
    # the context's own salient words first ("here" is a stopword), then one from the module
    rest = set(item["options"]) - {"frobnicator", "First", "paragraph"}
    assert len(rest) == 1 and rest <= {"alpha", "beta", "gamma", "delta"}
    # no sentence left to ask: None
    assert ipt.cloze_item(doc, vocab, WordTokenizer(), __import__("random").Random(0), 50, "y",
                          {item["sentence"]}) is None


@pytest.fixture(scope="module")
def heldout_items(smol_tokenizer):
    texts = module_docs(["array", "secrets", "numbers"])
    return texts, ipt.cloze_items(texts, smol_tokenizer, 30, 0, 96)


def test_cloze_items_invariants_on_real_heldout_text(heldout_items, smol_tokenizer):
    texts, items = heldout_items
    assert len(items) == 30
    assert len({it["id"] for it in items}) == 30
    for it in items:
        answer = it["options"][it["answer"]]
        distractors = [o for i, o in enumerate(it["options"]) if i != it["answer"]]
        assert len(it["options"]) == ipt.CHOICES
        assert answer.lower() not in {d.lower() for d in distractors}
        assert len({o.lower() for o in it["options"]}) == ipt.CHOICES
        word = re.compile(rf"(?<!\w){re.escape(answer)}(?!\w)")
        assert word.search(it["context"])  # the answer is in the shown context
        assert it["sentence"] in " ".join(it["context"].split())
        assert word.sub(ipt.BLANK, it["sentence"], count=1) == it["question"]
        assert not re.search(rf"(?<!\w){re.escape(answer.lower())}(?!\w)",
                             it["question"].lower())
        assert ipt.n_tokens(smol_tokenizer, it["context"]) <= 96
        module = texts[int(it["id"].split("-")[0])]
        assert all(re.search(rf"(?<!\w){re.escape(d)}(?!\w)", module) for d in distractors)
        excluded = {w.lower() for w in ipt.WORD.findall(it["sentence"])}
        if len(ipt.distractor_pool(ipt.salient_words(it["context"]), excluded)) >= 3:
            assert all(re.search(rf"(?<!\w){re.escape(d)}(?!\w)", it["context"])
                       for d in distractors)
    answers = [it["answer"] for it in items]
    assert len(set(answers)) > 1  # the right option is not always in one place


def test_cloze_items_are_deterministic_given_the_seed(heldout_items, smol_tokenizer):
    texts, items = heldout_items
    assert ipt.cloze_items(texts, smol_tokenizer, 30, 0, 96) == items
    assert ipt.cloze_items(texts, smol_tokenizer, 30, 1, 96) != items


@pytest.mark.parametrize("template", PAIR_TEMPLATES)
def test_plain_prompt_is_the_augmented_corpus_format(template):
    item = {"id": "x", "context": "Ctx line.", "question": "The ____ runs.",
            "options": ["alpha", "beta"], "answer": 1}
    prompt, options = ipt.plain_prompt(item, template)
    rendered = render_pairs([Pair(ipt.cloze_question(item), "beta")], template)
    assert prompt + options[1] == "Ctx line.\n\n" + rendered
    assert not prompt.endswith(" ")


def test_plain_prompt_canonical_by_hand():
    item = {"id": "x", "context": "Ctx.", "question": "The ____ runs.", "options": ["a", "b"],
            "answer": 0}
    assert ipt.plain_prompt(item, PAIR_TEMPLATES[0]) == (
        'Ctx.\n\nQuestion: Which word fills the blank (____) in: "The ____ runs."\nAnswer:',
        [" a", " b"])


def test_inplace_prompt_continues_the_sentence_up_to_the_blank():
    item = {"id": "x", "context": "Ctx.", "question": "The ____ runs.", "options": ["a", "b"],
            "answer": 0}
    assert ipt.inplace_prompt(item) == ("Ctx.\n\nThe", [" a", " b"])
    item["question"] = "____ runs; single-____ too."  # first blank only; none at the start
    assert ipt.inplace_prompt(item) == ("Ctx.\n\n", ["a", "b"])
    item["question"] = "A single-____ loop."
    assert ipt.inplace_prompt(item) == ("Ctx.\n\nA single-", ["a", "b"])


def test_choice_correct_by_hand():
    scores = np.array([[0.0, -1.0, -2.0, -3.0], [-5.0, -1.0, -2.0, -0.5], [1, 1, 1, 1.0]])
    assert ipt.choice_correct(scores, [0, 3, 2]).tolist() == [1.0, 1.0, 0.0]


def test_option_logprobs_match_a_plain_forward(tiny_gemma2, smol_tokenizer):
    prompts = [("Some context.\n\nQuestion: x?\nAnswer:", [" array", " weakref module"]),
               ("Another, longer context here.\n\nQ: y?\nA:", [" codecs", " zlib"])]
    sums, counts = ipt.option_logprobs(tiny_gemma2, smol_tokenizer, prompts, chat=False)
    assert sums.shape == counts.shape == (2, 2)
    for i, (prompt, options) in enumerate(prompts):
        for j, option in enumerate(options):
            p = [smol_tokenizer.eos_token_id,
                 *smol_tokenizer(prompt, add_special_tokens=False)["input_ids"]]
            o = smol_tokenizer(option, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(
                    tiny_gemma2(input_ids=torch.tensor([p + o])).logits[0].float(), -1)
            want = sum(logp[len(p) - 1 + t, tok].item() for t, tok in enumerate(o))
            assert counts[i, j] == len(o)
            assert sums[i, j] == pytest.approx(want, abs=1e-4)


class FavorTokens(torch.nn.Module):
    """Every position's next-token logits put +8 on `favored` ids: a scorer that prefers
    any option made of those tokens."""

    def __init__(self, vocab: int, favored: set[int]):
        super().__init__()
        self.config = SimpleNamespace(model_type="favor")
        bias = torch.zeros(vocab)
        bias[list(favored)] = 8.0
        self.register_buffer("bias", bias)

    def forward(self, input_ids, **_):
        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1))


def _items():
    return [{"id": "a", "context": "C one.", "question": "The ____ one.",
             "options": ["array", "zebra", "quantum", "lattice"], "answer": 0},
            {"id": "b", "context": "C two.", "question": "The ____ two.",
             "options": ["zebra", "quantum", "lattice", "array"], "answer": 3}]


@pytest.mark.parametrize("fmt", sorted(ipt.FORMATS))
def test_a_scorer_preferring_the_right_option_gets_every_item(smol_tokenizer, fmt):
    def ids(words):
        return {t for w in words for form in (w, " " + w)
                for t in smol_tokenizer(form, add_special_tokens=False)["input_ids"]}

    right, wrong = ids(["array"]), ids(["zebra", "quantum", "lattice"])
    assert not right & wrong
    for favored, want in ((right, [1.0, 1.0]), (wrong, [0.0, 0.0])):
        model = FavorTokens(len(smol_tokenizer), favored)
        got = ipt.score_choice(model, smol_tokenizer, _items(), fmt)
        assert got["correct"] == want
        assert np.asarray(got["option_sums"]).shape == (2, 4)


def test_accuracy_row_and_paired_difference_by_hand():
    row = accuracy_row("x", np.array([1, 1, 0, 0]), None)
    assert row["accuracy"] == 0.5 and row["items"] == 4
    assert 0.0 <= row["ci95"][0] <= 0.5 <= row["ci95"][1] <= 1.0
    same = accuracy_row("y", np.array([1, 1, 0, 0]), np.array([1, 1, 0, 0]))
    assert same["minus_baseline"] == 0.0 and same["minus_baseline_ci95"] == [0.0, 0.0]
    worse = accuracy_row("z", np.array([0, 0, 0, 0]), np.array([1, 1, 0, 0]))
    assert worse["minus_baseline"] == -0.5
    assert worse["minus_baseline_ci95"][0] >= -1.0 and worse["minus_baseline_ci95"][1] <= 0.0


def _pair_record(rid, question, answer, text, grounded=None):
    meta = {"source_chunk": {"id": "c", "text": text}} if text else {}
    if grounded is not None:
        meta["tags"] = {"grounded": grounded}
    return {"id": rid, "messages": [{"role": "user", "content": question},
                                    {"role": "assistant", "content": answer}], "meta": meta}


def test_tuning_records_show_the_chunk_window_around_the_answer(tmp_path, smol_tokenizer):
    chunk = ("Intro words only.\n\nThe frobnicator spins widgets quickly.\n\n"
             "Unrelated closing paragraph.")
    rows = [_pair_record("1", "What spins widgets?", "The frobnicator spins widgets.", chunk),
            _pair_record("2", "Unsupported?", "No.", chunk, grounded=False),
            _pair_record("3", "No chunk text?", "None.", None)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    budget = ipt.n_tokens(smol_tokenizer, "The frobnicator spins widgets quickly.")
    records = ipt.tuning_records(path, smol_tokenizer, 5, budget, 0, 256)
    assert len(records) == 1
    assert records[0]["messages"] == [
        {"role": "user", "content": "The frobnicator spins widgets quickly.\n\n"
                                    "What spins widgets?"},
        {"role": "assistant", "content": "The frobnicator spins widgets."}]
    assert ipt.tuning_records(path, smol_tokenizer, 5, budget, 0, 20) == []  # too long


def test_cached_scores_compute_once_per_key(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"v": len(calls)}

    path = tmp_path / "scores" / "arm.json"
    assert ipt.cached_scores(path, {"k": 1}, compute)["v"] == 1
    assert ipt.cached_scores(path, {"k": 1}, compute)["v"] == 1
    assert ipt.cached_scores(path, {"k": 2}, compute)["v"] == 2
    assert len(calls) == 2


def test_draw_distractors_tops_up_from_the_module_only_when_the_context_is_short():
    rng = __import__("random").Random(0)
    got = ipt.draw_distractors(["ctxa", "ctxb", "ctxc", "ctxd"], ["moda"], {"ctxd"}, rng)
    assert sorted(got) == ["ctxa", "ctxb", "ctxc"]
    got = ipt.draw_distractors(["ctxa"], ["moda", "ctxa", "modb"], set(), rng)
    assert got[0] == "ctxa" and sorted(got[1:]) == ["moda", "modb"]
    assert ipt.draw_distractors(["ctxa"], ["ctxa", "moda"], set(), rng) is None


def test_distractor_pool_one_spelling_each_excluded_words_out():
    vocab = ["Queue", "item", "queue", "Item", "size", "put"]
    assert ipt.distractor_pool(vocab, {"size"}) == ["Queue", "item", "put"]


def test_cloze_item_never_asks_a_sentence_the_context_also_holds_with_a_distractor():
    doc = "It is on to be the frobnicator.\n\nIt is on to be the gizmo.\n\nAlpha beta."
    vocab = ["frobnicator", "gizmo", "Alpha", "beta"]
    # the context's pool is exactly the other three words, so each sentence's distractors
    # include the word that completes the other sentence: no item can be unambiguous
    item = ipt.cloze_item(doc, vocab, WordTokenizer(), __import__("random").Random(0), 50, "x")
    assert item is None
    item = ipt.cloze_item(doc.replace("gizmo", "gizmo thing"), vocab, WordTokenizer(),
                          __import__("random").Random(0), 50, "x")
    assert item is not None and item["options"][item["answer"]] in {"frobnicator", "gizmo"}
