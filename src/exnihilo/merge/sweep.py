"""WARP's η sweep, measured: for each interpolated model, how much reward it keeps and how
far it moved from the initialization (Ramé et al., arXiv 2406.16768, plot reward against
KL to the init and pick η on that Pareto front).

On held-out preference pairs (any format `train dpo` reads):
- reward: the implicit reward of the η model against the init, r(y) = log π_η(y|x) −
  log π_init(y|x) summed over the response; reported as the mean margin
  r(chosen) − r(rejected) and the share of pairs with a positive margin (reward accuracy).
  This is the reward the preference training optimized, read off the held-out pairs; a
  verifiable score (IFEval) needs generation per η and is the experiments' job.
- KL to the init: KL(π_η ‖ π_init) per response token on the chosen responses, through the
  shared chunked divergence (`train.forward.model_divergence`, reverse direction).

`sweep_report` draws reward against KL as an SVG line in a self-contained HTML page (the
same escaping and CSP as `exnihilo report`) beside a table.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import torch

from exnihilo.devices import model_device, to_device
from exnihilo.errors import ExnihiloError


def pair_logps(model: Any, pairs: list[Any], pad_id: int, batch_size: int = 8
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ log π(chosen), Σ log π(rejected)) per pair."""
    from exnihilo.train.dpo import pair_batches
    from exnihilo.train.forward import sequence_logprobs

    chosen, rejected = [], []
    with torch.inference_mode():
        for batch in pair_batches(pairs, list(range(len(pairs))), batch_size, pad_id):
            sums = sequence_logprobs(model, to_device(batch, model_device(model))).sums.cpu()
            half = len(sums) // 2
            chosen.append(sums[:half])
            rejected.append(sums[half:])
    return torch.cat(chosen), torch.cat(rejected)


def kl_to_init(model: Any, init: Any, pairs: list[Any], pad_id: int, batch_size: int = 8
               ) -> float:
    """Mean KL(π_model ‖ π_init) per chosen-response token."""
    from exnihilo.train.collate import collate_continuations
    from exnihilo.train.forward import model_divergence

    total, count = 0.0, 0
    with torch.inference_mode():
        for k in range(0, len(pairs), batch_size):
            rows = [(p.prompt, p.chosen) for p in pairs[k:k + batch_size]]
            batch = to_device(collate_continuations(rows, pad_id), model_device(model))
            values = model_divergence(model, init, batch, kind="reverse_kl")
            total += float(values.sum())
            count += len(values)
    return total / max(count, 1)


def sweep_table(init: str, folders: list[tuple[float, str]], pairs_path: str,
                style: str = "chat", limit: int | None = 64, max_length: int = 512
                ) -> list[dict[str, Any]]:
    """One row per η: reward margin, reward accuracy and KL to the init on held-out pairs."""
    from exnihilo.models import load_model, load_tokenizer
    from exnihilo.train.preference_data import read_preferences, tokenize_pairs

    tokenizer = load_tokenizer(init)
    records = read_preferences(pairs_path)[:limit]
    pairs = tokenize_pairs(records, style, tokenizer, max_length)
    if not pairs:
        raise ExnihiloError(f"{pairs_path}: no usable preference pairs to evaluate the sweep on")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    init_model = load_model(init).eval()
    init_chosen, init_rejected = pair_logps(init_model, pairs, pad)
    rows = []
    for eta, folder in folders:
        model = load_model(folder).eval()
        chosen, rejected = pair_logps(model, pairs, pad)
        margin = (chosen - init_chosen) - (rejected - init_rejected)
        rows.append({"eta": eta, "reward_margin": round(float(margin.mean()), 4),
                     "reward_accuracy": round(float((margin > 0).float().mean()), 4),
                     "kl_to_init": round(kl_to_init(model, init_model, pairs, pad), 6),
                     "pairs": len(pairs), "model": str(folder)})
        del model
    return rows


def _svg(rows: list[dict[str, Any]], width: int = 520, height: int = 320) -> str:
    """Reward margin (y) against KL to the init (x), points labelled with η."""
    pad = 48
    xs = [r["kl_to_init"] for r in rows]
    ys = [r["reward_margin"] for r in rows]
    x0, x1 = min(xs), max(xs) or 1.0
    y0, y1 = min(ys + [0.0]), max(ys + [0.0])
    span_x = (x1 - x0) or 1.0
    span_y = (y1 - y0) or 1.0

    def px(x: float) -> float:
        return pad + (x - x0) / span_x * (width - 2 * pad)

    def py(y: float) -> float:
        return height - pad - (y - y0) / span_y * (height - 2 * pad)

    points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys, strict=True))
    labels = [html.escape(format(r["eta"], "g")) for r in rows]
    marks = "".join(
        f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="4"/>'
        f'<text x="{px(x) + 6:.1f}" y="{py(y) - 6:.1f}">η={label}</text>'
        for x, y, label in zip(xs, ys, labels, strict=True))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'role="img" aria-label="reward against KL to the init">'
            f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" '
            f'stroke="#888"/><line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" '
            f'stroke="#888"/><polyline fill="none" stroke="#2563eb" points="{points}"/>'
            f'{marks}<text x="{width / 2:.0f}" y="{height - 10}" text-anchor="middle">'
            f'KL(π_η ‖ π_init) per token</text><text x="14" y="{height / 2:.0f}" '
            f'transform="rotate(-90 14 {height / 2:.0f})" text-anchor="middle">'
            f'reward margin (chosen − rejected)</text></svg>')


def sweep_report(rows: list[dict[str, Any]], out: str | Path) -> Path:
    """A self-contained HTML page: the plot and the table (every value escaped)."""
    from exnihilo.outputs import write_text_atomic

    head = ("<tr><th>η</th><th>reward margin</th><th>reward accuracy</th>"
            "<th>KL to init / token</th></tr>")
    body = "".join(
        f"<tr><td>{html.escape(format(r['eta'], 'g'))}</td>"
        f"<td>{r['reward_margin']:+.4f}</td>"
        f"<td>{100 * r['reward_accuracy']:.1f} %</td><td>{r['kl_to_init']:.6f}</td></tr>"
        for r in rows)
    page = ("<!doctype html><html><head><meta charset='utf-8'>"
            "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; "
            "style-src 'unsafe-inline'\"><title>WARP η sweep</title>"
            "<style>body{font-family:sans-serif;margin:2em}td,th{padding:4px 10px;"
            "text-align:right}circle{fill:#2563eb}text{font-size:12px}</style></head><body>"
            f"<h1>WARP η sweep</h1><p>{len(rows)} models, {rows[0]['pairs']} held-out pairs."
            f"</p>{_svg(rows)}<table>{head}{body}</table>"
            f"<script type='application/json' id='data'>"
            f"{html.escape(json.dumps(rows))}</script></body></html>")
    path = Path(out)
    write_text_atomic(path, page)
    return path
