"""Engines by kind name. A backend module registers its factory with `@register("kind")`;
the built-in backends are imported on first use, and third-party backends can register
through the `exnihilo.engines` entry-point group (each entry point names a module that
registers itself on import), the way simonw/llm discovers its plugins.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from exnihilo.engines.base import Engine
from exnihilo.errors import ExnihiloError

_FACTORIES: dict[str, Callable[..., Engine]] = {}
_BUILTIN = {"transformers": "exnihilo.engines.transformers",
            "openai": "exnihilo.engines.openai",
            "llamacpp": "exnihilo.engines.llamacpp"}


def register(kind: str) -> Callable[[Callable[..., Engine]], Callable[..., Engine]]:
    """Decorator: make `factory(model, **options)` the engine of this kind."""
    def add(factory: Callable[..., Engine]) -> Callable[..., Engine]:
        _FACTORIES[kind] = factory
        return factory
    return add


def _load_plugins() -> None:
    from importlib.metadata import entry_points

    for entry in entry_points(group="exnihilo.engines"):
        importlib.import_module(entry.value.split(":")[0])


def engine_kinds() -> list[str]:
    return sorted(set(_BUILTIN) | set(_FACTORIES))


def make_engine(kind: str, model: str, **options: Any) -> Engine:
    """Build an engine by kind name ("transformers", "openai", or a plugin's)."""
    if kind not in _FACTORIES and kind in _BUILTIN:
        importlib.import_module(_BUILTIN[kind])
    if kind not in _FACTORIES:
        _load_plugins()
    if kind not in _FACTORIES:
        raise ExnihiloError(f"unknown engine {kind!r} (known: {', '.join(engine_kinds())})")
    return _FACTORIES[kind](model, **options)
