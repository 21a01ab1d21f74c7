"""Which device models run on (`exnihilo --device auto|cpu|cuda|mps`) and in what precision.

One process-wide default, like `exnihilo.threads`: the CLI's root option (or the
`EXNIHILO_DEVICE` environment variable) sets it once, `load_model` puts every model there,
and everything that builds tensors for a model moves them to the model's own device
(`to_device`, `model_device`). Library functions that take `device=` override it.

`auto` is the best device torch can see: CUDA, else Apple's MPS, else the CPU. On a
machine without an accelerator that is the CPU, so nothing changes there: same dtype
(float32), same kernels, same numbers.

Precision (`--dtype auto`, the default): inference loads the weights in bfloat16 on a CUDA
GPU that supports it and in float32 everywhere else (this project's CPU has no native
bfloat16, and MPS bfloat16 depends on the macOS version). Training keeps float32 master
weights and runs the forward pass under `torch.autocast(bfloat16)` on such a GPU (mixed
precision): AdamW updates in bfloat16 weights lose small steps to rounding. On a CPU with
native bfloat16 it multiplies only the frozen weights (LoRA's base model) in bfloat16
(`exnihilo.train.frozen_bf16`); `--dtype float32` keeps every product in float32.

Why torch directly and not accelerate: what we need is a device name, `.to(device)` and an
autocast context, each one line of torch. `accelerate.Accelerator` would take over the
training loop's optimizer, scheduler, RNG and checkpoint handling, which `train.loop` does
itself so that resume is bit-exact (see that module), and it brings no single-device
feature we lack.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch

from exnihilo.errors import ExnihiloError

ENV = "EXNIHILO_DEVICE"
DEVICES = ("auto", "cpu", "cuda", "mps")
OPTION = "--device"


def cuda_available() -> bool:
    return torch.cuda.is_available()


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def available_devices() -> list[str]:
    """The device kinds torch can use here, best first (the CPU always)."""
    found = []
    if cuda_available():
        found.append("cuda")
    if mps_available():
        found.append("mps")
    return [*found, "cpu"]


def _parse(name: str) -> tuple[str, int | None]:
    """("cuda", 1) from "cuda:1"; ExnihiloError naming --device for anything unknown."""
    kind, _, index = name.strip().lower().partition(":")
    if kind not in DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        raise ExnihiloError(f"{OPTION} {name!r}: expected one of {', '.join(DEVICES)} "
                            f"(or cuda:N)")
    return kind, int(index) if index else None


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """The torch device for `name`: auto/None → the process default resolved (CUDA, else
    MPS, else CPU); an explicit device that is not available here is an ExnihiloError
    naming `--device` and what is available."""
    if isinstance(name, torch.device):
        return name
    if name is None:
        name = default_device_name()
    kind, index = _parse(name)
    if kind == "auto":
        kind = available_devices()[0]
    if kind not in available_devices():
        raise ExnihiloError(f"{OPTION} {kind}: no {kind.upper()} device is available on this "
                            f"machine (available: {', '.join(available_devices())}; "
                            f"auto picks the first)")
    if index is not None and index >= torch.cuda.device_count():
        raise ExnihiloError(f"{OPTION} {name}: this machine has "
                            f"{torch.cuda.device_count()} CUDA device(s)")
    if kind == "cuda":  # with its index, so it compares equal to a parameter's device
        return torch.device("cuda", index if index is not None else torch.cuda.current_device())
    return torch.device(kind)


# ----------------------------------------------------------------- the process default

def default_device_name() -> str:
    """The process default's name: set_default_device's, else $EXNIHILO_DEVICE, else auto."""
    raw = os.environ.get(ENV, "").strip()
    return raw or "auto"


def set_default_device(name: str | None) -> torch.device | None:
    """Make `name` every model's device from now on (also for child processes, through
    $EXNIHILO_DEVICE). Checked at once, so a wrong --device fails before any model loads.
    None leaves the default as it is; returns the resolved device (None: unchanged)."""
    if name is None:
        if os.environ.get(ENV, "").strip():
            return resolve_device(None)  # a bad $EXNIHILO_DEVICE fails here too
        return None
    device = resolve_device(name)
    os.environ[ENV] = name.strip().lower()
    return device


def default_device() -> torch.device:
    return resolve_device(None)


# --------------------------------------------------------------------------- precision

def supports_bf16(device: torch.device) -> bool:
    """Native bfloat16 matmuls: CUDA GPUs from Ampere on. Not claimed for CPU or MPS."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def cpu_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), from torch's own
    CPU probes. $EXNIHILO_CPU_BF16=0 turns it off (1 claims it), e.g. to compare runs."""
    forced = os.environ.get("EXNIHILO_CPU_BF16", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def sampling_dtype(dtype: str, device: torch.device) -> str | None:
    """The dtype sampled (temperature > 0) decoding runs in when it differs from the weights':
    "bfloat16" for `--dtype auto` on a CPU with native bf16, else None.

    Why only sampled decoding: a bf16 decode step is about 2x a float32 one on such a CPU
    (SmolLM2-135M, batch 32-128, 2 threads), and a sample's distribution barely moves
    (benchmarks/generation.py measures the total variation). Greedy replies, though, follow
    the argmax, which bf16 flips early: they stay float32, so evaluations match across
    machines. Log-probabilities are scored in float32 too."""
    if dtype == "auto" and device.type == "cpu" and cpu_native_bf16():
        return "bfloat16"
    return None


def default_dtype_for(device: torch.device) -> str:
    """The weights' dtype for `--dtype auto` at inference: bfloat16 where the device runs
    it natively, else float32 (unchanged on CPU)."""
    return "bfloat16" if supports_bf16(device) else "float32"


def inference_dtype(dtype: str, device: torch.device) -> str:
    """`dtype` with "auto" resolved for loading a model to run (not train) on `device`."""
    return default_dtype_for(device) if dtype == "auto" else dtype


def training_dtypes(dtype: str, device: torch.device) -> tuple[str, str | None]:
    """(weights dtype, autocast dtype or None) for training. `auto`: float32 master weights,
    and bfloat16 autocast where the device supports it; any explicit dtype is used as the
    weights' dtype with no autocast (what it always meant)."""
    if dtype != "auto":
        return dtype, None
    return "float32", ("bfloat16" if supports_bf16(device) else None)


def wants_frozen_bf16(dtype: str, device: torch.device) -> bool:
    """Whether training multiplies frozen weights in bfloat16 (the rest float32): under
    `--dtype auto` on a CPU with native bf16. A LoRA step of SmolLM2-135M ran 1.4–1.5× as fast
    with its losses within 0.005 of float32 (see `exnihilo.train.frozen_bf16`)."""
    return dtype == "auto" and device.type == "cpu" and cpu_native_bf16()


@contextlib.contextmanager
def autocast(device: torch.device, dtype: str | None) -> Iterator[None]:
    """torch.autocast to `dtype` on `device`; a no-op when dtype is None (CPU: unchanged)."""
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=getattr(torch, dtype)):
        yield


# ----------------------------------------------------------------------------- tensors

def model_device(model: Any) -> torch.device:
    """Where `model`'s parameters live (the CPU for a model without parameters)."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """`batch` with every tensor on `device` (others unchanged); the same dict when nothing
    needs moving, so the CPU path copies nothing."""
    if all(not isinstance(v, torch.Tensor) or v.device == device for v in batch.values()):
        return batch
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def place_model(model: Any, device: str | torch.device | None) -> Any:
    """`model` moved to `device` when one is given (None: left where it is)."""
    if device is None:
        return model
    target = resolve_device(device)
    return model if model_device(model) == target else model.to(target)
