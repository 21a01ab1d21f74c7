"""Reading models tensor by tensor and writing safetensors shards as tensors arrive.

Reading: a model is a folder of safetensors shards (or a LoRA adapter folder over such a
model); its index (name → shard, shape, dtype) comes from the shard headers alone, so every
shape check runs before any weight is read. A tensor is read by opening its shard only for
that read, so the memory map is dropped right after and the process holds one tensor per
model, not the files.

Writing: `safetensors.torch.save_file` needs every tensor of a shard in memory at once,
which is what streaming avoids. The format is simple (8-byte little-endian header length, a
JSON header of name → dtype, shape and byte offsets, then the raw bytes), and every output
shape is known from the plan, so `ShardWriter` writes each shard's header first and then
appends each tensor's bytes as soon as it is computed.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from exnihilo.errors import ExnihiloError

# safetensors dtype codes ↔ torch dtypes (the ones model weights use)
SAFE_TO_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "F64": torch.float64, "I64": torch.int64, "I32": torch.int32,
                 "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
TORCH_TO_SAFE = {v: k for k, v in SAFE_TO_TORCH.items()}
NAME_TO_TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")
LAYER_RE = re.compile(r"^(?P<pre>.*?\.layers\.)(?P<idx>\d+)(?P<post>\..+)$")


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


def read_header_index(folder: Path, skip: tuple[str, ...] = ("adapter_model",)
                      ) -> dict[str, TensorInfo]:
    """Name → (shard, shape, dtype) for every tensor of a safetensors folder, headers only."""
    from safetensors import safe_open

    index_file = folder / "model.safetensors.index.json"
    if index_file.exists():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        files = sorted({folder / f for f in weight_map.values()})
    else:
        files = sorted(f for f in folder.glob("*.safetensors") if f.stem not in skip)
    if not files:
        raise ExnihiloError(f"{folder}: no safetensors weights (only safetensors are read; "
                            f"re-save the model with save_pretrained(safe_serialization=True))")
    index: dict[str, TensorInfo] = {}
    for file in files:
        if not file.exists():
            raise ExnihiloError(f"{file}: listed in the shard index but missing")
        try:
            with safe_open(str(file), "pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    part = f.get_slice(name)
                    index[name] = TensorInfo(file, tuple(part.get_shape()),
                                             SAFE_TO_TORCH[part.get_dtype()])
        except Exception as e:
            raise ExnihiloError(f"{file}: unreadable safetensors file ({e})") from None
    return index


def read_tensor(info: TensorInfo, name: str) -> torch.Tensor:
    """One tensor, read with its shard opened only for this read (no lasting memory map)."""
    from safetensors import safe_open

    with safe_open(str(info.file), "pt") as f:
        return f.get_tensor(name)


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter folder, applied to its base's weights as they are read.

    W' = W + s·B·A with s = lora_alpha/r (lora_alpha/√r with rsLoRA), transposed for
    `fan_in_fan_out`; embeddings get (B·A)ᵀ. Full weights the adapter saved itself
    (`…base_layer.weight`, e.g. a resized embedding) replace the base's.
    """

    folder: Path
    file: Path
    updates: dict[str, tuple[str, str, str, float]] = field(default_factory=dict)
    replaced: dict[str, str] = field(default_factory=dict)
    fan_in_fan_out: bool = False

    def delta(self, name: str) -> torch.Tensor | None:
        if name not in self.updates:
            return None
        a_key, b_key, kind, scale = self.updates[name]
        info = TensorInfo(self.file, (), torch.float32)
        a = read_tensor(info, a_key).float()
        b = read_tensor(info, b_key).float()
        delta = b @ a
        if kind == "embedding" or self.fan_in_fan_out:
            delta = delta.T
        return delta.mul_(scale)


