"""Any OpenAI-compatible server (vLLM, Ollama, llama.cpp, …) behind the engine protocol.

    complete(prompts)      -> POST {base}/completions       raw text, no chat template
    chat(conversations)    -> POST {base}/chat/completions  the server applies its template

Magpie needs `complete`: it sends the chat template's text up to the user turn and lets the
model write the user's message. A chat-only API cannot do that, so a server without
`/completions` is an error that says so.

Why hand-written rather than the `openai` client: we need per-server health across several
base URLs, our own bounded retry/backoff schedule with jitter, fail-fast on 4xx with the
server's own words, and no extra dependency; httpx (already required) gives the async
transport and connection pooling. Scale-out is N servers behind one engine, not a scheduler.

Faults: timeouts, refused connections, 5xx and 429 are retried with exponential backoff and
jitter, at most `max_retries` times per request; a failed server is cooled down so the other
servers take its requests. Any other 4xx fails at once. The API key is read from the
environment, sent as a Bearer token, and never appears in `name`, `repr`, errors or logs.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from exnihilo.engines.base import Completion, Conversation, SamplingParams, row_seeds
from exnihilo.engines.registry import register
from exnihilo.errors import ExnihiloError
from exnihilo.progress import note, token_progress

# Seeds go to servers as 31-bit non-negative ints: llama.cpp keeps a uint32 (with -1 meaning
# "random"), others a signed 32- or 64-bit int. Our per-record seeds are 62-bit hashes.
SEED_MODULUS = 2**31 - 1
RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}
# Status codes that say "this endpoint does not exist here" for POST /completions.
MISSING_ENDPOINT_STATUS = {404, 405, 501}


def normalize_base_url(url: str) -> str:
    """'http://h:8000' or 'http://h:8000/v1/' → 'http://h:8000/v1'; other paths kept as given.

    Credentials in the URL are refused: keys come from the environment only."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ExnihiloError(f"--base-url {url!r} is not an http(s) URL with a host "
                            f"(expected e.g. http://127.0.0.1:8080/v1)")
    if parts.username or parts.password:
        raise ExnihiloError("--base-url must not contain credentials; put the API key in "
                            "the environment (EXNIHILO_API_KEY)")
    path = parts.path.rstrip("/")
    if not path:
        path = "/v1"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def wire_seed(seed: int) -> int:
    return int(seed) % SEED_MODULUS


def one_line(text: str, limit: int = 300) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[:limit] + "…"


def server_message(response: httpx.Response) -> str:
    """What the server said in an error reply, as one short line.

    OpenAI/vLLM/llama.cpp put it in {"error": {"message"}}, Ollama in {"error": "..."},
    FastAPI validation in {"detail": [...]}; anything else is shown as text."""
    try:
        body = response.json()
    except ValueError:
        return one_line(response.text or response.reason_phrase or "(empty reply)")
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return one_line(str(error["message"]))
        if isinstance(error, str):
            return one_line(error)
        if body.get("message"):
            return one_line(str(body["message"]))
        detail = body.get("detail")
        if isinstance(detail, list):
            parts = [f"{'.'.join(str(x) for x in d.get('loc', []))}: {d.get('msg', '')}"
                     for d in detail if isinstance(d, dict)]
            return one_line("; ".join(parts) or json.dumps(detail))
        if detail:
            return one_line(str(detail))
    return one_line(json.dumps(body))


