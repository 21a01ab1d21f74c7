"""The instruction synthesizer: raw documents → grounded instruction–response pairs.

Instruction Pre-Training (arXiv 2406.14491) has a synthesizer model read a raw text and
write instruction–response pairs about it; the text followed by its pairs is pretraining
data, the pairs alone are SFT data. This module runs the job; each step is its own module:

- `synth/ingest.py`: files, folders, JSONL and pydoc → documents → token chunks;
- `synth/stepwise.py` (default): one question per passage, answered with the chunk's own
  sentences, which works even with the embedded 135M model;
- `synth/joint.py`: the paper's one-generation synthesis with few-shot chains (needs a
  capable synthesizer);
- `synth/grounding.py`: optional judge check, `meta.tags.grounded` true / false / null;
- `synth/corpus.py`: the instruction-augmented corpus, optionally mixed at an exact ratio.

`DocumentsJob` is the whole command (what `exnihilo synth documents` parses into): every
option is validated and the inputs read before a model or embedder loads.

Resumable like Magpie: every finished chunk (with or without pairs) is one line in the
`.exnihilo/<out>.chunks.jsonl` sidecar, written after its records; a rerun skips those chunks, drops
records of a chunk the killed run had not finished, and regenerates it with the same seed.
The output is opened through `resume.ResumableOutput`: locked for the run, and refused when
it was made with other settings or by something else (it is never emptied).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from exnihilo.assemble import check_engine
from exnihilo.engines.base import Engine, SamplingParams
from exnihilo.errors import ExnihiloError
from exnihilo.outputs import check_output, is_special, side_file
from exnihilo.progress import note, token_progress
from exnihilo.records import JsonlAppender, Record, iter_jsonl, make_record, write_jsonl_atomic
from exnihilo.resume import ResumableOutput, row_key
from exnihilo.synth.corpus import (  # noqa: F401  (re-exported: the corpus step's names)
    corpus_texts,
    general_text,
    mix_corpus,
    parse_ratio,
    write_corpus,
)
from exnihilo.synth.grounding import (  # noqa: F401  (re-exported)
    grounding_request,
    judge_pairs,
    judge_rows,
    parse_grounding,
)
from exnihilo.synth.ingest import Chunk, chunk_seed
from exnihilo.synth.joint import (  # noqa: F401  (re-exported: the joint method's names)
    DEMO,
    TASK_FORMATS,
    Example,
    assemble_conversation,
    chunk_row,
    example_chain,
    example_from_row,
    example_turns,
    prompt_tokens,
    round_groups,
    synthesis_request,
    synthesize_batch,
    task_formats,
)
from exnihilo.synth.stepwise import (  # noqa: F401  (question_request re-exported)
    StepwiseSettings,
    question_request,
    stepwise_rows,
)


class DocumentsConfig(BaseModel):
    method: Literal["stepwise", "joint"] = Field(
        "stepwise", description="stepwise: a question per passage, answers traced to chunk "
                                "sentences (any model); joint: all pairs in one generation "
                                "with few-shot chains (the paper's; needs a capable model)")
    answers: Literal["quote", "generate"] = Field(
        "quote", description="stepwise answers: the evidence sentences, or the model's answer "
                             "from them kept when lexically supported")
    min_evidence: float = Field(0.45, ge=-1.0, le=1.0, description="stepwise: least cosine "
                                "similarity of a question to its best chunk sentence")
    min_support: float = Field(0.8, ge=0.0, le=1.0, description="stepwise generate: least "
                               "share of answer content words found in the evidence")
    question_tokens: int = Field(64, ge=8, description="stepwise: token limit of a question")
    answer_tokens: int = Field(128, ge=8, description="stepwise generate: limit of an answer")
    pairs_per_chunk: int = Field(3, ge=1, le=20)
    rounds: int = Field(1, ge=1, description="chunk groups; round r's outputs are round "
                                             "r+1's few-shot examples")
    shots: int = Field(2, ge=0, description="most earlier (text, pairs) examples in a prompt")
    demo: bool = Field(True, description="show a built-in example when there is no earlier one")
    seed: int = 0
    batch_chunks: int = Field(8, ge=1, description="chunks generated together")
    context_tokens: int = Field(..., ge=256, description="prompt + answer token budget")
    store_chunk_text: bool = True
    generation: SamplingParams = SamplingParams(temperature=0.0, max_new_tokens=384)
    judging: SamplingParams = SamplingParams(temperature=0.0, max_new_tokens=32)

    def stepwise_settings(self) -> StepwiseSettings:
        """Questions and answers share the generation's sampling, each with its own limit."""
        return StepwiseSettings(
            pairs_per_chunk=self.pairs_per_chunk, answers=self.answers,
            min_evidence=self.min_evidence, min_support=self.min_support,
            questions=self.generation.model_copy(update={"max_new_tokens": self.question_tokens}),
            answering=self.generation.model_copy(update={"max_new_tokens": self.answer_tokens}))

    def output_tokens(self) -> int:
        """The longest single generation: what the context must leave room for."""
        if self.method == "joint":
            return self.generation.max_new_tokens
        return max(self.question_tokens, self.answer_tokens)


