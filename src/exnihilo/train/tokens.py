"""Text corpora → one flat token array on disk → fixed-length packed rows.

Pretraining and distillation read plain text: `{"text": ...}` JSONL (what `synth documents
--corpus-out` writes, raw, mixed or instruction-augmented alike), parquet files with a
`text` column and `hf:org/name[:split]` datasets from the local hub cache (how pretraining
corpora are shipped; read through `records.iter_source_rows`, the one reader every command
uses), `.txt`/`.md` files (one document each) or folders of them. Documents are tokenized
in a streaming pass and written to a flat uint16/uint32 token file plus the offsets where
documents start, so a corpus of any size costs one `numpy.memmap`, never Python lists of
its tokens.

The stream is `EOS d1 EOS d2 … EOS dN EOS`: every document is preceded by the EOS that
separates it from the previous one, and the last one is followed by a final EOS. A
document's segment starts at its leading EOS, so inside a row

  * the last token of d1 has the target EOS (the model learns where a document ends),
  * that EOS is position 0 of d2's segment and predicts d2's first token from nothing but
    itself (no cross-document information),

and every target of every row is trained. Rows are GPT-style windows of `seq_len + 1`
tokens (inputs = first `seq_len`, targets = last `seq_len`), each starting where the last
one's inputs ended. Position ids restart at every segment start and at the row start
(a document cut by a row boundary continues without its earlier context); with
`attention_mask=None` and `use_cache=False` transformers turns restarting position ids into
a block-diagonal causal mask (see `train.collate`), so no token attends across documents.

Held-out documents (a seeded `val_fraction` of them, chosen per document so no document
is split between training and validation) go into a second stream.

Tokenized streams are cached under `$XDG_CACHE_HOME/exnihilo/tokens/<key>/`, keyed by the
data files' contents, the tokenizer and the split, so reruns and later methods on the same
corpus (distillation after pretraining) do not tokenize again.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exnihilo.errors import ExnihiloError

TEXT_SUFFIXES = {".txt", ".md"}
JSONL_SUFFIXES = {".jsonl"}
ROW_SUFFIXES = {".parquet"}  # row files read by records.iter_source_rows
TOKENIZE_BATCH = 256  # documents per tokenizer call (the fast tokenizer batches in Rust)


# -------------------------------------------------------------------------------- sources

def data_files(path: str | Path) -> list[Path]:
    """The files a DATA path names: itself, every .jsonl/.parquet/.txt/.md below it
    (sorted, so the document order is fixed), or an `hf:` dataset's cached split files."""
    from exnihilo.records import HF_PREFIX, hf_split_files

    if str(path).startswith(HF_PREFIX):
        return hf_split_files(str(path))
    root = Path(path).expanduser()
    if root.is_file():
        return [root]
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower()
                       in TEXT_SUFFIXES | JSONL_SUFFIXES | ROW_SUFFIXES)
        if not files:
            raise ExnihiloError(f"{path}: the folder holds no .jsonl, .parquet, .txt or .md "
                                f"files")
        return files
    raise ExnihiloError(f"{path}: no such file or folder")


def iter_documents(path: str | Path) -> Iterator[str]:
    """Every non-blank document of the corpus, in order. A JSONL line or parquet row must
    have a string "text"; a .txt/.md file is one document."""
    for file in data_files(path):
        suffix = file.suffix.lower()
        if suffix in JSONL_SUFFIXES | ROW_SUFFIXES or suffix == ".json":  # .json: hf: splits
            yield from _row_texts(file)
        else:
            text = file.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield text


def _row_texts(file: Path) -> Iterator[str]:
    """The "text" of every row of a JSONL/JSON/parquet file (errors name the file and line)."""
    from exnihilo.records import iter_source_rows

    for where, obj in iter_source_rows(file):
        text = obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise ExnihiloError(f'{where}: expected an object with a string "text" field (a '
                                f'pretraining corpus row)')
        if text.strip():
            yield text


# ------------------------------------------------------------------------------- streams

