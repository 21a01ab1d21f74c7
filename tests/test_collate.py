"""Prompt styles, tokenised examples and the collate, checked value by value."""

from __future__ import annotations

import random

import pytest
import torch

from exnihilo.errors import ExnihiloError
from exnihilo.styles import render_prompt, render_segments
from exnihilo.train.collate import (
    IGNORE_INDEX,
    BatchPlan,
    collate_packed,
    collate_padded,
    pack_rows,
    padding_waste,
    shift_example,
)
from exnihilo.train.data import (
    Example,
    LengthReport,
    prepare_examples,
    split_records,
    tokenize_record,
)
from exnihilo.train.sft import SFTObjective, trained_logits

EOS = PAD = 2
M = IGNORE_INDEX



pytestmark = pytest.mark.usefixtures("one_thread")

def ex(ids, trained, complete=True):
    return Example(list(ids), [bool(t) for t in trained], complete=complete)


def user_assistant(q, a):
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


# ---------------------------------------------------------------------------------- styles

def test_alpaca_and_phi3_prompts_are_ch07_text(smol_tokenizer):
    msgs = user_assistant("Fix the spelling.\n\nOcassion", "Occasion")
    alpaca_meta = {"instruction": "Fix the spelling.", "input": "Ocassion"}
    assert render_prompt(msgs, "alpaca", smol_tokenizer, alpaca_meta) == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nFix the spelling.\n\n### Input:\n"
        "Ocassion\n\n### Response:\n")
    assert render_prompt(msgs[:1], "alpaca", smol_tokenizer) == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nFix the spelling.\n\nOcassion\n\n"
        "### Response:\n")
    assert render_prompt(msgs, "phi3", smol_tokenizer, alpaca_meta) == (
        "<|user|>\nFix the spelling.\nOcassion\n<|assistant|>\n")
    assert render_segments(msgs, "phi3", smol_tokenizer) == [
        ("<|user|>\nFix the spelling.\n\nOcassion\n<|assistant|>\n", False), ("Occasion", True)]


def test_chat_prompt_is_the_template_with_generation_prompt(smol_tokenizer):
    msgs = user_assistant("hi", "yo")
    expected = smol_tokenizer.apply_chat_template(msgs[:1], tokenize=False,
                                                  add_generation_prompt=True)
    assert render_prompt(msgs, "chat", smol_tokenizer) == expected
    assert "You are a helpful AI assistant named SmolLM" in expected  # injected default system


def test_chat_segments_multi_turn(smol_tokenizer):
    msgs = user_assistant("hi", "yo") + user_assistant("q2", "a2")
    segments = render_segments(msgs, "chat", smol_tokenizer)
    assert [s for s, trained in segments if trained] == ["yo<|im_end|>", "a2<|im_end|>"]
    full = smol_tokenizer.apply_chat_template(msgs, tokenize=False)
    # Concatenated, the segments are the template's text minus the final newline.
    assert "".join(s for s, _ in segments) + "\n" == full
    assert [t for _, t in segments] == [False, True, False, True]


def test_single_turn_styles_refuse_multi_turn_and_system(smol_tokenizer):
    msgs = user_assistant("hi", "yo") + user_assistant("q2", "a2")
    with pytest.raises(ExnihiloError, match="--style chat"):
        render_segments(msgs, "alpaca", smol_tokenizer)
    system = [{"role": "system", "content": "be brief"}] + user_assistant("hi", "yo")
    with pytest.raises(ExnihiloError, match="--style chat"):
        render_prompt(system, "phi3", smol_tokenizer)
    with pytest.raises(ExnihiloError, match="unknown prompt style"):
        render_prompt(msgs, "vicuna", smol_tokenizer)


# ------------------------------------------------------------------------- padded collate

