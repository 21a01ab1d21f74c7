"""The local transformers engine on a tiny random Llama with the real SmolLM2 tokenizer."""

import pytest
import torch

from exnihilo.engines.base import SamplingParams
from exnihilo.engines.transformers import (
    TransformersEngine,
    filter_logits,
    nucleus,
    sample_next,
)

PROMPTS = ["<|im_start|>user\nHello there, how are", "Short", "A much longer prompt, with many "
           "more tokens in it than the others have, so that left padding matters a lot here"]


def make_engine(model, tok, batch_size=8):
    return TransformersEngine(model_obj=model, tokenizer=tok, batch_size=batch_size)


def hf_greedy(model, tok, prompt, n):
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                         do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_greedy_batch_matches_hf_generate_one_by_one(tiny_llama, smol_tokenizer):
    engine = make_engine(tiny_llama, smol_tokenizer)
    engine._stop_ids = {-1}  # a random model may emit eos early; compare full lengths
    params = SamplingParams(temperature=0.0, max_new_tokens=6)
    outs = engine.complete(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        expected = hf_greedy(tiny_llama, smol_tokenizer, prompt, 6)
        assert out.text == smol_tokenizer.decode(expected, skip_special_tokens=False)
        assert out.completion_tokens == 6 and out.finish_reason == "length"
        assert out.prompt_tokens == len(smol_tokenizer(prompt, add_special_tokens=False)
                                        ["input_ids"])


def test_row_seed_gives_same_text_whatever_the_batch(tiny_llama, smol_tokenizer):
    engine = make_engine(tiny_llama, smol_tokenizer, batch_size=2)
    engine._stop_ids = {-1}
    params = SamplingParams(temperature=1.0, max_new_tokens=10)
    together = engine.complete(PROMPTS, params, seeds=[11, 22, 33])
    alone = [engine.complete([p], params, seeds=[s])[0] for p, s in zip(PROMPTS, [11, 22, 33],
                                                                       strict=True)]
    assert [c.text for c in together] == [c.text for c in alone]
    reordered = engine.complete(PROMPTS[::-1], params, seeds=[33, 22, 11])
    assert [c.text for c in reordered[::-1]] == [c.text for c in together]
    other_seed = engine.complete(PROMPTS[:1], params, seeds=[12])[0]
    assert other_seed.text != together[0].text


def test_stop_ids_and_stop_strings(tiny_llama, smol_tokenizer):
    engine = make_engine(tiny_llama, smol_tokenizer)
    engine._stop_ids = {-1}
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    ref = hf_greedy(tiny_llama, smol_tokenizer, PROMPTS[0], 8)
    engine._stop_ids = {ref[3]}
    first_at = ref.index(ref[3])  # the stop id may already occur earlier
    out = engine.complete(PROMPTS[:1], greedy)[0]
    assert out.finish_reason == "stop" and out.completion_tokens == first_at
    assert out.text == smol_tokenizer.decode(ref[:first_at], skip_special_tokens=False)
    engine._stop_ids = {-1}
    full = smol_tokenizer.decode(ref, skip_special_tokens=False)
    stop = smol_tokenizer.decode(ref[4:6], skip_special_tokens=False)
    out = engine.complete(PROMPTS[:1], greedy.model_copy(update={"stop": [stop]}))[0]
    assert out.finish_reason == "stop"
    assert out.text == full[:full.find(stop)]
    assert stop not in out.text


def test_top_k_one_is_greedy(tiny_llama, smol_tokenizer):
    engine = make_engine(tiny_llama, smol_tokenizer)
    engine._stop_ids = {-1}
    greedy = engine.complete(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=5))
    topk1 = engine.complete(PROMPTS, SamplingParams(temperature=1.3, top_k=1, max_new_tokens=5))
    assert [c.text for c in greedy] == [c.text for c in topk1]


