"""`exnihilo generate`: answer every prompt of an eval set with one model, batched."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from exnihilo.cli.common import (
    MODEL_HELP,
    base_url_option,
    build_engine,
    concurrency_option,
    console,
    decode_rows_option,
    deprecated_option,
    dtype_option,
    emit,
    engine_option,
    input_argument,
    pick_input,
)


def generate_command(
    data: Path = input_argument("Eval set: our JSONL, Alpaca JSON/JSONL or ShareGPT."),
    out: Path = typer.Option(..., "-o", "--out",
                             help="Output JSONL (appended as it goes; rerun to resume)."),
    model: str = typer.Option("smollm2-135m-instruct", "--model", "-m", help=MODEL_HELP),
    limit: int = typer.Option(None, "--limit", "-n", help="Use the first N prompts."),
    offset: int = typer.Option(0, "--offset", help="Skip the first K prompts (held-out slice)."),
    style: str = typer.Option(None, "--style",
                              help="chat | alpaca | phi3. Default: the style recorded in the "
                                   "model folder's exnihilo_run.json, else chat."),
    engine: str = engine_option(),
    base_url: list[str] = base_url_option(),
    concurrency: int = concurrency_option(),
    batch_size: int | None = decode_rows_option(),
    dtype: str = dtype_option(),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0,
                                      help="0 = greedy (the default for evaluation)."),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: int = typer.Option(0, "--seed", help="Base seed; each prompt derives its own."),
    show: int = typer.Option(2, "--show", help="Print this many answers at the end."),
    draft_model: str = typer.Option(
        None, "--draft-model", help="Speculative decoding with this small draft model (same "
        "tokenizer; local engine, one prompt at a time): the output keeps the model's own "
        "distribution, greedy output is token-identical."),
    data_option: Path = deprecated_option("--data", "-d"),
) -> None:
    """Answer every prompt of an eval set with one model, batched and resumable.

    The reference answer stays in meta.reference, so `exnihilo eval judge` can score
    against it."""

    from exnihilo.assemble import check_engine
    from exnihilo.engines.base import SamplingParams
    from exnihilo.errors import ExnihiloError
    from exnihilo.evaluate import (
        generate_responses,
        generation_summary,
        load_eval_set,
        resolve_style,
    )
    from exnihilo.resume import check_resumable

    data = pick_input(data, data_option, "DATA", "--data")
    check_engine(engine, base_url, dtype)
    check_resumable(out, "generate", None, inputs=[data])  # input clash, lock, torn file
    records = load_eval_set(data, limit=limit, offset=offset)  # fail before loading a model
    style = resolve_style(style, model)
    params = SamplingParams(temperature=temperature, top_p=top_p,
                            max_new_tokens=max_new_tokens, seed=seed)
    if draft_model is not None and engine != "transformers":
        raise ExnihiloError("--draft-model needs the local engine (--engine transformers)")
    gen = build_engine(engine, model, dtype=dtype, batch_size=batch_size,
                       base_urls=base_url, concurrency=concurrency, label="generating",
                       draft_model=draft_model)
    started = time.perf_counter()
    results = generate_responses(gen, records, params, style=style, out=out)
    summary = generation_summary(results, time.perf_counter() - started)
    emit({"model": model, "style": style, **summary, "out": out},
         lambda: _print_generated(summary, results, model, style, out, show))


def _print_generated(summary: dict, results: list[dict], model: str, style: str, out: Path,
                     show: int) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"generate → {out}", show_header=False)
    table.add_row("model", f"{model} (style {style})")
    for key, value in summary.items():
        table.add_row(key, str(value))
    console.print(table)
    for record in results[:show]:
        console.print(Text.assemble(("user:", "bold"), " ",
                                    record["messages"][-2]["content"][:300]))
        console.print(Text.assemble(("answer:", "bold"), " ",
                                    record["messages"][-1]["content"][:400]))
        console.print()

