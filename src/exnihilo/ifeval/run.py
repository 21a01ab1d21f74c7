"""Answering IFEval prompts with an engine: greedy, through the shared resumable generation
path, so `eval ifeval --model`, the demo and the preference experiments ask the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exnihilo.ifeval.score import Prompt


def prompt_records(inputs: list[Prompt]) -> list[dict[str, Any]]:
    """One single-turn record per prompt (the IFEval key kept in meta)."""
    from exnihilo.records import content_id

    records = []
    for row in inputs:
        messages = [{"role": "user", "content": row.prompt}]
        records.append({"id": content_id(messages), "messages": messages,
                        "meta": {"ifeval_key": row.key}})
    return records


def answer_prompts(engine: Any, inputs: list[Prompt], max_new_tokens: int = 1024,
                   style: str = "chat", out: str | Path | None = None) -> list[str]:
    """Greedy answers, in input order; with `out`, appended as they finish and resumed."""
    from exnihilo.engines.base import SamplingParams
    from exnihilo.evaluate import generate_responses

    params = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens, seed=0)
    results = generate_responses(engine, prompt_records(inputs), params, style=style, out=out)
    return [r["messages"][-1]["content"] for r in results]