def test_filter_logits_values():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, top_k=0, top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.7 ≤ 0.8
    kept = torch.isfinite(filter_logits(logits, top_k=3, top_p=1.0))
    assert kept.tolist() == [[True, True, True, False]]
    kept = torch.isfinite(filter_logits(logits, top_k=0, top_p=0.4))
    assert kept.tolist() == [[True, False, False, False]]


def sorted_nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """The textbook nucleus as a mask: sort everything, keep while the mass before a token
    is < top_p."""
    values, order = torch.sort(logits, descending=True, dim=-1)
    probs = torch.softmax(values, dim=-1)
    keep = (torch.cumsum(probs, dim=-1) - probs) < top_p
    return torch.zeros_like(keep).scatter(-1, order, keep)


def test_nucleus_from_the_head_matches_a_full_sort():
    """Peaked rows are settled within the head; flat rows (head mass < top_p) fall back to a
    full sort; both must keep exactly the textbook nucleus."""
    torch.manual_seed(0)
    peaked = torch.randn(6, 1000) * 4
    flat = torch.randn(4, 1000) * 0.1
    logits = torch.cat([peaked, flat])
    for top_p in (0.5, 0.9, 0.99):
        want = sorted_nucleus(logits, top_p)
        got = nucleus(logits, top_p, head=16)
        assert torch.equal(torch.isfinite(got), want)
        assert torch.equal(got[want], logits[want])
    assert torch.isfinite(nucleus(flat, 0.9, head=16)).sum(-1).min() > 16  # fell back


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = torch.log(probs).expand(4000, 3).contiguous()
    gens = [torch.Generator().manual_seed(i) for i in range(4000)]
    picks = sample_next(logits, SamplingParams(temperature=1.0), gens)
    freq = torch.bincount(picks, minlength=3).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03)


def test_sampling_picks_the_token_whose_cdf_passes_the_row_draw():
    """Inverse-CDF sampling, checked against a hand computation of each row's draw; tokens
    cut by top-k are never picked, even where the draw falls at the edge of their range."""
    probs = torch.tensor([0.1, 0.0, 0.4, 0.3, 0.2])
    logits = torch.log(probs).expand(500, 5).contiguous()
    picks = sample_next(logits, SamplingParams(temperature=1.0),
                        [torch.Generator().manual_seed(i) for i in range(500)])
    cdf = torch.cumsum(probs.double(), 0)
    for i, pick in enumerate(picks.tolist()):
        u = torch.rand(1, generator=torch.Generator().manual_seed(i)).double()
        assert pick == int((cdf <= u).sum())
    top2 = sample_next(logits, SamplingParams(temperature=1.0, top_k=2),
                       [torch.Generator().manual_seed(i) for i in range(500)])
    assert set(top2.tolist()) == {2, 3}
    edge = sample_next(torch.log(torch.tensor([[0.5, 0.5, 0.0]])), SamplingParams(
        temperature=1.0), [torch.Generator().manual_seed(0)])
    assert edge.item() in (0, 1)


def test_chat_uses_the_template(tiny_llama, smol_tokenizer):
    engine = make_engine(tiny_llama, smol_tokenizer)
    engine._stop_ids = {-1}
    params = SamplingParams(temperature=0.0, max_new_tokens=3)
    conv = [{"role": "user", "content": "Hi"}]
    via_chat = engine.chat([conv], params)[0]
    prompt = smol_tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    via_complete = engine.complete([prompt], params)[0]
    assert via_chat.text == via_complete.text
    assert via_chat.prompt_tokens == via_complete.prompt_tokens


@pytest.mark.slow
def test_real_model_rows_match_alone_while_others_finish_early():
    """On the real 135M model in float32, rows finish at different steps (and leave the KV
    cache); every row's text still equals its text generated alone, greedy and sampled.
    (bf16 sampling, the default on a CPU with native bf16, does not promise this: its
    kernels round differently with the batch's shape.)"""
    from conftest import EMBEDDED

    real_engine = TransformersEngine(EMBEDDED, dtype="float32", batch_size=16)
    questions = ["What is 2+2?", "Name a color.", "Write a haiku about rain.", "Say hi.",
                 "List three fruits.", "What is the capital of France?"]
    convs = [[{"role": "user", "content": q}] for q in questions]
    for params in (SamplingParams(temperature=0.0, max_new_tokens=32),
                   SamplingParams(temperature=0.7, max_new_tokens=32, seed=5)):
        together = real_engine.chat(convs, params)
        alone = [real_engine.chat([c], params, seeds=[params.seed + i])[0]
                 for i, c in enumerate(convs)]
        assert [c.text for c in together] == [c.text for c in alone]
        lengths = {c.completion_tokens for c in together}
        assert len(lengths) > 1  # rows really did finish at different steps


