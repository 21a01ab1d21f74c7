"""Engines: one protocol (`complete` raw prompts, `chat` conversations), several backends
registered by kind name."""

from exnihilo.engines.base import (
    Completion,
    Engine,
    LogprobEngine,
    SamplingParams,
    supports_logprobs,
)
from exnihilo.engines.registry import engine_kinds, make_engine, register

__all__ = ["Completion", "Engine", "LogprobEngine", "SamplingParams", "engine_kinds",
           "make_engine", "register", "supports_logprobs"]
