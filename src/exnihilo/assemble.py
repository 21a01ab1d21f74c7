"""Engine assembly for commands: an engine name and model spec → a ready engine.

Library code (not the CLI) so that a command's whole run, options to results, can be called
from Python; the CLI modules only parse and print.
"""

from __future__ import annotations

from typing import Any

from exnihilo.errors import ExnihiloError

ENGINES = ("transformers", "openai")


def check_engine(engine: str, base_urls: list[str] | None, dtype: str | None = None) -> None:
    """Engine options that are wrong whatever the model: checked before anything loads."""
    if dtype is not None and engine == "transformers":
        from exnihilo.models import DTYPES

        if dtype not in DTYPES:
            raise ExnihiloError(f"--dtype {dtype!r}: known {', '.join(DTYPES)}")
    if engine not in ENGINES:
        raise ExnihiloError(f"unknown engine {engine!r} (known: {', '.join(ENGINES)})")
    if engine == "openai" and not base_urls:
        raise ExnihiloError("--engine openai needs at least one --base-url")


def build_engine(engine: str, model: str, dtype: str = "float32", batch_size: int = 32,
                 base_urls: list[str] | None = None, concurrency: int = 8,
                 label: str = "generating") -> Any:
    """A local transformers engine or an OpenAI-compatible client for `model`."""
    from exnihilo.engines import make_engine

    check_engine(engine, base_urls)
    if engine == "transformers":
        return make_engine("transformers", model, dtype=dtype, batch_size=batch_size,
                           progress_label=label)
    return make_engine("openai", model, base_urls=base_urls, concurrency=concurrency,
                       progress_label=label)