def test_next_token_logprobs_agree_with_greedy_and_sum_to_at_most_one(tiny_llama,
                                                                      smol_tokenizer):
    import math

    from exnihilo.engines import supports_logprobs

    engine = make_engine(tiny_llama, smol_tokenizer, batch_size=2)
    assert supports_logprobs(engine)
    convs = [[{"role": "user", "content": q}] for q in ("Hi", "What is two plus two?", "Yo")]
    tops = engine.next_token_logprobs(convs, top_k=5)
    engine._stop_ids = {-1}
    greedy = engine.chat(convs, SamplingParams(temperature=0.0, max_new_tokens=1))
    for top, first in zip(tops, greedy, strict=True):
        assert len(top) <= 5 and sum(math.exp(v) for v in top.values()) <= 1.0 + 1e-5
        assert max(top, key=top.get) == first.text  # the most likely token is greedy's


def test_reply_logprobs_equal_the_models_own_log_softmax(tiny_llama, smol_tokenizer):
    from exnihilo.templates import render

    engine = make_engine(tiny_llama, smol_tokenizer, batch_size=2)
    conv = [{"role": "user", "content": "Pick one."}]
    (total, count), (other, _) = engine.reply_logprobs([conv, conv], ["Red", "Blue sky"])
    prompt = smol_tokenizer(render(smol_tokenizer, conv, True),
                            add_special_tokens=False)["input_ids"]
    reply = smol_tokenizer("Red", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = tiny_llama(input_ids=torch.tensor([prompt + reply])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    want = sum(float(logp[len(prompt) - 1 + t, tok]) for t, tok in enumerate(reply))
    assert count == len(reply) and total == pytest.approx(want, abs=1e-4)
    assert other != pytest.approx(total)


def test_registry_builds_engines_by_kind_and_names_the_known_ones(tiny_llama, smol_tokenizer):
    from exnihilo.engines import engine_kinds, make_engine, register
    from exnihilo.errors import ExnihiloError

    with pytest.raises(ExnihiloError, match="known: .*openai.*transformers"):
        make_engine("nope", "m")

    @register("scripted-test")
    class Fake:
        def __init__(self, model, **options):
            self.name, self.options = f"scripted:{model}", options

    engine = make_engine("scripted-test", "m", x=1)
    assert engine.name == "scripted:m" and engine.options == {"x": 1}
    assert "scripted-test" in engine_kinds()
    local = make_engine("transformers", "tiny", model_obj=tiny_llama, tokenizer=smol_tokenizer)
    assert local.context_length == tiny_llama.config.max_position_embeddings
    assert local.label == "generating" and local.tokenizer is smol_tokenizer


def test_continuous_batching_gives_each_row_the_text_it_gets_alone(tiny_llama, smol_tokenizer):
    """Waiting prompts join a running batch as rows finish (refill); every row's text is
    what the plain one-batch-at-a-time loop gives it, greedy and sampled alike."""
    prompts = [f"Prompt number {i} " + "word " * (i % 4) for i in range(7)]
    ids = torch.tensor([smol_tokenizer(prompts[3], add_special_tokens=False)["input_ids"]])
    with torch.no_grad():  # prompt 3's greedy first token: some rows stop at once
        stop_at = int(tiny_llama(input_ids=ids).logits[0, -1].argmax())
    lengths = set()
    for params in (SamplingParams(temperature=0.0, max_new_tokens=9),
                   SamplingParams(temperature=1.0, max_new_tokens=9, seed=3)):
        refill = make_engine(tiny_llama, smol_tokenizer, batch_size=3)
        plain = make_engine(tiny_llama, smol_tokenizer, batch_size=3)
        assert refill.refill
        plain.refill = False
        for engine in (refill, plain):  # a common token stops some rows early
            engine._stop_ids = {stop_at}
        got = refill.complete(prompts, params)
        want = plain.complete(prompts, params)
        assert [c.text for c in got] == [c.text for c in want]
        assert [c.finish_reason for c in got] == [c.finish_reason for c in want]
        lengths |= {c.completion_tokens for c in got}
    assert len(lengths) > 1  # rows did finish at other times


def test_growing_cache_merge_pads_left_and_keeps_rows():
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config
    from exnihilo.engines.kvcache import growing_cache, merge_rows, supports_growing

    model = LlamaForCausalLM(tiny_llama_config(64))
    assert supports_growing(model)
    a, b = growing_cache(model), growing_cache(model)
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7, 8]]), cache=a, use_cache=True)
        model(input_ids=torch.tensor([[9, 10], [11, 12]]), cache=b, use_cache=True)
    keys_a = a.layers[0].keys.clone()
    merged, mask = merge_rows(a, b, torch.ones(1, 4, dtype=torch.long),
                              torch.ones(2, 2, dtype=torch.long))
    assert mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]]
    assert merged.layers[0].keys.shape[0] == 3 and merged.get_seq_length() == 4
    assert torch.equal(merged.layers[0].keys[0], keys_a[0])
    assert torch.count_nonzero(merged.layers[0].keys[1:, :, :2]) == 0