def retry_after_seconds(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date: not worth parsing, use our own backoff
        return None


def map_finish_reason(reason: Any) -> str:
    """OpenAI's 'length' means cut by max_tokens; everything else ended on its own."""
    return "length" if reason == "length" else "stop"


def cut_at_stop(text: str, stop: list[str]) -> str:
    """Servers strip the matched stop string; some include it. Cut either way."""
    for s in stop:
        if s:
            cut = text.find(s)
            if cut >= 0:
                text = text[:cut]
    return text


# ------------------------------------------------------------------------------ servers

class RetryableError(Exception):
    """A failure that another try (maybe on another server) can fix."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Server:
    base_url: str
    failures: int = 0  # consecutive failed cool-down periods
    cool_until: float = 0.0
    checked: bool = False  # /models looked at once


class ServerPool:
    """Round-robin over servers, skipping those cooling down after a failure.

    A failure while a server is already cooling down does not lengthen its cool-down: the
    16 requests in flight on a server that just died count as one failure, not sixteen."""

    def __init__(self, base_urls: list[str], backoff_base: float, backoff_max: float):
        self.servers = [Server(u) for u in base_urls]
        self.backoff_base, self.backoff_max = backoff_base, backoff_max
        self._next = 0

    def pick(self, now: float) -> tuple[Server, float]:
        """The next healthy server in turn, or the one that recovers first and how long to
        wait for it."""
        n = len(self.servers)
        for k in range(n):
            server = self.servers[(self._next + k) % n]
            if server.cool_until <= now:
                self._next = (self._next + k + 1) % n
                return server, 0.0
        soonest = min(self.servers, key=lambda s: s.cool_until)
        return soonest, soonest.cool_until - now

    def backoff(self, failures: int) -> float:
        """Exponential backoff with 'equal jitter': half fixed, half random."""
        delay = min(self.backoff_max, self.backoff_base * 2 ** max(0, failures - 1))
        return delay / 2 + random.uniform(0, delay / 2)

    def failed(self, server: Server, now: float, retry_after: float | None) -> None:
        if server.cool_until > now:
            return
        server.failures += 1
        delay = self.backoff(server.failures)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_max))
        server.cool_until = now + delay

    @staticmethod
    def succeeded(server: Server) -> None:
        server.failures = 0
        server.cool_until = 0.0


# ------------------------------------------------------------------------------ the engine

@register("openai")
class OpenAIEngine:
    """Generation through one or more OpenAI-compatible servers.

    model: the server's model name (what its /v1/models lists).
    base_urls: e.g. ["http://127.0.0.1:8080/v1"]; several are used round-robin.
    concurrency: requests in flight at once, over all servers.
    timeout: seconds one request may take (a long generation on a busy server counts).
    max_retries: retries per request after the first try (connection, timeout, 5xx, 429).
    extra_body: server-specific fields added to every request (e.g. {"min_p": 0}).
    """

    def __init__(self, model: str, base_urls: list[str], concurrency: int = 8,
                 timeout: float = 60, max_retries: int = 6,
                 api_key_env: str = "EXNIHILO_API_KEY", backoff_base: float = 0.5,
                 backoff_max: float = 16.0, extra_body: dict[str, Any] | None = None,
                 progress_label: str = "generating"):
        if not base_urls:
            raise ExnihiloError("the openai engine needs at least one base URL")
        if not model:
            raise ExnihiloError("the openai engine needs a model name (the server's name "
                                "for it, see its /v1/models)")
        if concurrency < 1:
            raise ExnihiloError(f"concurrency must be at least 1, got {concurrency}")
        if max_retries < 0:
            raise ExnihiloError(f"max_retries must be >= 0, got {max_retries}")
        self.model = model
        self.base_urls = [normalize_base_url(u) for u in base_urls]
        self.name = f"openai:{model}"  # never the key; URLs live in self.base_urls
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.extra_body = dict(extra_body or {})
        self.progress_label = progress_label
        self.label = progress_label
        self.tokenizer = None  # the server tokenizes; `--template-from` gives a local one
        self.context_length: int | None = None
        self.pool = ServerPool(self.base_urls, backoff_base, backoff_max)
        self.api_key_env = api_key_env  # the variable's name, never its value
        self._api_key = os.environ.get(api_key_env) or None
        self.stats = {"requests": 0, "retries": 0}

    def __repr__(self) -> str:
        return (f"OpenAIEngine(model={self.model!r}, base_urls={self.base_urls!r}, "
                f"concurrency={self.concurrency})")

    # ------------------------------------------------------------------ protocol
    def complete(self, prompts: list[str], params: SamplingParams,
                 seeds: list[int] | None = None) -> list[Completion]:
        seeds = row_seeds(len(prompts), params, seeds)
        bodies = [dict(self._sampling_body(params, s), prompt=p)
                  for p, s in zip(prompts, seeds, strict=True)]
        return self._run("/completions", bodies, params.stop)

    def chat(self, conversations: list[list[dict[str, str]]], params: SamplingParams,
             seeds: list[int] | None = None) -> list[Completion]:
        seeds = row_seeds(len(conversations), params, seeds)
        bodies = [dict(self._sampling_body(params, s),
                       messages=[{"role": m["role"], "content": m["content"]} for m in c])
                  for c, s in zip(conversations, seeds, strict=True)]
        return self._run("/chat/completions", bodies, params.stop)

    def next_token_logprobs(self, conversations: list[Conversation], top_k: int = 20
                            ) -> list[dict[str, float]]:
        """The reply's first token's top-k {text: log p}, from the server's chat `logprobs`
        (`top_logprobs`, at most 20 in OpenAI's API; vLLM and llama.cpp's server support it).
        A server that returns none is an error naming it."""
        params = SamplingParams(temperature=0.0, max_new_tokens=1, seed=0)
        bodies = [dict(self._sampling_body(params, 0), logprobs=True,
                       top_logprobs=min(top_k, 20),
                       messages=[{"role": m["role"], "content": m["content"]} for m in c])
                  for c in conversations]
        replies = self._run("/chat/completions", bodies, [], raw=True)
        return [self._top_logprobs(r) for r in replies]

    def reply_logprobs(self, conversations: list[Conversation], replies: list[str]
                       ) -> list[tuple[float, int]]:
        raise ExnihiloError(f"{self.name}: scoring given replies needs the model's prompt "
                            f"log-probabilities, which the chat API does not return; use the "
                            f"local engine (--engine transformers) for option likelihoods")

    def _top_logprobs(self, data: Any) -> dict[str, float]:
        try:
            first = data["choices"][0]["logprobs"]["content"][0]
            return {str(t["token"]): float(t["logprob"]) for t in first["top_logprobs"]}
        except (KeyError, IndexError, TypeError, ValueError):
            raise ExnihiloError(f"{self.name}: the server returned no top_logprobs for the "
                                f"reply (it may not support logprobs on /chat/completions); "
                                f"--mode logprob needs them") from None

    # ------------------------------------------------------------------ request bodies
    def _sampling_body(self, params: SamplingParams, seed: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "seed": wire_seed(seed),
            "stream": False,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        # top_k is not in OpenAI's own API (which rejects unknown fields); vLLM, llama.cpp
        # and Ollama accept it. Sent only when set, so plain OpenAI-style servers work.
        if params.top_k:
            body["top_k"] = params.top_k
        body.update(self.extra_body)
        return body

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    # ------------------------------------------------------------------ running
    def _run(self, path: str, bodies: list[dict[str, Any]], stop: list[str],
             raw: bool = False) -> list[Any]:
        """Send every body; Completions, or the servers' JSON replies when `raw`."""
        if not bodies:
            return []
        coro_factory = lambda: self._gather(path, bodies, stop, raw)  # noqa: E731
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(coro_factory())
        # Called from inside an event loop (a notebook): run ours in a thread of its own.
        result: dict[str, Any] = {}

        def target() -> None:
            try:
                result["value"] = asyncio.run(coro_factory())
            except BaseException as e:  # re-raised in the caller's thread
                result["error"] = e

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        thread.join()
        if "error" in result:
            raise result["error"]
        return result["value"]

    async def _gather(self, path: str, bodies: list[dict[str, Any]], stop: list[str],
                      raw: bool = False) -> list[Any]:
        semaphore = asyncio.Semaphore(self.concurrency)
        self._check_locks: dict[str, asyncio.Lock] = {}  # bound to this call's event loop
        limits = httpx.Limits(max_connections=self.concurrency,
                              max_keepalive_connections=self.concurrency)
        timeout = httpx.Timeout(self.timeout, connect=min(10.0, self.timeout))
        async with httpx.AsyncClient(headers=self._headers(), timeout=timeout, limits=limits,
                                     trust_env=False) as client:
            with token_progress(self.progress_label, len(bodies)) as bar:
                async def one(body: dict[str, Any]) -> Any:
                    async with semaphore:
                        data, server = await self._request(client, path, body)
                    if raw:
                        bar.advance(items=1, tokens=1)
                        return data
                    completion = self._parse(data, server.base_url + path, stop)
                    bar.advance(items=1, tokens=completion.completion_tokens)
                    return completion

                tasks = [asyncio.ensure_future(one(b)) for b in bodies]
                await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                failed = [t for t in tasks if t.done() and not t.cancelled()
                          and t.exception() is not None]
                if failed:
                    # Fail fast: cancel the rest and let them unwind while the client is
                    # still open (else half-made connections warn at exit).
                    for t in tasks:
                        t.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                    raise failed[0].exception()  # type: ignore[misc]
                return [t.result() for t in tasks]

    async def _request(self, client: httpx.AsyncClient, path: str, body: dict[str, Any]
                       ) -> tuple[dict[str, Any], Server]:
        """POST with retries on retryable faults, each try on the next healthy server."""
        last_error = ""
        for attempt in range(self.max_retries + 1):
            server, wait = self.pool.pick(time.monotonic())
            if wait > 0:
                await asyncio.sleep(wait)
            if attempt:
                self.stats["retries"] += 1
            self.stats["requests"] += 1
            try:
                await self._check_model(client, server)
                data = await self._post(client, server, path, body)
            except RetryableError as e:
                last_error = str(e)
                was_healthy = server.cool_until <= time.monotonic()
                self.pool.failed(server, time.monotonic(), e.retry_after)
                if was_healthy:
                    note(self._redact(f"{last_error}; retrying (server cools down "
                                      f"{server.cool_until - time.monotonic():.1f} s)"))
                continue
            self.pool.succeeded(server)
            return data, server
        urls = ", ".join(self.base_urls)
        raise ExnihiloError(self._redact(
            f"gave up after {self.max_retries + 1} tries of POST {path} on {urls}; "
            f"last error: {last_error}"))

    async def _send(self, client: httpx.AsyncClient, method: str, url: str,
                    body: dict[str, Any] | None = None) -> httpx.Response:
        """One HTTP exchange; transport faults become RetryableError."""
        try:
            return await client.request(method, url, json=body)
        except httpx.TimeoutException:
            raise RetryableError(f"{url}: no answer within {self.timeout:g} s") from None
        except httpx.TransportError as e:
            why = one_line(str(e) or type(e).__name__, 160)
            raise RetryableError(f"{url}: cannot connect ({why})") from None

    async def _post(self, client: httpx.AsyncClient, server: Server, path: str,
                    body: dict[str, Any]) -> dict[str, Any]:
        url = server.base_url + path
        response = await self._send(client, "POST", url, body)
        if response.status_code in RETRYABLE_STATUS:
            raise RetryableError(f"{url} answered {response.status_code}: "
                                 f"{server_message(response)}", retry_after_seconds(response))
        if response.status_code >= 400:
            said = server_message(response)
            hint = ""
            if path == "/completions" and response.status_code in MISSING_ENDPOINT_STATUS:
                hint = (" — if this server has no raw /completions endpoint (a chat-only "
                        "API), Magpie cannot run through it: it needs raw text completions")
            raise ExnihiloError(self._redact(
                f"{url} answered {response.status_code}: {said}{hint}"))
        return self._json(response, url)

    def _json(self, response: httpx.Response, url: str) -> dict[str, Any]:
        try:
            data = response.json()
        except ValueError:
            kind = response.headers.get("content-type", "no content type")
            raise ExnihiloError(self._redact(
                f"{url} answered {response.status_code} with non-JSON ({kind}): "
                f"{one_line(response.text, 120)!r} — is --base-url an OpenAI-compatible "
                f"API (usually ending in /v1)?")) from None
        if not isinstance(data, dict):
            raise ExnihiloError(f"{url} answered with JSON that is not an object: "
                                f"{one_line(json.dumps(data), 120)}")
        return data

    async def _check_model(self, client: httpx.AsyncClient, server: Server) -> None:
        """Once per server: if it lists its models, the requested one must be there.

        Some servers (llama-cpp-python) answer for any model name with whatever they
        loaded; checking the list catches a wrong --model before it silently works."""
        if server.checked:
            return
        async with self._check_locks.setdefault(server.base_url, asyncio.Lock()):
            if not server.checked:  # another request may have checked it meanwhile
                await self._check_model_list(client, server)

    async def _check_model_list(self, client: httpx.AsyncClient, server: Server) -> None:
        url = server.base_url + "/models"
        response = await self._send(client, "GET", url)
        if response.status_code in RETRYABLE_STATUS:
            raise RetryableError(f"{url} answered {response.status_code}: "
                                 f"{server_message(response)}", retry_after_seconds(response))
        if response.status_code in (401, 403):
            raise ExnihiloError(self._redact(
                f"{url} answered {response.status_code}: {server_message(response)} "
                f"(set the API key in the environment variable {self.api_key_env})"))
        if response.status_code >= 400:  # no model list here: nothing to check
            server.checked = True
            return
        data = self._json(response, url)
        listed = [m.get("id") for m in data.get("data") or [] if isinstance(m, dict)]
        if listed and self.model not in listed:
            shown = ", ".join(repr(m) for m in listed[:8])
            raise ExnihiloError(f"{server.base_url} does not serve model {self.model!r} "
                                f"(its /models lists {shown}); pass one of those as --model")
        server.checked = True

    # ------------------------------------------------------------------ replies
    @staticmethod
    def _parse(data: dict[str, Any], url: str, stop: list[str]) -> Completion:
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise ExnihiloError(f"{url} answered without choices: "
                                f"{one_line(json.dumps(data), 160)}")
        choice = choices[0]
        if url.endswith("/chat/completions"):
            message = choice.get("message") or {}
            text = message.get("content") if isinstance(message, dict) else None
        else:
            text = choice.get("text")
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise ExnihiloError(f"{url} answered with non-text content: "
                                f"{one_line(json.dumps(choice), 160)}")
        usage = data.get("usage") or {}
        return Completion(text=cut_at_stop(text, stop),
                          prompt_tokens=int(usage.get("prompt_tokens") or 0),
                          completion_tokens=int(usage.get("completion_tokens") or 0),
                          finish_reason=map_finish_reason(choice.get("finish_reason")))  # type: ignore[arg-type]