def max_chunk_tokens(tokenizer: Any, config: DocumentsConfig) -> int:
    """The largest chunk whose prompt (with the demonstration, if on) plus the answer fits
    the context; chunks are cut at most this long so no source text is ever truncated.
    (Stepwise prompts hold a passage or two evidence sentences of the chunk, never more.)"""
    if config.method == "joint":
        overhead_conv = ([t for t in example_turns(DEMO)] if config.demo else []) + [
            {"role": "user", "content": synthesis_request("", task_formats(
                config.pairs_per_chunk, 0))}]
    else:
        overhead_conv = [{"role": "user", "content": question_request("")}]
    overhead = prompt_tokens(tokenizer, overhead_conv)
    margin = 16  # the fence may lengthen for texts containing "~~~"; tokens merge at edges
    return config.context_tokens - config.output_tokens() - overhead - margin


def model_context_length(engine: Any, tokenizer: Any) -> int:
    """The engine's declared context length, else the tokenizer's, else 2048."""
    n = getattr(engine, "context_length", None)
    if isinstance(n, int) and n > 0:
        return n
    n = getattr(tokenizer, "model_max_length", None)
    if isinstance(n, int) and 0 < n < 1_000_000:
        return n
    return 2048

# ----------------------------------------------------------------------------- state files

def chunks_path(out: Path) -> Path:
    return side_file(out, "chunks.jsonl")


def summary_path(out: Path) -> Path:
    return side_file(out, "summary.json")


def _chunk_of(record: Record) -> Any:
    """The id of the chunk a record was made from (None for a record from elsewhere)."""
    meta = record.get("meta") if isinstance(record, dict) else None
    source = meta.get("source_chunk") if isinstance(meta, dict) else None
    return source.get("id") if isinstance(source, dict) else None


def load_done(out: Path) -> dict[str, dict[str, Any]]:
    """Finished chunks by id, from the sidecar (after repairing a torn last line)."""
    path = chunks_path(out)
    if not path.exists():
        return {}
    JsonlAppender(path).close()  # repairs a torn tail
    return {row["chunk_id"]: row for _, row in iter_jsonl(path)}


def drop_unfinished_records(out: Path, done: dict[str, dict[str, Any]]) -> int:
    """Remove records of chunks a killed run wrote but never marked finished (atomic
    rewrite), so the rerun's regeneration of those chunks cannot duplicate or mix them."""
    if not out.exists() or is_special(out):
        return 0
    JsonlAppender(out).close()
    rows = [r for _, r in iter_jsonl(out)]
    keep = [r for r in rows if _chunk_of(r) in done]
    if len(keep) != len(rows):
        write_jsonl_atomic(out, keep)
    return len(rows) - len(keep)

