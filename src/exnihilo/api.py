"""The Python API: every verb of the CLI as a function on records and paths.

    import exnihilo
    data = exnihilo.magpie(20, model="smollm2-135m-instruct")       # synth, no file needed
    data = exnihilo.tag(data, judge="smollm2-135m-instruct")        # curate
    data = exnihilo.filter(data, ["quality>=average"])
    exnihilo.sft(data, "runs/sft")                                   # train
    answers = exnihilo.generate(["Name a prime."], model="runs/sft")
    print(exnihilo.eval_judge(answers, judge="smollm2-135m-instruct").summary)

Data arguments take a path (any format `records.read_any` reads, `hf:org/name`), a list of
records (ours, Alpaca, ShareGPT, TRL dicts — anything `to_record` converts), or for prompts
plain strings. Model arguments take a model name/folder (a local engine is built) or an
engine object: anything with `chat(conversations, params, seeds)` and `complete(prompts,
params, seeds)` — `FunctionEngine` wraps a plain Python function as one. Functions that
return records return a `Records` list carrying the command's summary as `.summary`.

This module is thin on purpose: each function validates its options the way the CLI does
and calls the same library functions, so a notebook and a shell run give the same files.
`exnihilo/__init__.py` imports it lazily, so `import exnihilo` loads no torch.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from exnihilo.engines.base import Completion, SamplingParams
from exnihilo.errors import ExnihiloError
from exnihilo.models import DEFAULT_MODEL
from exnihilo.outputs import side_file
from exnihilo.records import Record, read_any, to_record, write_jsonl_atomic

Data = str | Path | Iterable[Any]


class Records(list):
    """A list of records with the run's summary attached (`.summary`)."""

    def __init__(self, items: Iterable[Record] = (), summary: Any = None):
        super().__init__(items)
        self.summary = summary


class FunctionEngine:
    """An engine from a Python function `messages -> reply text` (and, for raw prompts,
    `text -> continuation`): plug any client or rule into every verb."""

    label = "generating"
    tokenizer = None
    context_length = None

    def __init__(self, chat: Callable[[list[dict[str, str]]], str],
                 complete: Callable[[str], str] | None = None, name: str = "function"):
        self._chat, self._complete, self.name = chat, complete, name

    def chat(self, conversations: list[list[dict[str, str]]], params: SamplingParams,
             seeds: list[int] | None = None) -> list[Completion]:
        return [Completion(self._chat(list(c)), 0, 0, "stop") for c in conversations]

    def complete(self, prompts: list[str], params: SamplingParams,
                 seeds: list[int] | None = None) -> list[Completion]:
        if self._complete is None:
            raise ExnihiloError(f"engine {self.name!r} answers chats only (give complete=…)")
        return [Completion(self._complete(p), 0, 0, "stop") for p in prompts]


# ---------------------------------------------------------------------------------- helpers

def load(data: Data) -> list[Record]:
    """Any data argument → schema records (paths read with `read_any`; dicts converted with
    `to_record`; strings taken as single user prompts)."""
    if isinstance(data, (str, Path)):
        return read_any(data)
    out = []
    for i, item in enumerate(data):
        if isinstance(item, str):
            item = {"prompt": item}
        out.append(to_record(dict(item), f"records[{i}]"))
    return out


@contextmanager
def _as_file(data: Data):
    """A path for library functions that read files: given paths pass through; records are
    written to a temporary JSONL that is removed afterwards."""
    if isinstance(data, (str, Path)) and not str(data).startswith("hf:"):
        yield Path(data)
        return
    with tempfile.TemporaryDirectory(prefix="exnihilo-api-") as tmp:
        path = Path(tmp) / "data.jsonl"
        write_jsonl_atomic(path, load(data))
        yield path


@contextmanager
def _out_file(out: str | Path | None):
    """The given output path, or a temporary one whose records are read back."""
    if out is not None:
        yield Path(out)
        return
    with tempfile.TemporaryDirectory(prefix="exnihilo-api-") as tmp:
        yield Path(tmp) / "out.jsonl"


