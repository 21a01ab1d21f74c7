"""`exnihilo eval ifeval`: verifiable instruction following (IFEval), generated or given.

Parses options and prints; generation, checking and statistics live in `exnihilo.ifeval`
and `exnihilo.evaluate`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from exnihilo.cli.common import (
    MODEL_HELP,
    base_url_option,
    build_engine,
    concurrency_option,
    console,
    decode_rows_option,
    dtype_option,
    emit,
    engine_option,
)
from exnihilo.ifeval.score import DEFAULT_INPUT


def _default_input() -> Path | None:
    return DEFAULT_INPUT if DEFAULT_INPUT.is_file() else None


def ifeval_command(
    model: str = typer.Option(None, "--model", "-m",
                              help=MODEL_HELP + " Generates an answer for every prompt."),
    responses: Path = typer.Option(None, "--responses", "-r",
                                   help="Check given answers instead: JSONL of {\"prompt\", "
                                        "\"response\"} or records from `exnihilo generate`."),
    input_path: Path = typer.Option(_default_input(), "--input", "-i",
                                    help="IFEval input JSONL (key, prompt, "
                                         "instruction_id_list, kwargs). Default: the shared "
                                         "541-prompt set when present."),
    out: Path = typer.Option(None, "-o", "--out",
                             help="Result rows JSONL: one per prompt and mode (strict, loose), "
                                  "in the benchmark's output format. Written atomically."),
    responses_out: Path = typer.Option(None, "--responses-out",
                                       help="With --model: where the generated answers go "
                                            "(resumable). Default: OUT with .responses.jsonl."),
    limit: int = typer.Option(None, "--limit", "-n", help="Use the first N prompts."),
    max_new_tokens: int = typer.Option(1024, "--max-new-tokens", min=1,
                                       help="With --model: answer length cap (greedy "
                                            "decoding, temperature 0)."),
    engine: str = engine_option(),
    base_url: list[str] = base_url_option(),
    concurrency: int = concurrency_option(),
    batch_size: int | None = decode_rows_option(),
    dtype: str = dtype_option(),
    threads: int = typer.Option(None, "--threads", min=1,
                                help="Torch CPU threads for local generation (default: "
                                     "torch's)."),
    compare: Path = typer.Option(None, "--compare",
                                 help="Another run's result rows: print this run minus it, "
                                      "with paired bootstrap intervals."),
    resamples: int = typer.Option(1000, "--resamples", min=100,
                                  help="Bootstrap resamples over prompts (seed 0)."),
) -> None:
    """IFEval: does the model follow verifiable instructions ("no commas", "3 bullets")?

    With --model, answers every prompt greedily (max 1024 new tokens by default), then
    checks; with --responses, checks the given answers. Prints prompt- and
    instruction-level accuracy, strict and loose, with bootstrap 95% intervals and a
    per-instruction table."""
    from exnihilo.errors import ExnihiloError
    from exnihilo.ifeval import (
        check_same_prompts,
        evaluate_responses,
        match_responses,
        paired_difference,
        read_inputs,
        read_responses,
        read_results,
        summarize,
        write_results,
    )
    from exnihilo.records import check_writable

    if (model is None) == (responses is None):
        raise ExnihiloError("give exactly one of --model (generate answers) or --responses "
                            "(check given answers)")
    if input_path is None:
        raise ExnihiloError(f"--input: no IFEval input file given and {DEFAULT_INPUT} does "
                            f"not exist")
    if out is not None:
        check_writable(out)
    if limit is not None and limit <= 0:
        raise ExnihiloError(f"--limit must be positive, got {limit}")
    all_inputs = read_inputs(input_path)  # every error surfaces before a model loads
    inputs = all_inputs[:limit] if limit is not None else all_inputs
    other = read_results(compare) if compare is not None else None
    if other is not None:
        check_same_prompts(other, inputs, f"--compare {compare}")
    if responses is not None:
        answers = match_responses(inputs, read_responses(responses), str(responses),
                                  known_prompts={row.prompt for row in all_inputs})
    else:
        if responses_out is None and out is not None:
            responses_out = out.with_name(f"{out.stem}.responses.jsonl")
        if responses_out is not None:
            check_writable(responses_out)
        answers = _generate(inputs, model, engine, base_url, concurrency, batch_size, dtype,
                            threads, max_new_tokens, responses_out)
    results = evaluate_responses(inputs, answers)
    if out is not None:
        write_results(out, results)
    summary = summarize(results, resamples=resamples)
    diff = paired_difference(results, other, resamples=resamples) if other is not None else None
    results_file = (_write_results(out, summary, input_path, responses, model, engine)
                    if out is not None else None)
    answers_out = responses_out if model is not None else None

    def show() -> None:
        console.print(_summary_table(summary, title=f"IFEval ({summary['n_prompts']} prompts, "
                                                   f"{summary['n_instructions']} "
                                                   f"instructions)"))
        console.print(_instruction_table(summary["by_instruction"]))
        if diff is not None:
            console.print(_summary_table(diff, title=f"this run minus {str(compare)} "
                                                     f"({diff['n_prompts']} prompts)",
                                         signed=True))
        if out is not None:
            console.print(f"results → {str(out)}", highlight=False)
            console.print(f"results → {results_file}", highlight=False)
        if answers_out is not None:
            console.print(f"answers → {str(answers_out)}", highlight=False)
    emit({**summary, "difference": diff, "out": out, "results": results_file,
          "responses_out": answers_out}, show)


def _generate(inputs: list[Any], model: str, engine: str, base_url: list[str],
              concurrency: int, batch_size: int | None, dtype: str, threads: int | None,
              max_new_tokens: int, responses_out: Path | None) -> list[str]:
    from exnihilo.evaluate import resolve_style
    from exnihilo.ifeval.run import answer_prompts
    from exnihilo.threads import apply_threads

    apply_threads(threads)
    gen = build_engine(engine, model, dtype=dtype, batch_size=batch_size, base_urls=base_url,
                       concurrency=concurrency, label="ifeval")
    return answer_prompts(gen, inputs, max_new_tokens, resolve_style(None, model),
                          responses_out)


def _write_results(out: Path, summary: dict[str, Any], input_path: Path,
                   responses: Path | None, model: str | None, engine: str) -> Path:
    """`.exnihilo/<OUT>.results.json`: config, versions, the model's chat template hash and
    the summary."""
    from exnihilo.results import model_template_hash, write_results

    templates = {f"chat_template:{model}": model_template_hash(model)
                 if engine == "transformers" else None} if model else {}
    return write_results(out, "eval ifeval", summary, inputs=[input_path, responses],
                         templates=templates)


def _pct(x: float, signed: bool = False) -> str:
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def _summary_table(summary: dict[str, Any], title: str, signed: bool = False) -> Table:
    table = Table(title=title)
    table.add_column("level")
    table.add_column("strict %", justify="right")
    table.add_column("loose %", justify="right")
    for level in ("prompt_level", "instruction_level"):
        cells = []
        for mode in ("strict", "loose"):
            m = summary[mode][level]
            low, high = m["ci95"]
            cells.append(f"{_pct(m['value'], signed)} [{_pct(low, signed)}, "
                         f"{_pct(high, signed)}]")
        table.add_row(level.replace("_", "-"), *cells)
    table.caption = f"95% bootstrap intervals over prompts ({summary['resamples']} resamples)"
    return table


def _instruction_table(by_instruction: dict[str, dict[str, Any]]) -> Table:
    table = Table(title="per instruction")
    table.add_column("instruction id")
    table.add_column("n", justify="right")
    table.add_column("strict %", justify="right")
    table.add_column("loose %", justify="right")
    for iid, row in by_instruction.items():
        table.add_row(iid, str(row["n"]), _pct(row["strict"]), _pct(row["loose"]))
    return table
