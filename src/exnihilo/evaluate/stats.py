"""The statistics evaluation reports: separation (AUC), intervals (bootstrap), agreement
between judges (Cohen's κ, Krippendorff's α, Spearman's ρ) and a one-feature logistic
regression (length-controlled win rate).

Why not scipy / scikit-learn / `krippendorff`: none is a core dependency, and each of these
is a few lines of numpy whose definition a reader can check against the formula in the
docstring. The tests cross-check them against hand-computed values (and scipy/sklearn where
installed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def auc(positives: Sequence[float], negatives: Sequence[float]) -> float | None:
    """Area under the ROC curve: P(a positive scores above a negative), ties counting half
    (the Mann–Whitney U statistic / (n_pos · n_neg)). 1 separates perfectly, 0.5 is chance,
    below 0.5 ranks backwards."""
    if not positives or not negatives:
        return None
    pos = np.asarray(positives, dtype=float)[:, None]
    neg = np.asarray(negatives, dtype=float)[None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))


def bootstrap_interval(values: Sequence[float], n_boot: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float | None, float | None]:
    """Percentile bootstrap interval of the mean: resample `values` with replacement
    `n_boot` times (seeded), take the (1-level)/2 and (1+level)/2 quantiles of the means.
    `values` may be a list or a numpy array."""
    if len(values) == 0:
        return None, None
    data = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(n_boot, len(data)))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def cohen_kappa(first: Sequence[str], second: Sequence[str]) -> float | None:
    """Cohen's κ of two raters' labels on the same items: (p_o − p_e) / (1 − p_e), p_o the
    observed agreement, p_e the agreement expected from each rater's label frequencies.
    None when undefined (no items, or both raters always give the one same label)."""
    if len(first) != len(second):
        raise ValueError("both raters must label the same items")
    n = len(first)
    if n == 0:
        return None
    observed = sum(a == b for a, b in zip(first, second, strict=True)) / n
    labels = set(first) | set(second)
    expected = sum((list(first).count(k) / n) * (list(second).count(k) / n) for k in labels)
    if expected >= 1:
        return None
    return (observed - expected) / (1 - expected)


def krippendorff_alpha_interval(ratings: Sequence[Sequence[float | None]]) -> float | None:
    """Krippendorff's α for interval data; `ratings[rater][unit]`, None where missing.

    α = 1 − D_o / D_e over the units rated at least twice: D_o = Σ_u Σ_{i≠j∈u}
    (v_i − v_j)² / (m_u − 1) / n (disagreement within units, m_u values in unit u, n values
    in all), D_e = Σ_{i≠j} (v_i − v_j)² / (n (n − 1)) over all those values pooled
    (disagreement expected by chance)."""
    units = list(zip(*ratings, strict=True)) if ratings else []
    values_by_unit = [[float(v) for v in unit if v is not None] for unit in units]
    pairable = [vs for vs in values_by_unit if len(vs) >= 2]
    pooled = np.asarray([v for vs in pairable for v in vs])
    n = pooled.size
    if n < 2:
        return None
    observed = sum(float(((np.asarray(vs)[:, None] - np.asarray(vs)[None, :]) ** 2).sum())
                   / (len(vs) - 1) for vs in pairable) / n
    expected = float(((pooled[:, None] - pooled[None, :]) ** 2).sum()) / (n * (n - 1))
    if expected == 0:
        return None
    return 1 - observed / expected


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing their average rank."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    sorted_vals = values[order]
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and sorted_vals[j + 1] == sorted_vals[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(first: Sequence[float], second: Sequence[float]) -> float | None:
    """Spearman's ρ: the Pearson correlation of the two lists' (average-tie) ranks. None
    when fewer than two pairs or a list is constant."""
    if len(first) != len(second):
        raise ValueError("both lists must score the same items")
    if len(first) < 2:
        return None
    a, b = _ranks(np.asarray(first, float)), _ranks(np.asarray(second, float))
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return None if denom == 0 else float((a * b).sum() / denom)


def logistic_fit(x: Sequence[float], y: Sequence[float], ridge: float = 1e-4,
                 iterations: int = 100) -> tuple[float, float]:
    """(intercept, slope) of P(y=1 | x) = σ(b0 + b1·x) by Newton's method (IRLS).

    `y` may be fractional (a tie is 0.5: the Bernoulli likelihood with a soft label). A
    small ridge penalty on the slope keeps it finite when x separates the outcomes."""
    xs, ys = np.asarray(x, float), np.asarray(y, float)
    design = np.stack([np.ones_like(xs), xs], axis=1)
    beta = np.zeros(2)
    penalty = np.diag([0.0, ridge])
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-(design @ beta)))
        gradient = design.T @ (ys - p) - penalty @ beta
        hessian = design.T @ (design * (p * (1 - p))[:, None]) + penalty + 1e-12 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        beta = beta + step
        if np.abs(step).max() < 1e-10:
            break
    return float(beta[0]), float(beta[1])


def sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))