def _pattern_value(module: str, patterns: dict[str, Any], default: Any) -> Any:
    """PEFT's rank/alpha pattern lookup: a key matches the end of the module path."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def load_lora(folder: Path) -> tuple[LoraAdapter, dict[str, Any]]:
    """Parse an adapter folder; returns the adapter and its adapter_config.json."""
    from safetensors import safe_open

    config = json.loads((folder / "adapter_config.json").read_text())
    where = folder / "adapter_config.json"
    if config.get("peft_type", "LORA") != "LORA":
        raise ExnihiloError(f"{where}: peft_type {config.get('peft_type')} is not LoRA")
    for flag in ("use_dora", "lora_bias"):
        if config.get(flag):
            raise ExnihiloError(f"{where}: {flag} adapters are not supported by merge")
    file = folder / "adapter_model.safetensors"
    if not file.exists():
        raise ExnihiloError(f"{folder}: no adapter_model.safetensors (safetensors only)")
    adapter = LoraAdapter(folder, file, fan_in_fan_out=bool(config.get("fan_in_fan_out")))
    pairs: dict[str, dict[str, str]] = {}
    with safe_open(str(file), "pt") as f:
        keys = list(f.keys())
        ranks = {k: f.get_slice(k).get_shape()[0] for k in keys}
    for key in keys:
        name = key.removeprefix("base_model.model.")
        for suffix, slot in ((".lora_A.weight", "A"), (".lora_B.weight", "B"),
                             (".lora_embedding_A", "eA"), (".lora_embedding_B", "eB")):
            if name.endswith(suffix):
                pairs.setdefault(name[: -len(suffix)], {})[slot] = key
                break
        else:
            if name.endswith(".base_layer.weight"):
                adapter.replaced[name.removesuffix(".base_layer.weight") + ".weight"] = key
            else:
                raise ExnihiloError(f"{file}: tensor {key} is not a LoRA A/B matrix "
                                    f"(modules_to_save and other PEFT extras are not supported)")
    alpha = float(config.get("lora_alpha", 8))
    for module, slots in pairs.items():
        kind = "embedding" if "eA" in slots else "linear"
        a_key, b_key = (slots.get("eA"), slots.get("eB")) if kind == "embedding" else \
            (slots.get("A"), slots.get("B"))
        if a_key is None or b_key is None:
            raise ExnihiloError(f"{file}: {module} has only one of its LoRA A/B matrices")
        r = ranks[a_key]
        module_alpha = float(_pattern_value(module, config.get("alpha_pattern") or {}, alpha))
        scale = module_alpha / (math.sqrt(r) if config.get("use_rslora") else r)
        adapter.updates[module + ".weight"] = (a_key, b_key, kind, scale)
    return adapter, config


@dataclass
class ModelSource:
    """One input model as the merger reads it: header index, config, optional LoRA."""

    ref: str
    folder: Path  # the weights' folder (the base's, for a LoRA adapter)
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    lora: LoraAdapter | None = None
    tokenizer_folder: Path | None = None

    @property
    def num_layers(self) -> int:
        config = self.config.get("text_config", self.config)
        return int(config.get("num_hidden_layers", 0))

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or [self.config.get("model_type", "?")]
        return str(archs[0])

    def tensors_outside_layers(self) -> list[str]:
        return [n for n in self.tensors if not LAYER_RE.match(n)]

    def read(self, name: str) -> torch.Tensor:
        """The tensor in float32, with the LoRA update (if any) merged in."""
        if self.lora is not None and name in self.lora.replaced:
            tensor = read_tensor(TensorInfo(self.lora.file, (), torch.float32),
                                 self.lora.replaced[name]).float()
        else:
            tensor = read_tensor(self.tensors[name], name).float()
        if self.lora is not None:
            delta = self.lora.delta(name)
            if delta is not None:
                if delta.shape != tensor.shape:
                    raise ExnihiloError(f"{self.lora.folder}: LoRA update for {name} has shape "
                                        f"{list(delta.shape)}, the base tensor "
                                        f"{list(tensor.shape)}")
                tensor.add_(delta)
        return tensor


def _find(ref: str, config_dir: Path | None) -> Path:
    """A path as given (relative to the working folder), else relative to the config file."""
    path = Path(ref).expanduser()
    if not path.exists() and config_dir is not None and (config_dir / path).exists():
        return config_dir / path
    return path


def open_model(ref: str, config_dir: Path | None = None) -> ModelSource:
    """Resolve a model reference: an HF folder, an embedded name or .gguf (through
    `exnihilo.models.resolve_model`), a LoRA adapter folder, or mergekit's `base+adapter`."""
    from exnihilo.models import resolve_model

    path = _find(ref, config_dir)
    base_ref, adapter_path = None, None
    if "+" in ref and not path.exists():
        base_ref, adapter_ref = ref.rsplit("+", 1)
        adapter_path = _find(adapter_ref, config_dir)
        if not (adapter_path / "adapter_config.json").exists():
            raise ExnihiloError(f"model {ref!r}: {adapter_path} is not a LoRA adapter folder "
                                f"(no adapter_config.json)")
    elif path.is_dir() and (path / "adapter_config.json").exists() \
            and not (path / "config.json").exists():
        adapter_path = path
    if adapter_path is None:
        folder = resolve_model(str(path) if path.exists() else ref)
        return ModelSource(ref, folder, _read_config(folder), read_header_index(folder),
                           tokenizer_folder=folder)
    adapter, adapter_config = load_lora(adapter_path)
    if base_ref is None:
        base_ref = adapter_config.get("base_model_name_or_path")
        if not base_ref:
            raise ExnihiloError(f"{adapter_path}/adapter_config.json: no "
                                f"base_model_name_or_path (write the model as base+adapter)")
        if not Path(base_ref).expanduser().exists() and (adapter_path / base_ref).exists():
            base_ref = str(adapter_path / base_ref)
    folder = resolve_model(str(_find(base_ref, config_dir)) if _find(base_ref, config_dir)
                           .exists() else base_ref)
    tensors = read_header_index(folder)
    for name in list(adapter.updates) + list(adapter.replaced):
        if name not in tensors:
            raise ExnihiloError(f"{adapter_path}: LoRA targets {name}, which base {folder} "
                                f"does not have")
    has_tokenizer = any((adapter_path / f).exists() for f in TOKENIZER_FILES)
    return ModelSource(ref, folder, _read_config(folder), tensors, adapter,
                       tokenizer_folder=adapter_path if has_tokenizer else folder)


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExnihiloError(f"{folder}/config.json: unreadable ({e})") from None


