"""Likelihood judging, option choice, agreement statistics and length control."""

from __future__ import annotations

import math

import pytest

from exnihilo.errors import ExnihiloError
from exnihilo.evaluate import (
    auc,
    bootstrap_interval,
    choose_option,
    cohen_kappa,
    expected_score,
    judge_scores,
    judge_summary,
    krippendorff_alpha_interval,
    logprob_scores,
    pairwise_compare,
    spearman,
)
from exnihilo.evaluate.judging import length_controlled_win_rate, pairwise_summary
from exnihilo.records import content_id, make_record
from helpers import ScriptedEngine

pytestmark = pytest.mark.usefixtures("one_thread")


class LogprobScripted(ScriptedEngine):
    """A scripted engine with the logprobs capability: `top(prompt_text)` gives the first
    reply token's {text: log p}; `reply(prompt_text, reply)` a reply's (Σ log p, tokens)."""

    def __init__(self, top=None, reply=None, **kw):
        super().__init__(lambda _: "", **kw)
        self.top, self.reply = top, reply

    def next_token_logprobs(self, conversations, top_k=20):
        self.calls.append(("next_token_logprobs", conversations, None, None))
        return [self.top(c[-1]["content"]) for c in conversations]

    def reply_logprobs(self, conversations, replies):
        self.calls.append(("reply_logprobs", conversations, None, None))
        return [self.reply(c[-1]["content"], r) for c, r in zip(conversations, replies,
                                                               strict=True)]


def generated(user: str, answer: str, reference: str | None = "ref", generator: str = "m"
              ) -> dict:
    prompt = [{"role": "user", "content": user}]
    return make_record(prompt + [{"role": "assistant", "content": answer}],
                       {"reference": reference, "prompt_id": content_id(prompt),
                        "generator": generator})


def logs(**probs: float) -> dict[str, float]:
    return {k: math.log(v) for k, v in probs.items()}


# ------------------------------------------------------------------------- expected score


def test_expected_score_is_the_probability_weighted_digit_scaled_to_100():
    top = {"7": math.log(0.3), " 9": math.log(0.1), "9": math.log(0.1), "The": math.log(0.4)}
    score, confidence, probs = expected_score(top)
    # mass 0.5 on digits; E[d] = (0.3·7 + 0.2·9) / 0.5 = 7.8; 7.8 / 9 · 100
    assert confidence == pytest.approx(0.5)
    assert score == pytest.approx(7.8 / 9 * 100)
    assert probs["7"] == pytest.approx(0.6) and probs["9"] == pytest.approx(0.4)


def test_expected_score_without_any_score_token_is_none_with_zero_confidence():
    assert expected_score(logs(Hello=0.9)) == (None, 0.0, {})


def test_logprob_judge_scores_every_answer_and_the_summary_keeps_confidence():
    def top(prompt: str) -> dict[str, float]:
        return logs(**{"9": 0.8, "0": 0.2}) if "Paris" in prompt else logs(**{"2": 0.5, "x": 0.5})

    engine = LogprobScripted(top=top)
    records = [generated("Capital of France?", "Paris"), generated("2+2?", "5")]
    results = judge_scores(engine, records, mode="logprob")
    verdicts = [r["meta"]["judge"] for r in results]
    scores = [r["meta"]["tags"]["score"] for r in results]
    assert scores[0] == pytest.approx(0.8 * 9 / 9 * 100)
    assert scores[1] == pytest.approx(2 / 9 * 100, abs=1e-3)
    assert [v["confidence"] for v in verdicts] == [pytest.approx(1.0), pytest.approx(0.5)]
    prompt = engine.calls[0][1][0][0]["content"]
    assert "from 0 to 9" in prompt and "single digit" in prompt
    summary = judge_summary(results)
    assert summary["unparseable"] == 0 and summary["mean_confidence"] == pytest.approx(0.75)


def test_logprob_mode_without_the_capability_names_the_engine():
    engine = ScriptedEngine(lambda _: "50", name="fake:no-logprobs")
    with pytest.raises(ExnihiloError, match="fake:no-logprobs"):
        judge_scores(engine, [generated("q", "a")], mode="logprob")
    with pytest.raises(ExnihiloError, match="fake:no-logprobs"):
        pairwise_compare(engine, [generated("q", "a")], [generated("q", "b")], mode="logprob")


