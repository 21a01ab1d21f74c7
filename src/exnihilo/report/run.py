"""Training curves: `exnihilo report RUN_DIR [RUN_DIR …]` as one self-contained HTML page.

A run folder (what every `exnihilo train …` writes) holds `metrics.jsonl`, one line per
optimizer step (loss, lr, tokens/s, the objective's metrics, and `val_`-prefixed ones at
validation steps), plus its config: `exnihilo_run.json` once finished, `run_config.json`
from the start. The page draws training loss, validation loss, learning rate, trained
tokens/s, gradient norm and every other numeric metric against the step, one line per run
(so 2+ runs compare), and lists each run's final metrics and config.

The charts are the dataset report's own inline SVG (`report.html.line_chart_svg`); every
piece of text from the files goes through `esc`, and the page carries a Content Security
Policy that allows no script at all and loads nothing from the network.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exnihilo.errors import ExnihiloError
from exnihilo.outputs import check_output, write_text_atomic
from exnihilo.report.html import COLORS, CSS, esc, line_chart_svg

METRICS = "metrics.jsonl"
RUN_INFO = "exnihilo_run.json"  # as exnihilo.train.run (not imported: that pulls in torch)
RUN_CONFIG = "run_config.json"

# The charts every run gets, in this order, then one per other numeric metric.
MAIN_CURVES = (("loss", "training loss"), ("val_loss", "validation loss"),
               ("lr", "learning rate"))
EXTRA_CURVES = (("trained_tokens_per_s", "trained tokens/s"), ("grad_norm", "gradient norm"))
# Running totals and the x-axis itself: tables, not curves.
NOT_CURVES = {"step", "epoch", "trained_tokens", "positions", "train_seconds"}
RUN_CSS = "table.config td{font-size:12px;max-width:560px;word-break:break-word}"


@dataclass
class RunData:
    name: str
    folder: Path
    rows: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] | None = None  # exnihilo_run.json: the run finished


def is_run_folder(path: str | Path) -> bool:
    """A folder that a training run wrote (metrics or its config files)."""
    path = Path(path)
    return path.is_dir() and any((path / name).is_file()
                                 for name in (METRICS, RUN_INFO, RUN_CONFIG))


def read_metric_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl. A last line without its newline that does not parse is
    the step being written right now (the run is live) and is left out; any other bad line
    is an error naming it."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    rows = []
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if lineno == len(lines):  # no newline after it: torn tail of a live run
                break
            raise ExnihiloError(f"{path}:{lineno}: not a metrics line ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise ExnihiloError(f"{path}:{lineno}: not a metrics line (no integer step)")
        rows.append(row)
    return rows


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExnihiloError(f"{path}: unreadable ({e})") from None
    return obj if isinstance(obj, dict) else None


def read_run(folder: str | Path, name: str | None = None) -> RunData:
    """Metrics, config and (if finished) run info of one run folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExnihiloError(f"{folder}: not a folder (a run report reads a training run's "
                            f"output folder)")
    metrics = folder / METRICS
    if not metrics.is_file():
        raise ExnihiloError(f"{folder}: no {METRICS} (not a training run folder, or the run "
                            f"has not finished a step yet)")
    rows = read_metric_rows(metrics)
    if not rows:
        raise ExnihiloError(f"{metrics}: no metrics yet (the run has not finished a step)")
    info = _read_json(folder / RUN_INFO)
    config = (info or {}).get("config") or _read_json(folder / RUN_CONFIG) or {}
    return RunData(name=name or folder.name, folder=folder, rows=rows, config=config,
                   info=info)


def curve(rows: Sequence[dict[str, Any]], key: str) -> list[tuple[float, float | None]]:
    """(step, value) for every row that has `key`; a non-number value is a gap (None)."""
    out = []
    for row in rows:
        if key in row:
            value = row[key]
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            out.append((float(row["step"]), float(value) if ok else None))
    return out


def curve_keys(runs: Sequence[RunData]) -> list[tuple[str, str]]:
    """(metric key, chart title): the main three always, then tokens/s and gradient norm
    where logged, then every other numeric metric (objective metrics, their val_ twins,
    MFU) in name order."""
    seen = {k for run in runs for row in run.rows for k, v in row.items()
            if isinstance(v, int | float) and not isinstance(v, bool)}
    fixed = {k for k, _ in MAIN_CURVES + EXTRA_CURVES}
    keys = list(MAIN_CURVES) + [(k, t) for k, t in EXTRA_CURVES if k in seen]
    keys += [(k, k.replace("_", " ")) for k in sorted(seen - fixed - NOT_CURVES)]
    return keys


def _number(value: Any, spec: str = ".4g") -> str:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return format(value, spec)
    return "–"


