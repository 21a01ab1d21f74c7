"""`exnihilo report a.jsonl [b.jsonl …] -o report.html`."""

from __future__ import annotations

from pathlib import Path

import typer

from exnihilo.cli.common import console, emit


def report_command(
    data: list[Path] = typer.Argument(..., help="One or more datasets (JSONL, Alpaca, "
                                                "ShareGPT); 2+ are shown side by side."),
    out: Path = typer.Option(Path("report.html"), "-o", "--out", help="Output HTML file."),
    samples: int = typer.Option(100, "--samples", min=0,
                                help="Records per dataset in the searchable sample table."),
    title: str = typer.Option(None, "--title", help="Page title."),
) -> None:
    """Write one self-contained HTML report for one or more datasets.

    Counts, tag / length / min-neighbour distance histograms (side by side for 2+ datasets)
    and a searchable sample table; nothing is loaded from the network at view time.
    """
    from exnihilo.report.html import write_report

    stats = write_report(data, out, samples=samples, title=title)
    sizes = ", ".join(f"{s.name} ({s.records:,})" for s in stats)
    emit({"out": out, "datasets": [{"name": s.name, "records": s.records} for s in stats]},
         lambda: console.print(f"wrote {out}: {sizes}"))
