"""Speculative decoding: greedy output identical to plain greedy, sampled output keeps the
target's distribution (the acceptance rule checked statistically), caches kept in step."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama_config
from exnihilo.engines.base import SamplingParams
from exnihilo.engines.speculative import SpeculativeEngine, accept_drafted, token_distribution
from exnihilo.engines.transformers import TransformersEngine
from exnihilo.errors import ExnihiloError

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(vocab, seed, layers=2):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(vocab, num_hidden_layers=layers))
    return model.eval()


def test_acceptance_rule_keeps_the_target_distribution():
    """Whatever the draft proposes, the first emitted token is distributed as p_1."""
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.1, 0.1, 0.4, 0.4]])
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    n = 20_000
    for _ in range(n):
        drafted = [int(torch.multinomial(q[0], 1, generator=gen))]
        emitted, _ = accept_drafted(p, q, drafted, gen)
        counts[emitted[0]] += 1
    freq = counts / n
    # Binomial standard error at n=20k is ≤ 0.0036: 4.5 σ bounds.
    assert torch.allclose(freq, p[0], atol=0.016), freq
    # Acceptance rate = Σ min(p, q) = 0.1 + 0.1 + 0.15 + 0.05.
    accepted = 0
    for _ in range(4000):
        drafted = [int(torch.multinomial(q[0], 1, generator=gen))]
        accepted += accept_drafted(p, q, drafted, gen)[1]
    assert accepted / 4000 == pytest.approx(0.4, abs=0.03)


def test_greedy_distributions_are_one_hot_and_accept_only_the_argmax():
    logits = torch.tensor([[0.0, 2.0, 1.0]])
    dist = token_distribution(logits, SamplingParams(temperature=0.0))
    assert dist.tolist() == [[0.0, 1.0, 0.0]]
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    q = torch.tensor([[0.0, 0.0, 1.0]])
    assert accept_drafted(p, q, [2], gen) == ([1], 0)  # rejected: the target's argmax
    q_ok = torch.tensor([[0.0, 1.0, 0.0]])
    assert accept_drafted(p, q_ok, [1], gen) == ([1, 0], 1)  # accepted, plus a bonus token


@pytest.mark.parametrize("draft_seed", [None, 7])  # a perfect draft (the target), a poor one
def test_greedy_output_is_token_identical_to_plain_greedy(smol_tokenizer, draft_seed):
    vocab = len(smol_tokenizer)
    target = tiny(vocab, 0)
    plain = TransformersEngine(model_obj=target, tokenizer=smol_tokenizer)
    plain._stop_ids = {-1}
    draft = target if draft_seed is None else tiny(vocab, draft_seed, layers=1)
    spec = SpeculativeEngine(plain, draft, max_draft=5)
    params = SamplingParams(temperature=0.0, max_new_tokens=17)
    prompts = ["Hello there", "A longer prompt about speculative decoding", "x"]
    want = [c.text for c in plain.complete(prompts, params)]
    got = [c.text for c in spec.complete(prompts, params)]
    assert got == want
    assert all(c.completion_tokens == 17 for c in spec.complete(prompts[:1], params))
    if draft_seed is None:  # the draft is the target: everything is accepted
        assert spec.acceptance_rate == 1.0
    assert spec.stats["target_passes"] < spec.stats["tokens"]  # fewer target passes


def test_sampled_first_token_follows_the_target(smol_tokenizer):
    """End to end with models: over many seeds, the first sampled token's frequencies match
    the target's softmax (restricted by top-k to a few tokens so counts are meaningful)."""
    vocab = len(smol_tokenizer)
    target, draft = tiny(vocab, 0), tiny(vocab, 3, layers=1)
    plain = TransformersEngine(model_obj=target, tokenizer=smol_tokenizer)
    plain._stop_ids = {-1}
    spec = SpeculativeEngine(plain, draft, start_draft=3)
    params = SamplingParams(temperature=1.0, top_k=3, max_new_tokens=2)
    prompt = smol_tokenizer("Once upon a time", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = target(input_ids=torch.tensor([prompt])).logits[0, -1:]
    p = token_distribution(logits, params)[0]
    support = torch.nonzero(p).flatten().tolist()
    counts = dict.fromkeys(support, 0)
    n = 600
    for seed in range(n):
        spec.generate_one(prompt, params, seed)
        counts[spec.last_tokens[0]] += 1
    for t in support:
        assert counts[t] / n == pytest.approx(float(p[t]), abs=0.07)


def test_draft_with_another_vocabulary_is_refused(smol_tokenizer):
    plain = TransformersEngine(model_obj=tiny(len(smol_tokenizer), 0), tokenizer=smol_tokenizer)
    with pytest.raises(ExnihiloError, match="vocabulary"):
        SpeculativeEngine(plain, tiny(64, 0))