@dataclass
class TokenStream:
    """A flat token array (memmapped) and the offsets where its document segments start."""

    tokens: np.ndarray  # [n] uint16/uint32
    starts: np.ndarray  # [documents + 1] int64, ascending; the last is the final EOS
    seq_len: int

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_documents(self) -> int:
        return max(int(self.starts.shape[0]) - 1, 0)

    @property
    def n_rows(self) -> int:
        """Full rows of `seq_len` inputs (the tail that fills no row is dropped)."""
        return max((self.n_tokens - 1) // self.seq_len, 0)

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens [seq_len + 1], position ids [seq_len]) of row r."""
        lo = r * self.seq_len
        window = np.asarray(self.tokens[lo:lo + self.seq_len + 1], dtype=np.int64)
        return window, row_positions(self.starts, lo, self.seq_len)


def row_positions(starts: np.ndarray, lo: int, length: int) -> np.ndarray:
    """Position ids of tokens lo … lo+length−1: the distance to the latest segment start
    (or to the row start, whichever is later)."""
    g = np.arange(lo, lo + length, dtype=np.int64)
    k = np.searchsorted(starts, g, side="right") - 1
    seg = np.where(k >= 0, starts[np.clip(k, 0, None)], lo)
    return g - np.maximum(seg, lo)


def collate_rows(stream: TokenStream, rows: Sequence[int]) -> dict[str, torch.Tensor]:
    """Rows of the stream as a batch: input_ids, labels (every target trained),
    position_ids (restarting per document)."""
    windows, positions = zip(*(stream.row(r) for r in rows), strict=True)
    tokens = torch.from_numpy(np.stack(windows))
    return {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
            "position_ids": torch.from_numpy(np.stack(positions))}


# ---------------------------------------------------------------------------- tokenizing

def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Identifies a tokenizer by its vocabulary and EOS (enough to know cached ids hold)."""
    vocab = sorted(tokenizer.get_vocab().items())
    h = hashlib.sha256(json.dumps(vocab).encode())
    h.update(str(tokenizer.eos_token_id).encode())
    return h.hexdigest()[:16]


