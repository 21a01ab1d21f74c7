"""How many CPU threads torch (and anything we start that uses OpenMP) may use.

Measured on the 2-core machine this project is built on: when the machine is loaded, torch's
default of one thread per core can be many times slower than a single thread (each small
matmul waits for its sibling thread), so every command takes `--threads` and the
`EXNIHILO_THREADS` environment variable. Unset, torch keeps its own default.
"""

from __future__ import annotations

import os

from exnihilo.errors import ExnihiloError

ENV = "EXNIHILO_THREADS"


def resolve_threads(threads: int | None = None) -> int | None:
    """The thread count to use: the explicit value, else $EXNIHILO_THREADS, else None."""
    if threads is None:
        raw = os.environ.get(ENV, "").strip()
        if not raw:
            return None
        try:
            threads = int(raw)
        except ValueError:
            raise ExnihiloError(f"${ENV} must be a whole number, got {raw!r}") from None
    if threads < 1:
        raise ExnihiloError(f"--threads must be at least 1, got {threads}")
    return threads


def apply_threads(threads: int | None = None) -> int | None:
    """Pin torch's intra-op threads (and OMP_NUM_THREADS for child processes such as a
    llama.cpp server) to the resolved count; returns it (None: left as it was)."""
    n = resolve_threads(threads)
    if n is None:
        return None
    os.environ["OMP_NUM_THREADS"] = str(n)
    os.environ[ENV] = str(n)
    import torch

    torch.set_num_threads(n)
    return n
