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
    deprecated_option,
    dtype_option,
    emit,
    engine_option,
    err_console,
    input_argument,
    pick_input,
)

app = typer.Typer(help="Evaluate answers: judge scores (0-100), pairwise win rate, perplexity, "
                       "multiple choice.",
                  no_args_is_help=True)

JUDGE_HELP = ("Judge model (same forms as --model), or MODEL@URL for a model behind an "
              "OpenAI-compatible server. Repeat for a panel of judges. The embedded 135M model "
              "works but is a weak judge: point this at a strong model for real judgements.")
MODE_HELP = ("generate: the judge writes its verdict; logprob: the verdict is read from its "
             "log-probabilities (expected score digit, P(A) vs P(B)), never unparseable.")


def _judge_factories(judges: list[str], engine: str, base_url: list[str], concurrency: int,
                     batch_size: int, dtype: str) -> list[tuple[str, Any]]:
    """(label, engine factory) per --judge; MODEL@URL means that model behind that server."""
    factories = []
    for spec in judges:
        model, _, url = spec.partition("@")
        if url:
            factories.append((spec, lambda m=model, u=url: build_engine(
                "openai", m, base_urls=[u], concurrency=concurrency, label="judging")))
        else:
            factories.append((spec, lambda m=model: _judge_engine(
                m, engine, base_url, concurrency, batch_size, dtype)))
    return factories


def _print_panel(summary: dict[str, Any], judges: list[str]) -> None:
    for judge in summary["judges"]:
        if "failed" in judge:
            err_console.print(Text.assemble(
                ("judge failed:", "bold red"),
                f" {judge['judge']}: {judge['failed']} not judged ({judge['error']})"),
                highlight=False)
        else:
            console.print(_summary_table(f"judge {judge['judge']}", judge))
    console.print(_summary_table("panel (pooled)", summary["pooled"]))
    agreement = summary["agreement"]
    if "krippendorff_alpha" in agreement:
        console.print(f"agreement: Krippendorff's alpha (interval) "
                      f"{agreement['krippendorff_alpha']}", highlight=False)
    for pair, values in agreement["pairs"].items():
        shown = "  ".join(f"{k} {v}" for k, v in values.items())
        console.print(f"  {pair}: {shown}", highlight=False)
    for judge in judges:
        _warn_if_weak(judge.partition("@")[0])


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


def _results(out: Path, command: str, metrics: Any, inputs: list[Path], prompt: str | None,
             models: list[str], engine: str) -> Path:
    """`.exnihilo/<OUT>.results.json`: config, versions, template hashes and the summary."""
    from exnihilo.results import model_template_hash, prompt_hash, write_results

    templates: dict[str, str | None] = {f"{prompt}_prompt": prompt_hash(prompt)} if prompt \
        else {}
    for m in models:
        templates[f"chat_template:{m}"] = (model_template_hash(m) if engine == "transformers"
                                           else None)
    return write_results(out, command, metrics, inputs=inputs, templates=templates)


def _print_results(path: Path | None) -> None:
    if path is not None:
        console.print(f"results → {path}", highlight=False)


def _print_unparseable(examples: list[str]) -> None:
    for raw in examples:
        console.print(Text.assemble(("  unparseable answer:", "dim"), f" {raw[:200]!r}"),
                      highlight=False)