def _is_engine(obj: Any) -> bool:
    return callable(getattr(obj, "chat", None)) and callable(getattr(obj, "complete", None))


def engine(model: Any = DEFAULT_MODEL, *, engine: str = "transformers", dtype: str = "auto",
           batch_size: int = 16, base_url: list[str] | None = None, concurrency: int = 8,
           label: str = "generating", device: str | None = None) -> Any:
    """An engine object as is, or one built for a model name (the CLI's `--engine`); a local
    one on `device` (None: the process default, `exnihilo.devices`)."""
    if _is_engine(model):
        return model
    from exnihilo.assemble import build_engine

    return build_engine(engine, str(model), dtype=dtype, batch_size=batch_size,
                        base_urls=base_url or [], concurrency=concurrency, label=label,
                        device=device)


def _tokenizer(eng: Any, template_from: str | None) -> Any:
    from exnihilo.models import load_tokenizer

    if template_from:
        return load_tokenizer(template_from)
    own = getattr(eng, "tokenizer", None)
    return own if own is not None else load_tokenizer(DEFAULT_MODEL)


def _engine_name(eng: Any) -> str:
    return str(getattr(eng, "name", type(eng).__name__))


# ------------------------------------------------------------------------------------ synth

def magpie(n: int, model: Any = DEFAULT_MODEL, *, out: str | Path | None = None,
           template_from: str | None = None, **options: Any) -> Records:
    """`synth magpie`: n instruction-response records from the model's own chat template.

    Options are `MagpieJob`'s (turns, system, no_system, seed, batch_size, temperatures…).
    Without `out` the records are only returned; with it, the file is written and resumable.
    """
    from exnihilo.synth.magpie import MagpieJob, synthesize, validate_magpie_job

    with _out_file(out) as path:
        name = model if not _is_engine(model) else _engine_name(model)
        job = MagpieJob(n=n, out=path, model=str(name), template_from=template_from,
                        **options)
        config = validate_magpie_job(job)
        eng = engine(model, engine=job.engine, dtype=job.dtype, batch_size=job.batch_size,
                     base_url=job.base_url, concurrency=job.concurrency, label="magpie")
        summary = synthesize(eng, _tokenizer(eng, template_from), config, path)
        return Records(read_any(path), summary)


def documents(inputs: list[str | Path], out: str | Path, **options: Any) -> dict[str, Any]:
    """`synth documents`: grounded Q&A records from your files, written to `out` (options are
    `DocumentsJob`'s: model, judge, n_per_chunk, …). Returns the run summary."""
    from exnihilo.synth.documents import DocumentsJob, run_job, validate_job

    return run_job(validate_job(DocumentsJob(paths=[Path(p) for p in inputs], out=Path(out),
                                             **options)))


# ----------------------------------------------------------------------------------- curate

def tag(data: Data, judge: Any = DEFAULT_MODEL, *, out: str | Path | None = None,
        score: bool = False, mode: str = "generate", batch_size: int = 16, seed: int = 0,
        max_new_tokens: int = 96, engine_kind: str = "transformers",
        dtype: str = "auto") -> Records:
    """`curate tag`: quality, difficulty and category (and with `score` a 0-100 response
    score) under meta.tags, by any model or engine as the judge."""
    from exnihilo.curate.tags import MODES, tag_file

    if mode not in MODES:
        raise ExnihiloError(f"mode {mode!r}: known {', '.join(MODES)}")
    with _as_file(data) as src, _out_file(out) as dst:
        eng = engine(judge, engine=engine_kind, dtype=dtype, batch_size=batch_size,
                     label="tagging")
        summary = tag_file(src, dst, eng, score=score, batch_size=batch_size, seed=seed,
                           max_new_tokens=max_new_tokens, mode=mode)
        return Records(read_any(dst), summary)


def dedup(data: Data, threshold: float = 0.05, **options: Any) -> Records:
    """`curate dedup`: exact, then embedding near-duplicates (all-MiniLM-L6-v2); options are
    `dedup_records`'s (k, method, batch_size, vectors, embedder)."""
    from exnihilo.curate.embed import dedup_records

    kept, summary = dedup_records(load(data), threshold, **options)
    return Records(kept, summary)


