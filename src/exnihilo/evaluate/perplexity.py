"""Reference perplexity: how likely a model finds the reference answers, given their
prompts. It needs no judge, so it is the objective signal beside judge scores."""

from __future__ import annotations

import math
from typing import Any

from exnihilo.errors import ExnihiloError
from exnihilo.evaluate.judging import mean_and_stderr
from exnihilo.evaluate.sets import Message, resolve_style, split_reference
from exnihilo.records import Record
from exnihilo.styles import check_style, render_segments
from exnihilo.train.collate import collate_continuations
from exnihilo.train.data import append_eos
from exnihilo.train.forward import sequence_logprobs


def response_token_ids(prompt: list[Message], reference: str, style: str, tokenizer: Any,
                       alpaca_meta: dict[str, str] | None = None) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) exactly as training sees the example.

    The response is the final assistant segment of `styles.render_segments` (for the chat
    template it includes the end-of-turn marker), followed by EOS unless it already ends
    with it: predicting where the answer stops is part of the answer.
    """
    messages = prompt + [{"role": "assistant", "content": reference}]
    segments = render_segments(messages, style, tokenizer, alpaca_meta)
    answer_text = segments[-1][0]
    prompt_text = "".join(text for text, _ in segments[:-1])
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer_text, add_special_tokens=False)["input_ids"]
    return prompt_ids, append_eos(answer_ids, tokenizer.eos_token_id)


def _batch_response_nll(model: Any, rows: list[tuple[list[int], list[int]]], pad_id: int
                        ) -> list[float]:
    """Summed NLL of each row's response tokens given its prompt, one forward pass through
    the shared log-prob path (the head runs only on response positions)."""
    import torch

    batch = collate_continuations(rows, pad_id)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.inference_mode():
        return (-sequence_logprobs(model, batch).sums).cpu().tolist()


def perplexity(model: Any, tokenizer: Any, records: list[Record], style: str = "chat",
               batch_size: int = 8, max_length: int = 2048
               ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Mean NLL and perplexity of the reference answers given their prompts.

    Only response tokens count (see `response_token_ids`). Records without a reference are
    skipped and counted; prompt + answer longer than `max_length` tokens are skipped and
    counted (truncating would score a different answer). Returns per-record rows
    {id, tokens, nll} and a summary: token-weighted mean NLL and its perplexity, the
    per-record mean NLL with its standard error.
    """
    check_style(style)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prepared: list[tuple[Record, list[int], list[int]]] = []
    no_reference = too_long = 0
    for record in records:
        prompt, reference = split_reference(record)
        if reference is None:
            no_reference += 1
            continue
        p, r = response_token_ids(prompt, reference, style, tokenizer,
                                  (record.get("meta") or {}).get("alpaca"))
        if len(p) + len(r) > max_length:
            too_long += 1
            continue
        prepared.append((record, p, r))
    if not prepared:
        raise ExnihiloError(f"no record has a reference answer within {max_length} tokens "
                            f"({no_reference} without a reference, {too_long} too long)")
    # Similar lengths together: less padding. Results are put back in input order.
    order = sorted(range(len(prepared)), key=lambda i: -(len(prepared[i][1]) +
                                                         len(prepared[i][2])))
    sums: dict[int, float] = {}
    from exnihilo.progress import token_progress

    with token_progress("perplexity", len(prepared)) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            nlls = _batch_response_nll(model, [(prepared[i][1], prepared[i][2])
                                               for i in chunk], pad_id)
            sums.update(zip(chunk, nlls, strict=True))
            bar.advance(items=len(chunk), tokens=sum(len(prepared[i][2]) for i in chunk))
    rows = [{"id": record["id"], "tokens": len(r), "nll": sums[i]}
            for i, (record, _, r) in enumerate(prepared)]
    return rows, perplexity_summary(rows, no_reference=no_reference, too_long=too_long)


def perplexity_summary(rows: list[dict[str, Any]], no_reference: int = 0, too_long: int = 0
                       ) -> dict[str, Any]:
    tokens = sum(row["tokens"] for row in rows)
    mean_nll = sum(row["nll"] for row in rows) / tokens
    per_record, stderr = mean_and_stderr([row["nll"] / row["tokens"] for row in rows])
    return {
        "n": len(rows) + no_reference + too_long,
        "scored": len(rows),
        "skipped_no_reference": no_reference,
        "skipped_too_long": too_long,
        "tokens": tokens,
        "mean_nll": round(mean_nll, 4),
        "perplexity": round(math.exp(mean_nll), 3),
        "per_record_mean_nll": None if per_record is None else round(per_record, 4),
        "per_record_stderr": None if stderr is None else round(stderr, 4),
    }


def model_perplexity(model_name: str, records: list[Record], style: str | None = None,
                     dtype: str = "auto", batch_size: int = 8, max_length: int = 2048,
                     device: str | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Load `model_name` (name, folder or .gguf) on `device` (None: the process default)
    and run `perplexity` with its style. dtype auto: bfloat16 on a GPU that supports it."""
    from exnihilo.models import load_model, load_tokenizer

    style = resolve_style(style, model_name)
    tokenizer = load_tokenizer(model_name)
    model = load_model(model_name, dtype=dtype, device=device)
    rows, summary = perplexity(model, tokenizer, records, style, batch_size, max_length)
    summary.update(model=model_name, style=style)
    return rows, summary