@app.command("judge")
def judge_command(
    file: Path = typer.Argument(..., help="JSONL of generated answers (`exnihilo generate`)."),
    judge: list[str] = typer.Option(["smollm2-135m-instruct"], "--judge", "-j",
                                    help=JUDGE_HELP),
    mode: str = typer.Option("generate", "--mode", help=MODE_HELP),
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
    from exnihilo.evaluate.judging import check_mode
    from exnihilo.resume import check_resumable

    check_mode(mode)
    out = out or file.with_name(f"{file.stem}.judged.jsonl")
    check_engine(engine, base_url, dtype)
    check_resumable(out, "eval judge", None, inputs=[file])
    records = read_generations(file)
    params = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens,
                            seed=seed)
    if len(judge) > 1:
        from exnihilo.evaluate.panels import judge_panel
        from exnihilo.records import write_jsonl_atomic

        pooled, panel = judge_panel(
            _judge_factories(judge, engine, base_url, concurrency, batch_size, dtype),
            records, params, out=out, mode=mode)
        write_jsonl_atomic(out, pooled)
        results = _results(out, "eval judge", panel, [file], "judge", judge, engine)

        def show_panel() -> None:
            _print_panel(panel, judge)
            console.print(f"pooled scores → {out}", highlight=False)
            _print_results(results)
        emit({**panel, "out": out, "results": results}, show_panel)
        return
    judge = judge[0]
    _warn_if_weak(judge)
    judge_engine = _judge_factories([judge], engine, base_url, concurrency, batch_size,
                                    dtype)[0][1]()
    results = judge_scores(judge_engine, records, params, out=out, mode=mode)
    summary = judge_summary(results)
    results_file = _results(out, "eval judge", summary, [file], "judge", [judge], engine)

    def show() -> None:
        console.print(_summary_table(f"judge scores → {out}", summary))
        histogram = "  ".join(f"{k}:{v}" for k, v in summary["histogram"].items())
        console.print(f"histogram  {histogram}", highlight=False)
        _print_unparseable(summary["unparseable_examples"])
        _print_results(results_file)
    emit({**summary, "out": out, "results": results_file}, show)
    _warn_if_weak(judge)


@app.command("pairwise")
def pairwise_command(
    a: Path = typer.Argument(..., help="Answers of model A (JSONL from `exnihilo generate`)."),
    b: Path = typer.Argument(..., help="Answers of model B, to the same prompts."),
    judge: list[str] = typer.Option(["smollm2-135m-instruct"], "--judge", "-j",
                                    help=JUDGE_HELP),
    mode: str = typer.Option("generate", "--mode", help=MODE_HELP),
    length_control: bool = typer.Option(
        False, "--length-control",
        help="Also report the win rate with the length difference regressed out."),
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
    from exnihilo.evaluate.judging import check_mode
    from exnihilo.resume import check_resumable

    check_mode(mode)
    out = out or a.with_name(f"{a.stem}.vs.{b.stem}.pairwise.jsonl")
    check_engine(engine, base_url, dtype)
    check_resumable(out, "eval pairwise", None, inputs=[a, b])
    records_a, records_b = read_generations(a), read_generations(b)
    if not match_by_prompt(records_a, records_b)[0]:  # before loading a judge
        raise ExnihiloError(f"{a} and {b} share no prompt: generate both from the same eval "
                            f"set")
    params = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens,
                            seed=seed)
    factories = _judge_factories(judge, engine, base_url, concurrency, batch_size, dtype)
    if len(judge) > 1:
        from exnihilo.evaluate.panels import pairwise_panel
        from exnihilo.records import write_jsonl_atomic

        pooled, panel = pairwise_panel(factories, records_a, records_b, params, out=out,
                                       mode=mode, length_control=length_control)
        write_jsonl_atomic(out, pooled)
        results = _results(out, "eval pairwise", panel, [a, b], "pairwise", judge, engine)

        def show_panel() -> None:
            _print_panel(panel, judge)
            console.print(f"pooled verdicts → {out}", highlight=False)
            _print_results(results)
        emit({**panel, "out": out, "results": results}, show_panel)
        return
    _warn_if_weak(judge[0])
    _, summary = pairwise_compare(factories[0][1](), records_a, records_b, params, out=out,
                                  mode=mode, length_control=length_control)
    summary["a"] = f"{a.name} ({summary['a']})"
    summary["b"] = f"{b.name} ({summary['b']})"
    results = _results(out, "eval pairwise", summary, [a, b], "pairwise", judge, engine)

    def show() -> None:
        console.print(_summary_table(f"pairwise A vs B → {out}", summary))
        _print_unparseable(summary["unparseable_examples"])
        _print_results(results)
    emit({**summary, "out": out, "results": results}, show)
    _warn_if_weak(judge[0])