def filter(data: Data, where: str | list[str], missing: str = "error") -> Records:  # noqa: A001
    """`curate filter`: keep the records passing every rule ('quality>=good', …); the
    summary says what each rule removed."""
    from exnihilo.curate.filters import apply_filters

    rules = [where] if isinstance(where, str) else list(where)
    kept, report = apply_filters(load(data), rules, on_missing=missing)
    return Records(kept, report)


# ------------------------------------------------------------------------------------ train

def _train_data(data: Data, out: str | Path) -> str:
    """A path for the trainers (they hash the data file into the run's identity): records
    given in memory are saved once beside the run folder, as `.exnihilo/OUT.data.jsonl`."""
    if isinstance(data, (str, Path)) and not str(data).startswith("hf:"):
        return str(data)
    path = side_file(out, "data.jsonl")
    write_jsonl_atomic(path, load(data))
    return str(path)


def sft(data: Data, out: str | Path, model: str = DEFAULT_MODEL, *, resume: bool = False,
        model_obj: Any = None, tokenizer: Any = None, **options: Any) -> Any:
    """`train sft`: LoRA (or `full=True`) supervised finetuning into the folder `out`.

    Options are `SFTConfig`'s (epochs, lr, batch_size, style, max_length, pack, …);
    `model_obj`/`tokenizer` train an in-memory model instead of loading `model`."""
    from exnihilo.train.sft import SFTConfig, run_sft

    cfg = SFTConfig(out=str(out), model=model, data=_train_data(data, out), **options)
    return run_sft(cfg, resume=resume, model_obj=model_obj, tokenizer=tokenizer)


def dpo(data: Data, out: str | Path, model: str = DEFAULT_MODEL, *, resume: bool = False,
        model_obj: Any = None, tokenizer: Any = None, **options: Any) -> Any:
    """`train dpo`: preference optimisation (DPO and its variants via `loss=`) into `out`."""
    from exnihilo.train.dpo import DPOConfig, run_dpo

    cfg = DPOConfig(out=str(out), model=model, data=_train_data(data, out), **options)
    return run_dpo(cfg, resume=resume, model_obj=model_obj, tokenizer=tokenizer)


# ----------------------------------------------------------------------- generate and eval

def generate(data: Data, model: Any = DEFAULT_MODEL, *, out: str | Path | None = None,
             style: str = "chat", temperature: float = 0.0, top_p: float = 1.0,
             max_new_tokens: int = 256, seed: int = 0, limit: int | None = None,
             engine_kind: str = "transformers", dtype: str = "auto",
             batch_size: int = 16, device: str | None = None) -> Records:
    """`generate`: answer every prompt (references move to meta.reference, as for eval);
    a local model runs on `device` (None: the process default)."""
    from exnihilo.evaluate import generate_responses, generation_summary, load_eval_set

    params = SamplingParams(temperature=temperature, top_p=top_p,
                            max_new_tokens=max_new_tokens, seed=seed)
    with _as_file(data) as src:
        prompts = load_eval_set(src, limit=limit)
    eng = engine(model, engine=engine_kind, dtype=dtype, batch_size=batch_size, device=device)
    rows = generate_responses(eng, prompts, params, style=style, out=out)
    return Records(rows, generation_summary(rows))


def eval_judge(data: Data, judge: Any = DEFAULT_MODEL, *, out: str | Path | None = None,
          mode: str = "generate", seed: int = 0, max_new_tokens: int = 32,
          engine_kind: str = "transformers", dtype: str = "auto",
          batch_size: int = 16) -> Records:
    """`eval judge`: score each final answer 0-100 against its reference (meta.judge)."""
    from exnihilo.evaluate import judge_scores, judge_summary, read_generations
    from exnihilo.evaluate.judging import check_mode

    check_mode(mode)
    with _as_file(data) as src:
        rows = read_generations(src)
    params = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens,
                            seed=seed)
    eng = engine(judge, engine=engine_kind, dtype=dtype, batch_size=batch_size,
                 label="judging")
    scored = judge_scores(eng, rows, params, out=out, mode=mode)
    return Records(scored, judge_summary(scored))


