"""The engine protocol every generator and judge goes through: types only. Backends live
in their own modules and register themselves (`engines.registry`).

    complete(prompts, params) -> list[Completion]      # raw text in, no chat template
    chat(conversations, params) -> list[Completion]    # the model's own chat template

`params.seed` is the base seed; row i of a call is sampled with `seeds[i]` when given
(per-record seeds), else `seed + i`.

What callers may also read: `name` (recorded in outputs), `label` (the progress label),
`tokenizer` (the model's tokenizer, or None for a remote server) and `context_length`
(tokens the model takes, or None when unknown).

Optional capability, `LogprobEngine`: log-probabilities instead of text — the next token's
top candidates after a conversation (a judge's score token, a tag's first word) and the
summed log-probability of given replies (multiple choice, option likelihood). Likelihood
judging needs it; `supports_logprobs(engine)` tells.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, Field

FinishReason = Literal["stop", "length"]


class SamplingParams(BaseModel):
    """Decoding settings. temperature 0 means greedy."""

    temperature: float = Field(0.7, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 disables top-k")
    max_new_tokens: int = Field(256, ge=1)
    stop: list[str] = Field(default_factory=list, description="extra stop strings")
    seed: int = 0

    def public(self) -> dict[str, Any]:
        """What goes into a record's meta.sampling."""
        return self.model_dump()


def row_seeds(n: int, params: SamplingParams, seeds: list[int] | None) -> list[int]:
    """One seed per prompt: the caller's (per-record seeds make a row's sample independent
    of its batch, in float32), or params.seed + i when none are given."""
    if seeds is None:
        return [params.seed + i for i in range(n)]
    if len(seeds) != n:
        raise ValueError(f"one seed per prompt: {len(seeds)} seeds for {n} prompts")
    return list(seeds)


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason


@runtime_checkable
class Engine(Protocol):
    name: str  # e.g. "transformers:smollm2-135m-instruct"
    label: str  # progress label ("generating", "judging", …)
    tokenizer: Any  # the model's tokenizer; None for a remote server
    context_length: int | None  # tokens the model takes; None when unknown

    def complete(self, prompts: list[str], params: SamplingParams,
                 seeds: list[int] | None = None) -> list[Completion]: ...

    def chat(self, conversations: list[list[dict[str, str]]], params: SamplingParams,
             seeds: list[int] | None = None) -> list[Completion]: ...


Conversation = list[dict[str, str]]


@runtime_checkable
class LogprobEngine(Protocol):
    """Engines that can return log-probabilities (the local engine; OpenAI-compatible
    servers for `next_token_logprobs`)."""

    def next_token_logprobs(self, conversations: list[Conversation], top_k: int = 20
                            ) -> list[dict[str, float]]:
        """For each conversation, the assistant reply's first token: {token text: log p}
        of the `top_k` most likely tokens."""
        ...

    def reply_logprobs(self, conversations: list[Conversation], replies: list[str]
                       ) -> list[tuple[float, int]]:
        """For each conversation, (Σ log p, token count) of `replies[i]` as the assistant's
        answer (its end-of-turn marker not included)."""
        ...


def supports_logprobs(engine: Any) -> bool:
    return callable(getattr(engine, "next_token_logprobs", None))
