"""Merge numerics as small pure functions on tensors, following mergekit's definitions.

Every function takes and returns torch tensors and never mutates its inputs. Arithmetic is
done in float32 (the caller casts the result to the output dtype), so bfloat16 inputs are
merged at least as precisely as mergekit does in their own dtype.

- `slerp`: spherical interpolation on the whole flattened tensor (Frobenius norm), with
  mergekit's linear fallback when the normalised vectors are nearly parallel
  (|dot| > 0.9995); the original magnitudes are kept (no renormalisation).
- `linear`: Σ wᵢθᵢ / Σ wᵢ (or without the division when `normalize` is false).
- `task_arithmetic`, `ties`, `dare`: base + λ · mix(wᵢ δᵢ) with δᵢ = θᵢ − θ_base, where the
  deltas are first sparsified (TIES: keep the top `density` fraction by magnitude; DARE: keep
  each entry with probability `density` and rescale to the original L1 norm, mergekit's rule
  since its PR #245, not the paper's 1/density) and, for TIES and dare_ties, mixed only where
  their sign agrees with the weighted majority sign (disjoint mean).
- `evaluate_gradient`: mergekit's per-layer interpolation of a list of anchor values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

DOT_THRESHOLD = 0.9995  # mergekit's: above it the vectors count as colinear and lerp is used
NORM_EPS = 1e-8  # below this norm a vector is left unnormalised (as mergekit does)
RESCALE_EPS = 1e-7  # mergekit's tolerance for the L1 rescale of DARE


def lerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """(1 − t)·v0 + t·v1 in float32."""
    return torch.lerp(v0.float(), v1.float(), float(t))


def dot_and_norms(v0: torch.Tensor, v1: torch.Tensor, chunk: int = 1 << 20
                  ) -> tuple[float, float, float]:
    """⟨v0, v1⟩, ‖v0‖, ‖v1‖ over the flattened tensors, accumulated in float64.

    Chunked, so a large tensor's angle neither drifts with float32 summation nor needs
    float64 copies of whole tensors (two of them would double a merge's peak memory)."""
    a, b = v0.reshape(-1), v1.reshape(-1)
    dot = n0 = n1 = 0.0
    for start in range(0, a.numel(), chunk):
        x, y = a[start:start + chunk].double(), b[start:start + chunk].double()
        dot += torch.dot(x, y).item()
        n0 += torch.dot(x, x).item()
        n1 += torch.dot(y, y).item()
    return dot, math.sqrt(n0), math.sqrt(n1)


def slerp_coefficients(t: float, v0: torch.Tensor, v1: torch.Tensor,
                       dot_threshold: float = DOT_THRESHOLD) -> tuple[float, float] | None:
    """The two scalars (s0, s1) with slerp = s0·v0 + s1·v1, or None for the lerp fallback.

    The angle is measured between the whole flattened tensors."""
    dot, n0, n1 = dot_and_norms(v0, v1)
    # mergekit divides by the norm only when it exceeds eps; a zero vector stays zero (dot 0).
    dot /= (n0 if n0 > NORM_EPS else 1.0) * (n1 if n1 > NORM_EPS else 1.0)
    if abs(dot) > dot_threshold:
        return None
    theta = math.acos(max(-1.0, min(1.0, dot)))
    sin_theta = math.sin(theta)
    return math.sin((1 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor,
          dot_threshold: float = DOT_THRESHOLD) -> torch.Tensor:
    """Spherical interpolation from v0 (t=0) to v1 (t=1), in float32, shape of v0.

    Nearly parallel (or anti-parallel) inputs take the linear path, as in mergekit."""
    if v0.shape != v1.shape:
        raise ValueError(f"slerp: shapes differ {tuple(v0.shape)} vs {tuple(v1.shape)}")
    coefficients = slerp_coefficients(t, v0, v1, dot_threshold)
    if coefficients is None:
        return lerp(t, v0, v1)
    s0, s1 = coefficients
    result = v0.float() * s0  # one new buffer; the second term is added in place
    result.add_(v1.float(), alpha=s1)
    return result


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float],
           normalize: bool = True) -> torch.Tensor:
    """Weighted sum Σ wᵢθᵢ, divided by Σ wᵢ when `normalize` (mergekit's `linear`)."""
    if len(tensors) != len(weights) or not tensors:
        raise ValueError("linear: need one weight per tensor and at least one tensor")
    total = float(sum(weights))
    if normalize and abs(total) < 1e-8:
        raise ValueError("linear: weights sum to zero under normalize")
    result = tensors[0].float() * float(weights[0])
    for tensor, weight in zip(tensors[1:], weights[1:], strict=True):
        result.add_(tensor.float(), alpha=float(weight))
    if normalize:
        result.div_(total)
    return result


