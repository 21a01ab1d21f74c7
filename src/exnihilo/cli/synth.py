"""`exnihilo synth …`: make instruction data from nothing (Magpie) or from documents."""

from __future__ import annotations

import importlib
from pathlib import Path

import typer

from exnihilo.cli.common import (
    MODEL_HELP,
    base_url_option,
    concurrency_option,
    console,
    dtype_option,
    emit,
    engine_option,
)

app = typer.Typer(help="Synthesize instruction data.", no_args_is_help=True)


@app.command("magpie")
def magpie_command(
    n: int = typer.Option(..., "-n", "--n", help="Number of unique records the output must hold."),
    out: Path = typer.Option(..., "-o", "--out", help="Output JSONL (appended; rerun to resume)."),
    model: str = typer.Option("smollm2-135m-instruct", "--model", "-m", help=MODEL_HELP),
    engine: str = engine_option(),
    base_url: list[str] = base_url_option(),
    concurrency: int = concurrency_option(),
    template_from: str = typer.Option(None, "--template-from",
                                      help="Local model whose chat template gives the "
                                           "pre-query text (default: --model)."),
    turns: int = typer.Option(1, "--turns", min=1, help="User/assistant turns per record."),
    system: str = typer.Option(None, "--system", help="Custom system prompt."),
    no_system: bool = typer.Option(False, "--no-system",
                                   help="Drop the template's default system block from the "
                                        "pre-query (compare: with it SmolLM2 writes far more "
                                        "finished instructions)."),
    seed: int = typer.Option(0, "--seed", help="Base seed; record i uses a seed derived from it."),
    batch_size: int | None = typer.Option(
        None, "--batch-size", min=1,
        help="Candidates per round and rows decoded together (local). Default: 128 per "
             "round, decoded as wide as a quarter of the free memory holds."),
    dtype: str = dtype_option(),
    instruction_max_tokens: int = typer.Option(128, "--instruction-max-tokens"),
    response_max_tokens: int = typer.Option(384, "--response-max-tokens"),
    instruction_temperature: float = typer.Option(1.0, "--instruction-temperature"),
    response_temperature: float = typer.Option(0.7, "--response-temperature"),
    response_top_p: float = typer.Option(0.9, "--response-top-p"),
    show: int = typer.Option(3, "--show", help="Print this many records at the end."),
) -> None:
    """Magpie: the model writes user instructions from its chat template's pre-query text
    alone, then answers them. Output is resumable: rerun the same command after a kill."""
    from exnihilo.synth.magpie import MagpieJob, run_magpie_job, validate_magpie_job

    job = MagpieJob(
        n=n, out=out, model=model, engine=engine, base_url=base_url, concurrency=concurrency,
        template_from=template_from, turns=turns, system=system, no_system=no_system,
        seed=seed, batch_size=batch_size, dtype=dtype,
        instruction_max_tokens=instruction_max_tokens, response_max_tokens=response_max_tokens,
        instruction_temperature=instruction_temperature,
        response_temperature=response_temperature, response_top_p=response_top_p)
    config = validate_magpie_job(job)  # options, output, lock, resume: before loading
    summary = run_magpie_job(job, config)
    emit({k: v for k, v in summary.items() if k != "examples"},
         lambda: print_summary(summary, show))


def print_summary(summary: dict, show: int) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"magpie → {summary['out']}", show_header=False)
    for key in ("requested", "written_this_run", "already_present", "total", "candidates",
                "elapsed_s", "pairs_per_minute", "generated_tokens_per_s"):
        table.add_row(key, str(summary[key]))
    for reason, count in sorted(summary["skipped"].items()):
        table.add_row(f"skipped: {reason}", str(count))
    console.print(table)
    for record in summary.get("examples", [])[:show]:
        for m in record["messages"]:
            console.print(Text.assemble((m["role"], "bold"), ": ", m["content"][:400]),
                          highlight=False)
        console.print()


def _register_optional() -> None:
    try:
        mod = importlib.import_module("exnihilo.cli.synth_documents")
    except ModuleNotFoundError as e:
        if e.name != "exnihilo.cli.synth_documents":
            raise
        return
    app.command("documents")(mod.documents_command)


_register_optional()
