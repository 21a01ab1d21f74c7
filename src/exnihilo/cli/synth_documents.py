"""`exnihilo synth documents`: raw documents → instruction–response pairs (and a corpus)."""

from __future__ import annotations

from pathlib import Path

import typer

from exnihilo.cli.common import (
    MODEL_HELP,
    base_url_option,
    build_engine,
    console,
    dtype_option,
    engine_option,
)
from exnihilo.errors import ExnihiloError


def documents_command(
    paths: list[Path] = typer.Argument(None, help="Files or folders (*.txt, *.md, *.rst; "
                                                  "JSONL with a text field)."),
    pydoc: str = typer.Option(None, "--pydoc", help="Comma-separated installed Python "
                                                    "modules whose docs are the corpus, e.g. "
                                                    "json,pathlib,itertools."),
    out: Path = typer.Option(..., "-o", "--out", help="Output JSONL of SFT records "
                                                      "(appended; rerun to resume)."),
    pairs_per_chunk: int = typer.Option(3, "--pairs-per-chunk", min=1, max=20),
    method: str = typer.Option("stepwise", "--method",
                               help="stepwise: one question per passage, each answer traced to "
                                    "sentences of the chunk (works with small models); joint: "
                                    "all pairs in one generation with few-shot chains, the "
                                    "paper's way (needs a capable synthesizer)."),
    answers: str = typer.Option("quote", "--answers",
                                help="stepwise: quote = the chunk sentences that answer the "
                                     "question; generate = the model answers from them, kept "
                                     "only when --min-support of its words are in them."),
    min_evidence: float = typer.Option(0.45, "--min-evidence",
                                       help="stepwise: a question whose most similar chunk "
                                            "sentence is below this cosine is rejected as "
                                            "unanswerable."),
    min_support: float = typer.Option(0.8, "--min-support", min=0.0, max=1.0,
                                      help="stepwise generate: least share of the answer's "
                                           "content words found in the evidence."),
    chunk_tokens: int = typer.Option(384, "--chunk-tokens", min=16,
                                     help="Chunk length in the model's tokens (lowered "
                                          "automatically when the prompt would not fit)."),
    overlap: int = typer.Option(32, "--overlap", min=0, help="Tokens shared by neighbours."),
    rounds: int = typer.Option(None, "--rounds", min=1,
                               help="joint: synthesis rounds; round r's outputs are round "
                                    "r+1's few-shot examples (default 1)."),
    shots: int = typer.Option(None, "--shots", min=0,
                              help="joint: most earlier (text, pairs) examples in one prompt "
                                   "(default 2)."),
    no_demo: bool = typer.Option(False, "--no-demo",
                                 help="joint: no built-in demonstration when a chunk has "
                                      "no earlier example."),
    judge: str = typer.Option(None, "--judge", help="Model that checks each answer against "
                                                    "its chunk (meta.tags.grounded)."),
    no_grounding: bool = typer.Option(False, "--no-grounding",
                                      help="Skip the grounding check even with --judge."),
    corpus_out: Path = typer.Option(None, "--corpus-out",
                                    help="Also write an instruction-augmented pretraining "
                                         "corpus (JSONL {\"text\": ...})."),
    mix: Path = typer.Option(None, "--mix", help="General instruction data to mix into the "
                                                 "corpus (our JSONL, Alpaca or ShareGPT)."),
    mix_ratio: str = typer.Option("1:1", "--mix-ratio",
                                  help="augmented:general texts in the corpus, exact."),
    text_field: str = typer.Option("text", "--text-field", help="Text field of JSONL input."),
    model: str = typer.Option("smollm2-135m-instruct", "--model", "-m", help=MODEL_HELP),
    engine: str = engine_option(),
    base_url: list[str] = base_url_option(),
    tokenizer_from: str = typer.Option(None, "--tokenizer",
                                       help="Local model whose tokenizer counts tokens "
                                            "(default: --model; the embedded model with "
                                            "--engine openai)."),
    context_tokens: int = typer.Option(None, "--context-tokens",
                                       help="Prompt + answer budget (default: the model's "
                                            "context length)."),
    seed: int = typer.Option(0, "--seed", help="Base seed; each chunk's seed derives from it."),
    limit_chunks: int = typer.Option(None, "--limit-chunks", min=1,
                                     help="Use only the first N chunks."),
    batch_size: int = typer.Option(8, "--batch-size", help="Chunks generated together."),
    dtype: str = dtype_option(),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens",
                                       help="Token limit of one generation: a chunk's pairs "
                                            "(joint, default 384) or one answer (stepwise "
                                            "generate, default 128)."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy (the paper's)."),
    show: int = typer.Option(3, "--show", help="Print this many pairs at the end."),
) -> None:
    """Instruction synthesizer (Instruction Pre-Training, arXiv 2406.14491): read documents,
    write instruction–response pairs answerable from each chunk; optionally check them with
    a judge and write an instruction-augmented corpus. Rerun the same command to resume.

    The default stepwise method has the model write one question per passage and answers it
    with the chunk's own sentences (found by MiniLM similarity), so every answer is grounded
    even with the embedded 135M model; --method joint is the paper's one-shot synthesis for
    a capable synthesizer (e.g. --engine openai)."""
    from exnihilo.engines.base import SamplingParams
    from exnihilo.models import load_tokenizer
    from exnihilo.records import check_writable, read_any
    from exnihilo.synth.documents import (
        DocumentsConfig,
        build_corpus,
        max_chunk_tokens,
        model_context_length,
        parse_ratio,
        synthesize_documents,
    )
    from exnihilo.synth.ingest import IngestReport, chunk_documents, pydoc_documents, read_paths

    if not paths and not pydoc:
        raise ExnihiloError("give documents (files or folders) and/or --pydoc MODULES")
    if method not in ("stepwise", "joint"):
        raise ExnihiloError(f"--method must be stepwise or joint, got {method!r}")
    if answers not in ("quote", "generate"):
        raise ExnihiloError(f"--answers must be quote or generate, got {answers!r}")
    if method == "joint" and answers != "quote":
        raise ExnihiloError("--answers belongs to --method stepwise (joint answers are "
                            "whatever the synthesizer writes)")
    if method == "stepwise" and (rounds is not None or shots is not None or no_demo):
        raise ExnihiloError("--rounds, --shots and --no-demo belong to --method joint "
                            "(stepwise prompts carry no few-shot examples)")
    ratio = parse_ratio(mix_ratio)
    if mix is not None and corpus_out is None:
        raise ExnihiloError("--mix needs --corpus-out (it mixes the corpus, not the pairs)")
    check_writable(out)
    if corpus_out is not None:
        check_writable(corpus_out)
    general = read_any(mix) if mix is not None else None  # fail on bad input before loading

    report = IngestReport()
    if paths:
        read_paths(paths, text_field=text_field, report=report)
    if pydoc:
        pydoc_documents(pydoc.split(","), report=report)
    if report.skipped_binary:
        names = ", ".join(report.skipped_binary[:5])
        extra = len(report.skipped_binary) - 5
        more = f" and {extra} more" if extra > 0 else ""
        console.print(f"skipped {len(report.skipped_binary)} binary or non-UTF-8 files: "
                      f"{names}{more}", highlight=False)
    if not report.documents:
        raise ExnihiloError(f"no text found in the inputs ({len(report.skipped_binary)} binary, "
                            f"{len(report.skipped_empty)} empty files skipped)")

    if engine == "openai":
        tokenizer = load_tokenizer(tokenizer_from or "smollm2-135m-instruct")
        gen = build_engine(engine, model, base_urls=base_url)
    else:
        gen = build_engine(engine, model, dtype=dtype, batch_size=batch_size, label="synthesizing")
        tokenizer = load_tokenizer(tokenizer_from) if tokenizer_from else gen.tokenizer
    config = DocumentsConfig(
        method=method, answers=answers, min_evidence=min_evidence, min_support=min_support,
        answer_tokens=max_new_tokens or 128,
        pairs_per_chunk=pairs_per_chunk, rounds=rounds or 1,
        shots=2 if shots is None else shots, demo=not no_demo, seed=seed,
        batch_chunks=batch_size,
        context_tokens=context_tokens or model_context_length(gen, tokenizer),
        generation=SamplingParams(temperature=temperature, seed=seed,
                                  max_new_tokens=max_new_tokens or 384))
    if overlap >= chunk_tokens:
        raise ExnihiloError(f"--overlap {overlap} must be smaller than --chunk-tokens "
                            f"{chunk_tokens}")
    fit = max_chunk_tokens(tokenizer, config)
    if fit < 32:
        raise ExnihiloError(f"the {config.context_tokens}-token context leaves only {fit} "
                            f"tokens for a chunk; lower --max-new-tokens or raise "
                            f"--context-tokens")
    size = chunk_tokens
    if chunk_tokens > fit:
        size = fit
        console.print(f"--chunk-tokens {chunk_tokens} does not fit the {config.context_tokens}"
                      f"-token context with the prompt and answer: re-chunking at {size} tokens",
                      highlight=False)
    chunks, duplicate_chunks = chunk_documents(report.documents, tokenizer, size,
                                               min(overlap, size - 1))
    if limit_chunks is not None:
        chunks = chunks[:limit_chunks]

    judge_engine = judge_tokenizer = judge_context = None
    if judge and not no_grounding:
        if judge == model and engine == "transformers":
            judge_engine = gen  # one model in memory, not two
        else:
            judge_engine = build_engine(engine, judge, dtype=dtype, batch_size=batch_size,
                                        base_urls=base_url, label="grounding")
        judge_tokenizer = getattr(judge_engine, "tokenizer", None)
        judge_context = model_context_length(judge_engine, judge_tokenizer) if (
            judge_tokenizer is not None) else None

    summary = synthesize_documents(gen, tokenizer, chunks, config, out, judge=judge_engine,
                                   judge_tokenizer=judge_tokenizer,
                                   judge_context_tokens=judge_context)
    summary.update(documents=len(report.documents), skipped_binary=len(report.skipped_binary),
                   skipped_empty=len(report.skipped_empty), duplicate_chunks=duplicate_chunks,
                   chunk_tokens=size, overlap=min(overlap, size - 1))
    if corpus_out is not None:
        summary["corpus"] = build_corpus(chunks, out, corpus_out, seed=seed, general=general,
                                         ratio=ratio)
        summary["corpus_out"] = str(corpus_out)
    print_summary(summary, show)


def print_summary(summary: dict, show: int) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"documents → {summary['out']}", show_header=False)
    for key in ("documents", "skipped_binary", "skipped_empty", "chunk_tokens", "overlap",
                "chunks", "duplicate_chunks", "chunks_done_before", "chunks_this_run",
                "method", "chunks_without_pairs", "pairs_total", "questions_rejected",
                "records_written_this_run", "duplicate_records", "truncated_outputs_this_run",
                "task_formats", "grounded",
                "rounds", "elapsed_s", "pairs_per_minute", "generated_tokens_per_s"):
        if summary.get(key) is not None:
            table.add_row(key, str(summary[key]))
    if "corpus" in summary:
        table.add_row("corpus", f"{summary['corpus_out']}: {summary['corpus']}")
    console.print(table)
    for record in summary.get("examples", [])[:show]:
        chunk = record["meta"]["source_chunk"]
        tags = record["meta"].get("tags", {})
        grounded = f" · grounded={tags['grounded']}" if "grounded" in tags else ""
        score = record["meta"].get("evidence_score")
        evidence = f" · evidence {score:.2f}" if score is not None else ""
        console.print(Text(f"{chunk['source']} · chunk {chunk['id']} · "
                           f"{record['meta']['task_format']}{evidence}{grounded}", style="dim"))
        for m in record["messages"]:  # generated text is data: no rich markup parsing
            console.print(Text.assemble((m["role"], "bold"), ": ", m["content"][:400]))
        console.print()