def corpus_key(path: str | Path, tokenizer: Any, val_fraction: float, seed: int) -> str:
    from exnihilo.records import file_sha256

    h = hashlib.sha256()
    for file in data_files(path):
        h.update(file.name.encode())
        h.update(file_sha256(str(file)).encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    h.update(f"{val_fraction}:{seed}:v1".encode())
    return h.hexdigest()[:24]


def token_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "exnihilo" / "tokens"


def is_heldout(index: int, val_fraction: float, seed: int) -> bool:
    """Whether document `index` is held out: a seeded coin per document, so the split does
    not depend on reading order or corpus size."""
    return val_fraction > 0 and random.Random(f"{seed}:doc:{index}").random() < val_fraction


class _StreamWriter:
    """Appends documents as `EOS + tokens` to a flat binary file, recording segment starts."""

    def __init__(self, folder: Path, name: str, dtype: Any, eos_id: int):
        self.path = folder / f"{name}.bin"
        self.file = open(self.path, "wb")  # noqa: SIM115 (closed in finish)
        self.dtype, self.eos_id = dtype, eos_id
        self.starts: list[int] = []  # one int per document: small next to the tokens
        self.n = 0

    def add(self, ids: Sequence[int]) -> None:
        self.starts.append(self.n)
        chunk = np.asarray([self.eos_id, *ids], dtype=self.dtype)
        self.file.write(chunk.tobytes())
        self.n += len(chunk)

    def finish(self, folder: Path, name: str) -> int:
        if self.starts:  # the final EOS ends the last document
            self.starts.append(self.n)
            self.file.write(np.asarray([self.eos_id], dtype=self.dtype).tobytes())
            self.n += 1
        self.file.close()
        np.save(folder / f"{name}-starts.npy", np.asarray(self.starts, dtype=np.int64))
        return self.n


def tokenize_corpus(path: str | Path, tokenizer: Any, folder: Path, val_fraction: float,
                    seed: int) -> dict[str, Any]:
    """Stream the corpus through the tokenizer into `folder`/{train,val}.bin (+ starts)."""
    eos = tokenizer.eos_token_id
    if not isinstance(eos, int):
        raise ExnihiloError("the tokenizer has no EOS token to separate documents with")
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
    writers = {"train": _StreamWriter(folder, "train", dtype, eos),
               "val": _StreamWriter(folder, "val", dtype, eos)}
    n_docs = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal n_docs
        # split_special_tokens: a "<|im_end|>" inside raw text is text, not a control token.
        encoded = tokenizer(batch, add_special_tokens=False, split_special_tokens=True)
        for ids in encoded["input_ids"]:
            if ids:
                held = is_heldout(n_docs, val_fraction, seed)
                writers["val" if held else "train"].add(ids)
                n_docs += 1
        batch.clear()

    for text in iter_documents(path):
        batch.append(text)
        if len(batch) >= TOKENIZE_BATCH:
            flush()
    if batch:
        flush()
    counts = {name: w.finish(folder, name) for name, w in writers.items()}
    if n_docs == 0:
        raise ExnihiloError(f"{path}: no usable text (every document is empty)")
    if counts["train"] == 0:
        raise ExnihiloError(f"{path}: all {n_docs} documents were held out for "
                            f"validation; lower --val-fraction")
    meta = {"documents": n_docs, "dtype": np.dtype(dtype).name,
            "train_tokens": counts["train"], "val_tokens": counts["val"],
            "train_documents": len(writers["train"].starts) - 1 if counts["train"] else 0,
            "val_documents": len(writers["val"].starts) - 1 if counts["val"] else 0}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def prepare_corpus(path: str | Path, tokenizer: Any, val_fraction: float = 0.05,
                   seed: int = 0, cache: Path | None = None) -> Path:
    """The cached, tokenized corpus folder (tokenizing it first if needed, atomically)."""
    root = cache or token_cache_root()
    folder = root / corpus_key(path, tokenizer, val_fraction, seed)
    if (folder / "meta.json").exists():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tok-", dir=root))
    try:
        tokenize_corpus(path, tokenizer, tmp, val_fraction, seed)
        if (folder / "meta.json").exists():  # another process finished first
            return folder
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def open_stream(folder: Path, split: str, seq_len: int) -> TokenStream:
    meta = json.loads((folder / "meta.json").read_text())
    n = meta[f"{split}_tokens"]
    dtype = np.dtype(meta["dtype"])
    tokens = (np.memmap(folder / f"{split}.bin", dtype=dtype, mode="r", shape=(n,))
              if n else np.zeros(0, dtype=dtype))
    return TokenStream(tokens, np.load(folder / f"{split}-starts.npy"), seq_len)


def corpus_meta(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "meta.json").read_text())


def stream_from_documents(docs: Sequence[Sequence[int]], eos_id: int, seq_len: int
                          ) -> TokenStream:
    """An in-memory stream of already tokenized documents (tests, small evaluations)."""
    tokens: list[int] = []
    starts: list[int] = []
    for ids in docs:
        starts.append(len(tokens))
        tokens += [eos_id, *ids]
    starts.append(len(tokens))
    tokens.append(eos_id)
    return TokenStream(np.asarray(tokens, dtype=np.int64), np.asarray(starts, dtype=np.int64),
                       seq_len)


def parse_token_count(value: str | int | None) -> int | None:
    """'20M' → 20_000_000; '500k', '1.5B', '12345' as written; None stays None."""
    if value is None or isinstance(value, int):
        return value
    text = str(value).strip().lower().replace("_", "").replace(",", "")
    scale = {"k": 1_000, "m": 1_000_000, "b": 1_000_000_000, "g": 1_000_000_000}
    try:
        suffix = scale.get(text[-1:], 1)
        number = float(text[:-1] if suffix != 1 else text) * suffix
    except ValueError:
        raise ExnihiloError(f"--tokens {value!r}: expected a count such as 20M, 500k or "
                            f"1.5B") from None
    if number < 1:
        raise ExnihiloError(f"--tokens {value!r}: must be at least 1")
    return int(number)
