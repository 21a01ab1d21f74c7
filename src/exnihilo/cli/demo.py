"""`exnihilo demo`: the main job on the embedded model, end to end, in minutes."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from exnihilo.cli.common import console, deprecated_option, emit


def demo_command(
    workdir: Path = typer.Option(Path("data/demo"), "-o", "--out",
                                 help="Where the demo writes its files (a rerun reuses them)."),
    n: int = typer.Option(24, "-n", help="Magpie pairs to synthesize."),
    epochs: int = typer.Option(2, "--epochs", help="LoRA SFT epochs over the Magpie pairs."),
    eval_limit: int = typer.Option(20, "--eval-limit",
                                   help="Held-out ch07 prompts to answer and judge."),
    eval_set: Path = typer.Option(None, "--eval-set",
                                  help="Alpaca-style eval file (default: the shared ch07 set)."),
    ifeval_limit: int = typer.Option(24, "--ifeval-limit", min=1,
                                     help="The first N IFEval prompts, answered by both "
                                          "models and checked by code."),
    workdir_option: Path = deprecated_option("--workdir"),
) -> None:
    """The whole loop on the embedded SmolLM2-135M-Instruct: Magpie synthesis from nothing →
    LoRA SFT → base and tuned answer held-out ch07 and IFEval prompts → instructions followed
    (checked by code), reference perplexity and judge score, with intervals and the paired
    differences."""
    from exnihilo.cli.common import deprecated
    from exnihilo.demo import DemoConfig, run_demo

    if workdir_option is not None:
        deprecated("--workdir", "use -o/--out")
        workdir = workdir_option

    console.rule(Text("exnihilo demo on smollm2-135m-instruct", style="bold"))
    result = run_demo(DemoConfig(workdir=workdir, n=n, epochs=epochs, eval_limit=eval_limit,
                                 eval_set=eval_set, ifeval_limit=ifeval_limit))
    magpie = {k: v for k, v in result.magpie.items() if k != "examples"}
    emit({"magpie": magpie, "sft": result.sft, "rows": result.rows,
          "differences": result.differences, "warning": result.warning,
          "files": result.files, "seconds": result.seconds}, lambda: _print_demo(result))


def _print_demo(result) -> None:
    from exnihilo.cli.synth import print_summary

    print_summary(result.magpie, show=2)
    sft = result.sft
    console.print(f"SFT (LoRA, merged): {sft['out']} · steps {sft['steps']} · train loss "
                  f"{_fmt(sft['train_loss'])} · val loss {_fmt(sft['val_loss'])}"
                  + (" · reused" if sft.get("reused") else ""))
    console.print(_report_table(result.rows))
    console.print(_difference_table(result.differences))
    if result.warning:
        console.print(Text.assemble(("note:", "yellow"), f" {result.warning}"), highlight=False)
    console.print(Text.assemble(("files", "bold"), f" (all under {result.files['workdir']})"))
    for name, path in result.files.items():
        if name != "workdir":
            console.print(f"  {name:<12} {path}", highlight=False)
    for row in result.rows:
        console.print(f"  {row['model']:<12} answers {row['generations']} · verdicts "
                      f"{row['judged_file']}", highlight=False)
    console.print("stage seconds: " + " · ".join(f"{k} {v:.0f}"
                                                 for k, v in result.seconds.items()),
                  highlight=False)


def _report_table(rows: list[dict]) -> Table:
    table = Table(title="base vs tuned (95 % bootstrap intervals)")
    for col in ("model", "IFEval instructions followed ↑", "reference perplexity ↓",
                "judge score (0–100)", "mean answer tokens", "hit max tokens"):
        table.add_column(col)
    for row in rows:
        low, high = row["ifeval_ci"]
        p_low, p_high = row["perplexity_ci"]
        score = ("—" if row["judge_mean"] is None else
                 f"{row['judge_mean']:.1f} ± {row['judge_stderr'] or 0:.1f}")
        table.add_row(row["model"],
                      f"{100 * row['ifeval_instruction_loose']:.1f} % "
                      f"[{100 * low:.1f}, {100 * high:.1f}]",
                      f"{row['perplexity']:.3f} [{p_low:.3f}, {p_high:.3f}]",
                      f"{score} ({row['judged']} read)", str(row["mean_tokens"]),
                      str(row["hit_max_tokens"]))
    return table


def _difference_table(differences: dict[str, dict]) -> Table:
    table = Table(title="tuned − base, paired on the same prompts")
    for col in ("measure", "difference [95 % interval]", "significant?"):
        table.add_column(col)
    for name, d in differences.items():
        scale = 100 if d["unit"] == "%" else 1
        low, high = d["ci95"]
        unit = " points" if d["unit"] == "%" else f" {d['unit']}"
        table.add_row(name, f"{scale * d['value']:+.3g}{unit} [{scale * low:+.3g}, "
                            f"{scale * high:+.3g}]",
                      "yes" if d["significant"] else "no (interval includes 0)")
    return table


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"
