"""`exnihilo synth documents`: raw documents → instruction–response pairs (and a corpus)."""

from __future__ import annotations

from pathlib import Path

import typer

from exnihilo.cli.common import (
    MODEL_HELP,
    base_url_option,
    console,
    dtype_option,
    emit,
    engine_option,
)


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
    judge: str = typer.Option(None, "-j", "--judge", help="Model that checks each answer against "
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
    from exnihilo.synth.documents import DocumentsJob, run_job, validate_job

    job = DocumentsJob(
        paths=paths or [], pydoc=pydoc, out=out, method=method, answers=answers,
        min_evidence=min_evidence, min_support=min_support, pairs_per_chunk=pairs_per_chunk,
        chunk_tokens=chunk_tokens, overlap=overlap, rounds=rounds, shots=shots,
        no_demo=no_demo, judge=judge, no_grounding=no_grounding, corpus_out=corpus_out,
        mix=mix, mix_ratio=mix_ratio, text_field=text_field, model=model, engine=engine,
        base_url=base_url, tokenizer_from=tokenizer_from, context_tokens=context_tokens,
        seed=seed, limit_chunks=limit_chunks, batch_size=batch_size, dtype=dtype,
        max_new_tokens=max_new_tokens, temperature=temperature)
    prepared = validate_job(job)  # every option, output and input: before any model loads
    for label, names in (("binary or non-UTF-8 files", prepared.skipped_binary),
                         ("symlinks leading out of their folder", prepared.skipped_links),
                         ("files over the size limit", prepared.skipped_large)):
        if names:
            extra = len(names) - 5
            more = f" and {extra} more" if extra > 0 else ""
            console.print(f"skipped {len(names)} {label}: {', '.join(names[:5])}{more}",
                          highlight=False)
    summary = run_job(prepared, notify=lambda message: console.print(message, highlight=False))
    emit({k: v for k, v in summary.items() if k != "examples"},
         lambda: print_summary(summary, show))


def print_summary(summary: dict, show: int) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"documents → {summary['out']}", show_header=False)
    for key in ("documents", "skipped_binary", "skipped_empty", "skipped_links", "skipped_large",
                "chunk_tokens", "overlap",
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
