"""Shared pieces of the pretraining / distillation / pruning experiments.

Corpora come from what every install has: the Python standard library's own documentation
(`exnihilo.synth.ingest.module_text`), one document per module, split into training and
held-out modules by fixed lists so no held-out text is ever trained on. The measure is
held-out perplexity over whole documents (each held-out module's text, cut into
documents of at most `seq_len` tokens, scored from an EOS like in training), with a 95%
bootstrap interval over documents and, between two arms, a paired bootstrap interval of
the difference (the same resampled documents for both).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from exnihilo.train.collate import collate_continuations  # noqa: E402
from exnihilo.train.forward import sequence_logprobs  # noqa: E402

TRAIN_MODULES = ["json", "pathlib", "textwrap", "itertools", "functools", "collections",
                 "csv", "string", "re", "datetime", "os", "shutil", "random", "statistics",
                 "argparse", "logging", "subprocess", "typing", "dataclasses", "enum",
                 "heapq", "bisect", "math", "decimal", "fractions", "calendar", "zipfile",
                 "tarfile", "gzip", "hashlib", "base64", "struct", "io", "tempfile", "glob",
                 "fnmatch", "difflib", "pprint", "copy", "operator", "contextlib", "abc",
                 "threading", "queue", "sched", "socket", "email.message", "urllib.parse",
                 "http.client", "html.parser", "xml.etree.ElementTree", "sqlite3", "pickle",
                 "shelve", "configparser", "uuid", "time", "locale", "gettext", "unittest"]
HELDOUT_MODULES = ["inspect", "asyncio.queues", "array", "codecs", "secrets", "weakref",
                   "ipaddress", "mimetypes", "numbers", "graphlib", "tomllib", "zlib"]


def threads(n: int = 1) -> None:
    """Pin torch (and BLAS) threads: on a shared 2-core machine one thread is fastest."""
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    os.environ.setdefault("EXNIHILO_NO_PROGRESS", "1")
    torch.set_num_threads(n)


def module_docs(modules: Sequence[str]) -> list[str]:
    from exnihilo.synth.ingest import module_text

    texts = []
    for name in modules:
        try:
            text = module_text(name)
        except Exception:  # a module missing on this Python: skip it, the list says which
            continue
        if text.strip():
            texts.append(text)
    return texts


def split_paragraph_docs(texts: Sequence[str], max_chars: int) -> list[str]:
    """Cut long module texts into documents of whole paragraphs, ≤ max_chars each."""
    docs = []
    for text in texts:
        current = ""
        for para in text.split("\n\n"):
            if current and len(current) + len(para) + 2 > max_chars:
                docs.append(current)
                current = ""
            current = f"{current}\n\n{para}" if current else para
        if current.strip():
            docs.append(current)
    return docs


def write_text_jsonl(path: Path, texts: Sequence[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------ measures

def document_nll(model: Any, tokenizer: Any, docs: Sequence[str], seq_len: int,
                 batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(summed NLL, token count) per held-out document: each scored alone from an EOS
    (as a document starts in training), truncated to seq_len tokens."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    rows = []
    for text in docs:
        ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        if ids:
            rows.append(([eos], ids[:seq_len]))
    sums, counts = [], []
    model.eval()
    with torch.no_grad():
        for k in range(0, len(rows), batch_size):
            out = sequence_logprobs(model, collate_continuations(rows[k:k + batch_size], pad))
            sums += (-out.sums).tolist()
            counts += out.counts.tolist()
    return np.asarray(sums), np.asarray(counts)


def perplexity(nll: np.ndarray, counts: np.ndarray) -> float:
    return math.exp(nll.sum() / counts.sum())


def bootstrap(nll: np.ndarray, counts: np.ndarray, n: int = 2000, seed: int = 0
              ) -> tuple[float, float]:
    """95% percentile interval of corpus perplexity, resampling documents."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(nll), size=(n, len(nll)))
    ppl = np.exp(nll[idx].sum(1) / counts[idx].sum(1))
    return float(np.percentile(ppl, 2.5)), float(np.percentile(ppl, 97.5))