@dataclass
class RunStats:
    chunks_this_run: int = 0
    no_pairs_this_run: int = 0
    pairs_parsed: int = 0
    written: int = 0
    duplicates: int = 0
    generated_tokens: int = 0
    truncated_outputs: int = 0

def documents_settings(generator: str, judge: str | None, config: DocumentsConfig,
                       chunking: dict[str, int] | None = None) -> dict[str, Any]:
    """The settings that change what a run writes (not the batch size): a resumed output
    must have been made with exactly these. `generator`/`judge` are engine names
    ("transformers:MODEL", "openai:MODEL")."""
    settings = config.model_dump(mode="json", exclude={"batch_chunks"})
    settings.update(generator=generator, judge=judge)
    if chunking is not None:
        settings["chunking"] = chunking
    return settings


def synthesize_documents(engine: Engine, tokenizer: Any, chunks: list[Chunk],
                         config: DocumentsConfig, out: str | Path,
                         judge: Engine | None = None, judge_tokenizer: Any = None,
                         judge_context_tokens: int | None = None,
                         embedder: Any = None, chunking: dict[str, int] | None = None,
                         inputs: list[str | Path] | tuple = ()) -> dict[str, Any]:
    """Write SFT records for every chunk into `out` (resuming whatever is there).

    `chunks` must already fit the context (`max_chunk_tokens`); a chunk that does not is an
    error, never silently cut. `embedder` (stepwise only) defaults to the packaged MiniLM.
    `chunking` ({"tokens", "overlap"}) is recorded with the settings; `out` may not be one
    of `inputs`. An output this command did not make, or made with other settings, is
    refused before anything is written or loaded.
    """
    out = Path(out)
    if not chunks:
        raise ExnihiloError("no text to synthesize from: the corpus is empty")
    settings = documents_settings(engine.name, judge.name if judge is not None else None,
                                  config, chunking)
    with ResumableOutput(out, "synth documents", settings, inputs=inputs,
                         sidecars=[chunks_path(out)]) as output:
        if output.rows and not chunks_path(out).exists():
            raise ExnihiloError(
                f"{out}: holds {len(output.rows)} records but its chunk log "
                f"{chunks_path(out).name} is missing, so which chunks are finished is unknown; "
                f"choose another -o (nothing was changed)")
        if config.method == "stepwise" and embedder is None:
            from exnihilo.embedder import load_embedder

            embedder = load_embedder()
        return _run(engine, tokenizer, chunks, config, out, output, judge, judge_tokenizer,
                    judge_context_tokens, embedder)