def _magnitude_bits(values: torch.Tensor) -> torch.Tensor:
    """|values| as float32 bit patterns: non-negative floats order like these integers."""
    return values.float().abs().view(torch.int32)


def kth_largest_magnitude(values: torch.Tensor, k: int, chunk: int = 1 << 20,
                          small: int = 1 << 22) -> int:
    """The float32 bit pattern of the k-th largest |entry| of a tensor.

    Up to `small` entries, torch.topk. Above, where topk's int64 indices (and a full |x|
    copy) would cost up to three times the tensor itself, a bisection over the 31-bit
    patterns: ~31 counting passes, each over chunks, so the temporaries stay chunk-sized."""
    flat = values.reshape(-1)
    if flat.numel() <= small:
        return int(torch.topk(flat.float().abs(), k, sorted=False).values.min()
                   .view(torch.int32))
    starts = range(0, flat.numel(), chunk)

    def kept(threshold: int) -> int:
        return sum(int((_magnitude_bits(flat[s:s + chunk]) >= threshold).sum())
                   for s in starts)

    lo = 0
    hi = max(int(_magnitude_bits(flat[s:s + chunk]).max()) for s in starts)
    while lo < hi:  # the largest threshold that still keeps at least k entries
        mid = (lo + hi + 1) // 2
        if kept(mid) >= k:
            lo = mid
        else:
            hi = mid - 1
    return lo