def final_metrics(run: RunData) -> dict[str, str]:
    """What the run ended at, formatted for the table."""
    last = run.rows[-1]
    vals = [(r["step"], r["val_loss"]) for r in run.rows
            if isinstance(r.get("val_loss"), int | float)]
    best = min(vals, key=lambda sv: sv[1]) if vals else None
    recent = [r["loss"] for r in run.rows[-10:] if isinstance(r.get("loss"), int | float)]
    return {
        "status": "finished" if run.info is not None else "unfinished",
        "steps": str(last["step"]),
        "final training loss": _number(last.get("loss")),
        "mean training loss, last 10 steps": _number(sum(recent) / len(recent)
                                                     if recent else None),
        "final validation loss": _number(vals[-1][1] if vals else None),
        "best validation loss": (f"{_number(best[1])} (step {best[0]})" if best else "–"),
        "final learning rate": _number(last.get("lr"), ".3g"),
        "trained tokens": _number(last.get("trained_tokens"), ",.0f"),
        "training seconds": _number(last.get("train_seconds"), ",.1f"),
        "trained tokens/s": _number(last.get("trained_tokens_per_s"), ",.0f"),
    }


def _table(runs: Sequence[RunData], rows: Sequence[tuple[str, list[str]]], cls: str) -> str:
    head = "".join(f'<th><span class="swatch" style="background:{COLORS[i % len(COLORS)]}">'
                   f'</span>{esc(run.name)}</th>' for i, run in enumerate(runs))
    body = "".join(f"<tr><th>{esc(label)}</th>" + "".join(f"<td>{esc(v)}</td>" for v in values)
                   + "</tr>" for label, values in rows)
    return f'<table class="{cls}"><tr><th></th>{head}</tr>{body}</table>'


def _config_value(value: Any) -> str:
    if value is None:
        return "–"
    return value if isinstance(value, str) else json.dumps(value)


def config_rows(runs: Sequence[RunData]) -> list[tuple[str, list[str]]]:
    """One row per setting any run has (what was trained from, then the config keys)."""
    infos = [run.info or {} for run in runs]
    rows = [(label, [_config_value(info.get(key)) for info in infos])
            for key, label in (("kind", "method"), ("base_model", "base model"),
                               ("style", "prompt style"))
            if any(info.get(key) is not None for info in infos)]
    keys = sorted({k for run in runs for k in run.config})
    rows += [(k, ["" if k not in run.config else _config_value(run.config[k]) for run in runs])
             for k in keys]
    return rows


def render_run_report(runs: Sequence[RunData], title: str) -> str:
    """The whole page as one string."""
    steps = [row["step"] for run in runs for row in run.rows]
    x_range = (min(steps), max(steps))  # every chart on the same step axis
    charts = [line_chart_svg(chart_title, [(run.name, curve(run.rows, key)) for run in runs],
                             x_range=x_range)
              for key, chart_title in curve_keys(runs)]
    legend = "".join(f'<span><span class="swatch" style="background:'
                     f'{COLORS[i % len(COLORS)]}"></span>{esc(run.name)} '
                     f'<span class="val">({esc(run.folder)})</span></span>'
                     for i, run in enumerate(runs))
    finals = [final_metrics(run) for run in runs]
    final_rows = [(label, [f[label] for f in finals]) for label in finals[0]]
    csp = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{esc(csp)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title><style>{CSS}{RUN_CSS}</style></head>
<body>
<h1>{esc(title)}</h1>
<div class="legend">{legend}</div>
<h2>Final metrics</h2>
{_table(runs, final_rows, "counts")}
<h2>Curves (against the optimizer step)</h2>
<div class="grid">{''.join(f'<div>{c}</div>' for c in charts)}</div>
<h2>Configuration</h2>
{_table(runs, config_rows(runs), "config")}
</body></html>
"""


def _run_names(folders: Sequence[Path]) -> list[str]:
    """Folder names, or full paths where two names collide."""
    names = [f.resolve().name or str(f) for f in folders]
    return [n if names.count(n) == 1 else str(f) for n, f in zip(names, folders, strict=True)]


def write_run_report(folders: Sequence[str | Path], output: str | Path,
                     title: str | None = None) -> list[RunData]:
    """Read each run folder, render the curves page, write it atomically; returns the runs."""
    paths = [Path(f) for f in folders]
    if not paths:
        raise ExnihiloError("report: give at least one run folder")
    twice = [p for i, p in enumerate(paths) if p.resolve() in {q.resolve() for q in paths[:i]}]
    if twice:
        raise ExnihiloError(f"report: run folder {twice[0]} given twice")
    output = Path(output)
    check_output(output, [p / METRICS for p in paths])
    runs = [read_run(p, name) for p, name in zip(paths, _run_names(paths), strict=True)]
    page = render_run_report(runs, title or "exnihilo training report: "
                             + " vs ".join(r.name for r in runs))
    write_text_atomic(output, page)
    return runs