def paired_difference(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray],
                      n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """ppl(a) − ppl(b) and its 95% paired bootstrap interval (same documents resampled)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a[0]), size=(n, len(a[0])))
    pa = np.exp(a[0][idx].sum(1) / a[1][idx].sum(1))
    pb = np.exp(b[0][idx].sum(1) / b[1][idx].sum(1))
    d = pa - pb
    return (perplexity(*a) - perplexity(*b), float(np.percentile(d, 2.5)),
            float(np.percentile(d, 97.5)))


def arm_row(name: str, scores: tuple[np.ndarray, np.ndarray], baseline: tuple | None,
            extra: dict[str, Any] | None = None) -> dict[str, Any]:
    lo, hi = bootstrap(*scores)
    row: dict[str, Any] = {"arm": name, "perplexity": perplexity(*scores), "ci95": [lo, hi],
                           "documents": int(len(scores[0])), "tokens": int(scores[1].sum())}
    if baseline is not None:
        d, dlo, dhi = paired_difference(scores, baseline)
        row["minus_baseline"] = d
        row["minus_baseline_ci95"] = [dlo, dhi]
    row.update(extra or {})
    return row


def markdown_table(rows: Sequence[dict[str, Any]], baseline_name: str) -> str:
    lines = [f"| arm | held-out ppl (95% CI) | Δ vs {baseline_name} (95% paired CI) | "
             f"train tokens | train s |", "|---|---|---|---|---|"]
    for r in rows:
        ci = f"{r['perplexity']:.1f} ({r['ci95'][0]:.1f}–{r['ci95'][1]:.1f})"
        delta = "–" if "minus_baseline" not in r else (
            f"{r['minus_baseline']:+.1f} ({r['minus_baseline_ci95'][0]:+.1f} to "
            f"{r['minus_baseline_ci95'][1]:+.1f})")
        tokens = r.get("trained_tokens")
        tokens = f"{int(tokens):,}" if tokens is not None else "–"
        seconds = f"{r['train_seconds']:.0f}" if r.get("train_seconds") is not None else "–"
        lines.append(f"| {r['arm']} | {ci} | {delta} | {tokens} | {seconds} |")
    return "\n".join(lines)


def save_results(out: Path, name: str, rows: Sequence[dict[str, Any]], settings: dict,
                 baseline_name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows, baseline_name)
    (out / "results.json").write_text(json.dumps({"experiment": name, "settings": settings,
                                                  "arms": list(rows)}, indent=2))
    (out / "results.md").write_text(f"# {name}\n\n{table}\n\nsettings: "
                                    f"`{json.dumps(settings)}`\n")
    print(table)


# ------------------------------------------------------------------- accuracy measures

def accuracy_row(name: str, correct: np.ndarray, baseline: np.ndarray | None,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Accuracy over items (`correct` is 0/1 per item) with its 95% bootstrap interval and,
    given the baseline arm's `correct` on the same items, the paired difference."""
    from exnihilo.evaluate.stats import bootstrap_interval

    correct = np.asarray(correct, dtype=float)
    lo, hi = bootstrap_interval(correct)
    row: dict[str, Any] = {"arm": name, "accuracy": float(correct.mean()), "ci95": [lo, hi],
                           "items": int(len(correct))}
    if baseline is not None:
        # Paired: resampling items is resampling the per-item differences.
        diff = correct - np.asarray(baseline, dtype=float)
        row["minus_baseline"] = float(diff.mean())
        row["minus_baseline_ci95"] = list(bootstrap_interval(diff))
    row.update(extra or {})
    return row


def accuracy_table(rows: Sequence[dict[str, Any]], baseline_name: str) -> str:
    lines = [f"| arm | accuracy % (95% CI) | Δ vs {baseline_name}, points (95% paired CI) | "
             f"per-token acc % | items |", "|---|---|---|---|---|"]
    for r in rows:
        acc = f"{100 * r['accuracy']:.1f} ({100 * r['ci95'][0]:.1f}–{100 * r['ci95'][1]:.1f})"
        delta = "–" if "minus_baseline" not in r else (
            f"{100 * r['minus_baseline']:+.1f} ({100 * r['minus_baseline_ci95'][0]:+.1f} to "
            f"{100 * r['minus_baseline_ci95'][1]:+.1f})")
        norm = (f"{100 * r['accuracy_per_token']:.1f}"
                if r.get("accuracy_per_token") is not None else "–")
        lines.append(f"| {r['arm']} | {acc} | {delta} | {norm} | {r['items']} |")
    return "\n".join(lines)


def save_sections(out: Path, name: str, sections: Sequence[tuple[str, str, list[dict]]],
                  settings: dict) -> None:
    """results.json ({section key: rows}) and results.md (one titled table per section),
    each written atomically. `sections`: (key, "title\\n\\ntable", rows)."""
    out.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {"experiment": name, "settings": settings}
    data.update({key: list(rows) for key, _, rows in sections})
    body = "\n\n".join(text for _, text, _ in sections)
    for target, text in ((out / "results.json", json.dumps(data, indent=2)),
                         (out / "results.md", f"# {name}\n\n{body}\n\nsettings: "
                                              f"`{json.dumps(settings)}`\n")):
        tmp = target.with_suffix(target.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, target)
    print(body)
