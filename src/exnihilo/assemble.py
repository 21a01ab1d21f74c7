"""Engine assembly for commands: an engine name and model spec → a ready engine.

Library code (not the CLI) so that a command's whole run, options to results, can be called
from Python; the CLI modules only parse and print.
"""

from __future__ import annotations

from typing import Any

from exnihilo.errors import ExnihiloError

# Sequences the in-process llama.cpp engine decodes together unless told (its own default).
LLAMACPP_ROWS = 32


def check_engine(engine: str, base_urls: list[str] | None, dtype: str | None = None) -> None:
    """Engine options that are wrong whatever the model: checked before anything loads."""
    if dtype is not None and engine in ("transformers", "llamacpp"):
        from exnihilo.models import DTYPES

        if dtype not in DTYPES:
            raise ExnihiloError(f"--dtype {dtype!r}: known {', '.join(DTYPES)}")
    from exnihilo.engines.registry import engine_kinds

    if engine not in engine_kinds():
        raise ExnihiloError(f"unknown engine {engine!r} (known: {', '.join(engine_kinds())})")
    if engine == "openai" and not base_urls:
        raise ExnihiloError("--engine openai needs at least one --base-url")
    if engine == "llamacpp":
        from exnihilo.engines.llamacpp import check_available

        check_available()  # llama-cpp-python is optional: say so before anything loads


def build_engine(engine: str, model: str, dtype: str = "auto", batch_size: int | None = None,
                 base_urls: list[str] | None = None, concurrency: int = 8,
                 label: str = "generating", draft_model: str | None = None,
                 device: str | None = None) -> Any:
    """A local transformers engine or an OpenAI-compatible client for `model`; with
    `draft_model`, the local engine decodes speculatively (`engines.speculative`). `device`
    (local only; None: the process default, `exnihilo.devices`). `batch_size` None: the
    local engine picks its width per call from free memory; llama.cpp takes 32 slots."""
    from exnihilo.engines import make_engine

    check_engine(engine, base_urls)
    if draft_model is not None and engine != "transformers":
        raise ExnihiloError("--draft-model needs the local engine (--engine transformers)")
    if engine == "transformers":
        local = make_engine("transformers", model, dtype=dtype, batch_size=batch_size,
                            progress_label=label, device=device)
        if draft_model is None:
            return local
        from exnihilo.engines.speculative import SpeculativeEngine
        from exnihilo.models import load_model

        return SpeculativeEngine(local, load_model(draft_model, dtype=dtype, device=device))
    if engine == "openai":
        return make_engine("openai", model, base_urls=base_urls, concurrency=concurrency,
                           progress_label=label)
    if engine == "llamacpp":  # in-process llama.cpp; --dtype picks the GGUF weights' type
        from exnihilo.engines.llamacpp import DEFAULT_WEIGHTS, DTYPE_WEIGHTS

        return make_engine("llamacpp", model, batch_size=batch_size or LLAMACPP_ROWS,
                           progress_label=label,
                           weights=DTYPE_WEIGHTS.get(dtype, DEFAULT_WEIGHTS))
    return make_engine(engine, model, progress_label=label)  # a registered plugin


def load_engine(engine: str, model: str, template_from: str | None = None, *,
                dtype: str = "auto", batch_size: int | None = None,
                base_urls: list[str] | None = None, concurrency: int = 8,
                label: str = "generating", device: str | None = None) -> tuple[Any, Any]:
    """(engine, tokenizer) for a command. A remote engine has no tokenizer of its own:
    `template_from` (else the embedded model's) supplies the chat template where a command
    renders one itself; a local engine uses its model's unless `template_from` is given."""
    from exnihilo.models import DEFAULT_MODEL, load_tokenizer

    built = build_engine(engine, model, dtype=dtype, batch_size=batch_size,
                         base_urls=base_urls, concurrency=concurrency, label=label,
                         device=device)
    own = getattr(built, "tokenizer", None)
    if template_from:
        return built, load_tokenizer(template_from)
    return built, own if own is not None else load_tokenizer(DEFAULT_MODEL)
