"""One self-contained HTML report for one or more datasets (and the chart code that
`exnihilo.report.run` reuses for training curves).

Counts, histograms of quality / difficulty / category / lengths / min-neighbour distance /
score, side by side for 2+ datasets as percentages of each dataset (like the Magpie paper's
Air vs Pro plots, arXiv 2406.08464), and a searchable sample table.

Safety: every piece of text that comes from data (instructions, responses, ids, tag values,
file names) goes through `esc` (html.escape with quotes) before it touches the page, so an
instruction `<script>…</script>` shows as text. As a second wall the page carries a Content
Security Policy that loads nothing from the network and lets only our own inline script run
(by its sha256 hash), so even a missed escape could not run injected script or fetch anything.

The charts are inline SVG written here: a plotting library would either need network assets
at view time (JS charting) or add a heavy dependency for a few bar charts (matplotlib).
"""

from __future__ import annotations

import base64
import hashlib
import html
import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from exnihilo.errors import ExnihiloError
from exnihilo.fields import instruction_of, response_of, tags_of
from exnihilo.outputs import check_output, write_text_atomic
from exnihilo.records import Record, read_any
from exnihilo.vocab import CATEGORIES, DIFFICULTY_LEVELS, QUALITY_LEVELS

COLORS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2", "#edc948")
NULL_LABEL = "unreadable"   # the judge answered but the tag could not be parsed
UNTAGGED_LABEL = "untagged"  # the record was never tagged


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


# ----------------------------------------------------------------------------------- stats

@dataclass
class DatasetStats:
    name: str
    records: int
    quality: Counter = field(default_factory=Counter)
    difficulty: Counter = field(default_factory=Counter)
    category: Counter = field(default_factory=Counter)
    instruction_words: list[int] = field(default_factory=list)
    response_words: list[int] = field(default_factory=list)
    min_neighbor_distance: list[float] = field(default_factory=list)
    score: list[float] = field(default_factory=list)
    samples: list[Record] = field(default_factory=list)


def _tag_label(tags: dict, key: str) -> str:
    if key not in tags:
        return UNTAGGED_LABEL
    value = tags[key]
    return NULL_LABEL if value is None else str(value)


def dataset_stats(name: str, records: Sequence[Record], samples: int = 100,
                  seed: int = 0) -> DatasetStats:
    stats = DatasetStats(name=name, records=len(records))
    for record in records:
        tags = tags_of(record)
        stats.quality[_tag_label(tags, "quality")] += 1
        stats.difficulty[_tag_label(tags, "difficulty")] += 1
        stats.category[_tag_label(tags, "category")] += 1
        stats.instruction_words.append(len((instruction_of(record) or "").split()))
        response = response_of(record)
        if response is not None:
            stats.response_words.append(len(response.split()))
        for key, values in (("min_neighbor_distance", stats.min_neighbor_distance),
                            ("score", stats.score)):
            value = tags.get(key)
            if isinstance(value, int | float) and math.isfinite(value):
                values.append(float(value))
    picked = sorted(random.Random(seed).sample(range(len(records)), min(samples, len(records))))
    stats.samples = [records[i] for i in picked]
    return stats


# ----------------------------------------------------------------------------------- charts

def _pct(count: int, total: int) -> float:
    return 100.0 * count / total if total else 0.0


def bar_chart_svg(title: str, labels: Sequence[str],
                  series: Sequence[tuple[str, Counter, int]]) -> str:
    """Horizontal grouped bars: one row per label, one bar per dataset (share of records)."""
    bar_h, gap, left, right, top = 12, 8, 150, 70, 28
    width = 620
    row_h = bar_h * len(series) + gap
    height = top + row_h * len(labels) + 10
    plot_w = width - left - right
    peak = max([_pct(c[label], total) for _, c, total in series for label in labels] + [1e-9])
    parts = [f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" width="{width}" '
             f'height="{height}" xmlns="http://www.w3.org/2000/svg">',
             f'<title>{esc(title)}</title>',
             f'<text x="0" y="16" class="ctitle">{esc(title)}</text>']
    for row, label in enumerate(labels):
        y0 = top + row * row_h
        parts.append(f'<text x="{left - 6}" y="{y0 + row_h / 2}" class="lbl" '
                     f'text-anchor="end" dominant-baseline="middle">{esc(label)}</text>')
        for s, (name, counts, total) in enumerate(series):
            pct = _pct(counts[label], total)
            w = plot_w * pct / peak
            y = y0 + s * bar_h
            parts.append(
                f'<rect class="bar" x="{left}" y="{y}" width="{w:.1f}" height="{bar_h - 2}" '
                f'fill="{COLORS[s % len(COLORS)]}"><title>{esc(name)} · {esc(label)}: '
                f'{counts[label]:,} ({pct:.1f}%)</title></rect>'
                f'<text x="{left + w + 4:.1f}" y="{y + bar_h / 2}" class="val" '
                f'dominant-baseline="middle">{pct:.1f}%</text>')
    parts.append("</svg>")
    return "".join(parts)