def test_padded_collate_value_by_value():
    a = ex([10, 11, 12, 13], [0, 0, 1, 1])
    b = ex([20, 21], [0, 1])
    batch = collate_padded([a, b], PAD, EOS, mask_prompt=False)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 13], [20, 21, EOS, PAD]]
    # b: the first pad target (EOS) is kept, the later pads are -100.
    assert batch["labels"].tolist() == [[11, 12, 13, EOS], [21, EOS, M, M]]
    assert "attention_mask" not in batch

    masked = collate_padded([a, b], PAD, EOS, mask_prompt=True)
    assert masked["input_ids"].tolist() == batch["input_ids"].tolist()
    assert masked["labels"].tolist() == [[M, 12, 13, EOS], [21, EOS, M, M]]


def test_eos_not_doubled_and_not_added_after_truncation():
    ends_in_eos = ex([10, 11, EOS], [0, 1, 1])
    assert shift_example(ends_in_eos, EOS, True) == ([10, 11], [11, EOS])
    cut = ex([10, 11, 12], [0, 1, 1], complete=False)
    assert shift_example(cut, EOS, False) == ([10, 11], [11, 12])


def ch07_collate(batch, pad_token_id=EOS, ignore_index=M):
    """Reference: LLMs-from-scratch ch07 custom_collate_fn (masks pads by value)."""
    batch_max_length = max(len(item) + 1 for item in batch)
    inputs_lst, targets_lst = [], []
    for item in batch:
        new_item = item.copy() + [pad_token_id]
        padded = new_item + [pad_token_id] * (batch_max_length - len(new_item))
        inputs = torch.tensor(padded[:-1])
        targets = torch.tensor(padded[1:])
        indices = torch.nonzero(targets == pad_token_id).squeeze()
        if indices.numel() > 1:
            targets[indices[1:]] = ignore_index
        inputs_lst.append(inputs)
        targets_lst.append(targets)
    return torch.stack(inputs_lst), torch.stack(targets_lst)


def test_padded_collate_matches_ch07_reference_on_random_batches():
    rng = random.Random(0)
    for _ in range(20):
        items = [[rng.randrange(3, 500) for _ in range(rng.randrange(1, 12))]
                 for _ in range(rng.randrange(1, 6))]
        ref_inputs, ref_targets = ch07_collate(items)
        batch = collate_padded([ex(i, [1] * len(i)) for i in items], PAD, EOS, False)
        assert torch.equal(batch["input_ids"], ref_inputs)
        assert torch.equal(batch["labels"], ref_targets)


def test_real_tokenizer_multi_turn_masking(smol_tokenizer):
    record = {"id": "r", "messages": user_assistant("hi", "yo") + user_assistant("q2", "a2")}
    example = tokenize_record(record, "chat", smol_tokenizer)
    assert example.input_ids[-1] == smol_tokenizer.eos_token_id  # <|im_end|> ends the text
    batch = collate_padded([example], PAD, EOS, mask_prompt=True)
    labels = batch["labels"][0].tolist()
    trained = [t for t in labels if t != M]
    assert smol_tokenizer.decode(trained) == "yo<|im_end|>a2<|im_end|>"
    # Every kept target sits exactly where that token is the next input.
    ids = example.input_ids
    for t, label in enumerate(labels):
        if label != M:
            assert label == ids[t + 1]
    # The prompt tokens equal the tokenised generation prompt: train = inference.
    prompt = render_prompt(record["messages"][:1], "chat", smol_tokenizer)
    prompt_ids = smol_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids[:len(prompt_ids)] == prompt_ids
    assert not any(example.trained[:len(prompt_ids)])
    assert all(example.trained[len(prompt_ids):len(prompt_ids) + 2])


# ------------------------------------------------------------------------------- packing

def test_packed_collate_positions_and_boundaries():
    a = ex([10, 11, 12], [0, 1, 1])  # 3 positions after EOS + shift
    b = ex([20, 21], [0, 1])  # 2 positions
    c = ex([30, 31, 32, 33], [0, 0, 1, 1])  # 4 positions
    batch = collate_packed([[a, b], [c]], PAD, EOS, mask_prompt=True)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 20, 21], [30, 31, 32, 33, PAD]]
    # a's last target is its EOS, never b's first token; b's first input is not a target of a.
    assert batch["labels"].tolist() == [[11, 12, EOS, 21, EOS], [M, 32, 33, EOS, M]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]


