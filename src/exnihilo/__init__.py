"""exnihilo: make small language models better starting from nothing.

`import exnihilo` is cheap: the verbs (`exnihilo.magpie`, `.tag`, `.filter`, `.sft`,
`.generate`, `.eval_judge`, … — see `exnihilo.api`) are loaded on first use, so importing the
package pulls in no torch and changes nothing in the environment.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = ("FunctionEngine", "Records", "dedup", "documents", "dpo", "engine", "eval_ifeval",
        "eval_judge", "eval_perplexity", "filter", "generate", "load", "magpie", "sft", "tag")

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    """PEP 562 lazy attributes: the API module is imported when a verb is first used."""
    if name in _API:
        from exnihilo import api

        return getattr(api, name)
    raise AttributeError(f"module 'exnihilo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
