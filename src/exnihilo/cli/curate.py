"""`exnihilo curate …`: judge tags, embedding dedup, declarative filters."""

from __future__ import annotations

from collections import Counter
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
    deprecated,
    deprecated_option,
    dtype_option,
    emit,
    engine_option,
)
from exnihilo.errors import ExnihiloError

app = typer.Typer(help="Curate instruction data: tag, dedup, filter.", no_args_is_help=True)


def _counter_table(title: str, counts: dict[str, Counter], total: int) -> Table:
    table = Table(title=title)
    table.add_column("tag")
    table.add_column("value")
    table.add_column("records", justify="right")
    table.add_column("share", justify="right")
    for key, counter in counts.items():
        for value, n in sorted(counter.items(), key=lambda kv: (-kv[1], str(kv[0]))):
            label = "null (unreadable)" if value is None else str(value)
            if key == "score" and value is not None:  # 20-point buckets from tag_distributions
                label = f"{value}-{100 if value == 80 else value + 19}"
            table.add_row(key, label, f"{n:,}", f"{100 * n / max(total, 1):.1f}%")
    return table


def _results(out: Path, command: str, metrics: Any, data: Path, prompt: str | None = None,
             judge: str | None = None, engine: str | None = None) -> Path:
    """`.exnihilo/<OUT>.results.json`: config, versions, template hashes and the summary."""
    from exnihilo.results import model_template_hash, prompt_hash, write_results

    templates = {}
    if prompt is not None:
        templates = {f"{prompt}_prompt": prompt_hash(prompt),
                     f"chat_template:{judge}": (model_template_hash(judge)
                                                if engine == "transformers" else None)}
    return write_results(out, command, metrics, inputs=[data], templates=templates)


@app.command("tag")
def tag_command(
    data: Path = typer.Argument(..., help="Input records (JSONL, Alpaca or ShareGPT)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output JSONL (appended; rerun to resume)."),
    judge: str = typer.Option("smollm2-135m-instruct", "--judge", "-j", help=MODEL_HELP),
    engine: str = engine_option(),
    base_url: list[str] = base_url_option(),
    concurrency: int = concurrency_option(),
    score: bool = typer.Option(False, "--score/--no-score",
                               help="Also score each response 0-100 (a second judge call)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Records judged together."),
    seed: int = typer.Option(0, "--seed", help="Judge seed (greedy decoding; kept for "
                                               "engines that sample)."),
    max_new_tokens: int = typer.Option(96, "--max-new-tokens",
                                       help="Longest judge answer, in tokens."),
    dtype: str = dtype_option(),
    mode: str = typer.Option("generate", "--mode",
                             help="generate: the judge writes a JSON verdict (needs a capable "
                                  "judge); logprob: each tag is the label the judge finds most "
                                  "likely, never unreadable (local engine or a server with "
                                  "top_logprobs)."),
    judge_option: str = deprecated_option("-m"),
) -> None:
    """Tag quality, difficulty and task category with any model as the judge.

    Magpie's tags (arXiv 2406.08464), optionally a 0-100 response score (--score). Tags go to
    meta.tags; unreadable answers become null and are counted. Rerun to resume.
    """
    from exnihilo.assemble import check_engine
    from exnihilo.curate.tags import MODES, tag_file, tag_settings
    from exnihilo.outputs import check_output
    from exnihilo.resume import check_resumable

    if judge_option is not None:
        deprecated("-m", "the judge is -j/--judge")
        judge = judge_option
    if mode not in MODES:
        raise ExnihiloError(f"--mode {mode!r}: known {', '.join(MODES)}")
    check_engine(engine, base_url, dtype)
    check_output(out, [data])
    check_resumable(out, "curate tag", tag_settings(f"{engine}:{judge}", score, seed,
                                                     max_new_tokens, mode), inputs=[data])
    model = build_engine(engine, judge, dtype=dtype, batch_size=batch_size,
                         base_urls=base_url, concurrency=concurrency, label="tagging")
    summary = tag_file(data, out, model, score=score, batch_size=batch_size, seed=seed,
                       max_new_tokens=max_new_tokens, mode=mode)
    results = _results(out, "curate tag", summary, data, "tag", judge, engine)

    def show() -> None:
        console.print(_counter_table(f"tags in {out}", summary.distributions,
                                     summary.output_records))
        unparsed = ", ".join(f"{k} {v}" for k, v in sorted(summary.unparsed.items())) or "none"
        console.print(f"tagged {summary.tagged:,} now, {summary.already_tagged:,} already "
                      f"tagged, {summary.duplicate_ids:,} duplicate ids skipped; unreadable "
                      f"answers this run: {unparsed}; {summary.output_records:,} records in "
                      f"{out}")
        console.print(f"results → {results}", highlight=False)
    emit({**vars(summary), "out": out, "results": results}, show)


