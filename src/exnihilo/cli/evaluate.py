"""`exnihilo eval …`: judge scores, pairwise win rate, perplexity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table
from rich.text import Text

from exnihilo.cli.common import (
    MODEL_HELP,
    base_url_option,
    build_engine,
    concurrency_option,
    console,
    dtype_option,
    engine_option,
    err_console,
)

app = typer.Typer(help="Evaluate answers: judge scores (0-100), pairwise win rate, perplexity.",
                  no_args_is_help=True)

JUDGE_HELP = ("Judge model (same forms as --model). The embedded 135M model works but is a "
              "weak judge: point this at a strong model for real judgements.")


def _judge_engine(judge: str, engine: str, base_url: list[str], concurrency: int,
                  batch_size: int, dtype: str) -> Any:
    return build_engine(engine, judge, dtype=dtype, batch_size=batch_size, base_urls=base_url,
                        concurrency=concurrency, label="judging")


def _warn_if_weak(judge_name: str) -> None:
    from exnihilo.evaluate import judge_warning

    warning = judge_warning(judge_name)
    if warning:
        err_console.print(Text.assemble(("warning:", "bold yellow"), f" {warning}"),
                          highlight=False)


def _summary_table(title: str, summary: dict[str, Any], skip: tuple[str, ...] = ()) -> Table:
    table = Table(title=title, show_header=False)
    for key, value in summary.items():
        if key in skip or isinstance(value, (dict, list)):
            continue
        table.add_row(key, "-" if value is None else str(value))
    return table


def _print_unparseable(examples: list[str]) -> None:
    for raw in examples:
        console.print(Text.assemble(("  unparseable answer:", "dim"), f" {raw[:200]!r}"),
                      highlight=False)


@app.command("judge")
def judge_command(
    file: Path = typer.Argument(..., help="JSONL of generated answers (`exnihilo generate`)."),
    judge: str = typer.Option("smollm2-135m-instruct", "--judge", "-j", help=JUDGE_HELP),
    out: Path = typer.Option(None, "-o", "--out",
                             help="Scored JSONL (default: FILE with .judged.jsonl; appended "
                                  "as it goes, rerun to resume)."),
    engine: str = engine_option(),
    base_url: list[str] = base_url_option(),
    concurrency: int = concurrency_option(),
    batch_size: int = typer.Option(16, "--batch-size", help="Rows judged together (local)."),
    dtype: str = dtype_option(),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1),
    seed: int = typer.Option(0, "--seed", help="Fixed seed for every judge call."),
) -> None:
    """Score each answer 0-100 against its reference answer.

    ch07's judge prompt with the texts fenced as data, temperature 0, a fixed seed.
    Unreadable judge answers are counted and shown, never dropped."""
    from exnihilo.assemble import check_engine
    from exnihilo.engines.base import SamplingParams
    from exnihilo.evaluate import judge_scores, judge_summary, read_generations
    from exnihilo.resume import check_resumable

    out = out or file.with_name(f"{file.stem}.judged.jsonl")
    check_engine(engine, base_url, dtype)
    check_resumable(out, "eval judge", None, inputs=[file])
    records = read_generations(file)
    _warn_if_weak(judge)
    params = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens,
                            seed=seed)
    judge_engine = _judge_engine(judge, engine, base_url, concurrency, batch_size, dtype)
    results = judge_scores(judge_engine, records, params, out=out)
    summary = judge_summary(results)
    console.print(_summary_table(f"judge scores → {out}", summary))
    histogram = "  ".join(f"{k}:{v}" for k, v in summary["histogram"].items())
    console.print(f"histogram  {histogram}", highlight=False)
    _print_unparseable(summary["unparseable_examples"])
    _warn_if_weak(judge)


@app.command("pairwise")
def pairwise_command(
    a: Path = typer.Argument(..., help="Answers of model A (JSONL from `exnihilo generate`)."),
    b: Path = typer.Argument(..., help="Answers of model B, to the same prompts."),
    judge: str = typer.Option("smollm2-135m-instruct", "--judge", "-j", help=JUDGE_HELP),
    out: Path = typer.Option(None, "-o", "--out",
                             help="Verdicts JSONL (default: A.vs.B.pairwise.jsonl beside A; "
                                  "rerun to resume)."),
    engine: str = engine_option(),
    base_url: list[str] = base_url_option(),
    concurrency: int = concurrency_option(),
    batch_size: int = typer.Option(16, "--batch-size", help="Rows judged together (local)."),
    dtype: str = dtype_option(),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", min=1),
    seed: int = typer.Option(0, "--seed", help="Fixed seed for every judge call."),
) -> None:
    """Win rate of A against B, judged in both orders.

    Each shared prompt is judged with A's answer first, then B's; a win needs both orders
    to agree. Prints wins/ties/losses, win rate and position consistency."""
    from exnihilo.assemble import check_engine
    from exnihilo.engines.base import SamplingParams
    from exnihilo.errors import ExnihiloError
    from exnihilo.evaluate import match_by_prompt, pairwise_compare, read_generations
    from exnihilo.resume import check_resumable

    out = out or a.with_name(f"{a.stem}.vs.{b.stem}.pairwise.jsonl")
    check_engine(engine, base_url, dtype)
    check_resumable(out, "eval pairwise", None, inputs=[a, b])
    records_a, records_b = read_generations(a), read_generations(b)
    if not match_by_prompt(records_a, records_b)[0]:  # before loading a judge
        raise ExnihiloError(f"{a} and {b} share no prompt: generate both from the same eval "
                            f"set")
    _warn_if_weak(judge)
    params = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens,
                            seed=seed)
    judge_engine = _judge_engine(judge, engine, base_url, concurrency, batch_size, dtype)
    _, summary = pairwise_compare(judge_engine, records_a, records_b, params, out=out)
    summary["a"] = f"{a.name} ({summary['a']})"
    summary["b"] = f"{b.name} ({summary['b']})"
    console.print(_summary_table(f"pairwise A vs B → {out}", summary))
    _print_unparseable(summary["unparseable_examples"])
    _warn_if_weak(judge)


@app.command("perplexity")
def perplexity_command(
    data: Path = typer.Option(..., "--data", "-d",
                              help="Eval set with reference answers (our JSONL, Alpaca, "
                                   "ShareGPT)."),
    model: str = typer.Option("smollm2-135m-instruct", "--model", "-m", help=MODEL_HELP),
    limit: int = typer.Option(None, "--limit", "-n", help="Use the first N prompts."),
    offset: int = typer.Option(0, "--offset", help="Skip the first K prompts."),
    style: str = typer.Option(None, "--style",
                              help="chat | alpaca | phi3. Default: the model folder's "
                                   "exnihilo_run.json, else chat."),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    dtype: str = typer.Option("float32", "--dtype", help="float32 or bfloat16."),
    max_length: int = typer.Option(2048, "--max-length", min=2,
                                   help="Skip (and count) longer prompt+answer pairs."),
    out: Path = typer.Option(None, "-o", "--out", help="Per-record NLL JSONL (optional)."),
) -> None:
    """Perplexity of the reference answers given their prompts (no judge needed).

    Only answer tokens count (with the end-of-turn/EOS token). Lower is better."""
    from exnihilo.assemble import check_engine
    from exnihilo.evaluate import load_eval_set, model_perplexity
    from exnihilo.outputs import check_output
    from exnihilo.records import write_jsonl_atomic

    check_engine("transformers", None, dtype)
    if out is not None:
        check_output(out, [data])
    records = load_eval_set(data, limit=limit, offset=offset)
    rows, summary = model_perplexity(model, records, style=style, dtype=dtype,
                                     batch_size=batch_size, max_length=max_length)
    if out is not None:
        write_jsonl_atomic(out, rows)
        summary["out"] = str(out)
    console.print(_summary_table("perplexity of the reference answers", summary))
