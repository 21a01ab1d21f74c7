"""`train reward`: the Bradley–Terry loss by hand, training on a tiny model (loss starts at
ln 2, pairwise accuracy rises), and the saved sequence-classification folder scoring exactly
as the trained head did."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import tiny_llama_config
from exnihilo.train.reward import (
    RewardConfig,
    RewardModel,
    RewardScorer,
    bradley_terry_loss,
    collate_sequences,
    run_reward,
)

pytestmark = pytest.mark.usefixtures("one_thread")

PREFS = [("What is 2+2?", "4.", "5."), ("Name a colour.", "Blue.", "Seven."),
         ("Say hi.", "Hi there!", "No."), ("Capital of France?", "Paris.", "Rome."),
         ("Opposite of hot?", "Cold.", "Hot."), ("Plural of mouse?", "Mice.", "Mouses."),
         ("First letter?", "A.", "Z."), ("Days in a week?", "Seven.", "Ten.")]


def test_bradley_terry_loss_by_hand():
    loss = bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.2, 0.0]))
    assert loss.tolist() == pytest.approx([math.log(1 + math.exp(-0.8)), math.log(2)])


def test_pooling_is_the_last_non_pad_token():
    batch = collate_sequences([[5, 6, 7], [5, 2]], pad_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 2, 2]]
    assert batch["last_index"].tolist() == [2, 0]  # a trailing pad-valued EOS is skipped


def test_reward_model_learns_and_saves_a_standard_folder(tmp_path, smol_tokenizer):
    from transformers import LlamaForCausalLM

    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "chosen": c, "rejected": r}) + "\n"
                            for q, c, r in PREFS))
    torch.manual_seed(0)
    lm = LlamaForCausalLM(tiny_llama_config(len(smol_tokenizer)))
    cfg = RewardConfig(data=str(data), out=str(tmp_path / "rm"), full=True, lr=1e-2, epochs=10,
                       batch_size=4, val_fraction=0.25, style="phi3", warmup_ratio=0.0,
                       eval_every=0, save_every=0, max_length=64)
    result = run_reward(cfg, model_obj=lm, tokenizer=smol_tokenizer)
    metrics = [json.loads(x) for x in (tmp_path / "rm" / "metrics.jsonl").read_text().split()]
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # zero head
    assert metrics[-1]["loss"] < 0.2 and metrics[-1]["accuracy"] == 1.0
    assert result.val_accuracy is not None and "val_accuracy" in metrics[-1]

    scorer = RewardScorer(str(tmp_path / "rm"), style="phi3")
    reloaded = RewardModel(lm)  # the trained decoder, with the saved head copied in
    reloaded.score.weight.data.copy_(scorer.model.score.weight)
    record = {"messages": [{"role": "user", "content": "Say hi."}]}
    scores = scorer.score(record, ["Hi there!", "No."])
    assert scores[0] > scores[1]
    from exnihilo.train.preference_data import tokenize_exchange

    rows = [sum(tokenize_exchange(record["messages"], {"role": "assistant", "content": t},
                                  "phi3", smol_tokenizer), []) for t in ("Hi there!", "No.")]
    with torch.no_grad():
        ours = reloaded.eval()(collate_sequences(rows, smol_tokenizer.pad_token_id))
    assert ours.tolist() == pytest.approx(scores, abs=1e-4)