def magnitude_mask(delta: torch.Tensor, density: float, chunk: int = 1 << 20) -> torch.Tensor:
    """Boolean mask of the k = int(density·numel) entries of largest magnitude (TIES trim).

    Exactly k entries are kept; among equal magnitudes at the threshold the first ones (in
    memory order) win."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    k = int(density * delta.numel())
    if k <= 0:
        raise ValueError(f"density {density} keeps no entry of a {delta.numel()}-entry tensor")
    threshold = kth_largest_magnitude(delta, k, chunk)
    flat = delta.reshape(-1)
    mask = torch.empty(flat.numel(), dtype=torch.bool)
    for start in range(0, flat.numel(), chunk):
        mask[start:start + chunk] = _magnitude_bits(flat[start:start + chunk]) > threshold
    missing = k - int(mask.sum())
    for start in range(0, flat.numel(), chunk):  # fill up with entries equal to the threshold
        if missing <= 0:
            break
        bits = _magnitude_bits(flat[start:start + chunk])
        ties = (bits == threshold).nonzero().squeeze(1)[:missing]
        mask[start + ties] = True
        missing -= ties.numel()
    return mask.view(delta.shape)


def random_mask(delta: torch.Tensor, density: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Boolean mask keeping each entry independently with probability `density` (DARE)."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    return torch.rand(delta.shape, generator=generator) < density


def rescale_l1(delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """δ·mask scaled so its L1 norm equals δ's (mergekit's DARE rescale, PR #245).

    Left unscaled when either norm is below 1e-7, as mergekit does."""
    return _mask_(delta.float().clone(), mask, rescale=True)


def _mask_(delta: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    """Zero `delta` outside `mask` in place, optionally restoring its L1 norm."""
    before = delta.abs().sum().item() if rescale else 0.0
    delta.mul_(mask)
    if rescale:
        after = delta.abs().sum().item()
        if before >= RESCALE_EPS and after >= RESCALE_EPS:
            delta.mul_(before / after)
    return delta


def sign_consensus(weighted_deltas: torch.Tensor) -> torch.Tensor:
    """TIES sign election over dim 0: keep entries whose sign equals the majority sign.

    The majority sign is +1 where Σᵢ wᵢδᵢ ≥ 0 and −1 elsewhere (so the weights vote, mergekit
    issue #474); zero entries never match and are thus excluded from the mean."""
    positive = weighted_deltas.sum(dim=0) >= 0
    return torch.where(positive, weighted_deltas > 0, weighted_deltas < 0)


def mix_deltas(deltas: Sequence[torch.Tensor], weights: Sequence[float], consensus: bool,
               normalize: bool) -> torch.Tensor:
    """Σ wᵢδᵢ (optionally only where signs agree), divided by the matching Σ wᵢ if normalize.

    With consensus the divisor is per entry, Σ wᵢ·maskᵢ, and 0 where no delta survives is
    replaced by 1 (the entry then stays at the base value)."""
    return _mix_stacked_(torch.stack([d.float() for d in deltas]), weights, consensus,
                         normalize)


def _mix_stacked_(stacked: torch.Tensor, weights: Sequence[float], consensus: bool,
                  normalize: bool, chunk: int = 1 << 20) -> torch.Tensor:
    """`mix_deltas` on a [M, ...] float32 tensor that it may overwrite (saves M copies)."""
    for row, weight in zip(stacked, weights, strict=True):
        row.mul_(float(weight))
    if not consensus:
        mixed = stacked.sum(dim=0)
        total = float(sum(weights))
        if normalize and abs(total) >= 1e-8:
            mixed.div_(total)
        return mixed
    # The sign election is element-wise, so it runs over chunks: the temporaries (sums,
    # masks) stay small however large the tensor.
    flat = stacked.view(stacked.shape[0], -1)
    mixed = torch.zeros(flat.shape[1])
    w = torch.tensor([float(x) for x in weights]).view(-1, 1)
    for start in range(0, flat.shape[1], chunk):
        part = flat[:, start:start + chunk]
        keep = sign_consensus(part)
        mixed[start:start + chunk] = (part * keep).sum(dim=0)
        if normalize:
            divisor = (w * keep).sum(dim=0)
            divisor[divisor == 0] = 1
            mixed[start:start + chunk] /= divisor
    return mixed.view(stacked.shape[1:])


def _stacked_deltas(base: torch.Tensor, models: Sequence[torch.Tensor]) -> torch.Tensor:
    """[M, ...] float32 tensor of θᵢ − θ_base, computed straight into one buffer."""
    stacked = torch.empty((len(models), *base.shape))
    for row, model in zip(stacked, models, strict=True):
        torch.sub(model.float(), base.float(), out=row)
    return stacked


def _apply_base_(mixed: torch.Tensor, base: torch.Tensor, lam: float) -> torch.Tensor:
    if lam != 1:
        mixed.mul_(lam)
    return mixed.add_(base.float())


def task_arithmetic(base: torch.Tensor, models: Sequence[torch.Tensor],
                    weights: Sequence[float], lam: float = 1.0,
                    normalize: bool = False) -> torch.Tensor:
    """θ_base + λ·Σ wᵢ(θᵢ − θ_base) (divided by Σ wᵢ when normalize)."""
    mixed = _mix_stacked_(_stacked_deltas(base, models), weights, False, normalize)
    return _apply_base_(mixed, base, lam)


def ties(base: torch.Tensor, models: Sequence[torch.Tensor], weights: Sequence[float],
         densities: Sequence[float], lam: float = 1.0, normalize: bool = True,
         rescale: bool = False) -> torch.Tensor:
    """TIES: trim each delta to its top-`density` magnitudes, elect signs, disjoint mean.

    `rescale` (off by default, as in mergekit) scales each trimmed delta back to its L1 norm."""
    stacked = _stacked_deltas(base, models)
    for row, density in zip(stacked, densities, strict=True):
        if density < 1:  # mergekit skips sparsification (and its rescale) at density 1
            _mask_(row, magnitude_mask(row, density), rescale)
    return _apply_base_(_mix_stacked_(stacked, weights, True, normalize), base, lam)


def dare(base: torch.Tensor, models: Sequence[torch.Tensor], weights: Sequence[float],
         densities: Sequence[float], generators: Sequence[torch.Generator | None],
         consensus: bool, lam: float = 1.0, normalize: bool = False,
         rescale: bool = True) -> torch.Tensor:
    """DARE: drop each delta entry with probability 1 − density, rescale to the original L1
    norm, then mix like task arithmetic (`dare_linear`) or with TIES sign consensus
    (`dare_ties`). One generator per model makes the drop reproducible."""
    stacked = _stacked_deltas(base, models)
    for row, density, gen in zip(stacked, densities, generators, strict=True):
        if density < 1:
            _mask_(row, random_mask(row, density, gen), rescale)
    return _apply_base_(_mix_stacked_(stacked, weights, consensus, normalize), base, lam)


def evaluate_gradient(values: Sequence[float], t: float) -> float:
    """mergekit's gradient: anchors spread evenly over [0, 1], linear between neighbours.

    A layer at relative depth t = idx/(n_layers − 1) gets the interpolated value; a single
    anchor is a constant."""
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * float(values[i0]) + frac * float(values[i1])


def slerp_task_vectors(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """WARP's spherical average of M task vectors, iterated for M > 2.

    M = 2 is slerp(½, δ₁, δ₂). For M > 2 the running result is slerped with δₘ at 1/m, so
    every policy gets the same share (the uniform generalisation of the pairwise rule)."""
    if not deltas:
        raise ValueError("slerp_task_vectors: no task vectors")
    merged = deltas[0].float()
    for m, delta in enumerate(deltas[1:], start=2):
        merged = slerp(1.0 / m, merged, delta)
    return merged


def liti(init: torch.Tensor, merged: torch.Tensor, eta: float) -> torch.Tensor:
    """WARP's linear interpolation towards the initialisation: (1 − η)·θ_init + η·θ_merged.

    η = 0 returns θ_init exactly and η = 1 returns θ_merged exactly."""
    if eta == 0:
        return init.float().clone()
    if eta == 1:
        return merged.float().clone()
    return torch.lerp(init.float(), merged.float(), float(eta))