def staggered_stops(model, tok, prompts, params):
    """Stop ids that end row i near step i + 1: each row's own token there, from a run
    without stops (a row may stop earlier where one of these ids occurs sooner)."""
    engine = make_engine(model, tok, batch_size=len(prompts))
    engine._stop_ids = {-1}
    ids, completion = [], engine._completion
    engine._completion = lambda tokens, *rest: ids.append(list(tokens)) or completion(tokens,
                                                                                     *rest)
    engine.complete(prompts, params)
    return {row[i + 1] for i, row in enumerate(ids) if row[i + 1] not in row[:i + 1]}


def test_finished_rows_left_in_the_batch_do_not_change_any_text(tiny_llama, smol_tokenizer):
    """Dropping finished rows in groups (`drop_slack`: they stay, ignored, until more than
    that share of the batch has finished) gives every row the text of immediate dropping,
    with refill on, sampled, and with stop strings (greedy is covered by the sampled case:
    the same loop; this random model's greedy text repeats one token)."""
    prompts = [f"Prompt number {i} " + "word " * (i % 4) for i in range(7)]
    for params in (SamplingParams(temperature=1.0, max_new_tokens=8, seed=4),
                   SamplingParams(temperature=1.0, max_new_tokens=8, seed=4, stop=["ing"])):
        stops = staggered_stops(tiny_llama, smol_tokenizer, prompts,
                                params.model_copy(update={"stop": []}))
        texts = {}
        for slack in (0.0, 0.5, 0.99):
            engine = make_engine(tiny_llama, smol_tokenizer, batch_size=4)
            engine.drop_slack, engine._stop_ids = slack, stops
            outs = engine.complete(prompts, params)
            texts[slack] = [(c.text, c.finish_reason, c.completion_tokens) for c in outs]
        assert texts[0.5] == texts[0.0] and texts[0.99] == texts[0.0]
        assert len({t[2] for t in texts[0.0]}) > 2  # rows finished at different steps