def test_pack_rows_first_fit_decreasing():
    rows = pack_rows([5, 3, 4, 2, 6, 1], capacity=7)
    assert sorted(sorted(r) for r in rows) == [[0, 3], [1, 2], [4, 5]]
    assert all(sum([5, 3, 4, 2, 6, 1][i] for i in r) <= 7 for r in rows)
    with pytest.raises(ValueError):
        pack_rows([8], capacity=7)


def test_padding_waste_by_hand():
    lengths = [4, 2, 3]
    assert padding_waste([[[0], [1]], [[2]]], lengths) == (2, 11)  # 4+4 wide, then 3
    assert padding_waste([[[0, 1], [2]]], lengths) == (3, 12)


def test_batch_plan_is_a_function_of_seed_and_epoch():
    lengths = [random.Random(i).randrange(1, 30) for i in range(40)]
    plan = BatchPlan(batch_size=4, pack=True, max_length=64, seed=3)
    assert plan.epoch(lengths, 0) == plan.epoch(lengths, 0)
    assert plan.epoch(lengths, 0) != plan.epoch(lengths, 1)
    used = sorted(i for batch in plan.epoch(lengths, 0) for row in batch for i in row)
    assert used == list(range(40))  # every example exactly once
    pad, total = padding_waste(plan.epoch(lengths, 0), lengths)
    assert pad / total < 0.10


def _examples(tokenizer, n=4):
    texts = [("What is 2+2?", "4."), ("Name a colour.", "Blue is a colour."),
             ("Say hi.", "Hi there, friend!"), ("Capital of France?", "Paris.")]
    return [tokenize_record({"messages": user_assistant(q, a)}, "phi3", tokenizer)
            for q, a in texts[:n]]


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma2"])
def test_packed_forward_equals_separate_forwards(fixture, request, smol_tokenizer):
    tiny_llama = request.getfixturevalue(fixture)
    examples = _examples(smol_tokenizer)
    packed = collate_packed([examples[:2], examples[2:]], PAD, EOS, mask_prompt=False)
    with torch.no_grad():
        # use_cache=False matters: with a KV cache transformers skips packed-sequence masks.
        logits = tiny_llama(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                            use_cache=False).logits
        for r, row in enumerate([examples[:2], examples[2:]]):
            start = 0
            for example in row:
                inputs, _ = shift_example(example, EOS, False)
                alone = tiny_llama(input_ids=torch.tensor([inputs])).logits[0]
                got = logits[r, start:start + len(inputs)]
                assert torch.allclose(got, alone, atol=1e-5), (r, start)
                start += len(inputs)
    # Control: without restarting positions the second example does see the first.
    flat = torch.arange(packed["input_ids"].shape[1]).unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        leaky = tiny_llama(input_ids=packed["input_ids"], position_ids=flat,
                           use_cache=False).logits
    n0 = len(shift_example(examples[0], EOS, False)[0])
    assert not torch.allclose(leaky[0, n0:], logits[0, n0:], atol=1e-3)


def test_padded_forward_needs_no_attention_mask(tiny_llama, smol_tokenizer):
    examples = _examples(smol_tokenizer)
    batch = collate_padded(examples, PAD, EOS, mask_prompt=False)
    lengths = [len(shift_example(e, EOS, False)[0]) for e in examples]
    mask = torch.tensor([[1] * n + [0] * (batch["input_ids"].shape[1] - n) for n in lengths])
    with torch.no_grad():
        bare = tiny_llama(input_ids=batch["input_ids"]).logits
        masked = tiny_llama(input_ids=batch["input_ids"], attention_mask=mask).logits
    for r, n in enumerate(lengths):
        assert torch.allclose(bare[r, :n], masked[r, :n], atol=1e-5)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma2"])