def test_logprob_scores_resume_and_refuse_a_generative_judges_file(tmp_path):
    engine = LogprobScripted(top=lambda _: logs(**{"5": 1.0}))
    out = tmp_path / "judged.jsonl"
    records = [generated(f"q{i}", "a") for i in range(3)]
    logprob_scores(engine, records[:2], out=out)
    calls = len(engine.calls)
    results = logprob_scores(engine, records, out=out)
    assert len(engine.calls) == calls + 1 and engine.calls[-1][1].__len__() == 1
    assert [r["meta"]["tags"]["score"] for r in results] == [pytest.approx(500 / 9, abs=1e-3)] * 3
    generative = ScriptedEngine(lambda _: "50", name="fake:judge")
    with pytest.raises(ExnihiloError, match="other settings"):
        judge_scores(generative, records, out=out)


def test_logprob_judge_on_tiny_llama_matches_the_full_softmax(tiny_llama, smol_tokenizer):
    """The local path: the expected digit from the engine's top-k (k = whole vocabulary)
    equals one computed here from the model's own logits over every digit token."""
    import torch

    from exnihilo.engines.transformers import TransformersEngine
    from exnihilo.evaluate import logprob_judge_prompt
    from exnihilo.templates import render

    engine = TransformersEngine("tiny", model_obj=tiny_llama, tokenizer=smol_tokenizer,
                                batch_size=2)
    record = generated("Say hi.", "Hi!", reference="Hello!")
    vocab = len(smol_tokenizer)
    scored = logprob_scores(engine, [record], top_k=vocab)[0]["meta"]
    result = {**scored["judge"], "score": scored["tags"]["score"]}

    text = render(smol_tokenizer, [{"role": "user", "content": logprob_judge_prompt(
        record["messages"][:1], "Hi!", "Hello!")}], add_generation_prompt=True)
    ids = torch.tensor([smol_tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        probs = torch.softmax(tiny_llama(input_ids=ids).logits[0, -1].float(), -1)
    texts = smol_tokenizer.batch_decode([[i] for i in range(vocab)])
    mass = {str(d): 0.0 for d in range(10)}
    for i, t in enumerate(texts):
        if t.strip() in mass:
            mass[t.strip()] += float(probs[i])
    total = sum(mass.values())
    expected = sum(int(d) * p for d, p in mass.items()) / total / 9 * 100
    assert result["score"] == pytest.approx(expected, abs=1e-3)
    assert result["confidence"] == pytest.approx(total, rel=1e-3)


# ------------------------------------------------------------------------- pairwise


def test_a_likelihood_judge_that_favours_the_first_position_gives_ties_and_p_a_half():
    engine = LogprobScripted(top=lambda _: logs(A=0.6, B=0.2, C=0.2))
    a = [generated(f"q{i}", "short") for i in range(4)]
    b = [generated(f"q{i}", "a longer answer") for i in range(4)]
    rows, summary = pairwise_compare(engine, a, b, mode="logprob")
    assert summary["ties"] == 4 and summary["first_position_rate"] == 1.0
    assert summary["mean_p_first"] == pytest.approx(0.75)
    assert summary["mean_p_a"] == pytest.approx(0.5)  # the bias cancels over both orders
    assert rows[0]["orders"][0]["p_first"] == pytest.approx(0.75)
    assert "tie if they" not in engine.calls[0][1][0][0]["content"]


def test_a_likelihood_judge_preferring_model_a_in_both_orders_gives_wins():
    def top(prompt: str) -> dict[str, float]:
        first = prompt.index("RESPONSE A")
        return logs(A=0.9, B=0.1) if "good" in prompt[first:prompt.index("RESPONSE B")] \
            else logs(A=0.3, B=0.7)

    a = [generated(f"q{i}", "good") for i in range(3)]
    b = [generated(f"q{i}", "bad") for i in range(3)]
    _, summary = pairwise_compare(LogprobScripted(top=top), a, b, mode="logprob")
    assert summary["wins"] == 3 and summary["win_rate"] == 1.0
    assert summary["mean_p_a"] == pytest.approx((0.9 + 0.7) / 2)
    assert summary["probability_win_rate"] == 1.0


# ------------------------------------------------------------------------- options


def test_choose_option_normalises_over_the_options():
    scores = {"poor": (-3.0, 1), "good": (-1.0, 1), "excellent": (-1.0 - math.log(3), 2)}
    engine = LogprobScripted(reply=lambda prompt, reply: scores[reply])
    option, p = choose_option(engine, [{"role": "user", "content": "rate"}],
                              ["poor", "good", "excellent"])
    # weights e^-3, e^-1, e^-1/3 → P(good) = 1 / (e^-2 + 1 + 1/3)
    assert option == "good"
    assert p == pytest.approx(1 / (math.exp(-2) + 1 + 1 / 3))


def test_choose_option_with_length_norm_compares_per_token():
    scores = {"short": (-2.0, 1), "a long option": (-3.0, 3)}
    engine = LogprobScripted(reply=lambda prompt, reply: scores[reply])
    conv = [{"role": "user", "content": "q"}]
    assert choose_option(engine, conv, ["short", "a long option"])[0] == "short"
    option, p = choose_option(engine, conv, ["short", "a long option"], length_norm=True)
    assert option == "a long option"
    assert p == pytest.approx(1 / (1 + math.exp(-2.0 + 1.0)))


def test_choose_option_needs_the_capability_and_two_options():
    conv = [{"role": "user", "content": "q"}]
    with pytest.raises(ExnihiloError, match="fake:plain"):
        choose_option(ScriptedEngine(lambda _: "", name="fake:plain"), conv, ["a", "b"])
    with pytest.raises(ExnihiloError, match="two options"):
        choose_option(LogprobScripted(reply=lambda p, r: (0.0, 1)), conv, ["a"])


def test_choose_option_on_tiny_llama_agrees_with_reply_logprobs(tiny_llama, smol_tokenizer):
    from exnihilo.engines.transformers import TransformersEngine

    engine = TransformersEngine("tiny", model_obj=tiny_llama, tokenizer=smol_tokenizer)
    conv = [{"role": "user", "content": "How good is this answer?"}]
    options = ["poor", "average", "excellent"]
    sums = [s for s, _ in engine.reply_logprobs([conv] * 3, options)]
    option, p = choose_option(engine, conv, options)
    best = max(range(3), key=sums.__getitem__)
    assert option == options[best]
    assert p == pytest.approx(math.exp(sums[best]) / sum(math.exp(s) for s in sums), rel=1e-4)


# ------------------------------------------------------------------------- statistics


def test_auc_counts_ties_as_half():
    assert auc([3, 2, 2], [1, 2]) == pytest.approx(5 / 6)
    assert auc([1], [2]) == 0.0 and auc([], [1]) is None


def test_cohen_kappa_matches_a_hand_computation():
    first = ["win", "win", "loss", "tie", "win", "loss"]
    second = ["win", "loss", "loss", "tie", "win", "win"]
    # p_o = 4/6; p_e = (3/6)² + (2/6)² + (1/6)² = 14/36 → κ = (24 − 14) / (36 − 14)
    assert cohen_kappa(first, second) == pytest.approx(10 / 22)
    assert cohen_kappa(["a", "a"], ["a", "a"]) is None
    sklearn = pytest.importorskip("sklearn.metrics")
    assert cohen_kappa(first, second) == pytest.approx(sklearn.cohen_kappa_score(first, second))


def test_krippendorff_alpha_interval_matches_a_hand_computation():
    # units (1,1), (2,2), (3,4): D_o = 2/6; D_e = Σ_{i≠j}(v_i − v_j)² / (6·5) = 82/30
    assert krippendorff_alpha_interval([[1, 2, 3], [1, 2, 4]]) == pytest.approx(1 - 10 / 82)
    # a missing rating drops that unit (it has one value), here the disagreeing one
    assert krippendorff_alpha_interval([[1, 2, 3], [1, 2, None]]) == pytest.approx(1.0)
    assert krippendorff_alpha_interval([[5, 5], [5, 5]]) is None


def test_spearman_uses_average_ranks_for_ties():
    # ranks [1..5] and [1, 2, 3.5, 5, 3.5]: ρ = 8 / sqrt(10 · 9.5)
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    assert spearman([1, 1, 1], [1, 2, 3]) is None
    stats = pytest.importorskip("scipy.stats")
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(
        stats.spearmanr([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]).statistic)


def test_bootstrap_interval_brackets_the_mean_and_is_seeded():
    values = [0, 1] * 50
    low, high = bootstrap_interval(values)
    assert low < 0.5 < high and low > 0.35 and high < 0.65
    assert bootstrap_interval(values) == (low, high)
    assert bootstrap_interval([1.0, 1.0, 1.0]) == (1.0, 1.0)


# ------------------------------------------------------------------------- length control


def test_a_model_that_wins_only_by_writing_more_has_an_lc_win_rate_of_one_half():
    # A is longer on 8 prompts and wins 6 of them; shorter on 4 and wins 1. At equal
    # length it wins half: the two-point logistic fit is saturated, σ(b0) = 0.5 exactly.
    outcomes = ["win"] * 6 + ["loss"] * 2 + ["win"] + ["loss"] * 3
    lengths_a = [300] * 8 + [100] * 4
    lengths_b = [200] * 8 + [200] * 4
    result = length_controlled_win_rate(outcomes, lengths_a, lengths_b)
    assert result["lc_win_rate"] == pytest.approx(0.5, abs=1e-3)
    assert result["length_slope"] > 0
    rows = [{"outcome": o, "orders": [{"choice": "A", "prefers": "a"}] * 2,
             "a": {"content": "x" * la}, "b": {"content": "x" * lb}}
            for o, la, lb in zip(outcomes, lengths_a, lengths_b, strict=True)]
    summary = pairwise_summary(rows, length_control=True)
    assert summary["win_rate"] == pytest.approx(7 / 12, abs=1e-4)
    assert summary["lc_win_rate"] == pytest.approx(0.5, abs=1e-3)
    assert summary["mean_length_a"] == pytest.approx((8 * 300 + 4 * 100) / 12, abs=0.05)
    assert summary["mean_length_b"] == 200


def test_lc_win_rate_equals_the_raw_one_when_lengths_never_differ():
    outcomes = ["win", "win", "tie", "loss"]
    result = length_controlled_win_rate(outcomes, [5] * 4, [5] * 4)
    assert result["lc_win_rate"] == pytest.approx((1 + 1 + 0.5) / 4, abs=1e-4)


def test_a_model_that_wins_regardless_of_length_keeps_its_lc_win_rate():
    # wins 3 of 4 whether longer or shorter: no length effect, LC = raw = 0.75
    outcomes = ["win", "win", "win", "loss"] * 2
    lengths_a = [300] * 4 + [100] * 4
    result = length_controlled_win_rate(outcomes, lengths_a, [200] * 8)
    assert result["lc_win_rate"] == pytest.approx(0.75, abs=1e-3)
    assert result["length_slope"] == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------- panels


def scoring_judge(name: str, table: dict[str, str]) -> ScriptedEngine:
    """A judge whose answer is looked up by the response text it is shown."""
    def answer(prompt: str) -> str:
        shown = prompt.split("MODEL RESPONSE")[1]
        return next(score for key, score in table.items() if key in shown)

    return ScriptedEngine(answer, name=name)


def failing_factory():
    raise ExnihiloError("server http://down:1/v1 unreachable")


def test_a_score_panel_pools_means_measures_agreement_and_counts_a_failed_judge(tmp_path):
    from exnihilo.evaluate.panels import judge_file, judge_panel

    records = [generated(f"q{i}", w) for i, w in enumerate(["alpha", "beta", "gamma"])]
    one = scoring_judge("fake:one", {"alpha": "1", "beta": "2", "gamma": "3"})
    two = scoring_judge("fake:two", {"alpha": "1", "beta": "2", "gamma": "4"})
    judges = [("one", lambda: one), ("down", failing_factory), ("two", lambda: two)]
    pooled, summary = judge_panel(judges, records, out=tmp_path / "panel.jsonl")
    assert [r["meta"]["tags"]["score"] for r in pooled] == [1.0, 2.0, 3.5]
    assert pooled[2]["meta"]["judge"]["scores"] == {"fake:one": 3.0, "fake:two": 4.0}
    failed = [j for j in summary["judges"] if "failed" in j]
    assert failed == [{"judge": "down", "failed": 3,
                       "error": "ExnihiloError: server http://down:1/v1 unreachable"}]
    assert summary["pooled"]["mean"] == pytest.approx((1 + 2 + 3.5) / 3, abs=0.01)
    assert summary["agreement"]["krippendorff_alpha"] == pytest.approx(1 - 10 / 82, abs=1e-4)
    assert summary["agreement"]["pairs"]["fake:one vs fake:two"] == {"n": 3, "spearman": 1.0}
    assert judge_file(tmp_path / "panel.jsonl", "fake:one").exists()


def test_majority_needs_more_than_half_of_the_readable_votes():
    from exnihilo.evaluate.panels import majority

    assert majority(["win", "win", "tie"]) == "win"
    assert majority(["win", "loss"]) == "tie"
    assert majority(["loss", "unparseable"]) == "loss"
    assert majority(["unparseable"]) == "unparseable"


def test_outcome_agreement_reports_kappa_beside_raw_agreement():
    from exnihilo.evaluate.panels import outcome_agreement

    got = outcome_agreement({
        "j1": ["win", "win", "loss", "tie", "win", "loss", "unparseable"],
        "j2": ["win", "loss", "loss", "tie", "win", "win", "win"],
        "j3": ["tie"] * 7})
    assert got["pairs"]["j1 vs j2"] == {"n": 6, "cohen_kappa": round(10 / 22, 4),
                                        "raw_agreement": round(4 / 6, 4)}
    # j3 always says tie: κ 0 for j1 (p_o = p_e = 1/6), though raw agreement is 1/6
    assert got["pairs"]["j1 vs j3"]["cohen_kappa"] == pytest.approx(0.0)


def test_a_pairwise_panel_pools_by_majority_and_keeps_each_judges_position_bias():
    from exnihilo.evaluate.panels import pairwise_panel

    def prefers_good(prompt: str) -> str:
        return "A" if "good" in prompt[prompt.index("RESPONSE A"):prompt.index("RESPONSE B")] \
            else "B"

    a = [generated(f"q{i}", w) for i, w in enumerate(["good", "good", "bad"])]
    b = [generated(f"q{i}", w) for i, w in enumerate(["bad", "bad", "good"])]
    judges = [("g1", lambda: ScriptedEngine(prefers_good, name="fake:g1")),
              ("g2", lambda: ScriptedEngine(prefers_good, name="fake:g2")),
              ("first", lambda: ScriptedEngine(lambda _: "A", name="fake:first")),
              ("down", failing_factory)]
    pooled, summary = pairwise_panel(judges, a, b)
    assert [r["outcome"] for r in pooled] == ["win", "win", "loss"]
    assert pooled[0]["votes"] == {"fake:g1": "win", "fake:g2": "win", "fake:first": "tie"}
    assert summary["pooled"]["wins"] == 2 and summary["pooled"]["losses"] == 1
    rates = {j["judge"]: j.get("first_position_rate") for j in summary["judges"]}
    assert rates == {"fake:g1": 0.5, "fake:g2": 0.5, "fake:first": 1.0, "down": None}
    assert summary["agreement"]["pairs"]["fake:g1 vs fake:g2"]["cohen_kappa"] == 1.0
    assert summary["agreement"]["pairs"]["fake:g1 vs fake:first"]["cohen_kappa"] == 0.0


@pytest.mark.slow
def test_the_embedded_judge_in_logprob_mode_scores_every_answer(real_engine):
    records = [generated("What is the capital of France?", "Paris.", reference="Paris."),
               generated("What is 2 + 2?", "Blue whales are large.", reference="4"),
               generated("Name a primary color.", "", reference="Red.")]
    results = judge_scores(real_engine, records, mode="logprob")
    verdicts = [r["meta"]["judge"] for r in results]
    assert all(r["meta"]["tags"]["score"] is not None
               and 0 <= r["meta"]["tags"]["score"] <= 100 for r in results)
    assert all(v["confidence"] > 0.01 for v in verdicts)
    option, p = choose_option(real_engine, [{"role": "user", "content": "What is the capital "
                                             "of France?"}], ["Berlin", "Paris", "Rome"])
    assert option == "Paris" and 0.5 < p <= 1
