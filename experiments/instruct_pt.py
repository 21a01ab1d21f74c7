"""Instruction Pre-Training end to end (Cheng et al., arXiv 2406.14491): Vanilla PT vs Mix PT
vs Instruct PT at an equal token budget, from scratch on a tiny Gemma 2 and, with
--continual, as continual pretraining of SmolLM2-135M; each arm measured by (a) held-out
perplexity, (b) held-out reading-comprehension multiple choice, and (c) both again after
the same short instruction tuning.

    python experiments/instruct_pt.py --quick --out runs/exp-ipt-quick   # minutes (+ synthesis)
    python experiments/instruct_pt.py --out runs/exp-ipt --continual     # ≈ 75 min, 1 thread

1. `exnihilo synth documents --pydoc <modules> --corpus-out` writes instruction-augmented
   texts (each chunk of the standard library's documentation followed by question–answer
   pairs about it, written by the embedded 135M with the stepwise method). Resumable.
2. Corpora over the same chunks: Vanilla = the chunks' raw text; Mix = raw + general
   instruction data (LLMs-from-scratch ch07's 1,100 examples rendered as text with the
   synthesizer's own pair templates, as many as there are chunks); Instruct = the
   augmented texts + the same general texts (the paper's Instruct PT mixes in the
   synthesizer's fine-tuning data).
3. Each arm trains the same preset from the same seed for the same token budget (corpora
   repeat as needed): 200k tokens from scratch, 16k tokens of continual pretraining.
4. Measures, all on held-out modules' documentation (`common.HELDOUT_MODULES`, never
   trained on), all through `exnihilo.train.forward.sequence_logprobs`:
   (a) raw-text perplexity over whole documents (`common.document_nll`);
   (b) cloze multiple choice built without any model (`cloze_items`): a context of a
       paragraph or two, a sentence of it with one salient word blanked, four options:
       the word + three other salient words of the same module, taken from the shown
       context where it has three (seeded), so the blank must be located, not just an
       option recognized as seen (a no-model row, "the option seen most often in the
       context", checks this). The prompt is the context, then the question and an
       answer slot in one of the augmented corpus's pair templates (`PAIR_TEMPLATES`,
       drawn per item as `corpus_texts` draws per chunk): exactly the format the
       Instruct arm saw. Each option is scored by its summed log-probability after the
       prompt; chance is 25 %. (`eval choice` is not used: its log-prob path goes through
       an engine's chat template, which a plain-text base model never saw.) The same
       items are also scored in place, without a question: the context, then the sentence
       up to the blank, continued by each option. SmolLM2-135M-Instruct itself answers 31 %
       of 48 items as a question but 85 % in place (measured): at this scale the question
       format hides what the model can read, so both are reported.
   (c) each arm's model is fully fine-tuned with the product's SFT recipe
       (`exnihilo.train.sft`, style "chat", loss on the answers), same data, steps and
       seed for every arm: the synthesizer's own question–answer pairs about TRAINING
       chunks, each shown with its chunk's context (in-context QA, the skill (b) tests);
       then (a) and (b) again. After tuning, (b) is scored in the format the tuning used
       (the chat template, the user turn = context + question, the option = the reply);
       the in-place form stays plain text.
   Accuracy has a 95 % bootstrap interval over items and a paired bootstrap interval of
   the difference to Vanilla; the per-token column divides each option's log-prob by its
   token count (lm-evaluation-harness's acc_norm idea).

Sizes (FULL; --quick is far smaller): from scratch gemma2-tiny, 200k tokens per arm, seq
256, scored on all 52 held-out documents and 200 cloze items; continual SmolLM2-135M, 16k
tokens per arm, scored on 48 documents and the first 48 items; tuning 32 examples (≤ 256
tokens each), one epoch, batch 4 (8 steps), lr 1e-3 from scratch / 5e-5 continual. About
75 min on one thread, plus the synthesis (resumed if its files exist).

Finished pretraining and tuning runs are reused (a killed one resumes), and each model's
scores are cached in `scores/<run>.json`, so a rerun redoes no finished evaluation.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import (
    HELDOUT_MODULES,
    ROOT,
    TRAIN_MODULES,
    accuracy_row,
    accuracy_table,
    arm_row,
    document_nll,
    markdown_table,
    module_docs,
    save_sections,
    split_paragraph_docs,
    threads,
    write_text_jsonl,
)

from exnihilo.synth.pairs import PAIR_TEMPLATES, PairTemplate
from exnihilo.train.collate import collate_continuations
from exnihilo.train.forward import sequence_logprobs

QUICK = dict(preset="gemma2-micro", modules=8, chunks=40, chunk_tokens=256, heldout_docs=24,
             seq_len=128, tokens=8_192, batch_size=8, lr=3e-3, eval_len=128,
             continual_tokens=2_048, continual_heldout_docs=8, items=40, continual_items=16,
             context_tokens=64, tune_examples=8, tune_epochs=1, tune_batch_size=4,
             tune_max_length=192, tune_lr_scratch=1e-3, tune_lr_continual=5e-5)
FULL = dict(preset="gemma2-tiny", modules=24, chunks=240, chunk_tokens=256,
            heldout_docs=200, seq_len=256, tokens=200_000, batch_size=8, lr=2e-3,
            eval_len=256, continual_tokens=16_384, continual_heldout_docs=48, items=200,
            continual_items=48, context_tokens=128, tune_examples=32, tune_epochs=1,
            tune_batch_size=4, tune_max_length=256, tune_lr_scratch=1e-3,
            tune_lr_continual=5e-5)
SYNTHESIZER = "smollm2-135m-instruct"
GENERAL = ROOT.parent / "shared" / "evalsets" / "rasbt-instruction-data.json"
ARMS = ("Vanilla PT (raw)", "Mix PT (raw + general)", "Instruct PT (augmented + general)")


def synthesize(out: Path, s: dict) -> tuple[Path, Path]:
    """Run (or resume) the documents synthesizer; returns (records, augmented corpus)."""
    records, augmented = out / "synth" / "pairs.jsonl", out / "synth" / "augmented.jsonl"
    records.parent.mkdir(parents=True, exist_ok=True)
    if not augmented.exists():
        cmd = [sys.executable, "-m", "exnihilo.cli", "synth", "documents", "--pydoc",
               ",".join(TRAIN_MODULES[:s["modules"]]), "--limit-chunks", str(s["chunks"]),
               "--chunk-tokens", str(s["chunk_tokens"]), "--pairs-per-chunk", "3",
               "-o", str(records), "--corpus-out", str(augmented), "--batch-size", "8"]
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    return records, augmented


def raw_chunks(records: Path, augmented: list[str], seed: int = 0) -> list[str]:
    """The raw text of exactly the chunks in the augmented corpus: each augmented text is
    `chunk text + "\n\n" + rendered pairs`, and the rendering is reproducible (the
    template is drawn from Random(f"{seed}:{chunk id}"), as `corpus_texts` does), so the
    suffix is stripped exactly. (Re-chunking the module docs is not safe: their text can
    differ between processes.) A text with no pairs is its chunk's raw text already."""
    from exnihilo.synth.documents import load_done
    from exnihilo.synth.pairs import Pair, render_pairs

    suffixes = []
    for cid, row in load_done(records).items():
        pairs = [Pair(p["instruction"], p["response"]) for p in row["pairs"]
                 if p.get("grounded") is not False]
        if pairs:
            template = random.Random(f"{seed}:{cid}").choice(PAIR_TEMPLATES)
            suffixes.append("\n\n" + render_pairs(pairs, template))
    raw = []
    for text in augmented:
        match = next((sfx for sfx in suffixes if text.endswith(sfx)), None)
        raw.append(text[:-len(match)] if match else text)
    stripped = sum(a != r for a, r in zip(augmented, raw, strict=True))
    if stripped == 0:
        raise SystemExit("no augmented text ends with its chunk's rendered pairs")
    return raw