def _run(engine: Engine, tokenizer: Any, chunks: list[Chunk], config: DocumentsConfig,
         out: Path, output: ResumableOutput, judge: Engine | None, judge_tokenizer: Any,
         judge_context_tokens: int | None, embedder: Any) -> dict[str, Any]:
    budget = config.context_tokens - config.generation.max_new_tokens
    done = load_done(out)
    dropped = drop_unfinished_records(out, done)
    if dropped:
        note(f"resume: removed {dropped} records of chunks the previous run had not finished")
    existing = [r for r in output.rows if _chunk_of(r) in done]
    ids = {row_key(r) for r in existing}
    sidecar = JsonlAppender(chunks_path(out))
    texts = {c.id: c.text for c in chunks}
    done_before = sum(1 for c in chunks if c.id in done)
    stats = RunStats()
    examples_shown: list[Record] = []
    start = time.perf_counter()
    groups = round_groups(chunks, config.rounds)
    todo_total = sum(1 for c in chunks if c.id not in done)
    meta_base = {"source": "documents", "generator": engine.name, "method": config.method,
                 "sampling": config.generation.public()}
    if config.method == "stepwise":
        meta_base["answers"] = config.answers
    if judge is not None:
        meta_base["judge"] = judge.name
    try:
        with token_progress("documents", todo_total) as bar:
            for r, group in enumerate(groups):
                previous = groups[r - 1] if r > 0 else []
                todo = [(j, c) for j, c in enumerate(group) if c.id not in done]
                for b in range(0, len(todo), config.batch_chunks):
                    batch = todo[b:b + config.batch_chunks]
                    prev_ids = [previous[j].id if j < len(previous) else None for j, _ in batch]
                    if config.method == "joint":
                        rows = synthesize_batch(engine, tokenizer, [c for _, c in batch],
                                                prev_ids, done, texts, config, budget, r)
                    else:
                        rows = stepwise_batch(engine, embedder, [c for _, c in batch], config, r)
                    if judge is not None:
                        judge_rows(judge, judge_tokenizer, judge_context_tokens,
                                   [c for _, c in batch], rows, config.judging)
                    for chunk, row in zip([c for _, c in batch], rows, strict=True):
                        for record in records_for(chunk, row, meta_base, config):
                            if record["id"] in ids:
                                stats.duplicates += 1
                                continue
                            output.append(record)
                            ids.add(record["id"])
                            stats.written += 1
                            if len(examples_shown) < 5:
                                examples_shown.append(record)
                        sidecar.append(row)
                        done[chunk.id] = row
                        stats.chunks_this_run += 1
                        stats.pairs_parsed += len(row["pairs"])
                        stats.no_pairs_this_run += row["status"] == "no_pairs"
                        stats.generated_tokens += row["completion_tokens"]
                        stats.truncated_outputs += row["finish_reason"] == "length"
                        bar.advance(items=1, tokens=row["completion_tokens"])
    finally:
        sidecar.close()
    elapsed = time.perf_counter() - start
    summary = run_summary(out, chunks, done, done_before, stats, elapsed, config, engine, judge)
    write_jsonl_atomic(summary_path(out), [summary])
    summary["examples"] = examples_shown or existing[:5]  # a finished rerun shows old ones
    return summary


def stepwise_batch(engine: Engine, embedder: Any, chunks: list[Chunk], config: DocumentsConfig,
                   round_index: int) -> list[dict[str, Any]]:
    """Sidecar rows of a batch of chunks by the stepwise method (`synth/stepwise.py`)."""
    seeds = [chunk_seed(config.seed, c.id) for c in chunks]
    parts = stepwise_rows(engine, embedder, chunks, seeds, config.stepwise_settings())
    return [{"chunk_id": c.id, "source": c.source, "index": c.index, "round": round_index,
             "status": "ok" if part["pairs"] else "no_pairs", "seed": seed, "examples": [],
             "prev": None, "demo": False, **part}
            for c, seed, part in zip(chunks, seeds, parts, strict=True)]

def records_for(chunk: Chunk, row: dict[str, Any], meta_base: dict[str, Any],
                config: DocumentsConfig) -> list[Record]:
    source_chunk: dict[str, Any] = {"id": chunk.id, "source": chunk.source,
                                    "index": chunk.index}
    if config.store_chunk_text:
        source_chunk["text"] = chunk.text
    records = []
    for i, p in enumerate(row["pairs"]):
        meta = dict(meta_base, seed=row["seed"], round=row["round"], pair_index=i,
                    task_format=p["task_format"], source_chunk=source_chunk)
        for key in ("evidence", "evidence_score", "support"):  # stepwise provenance
            if key in p:
                meta[key] = p[key]
        if "grounded" in p:
            meta["tags"] = {"grounded": p["grounded"]}
        records.append(make_record([{"role": "user", "content": p["instruction"]},
                                    {"role": "assistant", "content": p["response"]}], meta))
    return records


