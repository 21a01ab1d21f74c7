"""Generation: answer every prompt of an eval set with an engine, resumably."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from exnihilo.engines.base import Engine, SamplingParams
from exnihilo.errors import ExnihiloError
from exnihilo.evaluate.resumable import _resumable
from exnihilo.evaluate.sets import prompt_id, split_reference, turn_prompts
from exnihilo.fields import drop_verdict
from exnihilo.records import Record, content_id
from exnihilo.styles import check_style, render_prompt

# Stop strings for the single-turn styles: a model not trained on them (or a base model)
# goes on to write the next "### Instruction:" or "<|user|>" turn itself.
STYLE_STOPS: dict[str, list[str]] = {
    "chat": [],
    "alpaca": ["### Instruction:", "### Input:", "### Response:"],
    "phi3": ["<|user|>", "<|end|>", "<|assistant|>"],
}


def record_seed(base_seed: int, pid: str) -> int:
    """A per-prompt seed: a record's sample does not depend on its batch or position."""
    return (base_seed * 1_000_003 + int(pid[:12], 16)) % (2**62)


def generate_responses(engine: Engine, records: list[Record], params: SamplingParams,
                       style: str = "chat", tokenizer: Any = None,
                       out: str | Path | None = None, chunk_size: int = 256
                       ) -> list[Record]:
    """Answer every eval record with `engine`; one output record per prompt, input order.

    style "chat" goes through `engine.chat` (the model's template); "alpaca"/"phi3" are
    rendered with `styles.render_prompt` and sent to `engine.complete`. Output records hold
    the prompt messages plus the generated assistant message, with the reference in
    meta["reference"] and meta.generator/style/sampling/seed/finish_reason. With `out`, each
    chunk is appended as it finishes and a rerun skips prompts already answered.

    A multi-turn question (meta["turns"], `sets.turns_record`) is answered turn by turn,
    each turn seeing the model's own earlier answers (as MT-Bench does); its record keeps
    every turn, and is written once all its turns are answered.

    `chunk_size` trades what a kill loses against speed: the local engine decodes up to 128
    rows together and refills them from the chunk, so a chunk of twice that keeps its batch
    full until the chunk's last rows drain.
    """
    check_style(style)
    if not records:
        raise ExnihiloError("no records to generate for")
    if style != "chat" and any(turn_prompts(r) for r in records):
        raise ExnihiloError(f"multi-turn questions need --style chat (style {style} is "
                            f"single-turn)")
    tokenizer = tokenizer if tokenizer is not None else getattr(engine, "tokenizer", None)
    stops = STYLE_STOPS[style]
    run_params = params.model_copy(update={"stop": sorted(set(params.stop) | set(stops))})
    sampling = params.public()

    def mismatch(old: Record) -> str | None:
        meta = old.get("meta") or {}
        theirs = (meta.get("generator"), meta.get("style"), meta.get("sampling"))
        if theirs != (engine.name, style, sampling):
            return (f"holds answers from {theirs[0]} (style {theirs[1]}, other sampling), not "
                    f"{engine.name} (style {style})")
        return None

    def process(chunk: list[Record]) -> list[Record]:
        single = [r for r in chunk if not turn_prompts(r)]
        multi = [r for r in chunk if turn_prompts(r)]
        done = {prompt_id(r): r for r in single_turn(single) + multi_turn(multi)}
        return [done[prompt_id(r)] for r in chunk]

    def multi_turn(chunk: list[Record]) -> list[Record]:
        """All questions' turn k in one batch, then turn k + 1 after each own answer."""
        convs = [[] for _ in chunk]
        finishes: list[list[str]] = [[] for _ in chunk]
        tokens = [0] * len(chunk)
        base = [record_seed(params.seed, prompt_id(r)) for r in chunk]
        for k in range(max((len(turn_prompts(r)) for r in chunk), default=0)):
            active = [i for i, r in enumerate(chunk) if k < len(turn_prompts(r))]
            for i in active:
                convs[i].append({"role": "user", "content": turn_prompts(chunk[i])[k]})
            outs = engine.chat([list(convs[i]) for i in active], run_params,
                               seeds=[base[i] + k for i in active])
            for i, completion in zip(active, outs, strict=True):
                convs[i].append({"role": "assistant", "content": completion.text.strip()})
                finishes[i].append(completion.finish_reason)
                tokens[i] += completion.completion_tokens
        results = []
        for i, record in enumerate(chunk):
            meta = drop_verdict(record.get("meta") or {})
            meta.update(prompt_id=prompt_id(record), reference=meta.get("reference"),
                        generator=engine.name, style=style, sampling=sampling, seed=base[i],
                        finish_reason="length" if "length" in finishes[i] else "stop",
                        turn_finish_reasons=finishes[i], completion_tokens=tokens[i])
            results.append({"id": content_id(convs[i]), "messages": convs[i], "meta": meta})
        return results

    def single_turn(chunk: list[Record]) -> list[Record]:
        if not chunk:
            return []
        prompts = [split_reference(r)[0] for r in chunk]
        seeds = [record_seed(params.seed, prompt_id(r)) for r in chunk]
        if style == "chat":
            outs = engine.chat(prompts, run_params, seeds=seeds)
        else:
            texts = [render_prompt(p, style, tokenizer, (r.get("meta") or {}).get("alpaca"))
                     for p, r in zip(prompts, chunk, strict=True)]
            outs = engine.complete(texts, run_params, seeds=seeds)
        results = []
        for record, prompt, seed, completion in zip(chunk, prompts, seeds, outs, strict=True):
            answer = {"role": "assistant", "content": completion.text.strip()}
            meta = drop_verdict(record.get("meta") or {})
            meta.update(prompt_id=prompt_id(record), reference=split_reference(record)[1],
                        generator=engine.name, style=style, sampling=sampling, seed=seed,
                        finish_reason=completion.finish_reason,
                        completion_tokens=completion.completion_tokens)
            messages = prompt + [answer]
            results.append({"id": content_id(messages), "messages": messages, "meta": meta})
        return results

    results, _ = _resumable(records, prompt_id, process, out, chunk_size, mismatch)
    return results


def generation_summary(results: list[Record], elapsed_s: float | None = None
                       ) -> dict[str, Any]:
    """Counts that say whether generation went well: truncated answers, empty answers."""
    finish = Counter((r["meta"] or {}).get("finish_reason", "?") for r in results)
    tokens = [int((r["meta"] or {}).get("completion_tokens") or 0) for r in results]
    summary: dict[str, Any] = {
        "n": len(results),
        "stopped": finish.get("stop", 0),
        "hit_max_new_tokens": finish.get("length", 0),
        "empty": sum(1 for r in results if not r["messages"][-1]["content"].strip()),
        "mean_completion_tokens": round(sum(tokens) / max(len(tokens), 1), 1),
    }
    if elapsed_s is not None:
        summary["elapsed_s"] = round(elapsed_s, 1)
    return summary
