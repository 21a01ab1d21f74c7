"""Raw documents for the instruction synthesizer: read, then cut into token chunks.

Sources are text files, folders of them (*.txt, *.md, *.rst), JSON Lines with a text field,
and the installed Python standard library's own documentation read at run time
(`pydoc_documents`). Binary or undecodable files are skipped and reported by name, never
fatal; malformed JSONL is an error naming file:line. Reading is defensive: a symlink under a
folder that points outside it is skipped (and listed), a text file over `MAX_FILE_BYTES` is
skipped (and listed) without being read, and binary detection reads only a prefix.

Chunks are windows of the model's tokens with an exact overlap; a chunk's text is the exact
slice of its document between the first and last token's character offsets (from the fast
tokenizer's offset mapping), so nothing is lost or re-spelled by decoding.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exnihilo.errors import ExnihiloError
from exnihilo.outputs import resolved
from exnihilo.records import iter_jsonl

FOLDER_SUFFIXES = (".txt", ".md", ".markdown", ".rst")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
BINARY_SNIFF_BYTES = 8192
MAX_FILE_BYTES = 64 * 1024 * 1024  # a bigger "text" file is a mistake (a dump, a log)


@dataclass(frozen=True)
class Document:
    source: str  # file path, "file.jsonl:LINE", or "pydoc:module"
    text: str


@dataclass
class IngestReport:
    """What was read and what was skipped (and why), for the run summary."""

    documents: list[Document] = field(default_factory=list)
    skipped_binary: list[str] = field(default_factory=list)
    skipped_empty: list[str] = field(default_factory=list)
    skipped_links: list[str] = field(default_factory=list)  # symlinks leaving their folder
    skipped_large: list[str] = field(default_factory=list)  # over MAX_FILE_BYTES


# ----------------------------------------------------------------------------- files

def read_text_file(path: Path, max_bytes: int = MAX_FILE_BYTES) -> str | None:
    """The file's text, or None when it is binary (a NUL byte in its first
    BINARY_SNIFF_BYTES) or not UTF-8. Only the prefix is read before deciding; the caller
    has already skipped files over `max_bytes`."""
    with path.open("rb") as f:
        head = f.read(BINARY_SNIFF_BYTES)
        if b"\x00" in head:
            return None
        data = head + f.read(max_bytes + 1 - len(head))
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None


def _inside(path: Path, folder: Path) -> bool:
    """Whether `path`, with every symlink followed, is still under `folder`."""
    try:
        resolved(path).relative_to(resolved(folder))
    except ValueError:
        return False
    return True


def jsonl_documents(path: Path, text_field: str) -> list[Document]:
    """One document per line of a JSONL file; a line without the text field is an error."""
    docs = []
    for lineno, obj in iter_jsonl(path):
        text = obj.get(text_field) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise ExnihiloError(f"{path}:{lineno}: no string field {text_field!r} "
                                f"(set the text field name with --text-field)")
        if text.strip():
            docs.append(Document(f"{path}:{lineno}", text))
    return docs


def expand_paths(paths: Iterable[str | Path], report: IngestReport | None = None
                 ) -> list[Path]:
    """Files named directly, plus the text files under each folder (recursive, sorted).
    Under a folder, a symlink whose target lies outside it is skipped (listed in
    `report.skipped_links`): pointing a command at a folder must not read /etc/passwd."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            for p in sorted(path.rglob("*")):
                if any(part.startswith(".") for part in p.relative_to(path).parts):
                    continue
                if p.suffix.lower() not in FOLDER_SUFFIXES or not p.is_file():
                    continue
                if not _inside(p, path):
                    if report is not None:
                        report.skipped_links.append(str(p))
                    continue
                files.append(p)
        elif path.is_file():
            files.append(path)
        else:
            raise ExnihiloError(f"{path}: no such file or folder")
    return files


def read_paths(paths: Iterable[str | Path], text_field: str = "text",
               report: IngestReport | None = None,
               max_bytes: int = MAX_FILE_BYTES) -> IngestReport:
    """Read every file under `paths` into documents, recording skipped files by name."""
    report = report or IngestReport()
    for path in expand_paths(paths, report):
        if path.suffix.lower() in JSONL_SUFFIXES:
            report.documents.extend(jsonl_documents(path, text_field))  # read line by line
            continue
        if path.stat().st_size > max_bytes:
            report.skipped_large.append(str(path))
            continue
        text = read_text_file(path, max_bytes)
        if text is None:
            report.skipped_binary.append(str(path))
        elif not text.strip():
            report.skipped_empty.append(str(path))
        else:
            report.documents.append(Document(str(path), text))
    return report


# ----------------------------------------------------------------------------- pydoc

# A default value's repr can hold its memory address (`<built-in method match of re.Pattern
# object at 0x7f0b390186c0>`), which differs in every process: left in, the same module's
# chunks get new content ids in each run, so a resumed `synth documents --pydoc` redoes them.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+>")