def test_grouped_dropping_defers_cache_copies(tiny_llama, smol_tokenizer, monkeypatch):
    """With slack, fewer row removals (each a full KV-cache copy) happen."""
    from exnihilo.engines import kvcache

    calls = {"n": 0}
    original = kvcache.GrowingLayer.batch_select_indices

    def counting(self, indices):
        calls["n"] += 1
        return original(self, indices)

    monkeypatch.setattr(kvcache.GrowingLayer, "batch_select_indices", counting)
    prompts = [f"Prompt number {i} " + "word " * (i % 4) for i in range(7)]
    params = SamplingParams(temperature=1.0, max_new_tokens=9, seed=3)
    stops = staggered_stops(tiny_llama, smol_tokenizer, prompts, params)
    counts = {}
    for slack in (0.0, 0.5, 0.99):
        engine = make_engine(tiny_llama, smol_tokenizer, batch_size=8)
        engine.drop_slack, engine._stop_ids = slack, stops
        calls["n"] = 0
        engine.complete(prompts, params)
        counts[slack] = calls["n"]
    # 0.99: rows never leave before the batch is done; 0.5: fewer removals than at once
    assert counts[0.99] == 0 < counts[0.5] < counts[0.0]


def test_a_long_refill_run_keeps_its_cache_as_short_as_its_live_rows(tiny_llama, smol_tokenizer,
                                                                    monkeypatch):
    """Admitted rows are padded to the running batch's length; dropping the columns no live
    row attends to keeps that length near one prompt plus one reply, not the whole run's
    step count (40 prompts through 4 rows), and every row's text stays its text alone."""
    from exnihilo.engines import kvcache

    longest = {"n": 0}
    original = kvcache.GrowingLayer.update

    def tracking(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        longest["n"] = max(longest["n"], self.length)
        return out

    monkeypatch.setattr(kvcache.GrowingLayer, "update", tracking)
    prompts = [f"Prompt number {i} " + "word " * (i % 4) for i in range(40)]
    params = SamplingParams(temperature=1.0, max_new_tokens=16, seed=2)

    def stop_by_first_token(tokens, token, stop_strings, tail_tokens):
        """Each row stops after 2-12 tokens, set by its own first token: staggered ends
        that depend on the row's text alone (so refill and the plain loop agree)."""
        tokens.append(token)
        return len(tokens) >= 2 + tokens[0] % 11

    engines = {}
    for width in (4, 1):  # 1: every row alone
        engines[width] = make_engine(tiny_llama, smol_tokenizer, batch_size=width)
        engines[width]._stop_ids, engines[width]._append = {-1}, stop_by_first_token
    longest["n"] = 0
    got = engines[4].complete(prompts, params)
    widest = max(len(smol_tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    assert longest["n"] <= widest + 2 * params.max_new_tokens
    assert [c.text for c in got] == [c.text for c in engines[1].complete(prompts, params)]
    assert len({c.completion_tokens for c in got}) > 4


def test_row_seeds_default_to_the_params_seed_plus_the_row_and_check_the_count():
    from exnihilo.engines.base import row_seeds

    params = SamplingParams(seed=7)
    assert row_seeds(3, params, None) == [7, 8, 9]
    assert row_seeds(2, params, [42, 5]) == [42, 5]
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        row_seeds(3, params, [1, 2])


def test_automatic_width_fits_a_quarter_of_free_memory(tiny_llama, smol_tokenizer,
                                                        monkeypatch):
    """kv_bytes_per_token by hand (tiny Llama: 2 layers x K and V x 2 KV heads x 16 dims x
    4 bytes = 512 B); the automatic width is a quarter of free memory over twice a row's
    cache, capped at 128 and at least 1; a set batch_size wins."""
    from exnihilo.engines import transformers as local

    assert local.kv_bytes_per_token(tiny_llama) == 2 * 2 * 2 * 16 * 4
    row = 2 * 512 * 100  # 100 tokens per row, doubled for the cache's growth
    assert local.auto_width(tiny_llama, 100, memory=4 * row * 10) == 10
    assert local.auto_width(tiny_llama, 100, memory=4 * row * 10 - 1) == 9
    assert local.auto_width(tiny_llama, 100, memory=1 << 40) == local.AUTO_MAX_ROWS
    assert local.auto_width(tiny_llama, 100, memory=0) == 1
    auto = TransformersEngine(model_obj=tiny_llama, tokenizer=smol_tokenizer)
    monkeypatch.setattr(local, "free_memory", lambda device: 4 * 2 * 512 * 30 * 3)
    prompts = [[5] * 10, [6] * 20]
    params = SamplingParams(max_new_tokens=10)  # longest row: 20 + 10 = 30 tokens
    assert auto.batch_size is None and auto.width_for(prompts, params) == 3
    assert make_engine(tiny_llama, smol_tokenizer, batch_size=2).width_for(prompts, params) == 2
    assert local.free_memory(torch.device("cpu")) > 0


def test_sampling_decodes_a_bf16_copy_on_a_native_bf16_cpu_and_greedy_stays_fp32(
        tiny_llama, smol_tokenizer, tmp_path, monkeypatch):
    folder = tmp_path / "tiny"
    tiny_llama.save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    monkeypatch.setenv("EXNIHILO_CPU_BF16", "1")
    native = TransformersEngine(str(folder), batch_size=4)
    explicit = TransformersEngine(str(folder), dtype="float32", batch_size=4)
    in_memory = make_engine(tiny_llama, smol_tokenizer)  # weights that may be training
    monkeypatch.setenv("EXNIHILO_CPU_BF16", "0")
    plain = TransformersEngine(str(folder), batch_size=4)

    sampled = SamplingParams(temperature=1.0, max_new_tokens=12, seed=3)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12)
    copy = native.decoder_for(sampled)
    assert next(copy.parameters()).dtype == torch.bfloat16
    assert native.decoder_for(sampled) is copy  # made once
    assert next(native.model.parameters()).dtype == torch.float32  # weights untouched
    for engine in (plain, explicit, in_memory):
        assert engine.decoder_for(sampled) is engine.model
    assert native.decoder_for(greedy) is native.model

    # Greedy text and log-probabilities come from the float32 weights: identical to plain.
    assert [c.text for c in native.complete(PROMPTS, greedy)] == \
        [c.text for c in plain.complete(PROMPTS, greedy)]
    conv = [{"role": "user", "content": "Pick one."}]
    assert native.reply_logprobs([conv], ["Red"]) == plain.reply_logprobs([conv], ["Red"])
    # Sampled text comes from the copy, reproducibly: the same seeds give the same text.
    first = [c.text for c in native.complete(PROMPTS, sampled)]
    assert first == [c.text for c in native.complete(PROMPTS, sampled)]
    assert all(c.completion_tokens == 12 or c.finish_reason == "stop"
               for c in native.complete(PROMPTS, sampled))


@pytest.mark.slow
def test_real_model_bf16_sampling_copy_stays_close_to_float32(monkeypatch):
    """The bf16 copy that samples on a native-bf16 CPU moves SmolLM2-135M's next-token
    distributions little: mean total variation under 0.05 at temperature 1 over real reply
    positions (measured 0.018 on 1,431 positions, benchmarks/generation.py)."""
    from conftest import EMBEDDED

    monkeypatch.setenv("EXNIHILO_CPU_BF16", "1")
    engine = TransformersEngine(EMBEDDED, batch_size=8)
    sampled = SamplingParams(temperature=1.0, max_new_tokens=24, seed=2)
    bf16 = engine.decoder_for(sampled)
    convs = [[{"role": "user", "content": q}] for q in
             ("Write a short poem about the sea.", "How do I boil an egg?", "Describe a cat.")]
    replies = engine.chat(convs, sampled)
    variations = []
    for prompt, reply in zip(engine._prompt_ids(convs), replies, strict=True):
        ids = prompt + engine.tokenizer(reply.text, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            p = [torch.softmax(m(input_ids=torch.tensor([ids])).logits[0, len(prompt) - 1:-1]
                               .float(), -1) for m in (engine.model, bf16)]
        variations += (0.5 * (p[0] - p[1]).abs().sum(-1)).tolist()
    mean = sum(variations) / len(variations)
    assert len(variations) > 20 and 0.0 < mean < 0.05