@app.command("dedup")
def dedup_command(
    data: Path = typer.Argument(..., help="Input records."),
    out: Path = typer.Option(..., "-o", "--out", help="Output JSONL (written atomically)."),
    threshold: float = typer.Option(0.05, "--threshold",
                                    help="Cosine distance at or below which two instructions "
                                         "are near-duplicates (0 = only exact dedup)."),
    method: str = typer.Option("auto", "--method",
                               help="Neighbour search: auto (exact below 20k records, faiss "
                                    "HNSW above), exact, hnsw."),
    k: int = typer.Option(10, "--k", help="Neighbours looked at per record."),
    batch_size: int = typer.Option(64, "--batch-size", help="Embedding batch size."),
) -> None:
    """Remove exact and near-duplicate instructions; tag min_neighbor_distance.

    Exact dedup on normalised text, then near-duplicates by all-MiniLM-L6-v2 embeddings
    (the best-tagged member of each group is kept: quality, then score, then length).
    """
    from exnihilo.curate.embed import dedup_file
    from exnihilo.outputs import check_output
    from exnihilo.progress import note

    check_output(out, [data])
    summary = dedup_file(data, out, threshold, k=k, method=method, batch_size=batch_size,
                         note=note)
    results = _results(out, "curate dedup", summary, data)

    def show() -> None:
        table = Table(title=f"dedup {data} → {out}")
        table.add_column("step")
        table.add_column("records", justify="right")
        table.add_row("input", f"{summary.input_records:,}")
        table.add_row("exact duplicates removed", f"{summary.exact_duplicates:,}")
        table.add_row(f"near duplicates removed (distance ≤ {summary.threshold:g})",
                      f"{summary.near_duplicates:,}")
        table.add_row("output", f"{summary.output_records:,}")
        console.print(table)
        median = ("–" if summary.min_distance_median is None
                  else f"{summary.min_distance_median:.3f}")
        console.print(f"neighbour search: {summary.method}, {summary.passes} pass(es); median "
                      f"min_neighbor_distance in output: {median}")
        console.print(f"results → {results}", highlight=False)
    emit({**vars(summary), "out": out, "results": results}, show)


@app.command("filter")
def filter_command(
    data: Path = typer.Argument(..., help="Input records."),
    out: Path = typer.Option(..., "-o", "--out", help="Output JSONL (written atomically)."),
    where: list[str] = typer.Option(..., "--where", "-w",
                                    help="A rule like 'quality>=good' (repeatable; all must "
                                         "pass). See `exnihilo curate rules`."),
    missing: str = typer.Option("error", "--missing",
                                help="Records lacking a rule's field: error, drop or keep."),
) -> None:
    """Keep the records that pass every --where rule; show what each rule removed."""
    from exnihilo.curate.filters import apply_filters, parse_rule
    from exnihilo.outputs import check_output
    from exnihilo.records import read_any, write_jsonl_atomic

    rules = [parse_rule(w) for w in where]  # fail on a bad rule before reading any data
    check_output(out, [data])
    records = read_any(data)
    if not records:
        raise ExnihiloError(f"{data}: no records (empty file)")
    kept, report = apply_filters(records, rules, on_missing=missing)
    write_jsonl_atomic(out, kept)
    results = _results(out, "curate filter", report, data)

    def show() -> None:
        table = Table(title=f"filter {data} → {out}")
        table.add_column("rule", overflow="fold", min_width=24)
        for col in ("fails alone", "removed", "null tag", "missing"):
            table.add_column(col, justify="right")
        for rule in report.rules:
            table.add_row(rule.rule, f"{rule.failed:,}", f"{rule.removed:,}",
                          f"{rule.null:,}", f"{rule.missing:,}")
        console.print(table)
        console.print(f"kept {report.output_records:,} of {report.input_records:,} records → "
                      f"{out} ('removed' applies the rules in order; 'fails alone' counts each "
                      f"on its own)")
        console.print(f"results → {results}", highlight=False)
    emit({**vars(report), "out": out, "results": results}, show)


@app.command("rules")
def rules_command() -> None:
    """Show the filter language: fields, operators and examples."""
    from exnihilo.curate import filters

    emit({"rules": filters.__doc__},
         lambda: console.print(filters.__doc__, highlight=False, markup=False, soft_wrap=True))
