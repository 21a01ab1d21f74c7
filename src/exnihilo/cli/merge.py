"""`exnihilo merge` (a mergekit YAML) and `exnihilo warp` (WARP's merge of M policies)."""

from __future__ import annotations

from pathlib import Path

import typer

from exnihilo.cli.common import console, emit
from exnihilo.errors import ExnihiloError


def _print_summaries(summaries: list) -> None:
    emit({"outputs": summaries}, lambda: _summary_table(summaries))


def _summary_table(summaries: list) -> None:
    from rich.table import Table

    table = Table(show_header=True)
    for column in ("output", "method", "tensors", "parameters", "seconds", "peak RSS MB"):
        table.add_column(column)
    for s in summaries:
        table.add_row(str(s.out), s.method, str(s.tensors), f"{s.parameters:,}",
                      f"{s.seconds:.1f}", f"{s.peak_rss_mb:.0f}")
    console.print(table)


def merge_command(
    config: Path = typer.Argument(..., help="mergekit YAML (merge_method: linear, slerp, "
                                            "task_arithmetic, ties, dare_ties, dare_linear)."),
    out: Path = typer.Option(..., "-o", "--out", help="New output folder (must not exist)."),
    seed: int = typer.Option(0, "--seed", help="Seed of DARE's random drop."),
) -> None:
    """Merge models with a mergekit configuration, streaming tensor by tensor."""
    from exnihilo.merge import merge

    _print_summaries([merge(config, out, seed=seed)])


def _eta_grid(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ExnihiloError(f"--eta-sweep {text!r}: expected comma-separated numbers, "
                            f"e.g. 0,0.1,0.3,0.5,1") from None
    if not values:
        raise ExnihiloError("--eta-sweep: no values")
    return values


def warp_command(
    init: str = typer.Option(..., "--init", help="The policies' shared initialisation "
                                                 "(e.g. the SFT model)."),
    policies: list[str] = typer.Option([], "--policies", help="Policy folders trained from "
                                                             "--init (repeatable)."),
    more_policies: list[str] = typer.Argument(None, metavar="[POLICY]...",
                                              help="Further policies, so `--policies A B` "
                                                   "works."),
    eta: float = typer.Option(0.3, "--eta", help="LITI: θ = (1−η)·θ_init + η·θ_slerp."),
    eta_sweep: str = typer.Option(None, "--eta-sweep",
                                  help="Comma-separated η values; writes OUT/eta-<η> for "
                                       "each (one pass over the weights)."),
    out: Path = typer.Option(..., "-o", "--out", help="New output folder (must not exist)."),
    eval_pairs: str = typer.Option(
        None, "--eval-pairs", help="With --eta-sweep: held-out preference pairs; writes "
        "OUT/sweep.json and OUT/sweep.html (implicit reward margin against KL to --init for "
        "each η)."),
    eval_limit: int = typer.Option(64, "--eval-limit", min=1, help="Pairs used by --eval-pairs."),
) -> None:
    """WARP merge: slerp of the policies' task vectors, then interpolation towards --init."""
    from exnihilo.merge import warp, warp_sweep

    all_policies = [*policies, *(more_policies or [])]
    if eta_sweep is None:
        _print_summaries([warp(init, all_policies, eta, out)])
        return
    if eval_pairs is not None and not Path(eval_pairs).is_file():
        raise ExnihiloError(f"--eval-pairs {eval_pairs}: no such file")
    summaries = warp_sweep(init, all_policies, _eta_grid(eta_sweep), out)
    if eval_pairs is None:
        _print_summaries(summaries)
    else:
        import json

        from exnihilo.merge.sweep import sweep_report, sweep_table
        from exnihilo.outputs import write_text_atomic

        etas = _eta_grid(eta_sweep)
        rows = sweep_table(init, [(eta, str(s.out)) for eta, s in zip(etas, summaries,
                                                                      strict=True)],
                           eval_pairs, limit=eval_limit)
        write_text_atomic(out / "sweep.json", json.dumps(rows, indent=2))
        sweep_report(rows, out / "sweep.html")

        def show() -> None:
            _summary_table(summaries)
            for row in rows:
                console.print(f"η {row['eta']:<5g} reward margin "
                              f"{row['reward_margin']:+.4f} · accuracy "
                              f"{100 * row['reward_accuracy']:.1f} % · KL to init "
                              f"{row['kl_to_init']:.6f}", highlight=False)
            console.print(f"sweep → {out / 'sweep.html'}", highlight=False)
        emit({"outputs": summaries, "sweep": rows, "report": out / "sweep.html"}, show)
