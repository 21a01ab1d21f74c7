"""Test helpers shared by every test module: one scripted engine and one CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

from exnihilo.engines.base import Completion, SamplingParams


class ScriptedEngine:
    """Implements the engine protocol without a model: each prompt (complete) or each
    conversation's last message (chat) is answered by `answer(text)`; every call is
    recorded. `die_after` calls in, it raises KeyboardInterrupt, like a kill mid-run."""

    tokenizer = None
    context_length = None

    def __init__(self, answer: Callable[[str], str], name: str = "fake:judge",
                 die_after: int | None = None):
        self.answer = answer
        self.name = self.label = name
        self.die_after = die_after
        self.calls: list[tuple[str, list, SamplingParams, list[int] | None]] = []

    def _tick(self) -> None:
        if self.die_after is not None and len(self.calls) >= self.die_after:
            raise KeyboardInterrupt("simulated kill")

    def complete(self, prompts, params, seeds=None):
        self._tick()
        self.calls.append(("complete", prompts, params, seeds))
        return [Completion(self.answer(p), 1, 1, "stop") for p in prompts]

    def chat(self, conversations, params, seeds=None):
        self._tick()
        self.calls.append(("chat", conversations, params, seeds))
        return [Completion(self.answer(c[-1]["content"]), 1, 1, "stop") for c in conversations]

    @property
    def rows_seen(self) -> int:
        return sum(len(c[1]) for c in self.calls)


def run_cli(*args: str, env_extra: dict[str, str] | None = None, timeout: int = 300
            ) -> subprocess.CompletedProcess:
    """`exnihilo ARGS` in a subprocess (its own exit status, stdout and stderr)."""
    env = dict(os.environ, EXNIHILO_NO_PROGRESS="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "exnihilo.cli", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)