def run_summary(out: Path, chunks: list[Chunk], done: dict[str, dict[str, Any]],
                done_before: int, stats: RunStats, elapsed: float, config: DocumentsConfig,
                engine: Engine, judge: Engine | None) -> dict[str, Any]:
    rows = [done[c.id] for c in chunks if c.id in done]
    grounded = {"true": 0, "false": 0, "null": 0}
    for row in rows:
        for p in row["pairs"]:
            if "grounded" in p:
                grounded[{True: "true", False: "false", None: "null"}[p["grounded"]]] += 1
    formats: dict[str, int] = {}
    rejected: dict[str, int] = {}
    for row in rows:
        for p in row["pairs"]:
            formats[p["task_format"]] = formats.get(p["task_format"], 0) + 1
        for x in row.get("rejected", []):
            rejected[x["reason"]] = rejected.get(x["reason"], 0) + 1
    return {
        "out": str(out),
        "chunks": len(chunks),
        "chunks_done_before": done_before,
        "chunks_this_run": stats.chunks_this_run,
        "chunks_without_pairs": sum(1 for row in rows if row["status"] == "no_pairs"),
        "pairs_total": sum(len(row["pairs"]) for row in rows),
        "records_written_this_run": stats.written,
        "duplicate_records": stats.duplicates,
        "truncated_outputs_this_run": stats.truncated_outputs,
        "task_formats": formats,
        "method": config.method,
        "questions_rejected": rejected if config.method == "stepwise" else None,
        "grounded": grounded if judge is not None else None,
        "rounds": config.rounds,
        "elapsed_s": round(elapsed, 1),
        "pairs_per_minute": round(60 * stats.pairs_parsed / elapsed, 1) if elapsed > 0 else 0.0,
        "generated_tokens_per_s": round(stats.generated_tokens / elapsed, 1)
        if elapsed > 0 else 0.0,
        "generator": engine.name,
        "judge": judge.name if judge is not None else None,
    }


def build_corpus(chunks: list[Chunk], out: str | Path, corpus_out: str | Path, seed: int = 0,
                 general: list[Record] | None = None, ratio: tuple[int, int] = (1, 1)
                 ) -> dict[str, int]:
    """Write the instruction-augmented corpus (JSONL {"text": ...}) atomically from the
    finished chunks of `out`; optionally mixed with general instruction records."""
    return write_corpus(chunks, load_done(Path(out)), corpus_out, seed, general, ratio)


# ----------------------------------------------------------------------------- the command

class DocumentsJob(BaseModel):
    """Everything `exnihilo synth documents` takes, validated before anything loads.

    `validate_job` checks the options and outputs, reads the mix file and the documents;
    `run_job` then assembles the engines and runs synthesis and the corpus."""

    paths: list[Path] = Field(default_factory=list)
    pydoc: str | None = None
    out: Path
    method: str = "stepwise"
    answers: str = "quote"
    min_evidence: float = 0.45
    min_support: float = 0.8
    pairs_per_chunk: int = 3
    chunk_tokens: int = 384
    overlap: int = 32
    rounds: int | None = None
    shots: int | None = None
    no_demo: bool = False
    judge: str | None = None
    no_grounding: bool = False
    corpus_out: Path | None = None
    mix: Path | None = None
    mix_ratio: str = "1:1"
    text_field: str = "text"
    model: str = "smollm2-135m-instruct"
    engine: str = "transformers"
    base_url: list[str] = Field(default_factory=list)
    tokenizer_from: str | None = None
    context_tokens: int | None = None
    seed: int = 0
    limit_chunks: int | None = None
    batch_size: int = 8
    dtype: str = "auto"
    max_new_tokens: int | None = None
    temperature: float = 0.0

    def config(self, context_tokens: int) -> DocumentsConfig:
        return DocumentsConfig(
            method=self.method, answers=self.answers, min_evidence=self.min_evidence,
            min_support=self.min_support, answer_tokens=self.max_new_tokens or 128,
            pairs_per_chunk=self.pairs_per_chunk, rounds=self.rounds or 1,
            shots=2 if self.shots is None else self.shots, demo=not self.no_demo,
            seed=self.seed, batch_chunks=self.batch_size, context_tokens=context_tokens,
            generation=SamplingParams(temperature=self.temperature, seed=self.seed,
                                      max_new_tokens=self.max_new_tokens or 384))

    def grounding(self) -> bool:
        return bool(self.judge) and not self.no_grounding

    def engine_name(self, model: str) -> str:
        return f"{self.engine}:{model}"