def general_texts(n: int) -> list[str]:
    from exnihilo.records import read_any
    from exnihilo.synth.documents import general_text

    records = read_any(GENERAL)
    return [general_text(records[i % len(records)], i) for i in range(n)]


# --------------------------------------------------------- (b) held-out cloze multiple choice

# English function words: never a blank or a distractor. A short fixed list rather than
# nltk's (not a dependency); documentation words like "function" stay salient on purpose.
_STOPWORD_TEXT = """
about above after again against also although among another anything because been before
being below between both cannot could does doing down during each either else even every
from further given have having here however into itself just least less like made make
many more most much must neither never none only other otherwise over same should since
some such than that their them then there therefore these they this those though through
thus under until upon very want were what when where whether which while will with within
without would your yours also always instead usually often rather whose"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())
WORD = re.compile(r"(?<!\w)[A-Za-z_][A-Za-z0-9_]{3,}(?!\w)")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
BLANK = "____"
CHOICES = 4


def salient_words(text: str) -> list[str]:
    """Distinct identifiers/words of ≥ 4 characters that are not stopwords, in order of
    first appearance (so a seeded draw from them is reproducible)."""
    seen: dict[str, None] = {}
    for word in WORD.findall(text):
        if word.lower() not in STOPWORDS:
            seen.setdefault(word, None)
    return list(seen)


def paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def n_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def context_window(paras: list[str], anchor: int, tokenizer: Any, budget: int) -> str | None:
    """Paragraph `anchor` plus its neighbours (next, then previous, alternately) while the
    joined text stays within `budget` tokens; None when the anchor alone does not fit."""
    if n_tokens(tokenizer, paras[anchor]) > budget:
        return None
    lo, hi = anchor, anchor + 1
    grew = True
    while grew:
        grew = False
        for cand in ((lo, hi + 1), (lo - 1, hi)):
            if cand[0] >= 0 and cand[1] <= len(paras) and \
                    n_tokens(tokenizer, "\n\n".join(paras[cand[0]:cand[1]])) <= budget:
                lo, hi = cand
                grew = True
                break
    return "\n\n".join(paras[lo:hi])


def blank_candidates(sentence: str, vocab: set[str]) -> list[str]:
    """Words of `sentence` that can be blanked: salient words of the module that occur
    exactly once in the sentence as whole words, in any case (so the blank is unambiguous
    and the question does not show the answer elsewhere)."""
    words = WORD.findall(sentence)
    lowered = [w.lower() for w in words]
    return [w for w in dict.fromkeys(words) if w in vocab and lowered.count(w.lower()) == 1]


def distractor_pool(vocab: list[str], excluded: set[str]) -> list[str]:
    """Words of `vocab` not in `excluded` (lower case), one spelling each (the first seen),
    in first-seen order, so a seeded draw from it is reproducible."""
    pool, seen = [], set(excluded)
    for w in vocab:
        if w.lower() not in seen:
            seen.add(w.lower())
            pool.append(w)
    return pool


def draw_distractors(in_context: list[str], vocab: list[str], excluded: set[str],
                     rng: random.Random) -> list[str] | None:
    """CHOICES − 1 distractors: salient words of the shown context first (so "which option
    appears in the context" does not give the answer away; the blank must be located),
    topped up from the module's other salient words; None when there are too few."""
    near = distractor_pool(in_context, excluded)
    if len(near) >= CHOICES - 1:
        return rng.sample(near, CHOICES - 1)
    far = distractor_pool(vocab, excluded | {w.lower() for w in near})
    if len(near) + len(far) < CHOICES - 1:
        return None
    return near + rng.sample(far, CHOICES - 1 - len(near))


def cloze_item(doc: str, vocab: list[str], tokenizer: Any, rng: random.Random, budget: int,
               item_id: str, used: set[str] | frozenset[str] = frozenset()
               ) -> dict[str, Any] | None:
    """One cloze question about `doc`: (context, blanked sentence, 4 options, answer index),
    or None when the document has no usable sentence left (`used`: sentences already asked
    about). The blanked sentence is taken from the shown context, so the answer is always
    in it; distractors are other salient words of the same module (of the shown context
    where it has enough), distinct from each other and from the answer (case-insensitively)
    and absent from the sentence."""
    vocab_set = set(vocab)
    paras = paragraphs(doc)
    candidates = []
    for p, para in enumerate(paras):
        for sentence in SENTENCE_END.split(para):
            sentence = " ".join(sentence.split())
            if sentence in used or ">>>" in sentence or not 6 <= len(sentence.split()) <= 40:
                continue
            candidates += [(p, sentence, w) for w in blank_candidates(sentence, vocab_set)]
    rng.shuffle(candidates)
    for p, sentence, word in candidates:
        context = context_window(paras, p, tokenizer, budget)
        if context is None:
            continue
        excluded = {word.lower(), *(w.lower() for w in WORD.findall(sentence))}
        distractors = draw_distractors(salient_words(context), vocab, excluded, rng)
        if distractors is None:
            continue
        pattern = re.compile(rf"(?<!\w){re.escape(word)}(?!\w)")
        question = pattern.sub(BLANK, sentence, count=1)
        flat = " ".join(context.split())
        if any(question.replace(BLANK, d) in flat for d in distractors):
            continue  # the context also holds the sentence with a distractor: two answers
        options = [word, *distractors]
        rng.shuffle(options)
        return {"id": item_id, "context": context, "sentence": sentence,
                "question": question, "options": options, "answer": options.index(word)}
    return None


def cloze_items(modules: list[str], tokenizer: Any, n: int, seed: int, budget: int
                ) -> list[dict[str, Any]]:
    """`n` items (fewer if the texts run out) from held-out module texts, in passes over
    their documents (≤ 2,000-character pieces of a module): each pass asks one new sentence
    of every document, so every document contributes before any is asked twice.
    Deterministic given `seed`."""
    docs = [(m, d, doc) for m, text in enumerate(modules)
            for d, doc in enumerate(split_paragraph_docs([text], 2000))]
    vocab = [salient_words(text) for text in modules]
    used: dict[tuple[int, int], set[str]] = {}
    items: list[dict[str, Any]] = []
    for round_index in range(n):
        added = 0
        for m, d, doc in docs:
            if len(items) == n:
                return items
            asked = used.setdefault((m, d), set())
            item = cloze_item(doc, vocab[m], tokenizer,
                              random.Random(f"{seed}:{m}:{d}:{round_index}"), budget,
                              f"{m}-{d}-{round_index}", asked)
            if item is not None:
                asked.add(item["sentence"])
                items.append(item)
                added += 1
        if not added:
            break
    return items


def cloze_question(item: dict[str, Any]) -> str:
    return f"Which word fills the blank ({BLANK}) in: \"{item['question']}\""


def item_template(item: dict[str, Any], seed: int = 0) -> PairTemplate:
    """The pair template of this item, drawn as `corpus_texts` draws one per chunk."""
    return random.Random(f"{seed}:{item['id']}").choice(PAIR_TEMPLATES)


def plain_prompt(item: dict[str, Any], template: PairTemplate) -> tuple[str, list[str]]:
    """(prompt, option continuations) in the augmented corpus's format: the context, then
    the question and answer slot as `render_pairs` writes them. The answer prefix's trailing
    space moves onto each option ("Answer:" + " word"), as the text tokenizes in training."""
    prefix = template.answer_prefix.rstrip()
    space = template.answer_prefix[len(prefix):]
    prompt = (f"{item['context']}\n\n{template.question_prefix}{cloze_question(item)}"
              f"{template.between}{prefix}")
    return prompt, [space + o for o in item["options"]]


def chat_messages(context: str, question: str) -> list[dict[str, str]]:
    """The user turn of in-context QA, in (c)'s tuning data and (b) after tuning alike."""
    return [{"role": "user", "content": f"{context}\n\n{question}"}]


def chat_prompt(item: dict[str, Any], tokenizer: Any) -> tuple[str, list[str]]:
    """(prompt, options) in the tuned models' format: the chat template's generation
    prompt, then the option as the reply (as `eval choice --style cloze` scores)."""
    from exnihilo.styles import render_prompt

    messages = chat_messages(item["context"], cloze_question(item))
    return render_prompt(messages, "chat", tokenizer), list(item["options"])


def inplace_prompt(item: dict[str, Any]) -> tuple[str, list[str]]:
    """(prompt, options) as plain-text continuation, no question at all: the context, then
    the asked sentence up to the blank, which each option continues (LAMBADA's form). It
    asks the same thing as the question formats without asking the model to work one."""
    before = item["question"].split(BLANK)[0]
    head = before.rstrip()
    space = before[len(head):][:1]  # the blank's leading space joins the option
    return f"{item['context']}\n\n{head}", [space + o for o in item["options"]]


# (b)'s formats: name → (prompt builder(item, tokenizer, seed), chat tokenization?)
FORMATS = {
    "pair": (lambda it, tok, seed: plain_prompt(it, item_template(it, seed)), False),
    "chat": (lambda it, tok, seed: chat_prompt(it, tok), True),
    "inplace": (lambda it, tok, seed: inplace_prompt(it), False),
}


def option_logprobs(model: Any, tokenizer: Any, prompts: list[tuple[str, list[str]]],
                    chat: bool, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(summed log-prob, token count) of every option after its prompt, [items, options].
    Plain prompts start from an EOS, as a pretraining document does, and their special-
    token look-alikes stay text; chat prompts are tokenized as SFT tokenizes them."""
    rows = []
    for prompt, options in prompts:
        ids = tokenizer(prompt, add_special_tokens=False,
                        split_special_tokens=not chat)["input_ids"]
        ids = ids if chat else [tokenizer.eos_token_id, *ids]
        rows += [(ids, tokenizer(o, add_special_tokens=False,
                                 split_special_tokens=not chat)["input_ids"]) for o in options]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id
    sums, counts = [], []
    model.eval()
    with torch.no_grad():
        for k in range(0, len(rows), batch_size):
            out = sequence_logprobs(model, collate_continuations(rows[k:k + batch_size], pad))
            sums += out.sums.tolist()
            counts += out.counts.tolist()
    shape = (len(prompts), -1)
    return np.asarray(sums).reshape(shape), np.asarray(counts).reshape(shape)


def choice_correct(scores: np.ndarray, answers: list[int]) -> np.ndarray:
    """1.0 where the highest-scoring option is the answer (ties: the first listed wins,
    and options are listed in a seeded order, so a constant scorer gets chance)."""
    return (scores.argmax(1) == np.asarray(answers)).astype(float)


def score_choice(model: Any, tokenizer: Any, items: list[dict[str, Any]], fmt: str,
                 seed: int = 0) -> dict[str, list]:
    """Per-item correctness by summed and by per-token log-prob, and the raw scores, with
    the items shown in format `fmt` (a key of FORMATS)."""
    build, chat = FORMATS[fmt]
    sums, counts = option_logprobs(model, tokenizer,
                                   [build(it, tokenizer, seed) for it in items], chat)
    answers = [it["answer"] for it in items]
    return {"correct": choice_correct(sums, answers).tolist(),
            "correct_per_token": choice_correct(sums / counts, answers).tolist(),
            "option_sums": sums.tolist(), "option_counts": counts.tolist()}


# --------------------------------------------------------- (c) the same short instruction tuning

def tuning_records(records: Path, tokenizer: Any, n: int, budget: int, seed: int,
                   max_length: int) -> list[dict[str, Any]]:
    """`n` in-context QA records from the synthesizer's pairs about TRAINING chunks: the
    user turn is a window of the pair's chunk (around the paragraph sharing most words with
    the answer, ≤ `budget` tokens) and the question; the reply is the pair's answer. Pairs
    judged unsupported (`grounded` false) and examples longer than `max_length` tokens as
    SFT tokenizes them are left out, so every arm trains on all `n`. Seeded choice."""
    from exnihilo.records import iter_jsonl, make_record
    from exnihilo.train.data import final_length, tokenize_record

    usable = []
    for _, rec in iter_jsonl(records):
        meta = rec.get("meta") or {}
        text = (meta.get("source_chunk") or {}).get("text")
        if not text or (meta.get("tags") or {}).get("grounded") is False:
            continue
        question, answer = rec["messages"][0]["content"], rec["messages"][-1]["content"]
        paras = paragraphs(text)
        words = set(WORD.findall(answer))
        anchor = max(range(len(paras)), key=lambda i: len(words & set(WORD.findall(paras[i]))))
        context = context_window(paras, anchor, tokenizer, budget)
        if context is None:
            continue
        record = make_record([*chat_messages(context, question),
                              {"role": "assistant", "content": answer}],
                             {"source": "instruct_pt tuning", "pair": rec["id"]})
        example = tokenize_record(record, "chat", tokenizer)
        if final_length(example, tokenizer.eos_token_id) <= max_length:
            usable.append(record)
    random.Random(seed).shuffle(usable)
    return usable[:n]


def unfinished(folder: Path) -> bool:
    """A killed run of ours left this folder: resume it (from its last checkpoint, if any)."""
    from exnihilo.train.run import RUN_CONFIG

    return (folder / RUN_CONFIG).exists()


def tune(folder: Path, base: Path, data: Path, s: dict, lr: float, seed: int, tokenizer: Any
         ) -> None:
    """Full fine-tuning of `base` by the product's SFT recipe (reused when finished)."""
    from exnihilo.train.sft import SFTConfig, run_sft

    if (folder / "exnihilo_run.json").exists():
        return
    run_sft(SFTConfig(data=str(data), out=str(folder), model=str(base), full=True,
                      style="chat", mask_prompt=True, epochs=s["tune_epochs"], lr=lr,
                      batch_size=s["tune_batch_size"], max_length=s["tune_max_length"],
                      length_policy="drop", val_fraction=0.0, eval_every=0, save_every=0,
                      seed=seed), resume=unfinished(folder), tokenizer=tokenizer)


# ------------------------------------------------------------------------ scores per arm

def cached_scores(path: Path, key: dict[str, Any], compute: Any) -> dict[str, Any]:
    """`compute()` once per `key` (the model folder and evaluation sizes): the result is
    kept in `path` (written atomically), so a rerun skips finished evaluations."""
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("key") == key:
            return old
    result = {"key": key, **compute()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, path)
    return result


def items_digest(items: list[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()[:16]


def evaluate_arm(folder: Path, tokenizer: Any, heldout: list[str], items: list[dict], s: dict,
                 formats: tuple[str, ...], seed: int) -> dict[str, Any]:
    """(a) and (b) in each of `formats` for the model in `folder`, cached per folder (a
    retrained model, other items or sizes are scored afresh)."""
    from exnihilo.models import load_model

    run = hashlib.sha256((folder / "exnihilo_run.json").read_bytes()).hexdigest()[:16]
    key = {"model": str(folder), "run": run, "heldout": len(heldout), "eval_len": s["eval_len"],
           "items": items_digest(items), "formats": list(formats)}

    def compute() -> dict[str, Any]:
        model = load_model(str(folder), "float32")
        nll, counts = document_nll(model, tokenizer, heldout, s["eval_len"])
        return {"nll": nll.tolist(), "counts": counts.tolist(),
                "choice": {f: score_choice(model, tokenizer, items, f, seed) for f in formats}}
    return cached_scores(folder.parent / "scores" / f"{folder.name}.json", key, compute)


def last_metrics(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])


def context_count_guess(items: list[dict[str, Any]]) -> np.ndarray:
    """A no-model reference for (b): pick the option that occurs most often (whole word) in
    the shown context, the first listed on ties. 1.0 where that is the answer."""
    picks = []
    for it in items:
        counts = [len(re.findall(rf"(?<!\w){re.escape(o)}(?!\w)", it["context"]))
                  for o in it["options"]]
        picks.append(counts.index(max(counts)))
    return (np.asarray(picks) == np.asarray([it["answer"] for it in items])).astype(float)


# ----------------------------------------------------------------------------------- run

def pretrain_arm(folder: Path, data: Path, s: dict, setup: str, seed: int, tokenizer: Any
                 ) -> None:
    from exnihilo.train.pretrain import PretrainConfig, run_pretrain

    if (folder / "exnihilo_run.json").exists():
        return
    extra = (dict(arch=s["preset"], lr=s["lr"], tokens=s["tokens"]) if setup == "scratch" else
             dict(arch=None, model=SYNTHESIZER, lr=5e-5, tokens=s["continual_tokens"]))
    run_pretrain(PretrainConfig(
        data=str(data), out=str(folder), seq_len=s["seq_len"], batch_size=s["batch_size"],
        val_fraction=0.0, eval_every=0, save_every=25, seed=seed, warmup_ratio=0.02, **extra),
        resume=unfinished(folder), tokenizer=tokenizer)


# results.json keys and results.md titles, in order
SECTIONS = {
    "arms": "(a) held-out perplexity",
    "choice": "(b) held-out cloze multiple choice, as a question in the pair templates' "
              "format (chance 25 %)",
    "choice_inplace": "(b) the same items in place: the sentence up to the blank, continued "
                      "by each option (chance 25 %)",
    "tuned_perplexity": "(c) after the same instruction tuning: held-out perplexity "
                        "(train tokens and s: the tuning's; answer tokens trained)",
    "tuned_choice": "(c) after the same instruction tuning: the question, in the chat "
                    "format the tuning used (chance 25 %)",
    "tuned_choice_inplace": "(c) after the same instruction tuning: the items in place "
                            "(chance 25 %)",
}


def measure_setup(setup: str, out: Path, corpora: list[Path], tune_data: Path,
                  docs: list[str], items: list[dict[str, Any]], s: dict, seed: int,
                  tokenizer: Any) -> dict[str, list[dict[str, Any]]]:
    """Pretrain (or reuse) and tune (or reuse) the three arms of one setup and measure
    each before and after tuning: rows of the four result tables, with differences to
    this setup's Vanilla arm."""
    lr = s["tune_lr_scratch" if setup == "scratch" else "tune_lr_continual"]
    rows: dict[str, list[dict[str, Any]]] = {key: [] for key in SECTIONS}
    base: dict[str, dict[str, Any]] = {}
    for k, (name, data) in enumerate(zip(ARMS, corpora, strict=True)):
        folder, tuned = out / f"{setup}-{k}", out / f"{setup}-{k}-tuned"
        pretrain_arm(folder, data, s, setup, seed, tokenizer)
        tune(tuned, folder, tune_data, s, lr, seed, tokenizer)
        info = json.loads((folder / "exnihilo_run.json").read_text())
        tuning = last_metrics(tuned)
        stages = (("arms", folder, {"choice": "pair", "choice_inplace": "inplace"}, {
                      "trained_tokens": info["trained_tokens"],
                      "train_seconds": last_metrics(folder)["train_seconds"],
                      "corpus_documents": info["data"]["documents"]}),
                  ("tuned_perplexity", tuned, {"tuned_choice": "chat",
                                               "tuned_choice_inplace": "inplace"}, {
                      "trained_tokens": tuning["trained_tokens"],
                      "train_seconds": tuning["train_seconds"],
                      "tuning_positions": tuning["positions"], "tuning_steps": tuning["step"],
                      "pretrain_trained_tokens": info["trained_tokens"]}))
        for ppl_key, model_dir, formats, extra in stages:
            sc = evaluate_arm(model_dir, tokenizer, docs, items, s, tuple(formats.values()),
                              seed)
            ref = base.setdefault(ppl_key, sc)
            first = ref is sc
            rows[ppl_key].append(arm_row(
                f"{setup}: {name}", (np.asarray(sc["nll"]), np.asarray(sc["counts"])),
                None if first else (np.asarray(ref["nll"]), np.asarray(ref["counts"])), extra))
            for choice_key, fmt in formats.items():
                got, want = sc["choice"][fmt], ref["choice"][fmt]
                rows[choice_key].append(accuracy_row(
                    f"{setup}: {name}", np.asarray(got["correct"]),
                    None if first else np.asarray(want["correct"]),
                    {"accuracy_per_token": float(np.mean(got["correct_per_token"])),
                     "format": fmt}))
    rows["choice"].append(accuracy_row(
        f"{setup}: reference, no model: the option seen most often in the context",
        context_count_guess(items), None))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="minutes, for CI")
    parser.add_argument("--out", default="runs/exp-ipt")
    parser.add_argument("--continual", action="store_true",
                        help="also continual pretraining of SmolLM2-135M (part of the full run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=None,
                        help="override the size's from-scratch tokens")
    args = parser.parse_args()
    threads(1)
    from exnihilo.models import load_tokenizer
    from exnihilo.records import write_jsonl_atomic

    s = dict(QUICK if args.quick else FULL)
    if args.tokens is not None:
        s["tokens"] = args.tokens
    out = Path(args.out)
    started = time.perf_counter()
    tokenizer = load_tokenizer(SYNTHESIZER)
    records, augmented = synthesize(out, s)
    aug = [json.loads(line)["text"] for line in augmented.read_text().splitlines() if line]
    raw = raw_chunks(records, aug)
    general = general_texts(len(raw))
    corpora = [write_text_jsonl(out / "data" / "vanilla.jsonl", raw),
               write_text_jsonl(out / "data" / "mix.jsonl", raw + general),
               write_text_jsonl(out / "data" / "instruct.jsonl", aug + general)]
    heldout_texts = module_docs(HELDOUT_MODULES)
    heldout = split_paragraph_docs(heldout_texts, 2000)
    items = cloze_items(heldout_texts, tokenizer, s["items"], args.seed, s["context_tokens"])
    write_jsonl_atomic(out / "data" / "cloze_items.jsonl", items)
    tune_data = out / "data" / "tune.jsonl"
    write_jsonl_atomic(tune_data, tuning_records(records, tokenizer, s["tune_examples"],
                                                 s["context_tokens"], args.seed,
                                                 s["tune_max_length"]))

    sections: dict[str, list[dict[str, Any]]] = {key: [] for key in SECTIONS}
    for setup in ["scratch", "continual"] if args.continual else ["scratch"]:
        docs = heldout[:s["heldout_docs" if setup == "scratch" else "continual_heldout_docs"]]
        asked = items[:s["items" if setup == "scratch" else "continual_items"]]
        for key, rows in measure_setup(setup, out, corpora, tune_data, docs, asked, s,
                                       args.seed, tokenizer).items():
            sections[key] += rows
    settings = {**s, "seed": args.seed, "quick": args.quick, "continual": args.continual,
                "chunks_used": len(raw), "augmented_texts": len(aug),
                "general_texts": len(general), "cloze_items": len(items),
                "tune_examples_written": sum(1 for _ in tune_data.open()),
                "wall_seconds": round(time.perf_counter() - started)}
    tables = {key: accuracy_table if "choice" in key else markdown_table for key in SECTIONS}
    save_sections(out, "Instruction Pre-Training: Vanilla vs Mix vs Instruct", [
        (key, f"## {SECTIONS[key]}\n\n{tables[key](rows, 'Vanilla PT')}", rows)
        for key, rows in sections.items()], settings)

if __name__ == "__main__":
    main()
