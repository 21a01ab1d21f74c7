"""`exnihilo demo`: the main job on the embedded model, end to end, in minutes."""

from __future__ import annotations

from pathlib import Path

import typer

from exnihilo.cli.common import console


def demo_command(
    workdir: Path = typer.Option(Path("data/demo"), "--workdir",
                                 help="Where the demo writes its files (a rerun reuses them)."),
    n: int = typer.Option(24, "-n", help="Magpie pairs to synthesize."),
    epochs: int = typer.Option(2, "--epochs", help="LoRA SFT epochs over the Magpie pairs."),
    eval_limit: int = typer.Option(20, "--eval-limit",
                                   help="Held-out ch07 prompts to answer and judge."),
    eval_set: Path = typer.Option(None, "--eval-set",
                                  help="Alpaca-style eval file (default: the shared ch07 set)."),
) -> None:
    """The whole loop on the embedded SmolLM2-135M-Instruct: Magpie synthesis from nothing →
    LoRA SFT → answers on held-out ch07 prompts from base and tuned → judge scores and
    reference perplexity, side by side."""
    from rich.table import Table
    from rich.text import Text

    from exnihilo.cli.synth import print_summary
    from exnihilo.demo import DemoConfig, run_demo

    console.rule(Text("exnihilo demo on smollm2-135m-instruct", style="bold"))
    result = run_demo(DemoConfig(workdir=workdir, n=n, epochs=epochs, eval_limit=eval_limit,
                                 eval_set=eval_set))
    print_summary(result.magpie, show=2)
    sft = result.sft
    console.print(f"SFT (LoRA, merged): {sft['out']} · steps {sft['steps']} · train loss "
                  f"{_fmt(sft['train_loss'])} · val loss {_fmt(sft['val_loss'])}"
                  + (" · reused" if sft.get("reused") else ""))
    table = Table(title="base vs tuned on held-out ch07 prompts")
    for col in ("model", "judge score (0–100)", "judged", "unparseable",
                "reference perplexity ↓", "mean answer tokens", "hit max tokens"):
        table.add_column(col)
    for row in result.rows:
        score = ("—" if row["judge_mean"] is None else
                 f"{row['judge_mean']:.1f} ± {row['judge_stderr'] or 0:.1f}")
        table.add_row(row["model"], score, row["judged"], str(row["unparseable"]),
                      f"{row['perplexity']:.3f}", str(row["mean_tokens"]),
                      str(row["hit_max_tokens"]))
    console.print(table)
    if result.warning:
        console.print(Text.assemble(("note:", "yellow"), f" {result.warning}"), highlight=False)
    console.print(f"files: {result.files} · answers and verdicts: "
                  f"{', '.join(r['judged_file'] for r in result.rows)}", highlight=False)
    console.print(f"stage seconds: {result.seconds}", highlight=False)


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"