@dataclass
class _Shard:
    path: Path
    names: list[str]


class ShardWriter:
    """Write tensors, in a fixed order known up front, into safetensors shards as they come.

    Each shard's header (names, dtypes, shapes, byte offsets) is written when the shard is
    opened; `write` then appends the next tensor's bytes. Shards hold at most
    `max_shard_bytes` (a larger single tensor gets a shard of its own); with more than one
    shard, `model.safetensors.index.json` is written as transformers expects.
    """

    def __init__(self, folder: Path, specs: list[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_bytes: int = 2 * 1024**3) -> None:
        self.folder = folder
        self.specs = {name: (shape, dtype) for name, shape, dtype in specs}
        self.order = [name for name, _, _ in specs]
        groups: list[list[str]] = [[]]
        size = 0
        for name, shape, dtype in specs:
            nbytes = _nbytes(shape, dtype)
            if groups[-1] and size + nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(name)
            size += nbytes
        n = len(groups)
        self.shards = [_Shard(folder / ("model.safetensors" if n == 1 else
                                        f"model-{i + 1:05d}-of-{n:05d}.safetensors"), g)
                       for i, g in enumerate(groups)]
        self.shard_of = {name: i for i, s in enumerate(self.shards) for name in s.names}
        self._next = 0
        self._file: Any = None
        self._shard = -1
        self.total_bytes = sum(_nbytes(s, d) for s, d in self.specs.values())

    def _open_shard(self, i: int) -> None:
        if self._file is not None:
            self._file.close()
        shard = self.shards[i]
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name in shard.names:
            shape, dtype = self.specs[name]
            end = offset + _nbytes(shape, dtype)
            header[name] = {"dtype": TORCH_TO_SAFE[dtype], "shape": list(shape),
                            "data_offsets": [offset, end]}
            offset = end
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the format pads the header to 8-byte alignment
        self._file = shard.path.open("wb")
        self._file.write(struct.pack("<Q", len(blob)))
        self._file.write(blob)
        self._shard = i

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.order[self._next]
        if name != expected:
            raise RuntimeError(f"ShardWriter: got {name}, expected {expected}")
        shape, dtype = self.specs[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(f"ShardWriter: {name} is {tuple(tensor.shape)} {tensor.dtype}, "
                               f"planned {shape} {dtype}")
        if self.shard_of[name] != self._shard:
            self._open_shard(self.shard_of[name])
        # a uint8 view of the contiguous tensor is written without another copy
        data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(data))
        self._next += 1

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        elif self._file is not None:  # an error: just release the file; the caller deletes
            self._file.close()
            self._file = None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._next != len(self.order):
            raise RuntimeError(f"ShardWriter: {len(self.order) - self._next} tensors unwritten")
        if len(self.shards) > 1:
            weight_map = {name: s.path.name for s in self.shards for name in s.names}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map},
                indent=2))


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def check_new_folder(out: Path, inputs: list[Path]) -> None:
    """Refuse an existing output folder or one that is an input; create its parent."""
    if out.exists():
        raise ExnihiloError(f"{out}: already exists (merge writes a new folder; remove it or "
                            f"choose another -o)")
    resolved = out.resolve()
    for folder in inputs:
        if resolved == folder.resolve():
            raise ExnihiloError(f"{out}: is one of the input models")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as e:
        raise ExnihiloError(f"{out}: cannot write in {out.parent} ({e.strerror})") from None


@contextmanager
def atomic_folders(outs: list[Path]) -> Iterator[list[Path]]:
    """Temporary folders next to each target, renamed into place only if the body succeeds;
    on any error every temporary folder is removed, so no partial output is left."""
    temps: list[Path] = []
    try:
        for out in outs:
            out.parent.mkdir(parents=True, exist_ok=True)
            temps.append(Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent)))
        yield temps
        for tmp, out in zip(temps, outs, strict=True):
            os.replace(tmp, out)
    finally:
        for tmp in temps:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def copy_side_files(model: ModelSource, tokenizer_from: Path | None, out: Path) -> list[str]:
    """Copy the tokenizer files and generation/run metadata; returns what was copied."""
    copied = []
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_from / name).exists():
                shutil.copy2(tokenizer_from / name, out / name)
                copied.append(name)
    for name in ("generation_config.json", "exnihilo_run.json"):
        if (model.folder / name).exists():
            shutil.copy2(model.folder / name, out / name)
            copied.append(name)
    return copied


def write_config(config: dict[str, Any], out: Path, dtype: torch.dtype,
                 num_layers: int | None = None) -> None:
    """config.json of the result: the reference model's, with the output dtype (and layer
    count, when slices changed it)."""
    config = json.loads(json.dumps(config))
    name = str(dtype).removeprefix("torch.")
    key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
    config[key] = name
    if num_layers is not None:
        target = config.get("text_config", config)
        target["num_hidden_layers"] = num_layers
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