@app.command("perplexity")
def perplexity_command(
    data: Path = input_argument("Eval set with reference answers (our JSONL, Alpaca, "
                                "ShareGPT)."),
    model: str = typer.Option("smollm2-135m-instruct", "--model", "-m", help=MODEL_HELP),
    limit: int = typer.Option(None, "--limit", "-n", help="Use the first N prompts."),
    offset: int = typer.Option(0, "--offset", help="Skip the first K prompts."),
    style: str = typer.Option(None, "--style",
                              help="chat | alpaca | phi3. Default: the model folder's "
                                   "exnihilo_run.json, else chat."),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    dtype: str = dtype_option(),
    max_length: int = typer.Option(2048, "--max-length", min=2,
                                   help="Skip (and count) longer prompt+answer pairs."),
    out: Path = typer.Option(None, "-o", "--out", help="Per-record NLL JSONL (optional)."),
    data_option: Path = deprecated_option("--data", "-d"),
) -> None:
    """Perplexity of the reference answers given their prompts (no judge needed).

    Only answer tokens count (with the end-of-turn/EOS token). Lower is better."""
    from exnihilo.assemble import check_engine
    from exnihilo.evaluate import load_eval_set, model_perplexity
    from exnihilo.outputs import check_output
    from exnihilo.records import write_jsonl_atomic

    data = pick_input(data, data_option, "DATA", "--data")
    check_engine("transformers", None, dtype)
    if out is not None:
        check_output(out, [data])
    records = load_eval_set(data, limit=limit, offset=offset)
    rows, summary = model_perplexity(model, records, style=style, dtype=dtype,
                                     batch_size=batch_size, max_length=max_length)
    results = None
    if out is not None:
        write_jsonl_atomic(out, rows)
        summary["out"] = str(out)
        results = _results(out, "eval perplexity", summary, [data], None, [model],
                           "transformers")

    def show() -> None:
        console.print(_summary_table("perplexity of the reference answers", summary))
        _print_results(results)
    emit({**summary, "results": results}, show)


@app.command("choice")
def choice_command(
    file: Path = typer.Argument(..., help="Multiple-choice items: {question, options, answer} "
                                          "JSON/JSONL, or `synth documents` records."),
    model: str = typer.Option("smollm2-135m-instruct", "--model", "-m", help=MODEL_HELP),
    shuffles: int = typer.Option(4, "--shuffles", min=1,
                                 help="Option orders per question (rotations of a seeded "
                                      "shuffle), to cancel position bias."),
    seed: int = typer.Option(0, "--seed", help="Seed of the option orders and the bootstrap."),
    length_norm: bool = typer.Option(False, "--length-norm",
                                     help="Compare options by mean log-prob per token."),
    style: str = typer.Option("lettered", "--style",
                              help="lettered: options listed A), B)…, each scored as the "
                                   "reply 'B) text'; cloze: the question alone, each option's "
                                   "bare text scored (better for small models)."),
    limit: int = typer.Option(None, "--limit", "-n", help="Use the first N questions."),
    out: Path = typer.Option(None, "-o", "--out",
                             help="Per-question JSONL (appended as it goes; rerun to resume)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    dtype: str = dtype_option(),
) -> None:
    """Multiple-choice accuracy by the log-likelihood of each option (no judge).

    Each option, as the reply "B) its text", is scored by the model; the likeliest is its
    answer. Accuracy over questions with a bootstrap 95 % interval."""
    from exnihilo.errors import ExnihiloError
    from exnihilo.evaluate import choice_accuracy, load_choice_set
    from exnihilo.records import check_writable

    if out is not None:
        check_writable(out)
    from exnihilo.evaluate.choice import CHOICE_STYLES

    if style not in CHOICE_STYLES:
        raise ExnihiloError(f"--style must be one of {', '.join(CHOICE_STYLES)}, got {style!r}")
    items = load_choice_set(file, limit=limit)  # fail before loading a model
    scorer = build_engine("transformers", model, dtype=dtype, batch_size=batch_size,
                          label="scoring")
    _, summary = choice_accuracy(scorer, items, shuffles=shuffles, seed=seed,
                                 length_norm=length_norm, out=out, style=style)
    interval = summary.pop("interval_95")
    results = None
    if out is not None:
        results = _results(out, "eval choice", {**summary, "interval_95": interval}, [file],
                           None, [model], "transformers")

    def show() -> None:
        low, high = interval
        console.print(_summary_table(f"multiple choice: {file.name}",
                                     {**summary, "interval_95": f"[{low}, {high}]"}))
        _print_results(results)
    emit({**summary, "interval_95": interval, "out": out, "results": results}, show)