def eval_perplexity(data: Data, model: Any = DEFAULT_MODEL, *, tokenizer: Any = None,
               style: str | None = None, dtype: str = "auto", batch_size: int = 8,
               max_length: int = 2048, limit: int | None = None,
               device: str | None = None) -> Records:
    """`eval perplexity`: perplexity of the reference answers given their prompts. `model`
    is a name/folder, or a loaded model with its `tokenizer`."""
    from exnihilo.evaluate import load_eval_set, model_perplexity
    from exnihilo.evaluate.perplexity import perplexity as run_perplexity

    with _as_file(data) as src:
        rows_in = load_eval_set(src, limit=limit)
    if isinstance(model, (str, Path)):
        rows, summary = model_perplexity(str(model), rows_in, style=style, dtype=dtype,
                                         batch_size=batch_size, max_length=max_length,
                                         device=device)
    else:
        if tokenizer is None:
            raise ExnihiloError("perplexity: a loaded model needs its tokenizer=")
        rows, summary = run_perplexity(model, tokenizer, rows_in, style=style or "chat",
                                       batch_size=batch_size, max_length=max_length)
    return Records(rows, summary)


def _response_map(rows: Iterable[Any]) -> dict[str, str]:
    """{"prompt", "response"} dicts or answered records → prompt → response."""
    found = {}
    for i, row in enumerate(rows):
        if isinstance(row, dict) and isinstance(row.get("response"), str):
            found[str(row.get("prompt"))] = row["response"]
            continue
        msgs = to_record(dict(row), f"responses[{i}]")["messages"]
        users = [m["content"] for m in msgs if m["role"] == "user"]
        if msgs[-1]["role"] != "assistant" or not users:
            raise ExnihiloError(f"responses[{i}]: needs a user prompt and a final answer")
        found[users[-1]] = msgs[-1]["content"]
    return found


def eval_ifeval(model: Any = None, *, responses: Data | dict[str, str] | None = None,
           inputs: str | Path | None = None, limit: int | None = None,
           max_new_tokens: int = 1024, resamples: int = 1000) -> Records:
    """`eval ifeval`: instruction following, strict and loose, with bootstrap intervals.

    Give `model` (a name or engine: answers are generated greedily) or `responses` (a path,
    records ending in an answer, or a {prompt: response} dict). `inputs` defaults to the
    shared 541-prompt set."""
    from exnihilo.ifeval import (
        evaluate_responses,
        match_responses,
        read_inputs,
        read_responses,
        summarize,
    )

    if (model is None) == (responses is None):
        raise ExnihiloError("ifeval: give exactly one of model= or responses=")
    if inputs is None:
        from exnihilo.ifeval.score import DEFAULT_INPUT

        inputs = DEFAULT_INPUT
    prompts = read_inputs(inputs, limit=limit)
    if model is not None:
        from exnihilo.ifeval.run import answer_prompts

        answers: Any = answer_prompts(engine(model), prompts, max_new_tokens=max_new_tokens)
    elif isinstance(responses, dict):
        answers = match_responses(prompts, responses, "responses")
    elif isinstance(responses, (str, Path)):
        answers = match_responses(prompts, read_responses(responses), str(responses))
    else:
        answers = match_responses(prompts, _response_map(responses), "responses")
    results = evaluate_responses(prompts, answers)
    return Records(results, summarize(results, resamples=resamples))


# Names chosen not to shadow the package's modules (exnihilo.records, .judge, .ifeval): the
# evals carry the CLI group's prefix, `eval judge` → `eval_judge`.
__all__ = ["FunctionEngine", "Records", "dedup", "documents", "dpo", "engine", "eval_ifeval",
           "eval_judge", "eval_perplexity", "filter", "generate", "load", "magpie", "sft", "tag"]