def _bin_edges(values: Sequence[float], bins: int, integer: bool) -> list[float]:
    """Shared edges from 0 to the 99th percentile of all values (the last bin takes the tail),
    so one outlier does not squash the plot."""
    ordered = sorted(values)
    high = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else 1.0
    low = min(0.0, ordered[0]) if ordered else 0.0
    high = high if high > low else low + 1.0
    step = (high - low) / bins
    if integer:  # whole-number edges for counts such as words
        step = float(max(1, math.ceil(step)))
    return [low + i * step for i in range(bins + 1)]


def _histogram(values: Sequence[float], edges: Sequence[float]) -> list[int]:
    counts = [0] * (len(edges) - 1)
    step = edges[1] - edges[0]
    for v in values:
        counts[min(max(int((v - edges[0]) // step), 0), len(counts) - 1)] += 1
    return counts


def histogram_svg(title: str, series: Sequence[tuple[str, Sequence[float]]], bins: int = 20,
                  integer: bool = False) -> str:
    """Vertical histogram with shared bins; datasets side by side within each bin (share of
    each dataset's values, so datasets of different sizes compare)."""
    width, height, left, bottom, top, right = 620, 230, 44, 34, 28, 10
    all_values = [v for _, values in series for v in values]
    if not all_values:
        return (f'<svg class="chart empty" viewBox="0 0 {width} 40" width="{width}" '
                f'height="40" xmlns="http://www.w3.org/2000/svg"><text x="0" y="16" '
                f'class="ctitle">{esc(title)}: no values</text></svg>')
    edges = _bin_edges(all_values, bins, integer)
    shares = []
    for _, values in series:
        counts = _histogram(values, edges)
        shares.append([_pct(c, len(values)) for c in counts])
    peak = max(max(s) for s in shares) or 1.0
    plot_w, plot_h = width - left - right, height - top - bottom
    bin_w = plot_w / bins
    bar_w = max((bin_w - 2) / len(series), 1.0)
    parts = [f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" width="{width}" '
             f'height="{height}" xmlns="http://www.w3.org/2000/svg">',
             f'<title>{esc(title)}</title>',
             f'<text x="0" y="16" class="ctitle">{esc(title)}</text>',
             f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" '
             f'class="axis"/>']
    for tick in (0.0, peak / 2, peak):
        y = top + plot_h - plot_h * tick / peak
        parts.append(f'<text x="{left - 4}" y="{y:.1f}" class="val" text-anchor="end" '
                     f'dominant-baseline="middle">{tick:.0f}%</text>')
    for s, (name, _) in enumerate(series):
        for b, share in enumerate(shares[s]):
            h = plot_h * share / peak
            x = left + b * bin_w + 1 + s * bar_w
            hi = "+" if b == bins - 1 else f"{edges[b + 1]:.3g}"
            parts.append(f'<rect class="bar" x="{x:.1f}" y="{top + plot_h - h:.1f}" '
                         f'width="{bar_w:.1f}" height="{h:.1f}" fill="{COLORS[s % len(COLORS)]}">'
                         f'<title>{esc(name)} · [{edges[b]:.3g}, {hi}): {share:.1f}%</title>'
                         f'</rect>')
    for b in range(0, bins + 1, max(bins // 5, 1)):
        x = left + b * bin_w
        label = f"{edges[b]:.3g}" + ("+" if b == bins else "")
        parts.append(f'<text x="{x:.1f}" y="{top + plot_h + 14}" class="val" '
                     f'text-anchor="middle">{esc(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


Point = tuple[float, float | None]  # (x, y); y None or NaN leaves a gap in the line


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) \
        and math.isfinite(value)


def _span(values: Sequence[float]) -> tuple[float, float]:
    """(low, high) of the values; a single value gets a unit-wide (or ±5%) span around it so
    it still has a place on the axis."""
    low, high = min(values), max(values)
    if high > low:
        return low, high
    pad = abs(low) * 0.05 or 0.5
    return low - pad, high + pad


def line_segments(points: Sequence[Point]) -> list[list[tuple[float, float]]]:
    """Runs of consecutive drawable points: a None / NaN / infinite y (or x) ends a run, so
    the line shows the gap instead of bridging it."""
    segments: list[list[tuple[float, float]]] = [[]]
    for x, y in points:
        if _finite(x) and _finite(y):
            segments[-1].append((float(x), float(y)))  # type: ignore[arg-type]
        elif segments[-1]:
            segments.append([])
    return [seg for seg in segments if seg]


def line_chart_svg(title: str, series: Sequence[tuple[str, Sequence[Point]]],
                   x_label: str = "step", markers_up_to: int = 100,
                   x_range: tuple[float, float] | None = None) -> str:
    """Lines of y against x, one per series, on shared linear axes spanning the drawable
    points exactly (lowest value on the bottom edge, highest on the top; `x_range` fixes the
    x-axis instead, so charts of one run line up step for step). Each series is one
    `<path class="line">` (a new `M` after each gap); series with at most `markers_up_to`
    points also get a dot per point whose tooltip gives the value."""
    width, height, left, bottom, top, right = 620, 230, 64, 34, 28, 14
    drawn = [(name, line_segments(points)) for name, points in series]
    xs = [x for _, segs in drawn for seg in segs for x, _ in seg]
    ys = [y for _, segs in drawn for seg in segs for _, y in seg]
    if not xs:
        return (f'<svg class="chart empty" viewBox="0 0 {width} 40" width="{width}" '
                f'height="40" xmlns="http://www.w3.org/2000/svg"><title>{esc(title)}</title>'
                f'<text x="0" y="16" class="ctitle">{esc(title)}: no values</text></svg>')
    (x_lo, x_hi), (y_lo, y_hi) = _span(list(x_range) if x_range else xs), _span(ys)
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + plot_w * (x - x_lo) / (x_hi - x_lo)

    def py(y: float) -> float:
        return top + plot_h - plot_h * (y - y_lo) / (y_hi - y_lo)

    parts = [f'<svg class="chart line-chart" role="img" viewBox="0 0 {width} {height}" '
             f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
             f'<title>{esc(title)}</title>',
             f'<text x="0" y="16" class="ctitle">{esc(title)}</text>',
             f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" '
             f'class="axis"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" class="axis"/>']
    for tick in (y_lo, (y_lo + y_hi) / 2, y_hi):
        parts.append(f'<text x="{left - 4}" y="{py(tick):.1f}" class="val" text-anchor="end" '
                     f'dominant-baseline="middle">{tick:.3g}</text>')
    x_ticks = [x_lo + (x_hi - x_lo) * i / 4 for i in range(5)]
    whole = all(float(x).is_integer() for x in xs) and x_hi - x_lo >= 4
    if whole:  # steps: whole-number ticks, written out (12,000 rather than 1.2e+04)
        x_ticks = sorted({float(round(t)) for t in x_ticks})
    for tick in x_ticks:
        label = f"{tick:,.0f}" if whole else f"{tick:.4g}"
        parts.append(f'<text x="{px(tick):.1f}" y="{top + plot_h + 14}" class="val" '
                     f'text-anchor="middle">{label}</text>')
    parts.append(f'<text x="{left + plot_w}" y="{height - 4}" class="val" '
                 f'text-anchor="end">{esc(x_label)}</text>')
    for s, (name, segments) in enumerate(drawn):
        color = COLORS[s % len(COLORS)]
        path = " ".join("M " + " L ".join(f"{px(x):.2f} {py(y):.2f}" for x, y in seg)
                        for seg in segments)
        if path:
            parts.append(f'<path class="line" data-series="{esc(name)}" d="{path}" '
                         f'fill="none" stroke="{color}" stroke-width="1.5">'
                         f'<title>{esc(name)}</title></path>')
        points = [p for seg in segments for p in seg]
        if 0 < len(points) <= markers_up_to:
            parts.extend(f'<circle class="dot" cx="{px(x):.2f}" cy="{py(y):.2f}" r="2.5" '
                         f'fill="{color}"><title>{esc(name)} · {esc(x_label)} {x:g}: '
                         f'{y:.6g}</title></circle>' for x, y in points)
    parts.append("</svg>")
    return "".join(parts)


# ----------------------------------------------------------------------------------- page

def _ordered_labels(counters: Sequence[Counter], known: Sequence[str]) -> list[str]:
    """Every known label in its order (zero bars too, so datasets line up), then any others
    seen, then unreadable / untagged."""
    seen = set().union(*counters) if counters else set()
    extra = sorted(seen - set(known) - {NULL_LABEL, UNTAGGED_LABEL})
    tail = [label for label in (NULL_LABEL, UNTAGGED_LABEL) if label in seen]
    return [*known, *extra, *tail]


def _median(values: Sequence[float]) -> str:
    if not values:
        return "–"
    ordered = sorted(values)
    mid = len(ordered) // 2
    value = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    return f"{value:.3g}"


def counts_table(stats: Sequence[DatasetStats]) -> str:
    rows = [("records", lambda s: f"{s.records:,}"),
            ("tagged (quality)", lambda s: f"{s.records - s.quality[UNTAGGED_LABEL]:,}"),
            ("unreadable quality tags", lambda s: f"{s.quality[NULL_LABEL]:,}"),
            ("median instruction words", lambda s: _median(s.instruction_words)),
            ("median response words", lambda s: _median(s.response_words)),
            ("median min-neighbour distance", lambda s: _median(s.min_neighbor_distance)),
            ("median score", lambda s: _median(s.score))]
    head = "".join(f'<th><span class="swatch" style="background:{COLORS[i % len(COLORS)]}">'
                   f'</span>{esc(s.name)}</th>' for i, s in enumerate(stats))
    body = "".join(f"<tr><th>{esc(label)}</th>" + "".join(f"<td>{esc(get(s))}</td>"
                                                          for s in stats) + "</tr>"
                   for label, get in rows)
    return f'<table class="counts"><tr><th></th>{head}</tr>{body}</table>'


def _clip(text: str | None, limit: int) -> str:
    if text is None:
        return ""
    return text if len(text) <= limit else text[:limit] + "…"


def sample_table(stats: Sequence[DatasetStats], clip: int = 400) -> str:
    head = ("<tr><th>dataset</th><th>quality</th><th>difficulty</th><th>category</th>"
            "<th>score</th><th>min dist</th><th>instruction</th><th>response</th></tr>")
    rows = []
    for s in stats:
        for record in s.samples:
            tags = tags_of(record)
            cells = [s.name, tags.get("quality", ""), tags.get("difficulty", ""),
                     tags.get("category", ""), tags.get("score", ""),
                     tags.get("min_neighbor_distance", ""),
                     _clip(instruction_of(record), clip), _clip(response_of(record), clip)]
            rows.append('<tr class="sample">' + "".join(
                f"<td>{esc('' if c is None else c)}</td>" for c in cells) + "</tr>")
    return (f'<table id="samples" class="samples"><thead>{head}</thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


# Our only script: filters the sample table as the user types; the query can also come from
# the URL (#q=...), which makes searches shareable and testable in a headless browser.
SEARCH_JS = """
(function () {
  var box = document.getElementById('search');
  var rows = document.querySelectorAll('#samples tr.sample');
  var shown = document.getElementById('shown');
  function apply() {
    var q = box.value.toLowerCase(), n = 0;
    rows.forEach(function (row) {
      var hit = row.textContent.toLowerCase().indexOf(q) !== -1;
      row.style.display = hit ? '' : 'none';
      if (hit) { n += 1; }
    });
    shown.textContent = n + ' of ' + rows.length + ' shown';
  }
  var m = /^#q=(.*)$/.exec(location.hash);
  if (m) { box.value = decodeURIComponent(m[1]); }
  box.addEventListener('input', apply);
  apply();
  document.body.setAttribute('data-ready', '1');
})();
"""

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#222}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:28px 0 8px}
.legend span{margin-right:16px} .swatch{display:inline-block;width:10px;height:10px;
margin-right:6px;border-radius:2px}
.grid{display:flex;flex-wrap:wrap;gap:18px}
.chart{max-width:100%;height:auto;background:#fafafa;border:1px solid #eee;border-radius:4px}
.ctitle{font-weight:600;font-size:13px} .lbl{font-size:12px} .val{font-size:10px;fill:#555}
.axis{stroke:#999} .dot{stroke:#fff;stroke-width:.5}
table{border-collapse:collapse} td,th{border-bottom:1px solid #eee;padding:4px 8px;
text-align:left;vertical-align:top}
table.counts td{text-align:right}
table.samples td{max-width:420px;white-space:pre-wrap;word-break:break-word;font-size:12px}
#search{padding:6px;width:320px;margin-bottom:8px}
"""


def render_report(stats: Sequence[DatasetStats], title: str = "exnihilo dataset report") -> str:
    """The whole page as one string."""
    series = lambda attr: [(s.name, getattr(s, attr), s.records) for s in stats]  # noqa: E731
    categorical = [
        ("input quality", "quality", QUALITY_LEVELS),
        ("difficulty", "difficulty", DIFFICULTY_LEVELS),
        ("task category", "category", CATEGORIES),
    ]
    charts = []
    for chart_title, attr, known in categorical:
        labels = _ordered_labels([getattr(s, attr) for s in stats], known)
        charts.append(bar_chart_svg(chart_title, labels, series(attr)))
    for chart_title, attr, integer in (("instruction length (words)", "instruction_words", True),
                                       ("response length (words)", "response_words", True),
                                       ("min-neighbour distance (cosine)",
                                        "min_neighbor_distance", False),
                                       ("response score (0–100)", "score", False)):
        charts.append(histogram_svg(chart_title, [(s.name, getattr(s, attr)) for s in stats],
                                    integer=integer))
    legend = "".join(f'<span><span class="swatch" style="background:'
                     f'{COLORS[i % len(COLORS)]}"></span>{esc(s.name)}</span>'
                     for i, s in enumerate(stats))
    script_hash = base64.b64encode(hashlib.sha256(SEARCH_JS.encode()).digest()).decode()
    csp = (f"default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
           f"script-src 'sha256-{script_hash}'")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{esc(csp)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title><style>{CSS}</style></head>
<body>
<h1>{esc(title)}</h1>
<div class="legend">{legend}</div>
<h2>Counts</h2>
{counts_table(stats)}
<h2>Distributions (share of each dataset's records)</h2>
<div class="grid">{''.join(f'<div>{c}</div>' for c in charts)}</div>
<h2>Samples</h2>
<input id="search" type="search" placeholder="search instructions, responses, tags…"
 aria-label="search samples"> <span id="shown"></span>
{sample_table(stats)}
<script>{SEARCH_JS}</script>
</body></html>
"""


def _dataset_names(paths: Sequence[Path]) -> list[str]:
    """File stems, or full paths where two stems collide."""
    stems = [p.stem for p in paths]
    return [stem if stems.count(stem) == 1 else str(path) for stem, path in zip(stems, paths,
                                                                                strict=True)]


def write_report(inputs: Sequence[str | Path], output: str | Path, samples: int = 100,
                 title: str | None = None) -> list[DatasetStats]:
    """Read each dataset, render the page, write it atomically; returns the stats."""
    paths = [Path(p) for p in inputs]
    if not paths:
        raise ExnihiloError("report: give at least one dataset file")
    output = Path(output)
    check_output(output, paths)  # never the dataset itself: HTML over data loses it
    stats = []
    for path, name in zip(paths, _dataset_names(paths), strict=True):
        records = read_any(path)
        if not records:
            raise ExnihiloError(f"{path}: no records (empty file)")
        stats.append(dataset_stats(name, records, samples))
    page = render_report(stats, title or "exnihilo report: " + " vs ".join(s.name for s in stats))
    write_text_atomic(output, page)
    return stats