def test_trained_logits_shortcut_matches_model_forward(fixture, request, smol_tokenizer):
    model = request.getfixturevalue(fixture)
    batch = collate_padded(_examples(smol_tokenizer), PAD, EOS, mask_prompt=True)
    with torch.no_grad():
        logits, targets = trained_logits(model, batch)
        full = model(input_ids=batch["input_ids"]).logits
        keep = batch["labels"] != M
        assert torch.allclose(logits, full[keep], atol=1e-5)
        assert torch.equal(targets, batch["labels"][keep])
        # The SFT loss is the ch07 loss: mean cross-entropy over non-ignored targets.
        objective = SFTObjective()
        ours = objective.loss_sum(model, batch) / objective.weight(batch)
        ref = torch.nn.functional.cross_entropy(full.flatten(0, 1), batch["labels"].flatten())
        assert torch.allclose(ours, ref, atol=1e-5)


# ---------------------------------------------------------------------------------- data

def test_split_is_seeded_and_disjoint():
    records = [{"id": str(i), "messages": user_assistant(str(i), "x")} for i in range(50)]
    train, val = split_records(records, 0.1, seed=7)
    again_train, again_val = split_records(records, 0.1, seed=7)
    assert [r["id"] for r in val] == [r["id"] for r in again_val] and len(val) == 5
    assert {r["id"] for r in train} | {r["id"] for r in val} == {str(i) for i in range(50)}
    assert not {r["id"] for r in train} & {r["id"] for r in val}
    assert [r["id"] for r in split_records(records, 0.1, seed=8)[1]] != [r["id"] for r in val]
    with pytest.raises(ExnihiloError, match="val-fraction"):
        split_records(records, 1.5, seed=0)


def test_max_length_truncate_and_drop_are_counted(smol_tokenizer):
    long_answer = "word " * 60
    records = [{"id": "short", "messages": user_assistant("hi", "yo")},
               {"id": "long", "messages": user_assistant("hi", long_answer)},
               {"id": "none", "messages": [{"role": "user", "content": "no answer"}]}]
    report = LengthReport()
    kept = prepare_examples(records, "phi3", smol_tokenizer, 20, "truncate", report)
    assert (report.kept, report.truncated, report.dropped, report.no_answer) == (2, 1, 0, 1)
    assert len(kept[1].input_ids) == 20 and not kept[1].complete
    assert len(shift_example(kept[1], EOS, False)[0]) == 19  # no EOS after a cut answer
    report = LengthReport()
    kept = prepare_examples(records, "phi3", smol_tokenizer, 20, "drop", report)
    assert (report.kept, report.truncated, report.dropped) == (1, 0, 1)
    assert "1 dropped" in report.summary() and "no assistant" in report.summary()
    # Truncating away every answer token leaves nothing to learn: dropped, and counted.
    report = LengthReport()
    prepare_examples(records[1:2], "alpaca", smol_tokenizer, 10, "truncate", report)
    assert (report.kept, report.dropped) == (0, 1)


def test_chunked_loss_equals_whole_loss_and_gradients(tiny_llama, smol_tokenizer, monkeypatch):
    from exnihilo.train import forward

    batch = collate_padded(_examples(smol_tokenizer), PAD, EOS, mask_prompt=False)
    objective = SFTObjective()
    grads = []
    for chunk in (10_000, 7):  # one piece vs checkpointed chunks of 7 positions
        monkeypatch.setattr(forward, "LOGIT_CHUNK", chunk)
        tiny_llama.zero_grad()
        loss = objective.loss_sum(tiny_llama, batch)
        loss.backward()
        grads.append((float(loss), [p.grad.clone() for p in tiny_llama.parameters()]))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    for whole, chunked in zip(grads[0][1], grads[1][1], strict=True):
        assert torch.allclose(whole, chunked, atol=1e-6)