def _signature(obj: Any) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):  # builtins without text signatures
        return ""


def _public_names(module: Any) -> list[str]:
    """`__all__` in its own order, else public names defined in the module, sorted."""
    names = getattr(module, "__all__", None)
    if names is not None:
        return [n for n in names if hasattr(module, n)]
    return sorted(n for n, obj in vars(module).items()
                  if not n.startswith("_") and getattr(obj, "__module__", None) == module.__name__
                  and (inspect.isclass(obj) or inspect.isroutine(obj)))


def _section(title: str, doc: str | None) -> str | None:
    doc = (doc or "").strip()
    return f"{title}\n\n{doc}" if doc else None


def _class_sections(qualname: str, cls: type) -> list[str]:
    sections = [_section(f"class {qualname}{_signature(cls)}", inspect.getdoc(cls))]
    for name, member in vars(cls).items():
        if name.startswith("_") and name != "__init__":
            continue
        if isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
        if not inspect.isroutine(member):
            continue
        own_doc = member.__doc__  # only docstrings written here, not inherited ones
        sections.append(_section(f"{qualname}.{name}{_signature(member)}",
                                 inspect.cleandoc(own_doc) if own_doc else None))
    return [s for s in sections if s]


def module_text(module_name: str) -> str:
    """The documentation of one installed module as plain text: its docstring, then each
    public class (with its methods) and function, with signatures, in `__all__` order.

    Written with `inspect` rather than `pydoc.render_doc` because the latter adds listings
    (inherited members, data descriptors, file paths) that are noise for question writing.
    """
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ExnihiloError(f"--pydoc: cannot import module {module_name!r} ({e})") from None
    sections = [_section(f"Module {module_name}", inspect.getdoc(module))]
    for name in _public_names(module):
        obj = getattr(module, name)
        qualname = f"{module_name}.{name}"
        if inspect.isclass(obj):
            sections.extend(_class_sections(qualname, obj))
        elif inspect.isroutine(obj):
            sections.append(_section(f"{qualname}{_signature(obj)}", inspect.getdoc(obj)))
    return _ADDRESS.sub(">", "\n\n".join(s for s in sections if s))


def pydoc_documents(modules: Iterable[str], report: IngestReport | None = None) -> IngestReport:
    """One document per named module ("json", "pathlib", "json.decoder", ...)."""
    report = report or IngestReport()
    for name in modules:
        name = name.strip()
        if not name:
            continue
        text = module_text(name)
        if text.strip():
            report.documents.append(Document(f"pydoc:{name}", text))
        else:
            report.skipped_empty.append(f"pydoc:{name}")
    return report


# ----------------------------------------------------------------------------- chunking

@dataclass(frozen=True)
class Chunk:
    id: str  # content hash of the text: identical text anywhere is the same chunk
    source: str
    index: int  # position of the chunk within its document
    text: str
    tokens: int


def chunk_id(text: str) -> str:
    return hashlib.sha256(f"chunk:{text}".encode()).hexdigest()[:16]


def chunk_seed(base_seed: int, chunk_id: str) -> int:
    """A 62-bit seed per chunk: results do not depend on batch composition or order."""
    digest = hashlib.sha256(f"documents:{base_seed}:{chunk_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 2


def token_windows(n_tokens: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) windows of `size` tokens, each starting `overlap` tokens before the
    previous one ended; the last window ends at `n_tokens` and no window is contained in
    the previous one's overlap."""
    if size <= 0:
        raise ExnihiloError(f"chunk size must be positive, got {size}")
    if not 0 <= overlap < size:
        raise ExnihiloError(f"overlap must be in [0, chunk size {size}), got {overlap}")
    windows: list[tuple[int, int]] = []
    start = 0
    while start < n_tokens:
        end = min(start + size, n_tokens)
        windows.append((start, end))
        if end == n_tokens:
            break
        start = end - overlap
    return windows


def chunk_document(doc: Document, tokenizer: Any, size: int, overlap: int) -> list[Chunk]:
    """Cut one document into token windows; each chunk's text is an exact slice of the
    document (character offsets of its first and last tokens)."""
    enc = tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    chunks = []
    for i, (start, end) in enumerate(token_windows(len(offsets), size, overlap)):
        text = doc.text[offsets[start][0]:offsets[end - 1][1]]
        if text.strip():
            chunks.append(Chunk(chunk_id(text), doc.source, i, text, end - start))
    return chunks


def chunk_documents(docs: Iterable[Document], tokenizer: Any, size: int, overlap: int
                    ) -> tuple[list[Chunk], int]:
    """All chunks in document order, identical texts kept once; returns (chunks, duplicates)."""
    seen: set[str] = set()
    chunks: list[Chunk] = []
    duplicates = 0
    for doc in docs:
        for chunk in chunk_document(doc, tokenizer, size, overlap):
            if chunk.id in seen:
                duplicates += 1
                continue
            seen.add(chunk.id)
            chunks.append(chunk)
    return chunks, duplicates
