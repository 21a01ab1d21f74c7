"""`exnihilo report a.jsonl [b.jsonl …] -o report.html`, or `exnihilo report RUN_DIR […]`."""

from __future__ import annotations

from pathlib import Path

import typer

from exnihilo.cli.common import console, emit
from exnihilo.errors import ExnihiloError


def report_command(
    data: list[Path] = typer.Argument(..., help="One or more datasets (JSONL, Alpaca, "
                                                "ShareGPT), or training run folders (their "
                                                "curves); 2+ are shown side by side."),
    out: Path = typer.Option(Path("report.html"), "-o", "--out", help="Output HTML file."),
    samples: int = typer.Option(100, "--samples", min=0,
                                help="Records per dataset in the searchable sample table."),
    title: str = typer.Option(None, "--title", help="Page title."),
) -> None:
    """Write one self-contained HTML report for one or more datasets or training runs.

    Datasets: counts, tag / length / min-neighbour distance histograms (side by side for 2+
    datasets) and a searchable sample table. Run folders (`exnihilo train … --out DIR`):
    training loss, validation loss, learning rate and every other logged metric against the
    step, final metrics and config. Nothing is loaded from the network at view time.
    """
    folders = [p for p in data if p.is_dir()]
    if folders:
        from exnihilo.report.run import write_run_report

        if len(folders) != len(data):
            files = ", ".join(str(p) for p in data if not p.is_dir())
            raise ExnihiloError(f"report: give either run folders or dataset files, not both "
                                f"({files} is not a folder)")
        runs = write_run_report(folders, out, title=title)
        sizes = ", ".join(f"{r.name} ({r.rows[-1]['step']:,} steps)" for r in runs)
        emit({"out": out, "runs": [{"name": r.name, "steps": r.rows[-1]["step"]}
                                   for r in runs]},
             lambda: console.print(f"wrote {out}: {sizes}"))
        return
    from exnihilo.report.html import write_report

    stats = write_report(data, out, samples=samples, title=title)
    sizes = ", ".join(f"{s.name} ({s.records:,})" for s in stats)
    emit({"out": out, "datasets": [{"name": s.name, "records": s.records} for s in stats]},
         lambda: console.print(f"wrote {out}: {sizes}"))