@dataclass
class PreparedJob:
    """A validated job with its inputs read: what `run_job` needs besides the models."""

    job: DocumentsJob
    documents: list[Any]
    general: list[Record] | None
    ratio: tuple[int, int]
    input_files: list[Path]
    skipped_binary: list[str] = field(default_factory=list)
    skipped_empty: list[str] = field(default_factory=list)
    skipped_links: list[str] = field(default_factory=list)
    skipped_large: list[str] = field(default_factory=list)


def validate_job(job: DocumentsJob) -> PreparedJob:
    """Check every option and output and read every input; nothing is loaded or written."""
    from exnihilo.records import read_any
    from exnihilo.resume import check_resumable
    from exnihilo.synth.ingest import IngestReport, expand_paths, pydoc_documents, read_paths

    if not job.paths and not job.pydoc:
        raise ExnihiloError("give documents (files or folders) and/or --pydoc MODULES")
    if job.method not in ("stepwise", "joint"):
        raise ExnihiloError(f"--method must be stepwise or joint, got {job.method!r}")
    if job.answers not in ("quote", "generate"):
        raise ExnihiloError(f"--answers must be quote or generate, got {job.answers!r}")
    if job.method == "joint" and job.answers != "quote":
        raise ExnihiloError("--answers belongs to --method stepwise (joint answers are "
                            "whatever the synthesizer writes)")
    if job.method == "stepwise" and (job.rounds is not None or job.shots is not None
                                     or job.no_demo):
        raise ExnihiloError("--rounds, --shots and --no-demo belong to --method joint "
                            "(stepwise prompts carry no few-shot examples)")
    check_engine(job.engine, job.base_url, job.dtype)
    if job.overlap >= job.chunk_tokens:
        raise ExnihiloError(f"--overlap {job.overlap} must be smaller than --chunk-tokens "
                            f"{job.chunk_tokens}")
    if job.batch_size < 1:
        raise ExnihiloError(f"--batch-size must be at least 1, got {job.batch_size}")
    if job.context_tokens is not None and job.context_tokens < 256:
        raise ExnihiloError(f"--context-tokens must be at least 256, got {job.context_tokens}")
    if job.max_new_tokens is not None and job.max_new_tokens < 8:
        raise ExnihiloError(f"--max-new-tokens must be at least 8, got {job.max_new_tokens}")
    if job.temperature < 0:
        raise ExnihiloError(f"--temperature must be 0 or more, got {job.temperature}")
    if not -1.0 <= job.min_evidence <= 1.0:
        raise ExnihiloError(f"--min-evidence must be in [-1, 1], got {job.min_evidence}")
    ratio = parse_ratio(job.mix_ratio)
    if job.mix is not None and job.corpus_out is None:
        raise ExnihiloError("--mix needs --corpus-out (it mixes the corpus, not the pairs)")
    input_files = expand_paths(job.paths) if job.paths else []
    inputs = [*input_files, *([job.mix] if job.mix is not None else [])]
    check_output(job.out, inputs)
    if job.corpus_out is not None:
        check_output(job.corpus_out, [*inputs, job.out, chunks_path(job.out)],
                     option="--corpus-out")
    general = read_any(job.mix) if job.mix is not None else None
    # Settings known before loading (context and final chunk size come from the model).
    try:
        config = job.config(job.context_tokens or 256)
    except ValidationError as e:
        first = e.errors()[0]
        name = str(first["loc"][0]).replace("_", "-") if first["loc"] else "option"
        raise ExnihiloError(f"--{name}: {first['msg']}") from None
    known = config.model_dump(
        mode="json", exclude={"batch_chunks"} | ({"context_tokens"} if job.context_tokens
                                                 is None else set()))
    known.update(generator=job.engine_name(job.model),
                 judge=job.engine_name(job.judge) if job.grounding() else None)
    check_resumable(job.out, "synth documents", known, inputs=inputs,
                    sidecars=[chunks_path(job.out)])

    report = IngestReport()
    if job.paths:
        read_paths(job.paths, text_field=job.text_field, report=report)
    if job.pydoc:
        pydoc_documents(job.pydoc.split(","), report=report)
    if not report.documents:
        raise ExnihiloError(f"no text found in the inputs ({len(report.skipped_binary)} binary, "
                            f"{len(report.skipped_empty)} empty files skipped)")
    return PreparedJob(job, report.documents, general, ratio, input_files,
                       report.skipped_binary, report.skipped_empty,
                       report.skipped_links, report.skipped_large)


def run_job(prepared: PreparedJob, notify: Callable[[str], None] = note) -> dict[str, Any]:
    """Load the synthesizer (and judge), chunk, synthesize, write the corpus; the summary.
    `notify` gets the one-line notices a user should see while it runs."""
    from exnihilo.assemble import build_engine, load_engine
    from exnihilo.synth.ingest import chunk_documents

    job = prepared.job
    gen, tokenizer = load_engine(job.engine, job.model, job.tokenizer_from, dtype=job.dtype,
                                 batch_size=job.batch_size, base_urls=job.base_url,
                                 label="synthesizing")
    config = job.config(job.context_tokens or model_context_length(gen, tokenizer))
    fit = max_chunk_tokens(tokenizer, config)
    if fit < 32:
        raise ExnihiloError(f"the {config.context_tokens}-token context leaves only {fit} "
                            f"tokens for a chunk; lower --max-new-tokens or raise "
                            f"--context-tokens")
    size = job.chunk_tokens
    if size > fit:
        size = fit
        notify(f"--chunk-tokens {job.chunk_tokens} does not fit the {config.context_tokens}"
               f"-token context with the prompt and answer: re-chunking at {size} tokens")
    overlap = min(job.overlap, size - 1)
    chunks, duplicate_chunks = chunk_documents(prepared.documents, tokenizer, size, overlap)
    if job.limit_chunks is not None:
        chunks = chunks[:job.limit_chunks]

    judge_engine = judge_tokenizer = judge_context = None
    if job.grounding():
        if job.judge == job.model and job.engine == "transformers":
            judge_engine = gen  # one model in memory, not two
        else:
            judge_engine = build_engine(job.engine, job.judge, dtype=job.dtype,
                                        batch_size=job.batch_size, base_urls=job.base_url,
                                        label="grounding")
        judge_tokenizer = getattr(judge_engine, "tokenizer", None)
        judge_context = model_context_length(judge_engine, judge_tokenizer) if (
            judge_tokenizer is not None) else None
    inputs = [*prepared.input_files, *([job.mix] if job.mix is not None else [])]
    summary = synthesize_documents(gen, tokenizer, chunks, config, job.out, judge=judge_engine,
                                   judge_tokenizer=judge_tokenizer,
                                   judge_context_tokens=judge_context,
                                   chunking={"tokens": size, "overlap": overlap}, inputs=inputs)
    summary.update(documents=len(prepared.documents),
                   skipped_binary=len(prepared.skipped_binary),
                   skipped_empty=len(prepared.skipped_empty),
                   skipped_links=len(prepared.skipped_links),
                   skipped_large=len(prepared.skipped_large),
                   duplicate_chunks=duplicate_chunks, chunk_tokens=size, overlap=overlap)
    if job.corpus_out is not None:
        summary["corpus"] = build_corpus(chunks, job.out, job.corpus_out, seed=job.seed,
                                         general=prepared.general, ratio=prepared.ratio)
        summary["corpus_out"] = str(job.corpus_out)
    return summary
