"""`exnihilo export gguf MODEL -o model.gguf [--type f16|q8_0|…] [--ollama]` and
`exnihilo export data IN -o OUT --format alpaca|sharegpt|trl|parquet`."""

from __future__ import annotations

from pathlib import Path

import typer

from exnihilo.cli.common import console, emit

app = typer.Typer(help="Export a model for other runtimes (llama.cpp, Ollama, LM Studio) or "
                       "data for other trainers (TRL, axolotl, LLaMA-Factory, the hub).",
                  no_args_is_help=True)


@app.callback()
def _export() -> None:
    """Export a model for other runtimes (llama.cpp, Ollama, LM Studio) or data for other
    trainers (TRL, axolotl, LLaMA-Factory, the hub)."""


def export_gguf_command(
    model: str = typer.Argument(..., help="A trained run folder (`exnihilo train … --out`), a "
                                          "Hugging Face folder, an embedded name or a .gguf."),
    out: Path = typer.Option(..., "-o", "--out", help="Output .gguf file."),
    qtype: str = typer.Option("f16", "--type", "-t",
                              help="f16 (default), q8_0, f32, bf16, or 4/5-bit q4_0, q4_1, "
                                   "q5_0, q5_1 (token embedding kept at q8_0)."),
    ollama: bool = typer.Option(False, "--ollama",
                                help="Also write a Modelfile beside the file (FROM, TEMPLATE, "
                                     "stop tokens): `ollama create NAME -f Modelfile`."),
) -> None:
    """Write a Llama-family model (SmolLM2 and its finetunes) as one GGUF file.

    The tokenizer and the chat template are embedded, so `llama-cli -m x.gguf -cnv`, LM Studio
    and Ollama chat with the model in the prompt format it was trained on."""
    from exnihilo.export.gguf import export_gguf

    result = export_gguf(model, out, qtype=qtype, ollama=ollama)
    emit(result, lambda: _print_gguf(result, qtype))


def _print_gguf(result, qtype: str) -> None:
    types = ", ".join(f"{n} {t}" for t, n in sorted(result.tensor_types.items()))
    console.print(f"wrote {result.path} ({result.size_bytes / 2**20:.1f} MiB, {qtype}: "
                  f"{result.n_tensors} tensors: {types}; tokenizer pre {result.pre_tokenizer}; "
                  f"chat template {'embedded' if result.chat_template else 'absent'})",
                  highlight=False, soft_wrap=True)
    for note in result.notes:
        console.print(f"note: {note}", highlight=False, soft_wrap=True)
    if result.modelfile is not None:
        console.print(f"wrote {result.modelfile}: run `ollama create NAME -f "
                      f"{result.modelfile}`", highlight=False, soft_wrap=True)


app.command("gguf")(export_gguf_command)


def export_data_command(
    data: str = typer.Argument(..., help="Records in any format exnihilo reads (JSONL, JSON, "
                                         "parquet, hf:org/name[:split])."),
    out: Path = typer.Option(..., "-o", "--out",
                             help="Output file (.json: one JSON array; else JSON lines), or a "
                                  "folder for --format parquet."),
    fmt: str = typer.Option(..., "--format", "-f",
                            help="alpaca, sharegpt, trl (TRL's conversational formats) or "
                                 "parquet (a hub-style folder with a dataset card)."),
) -> None:
    """Write records in the format another trainer reads without options."""
    from exnihilo.export.data import export_data

    result = export_data(data, out, fmt)
    emit(result, lambda: console.print(f"wrote {result.path}: {result.rows} rows, "
                                       f"{result.format} ({result.layout})", highlight=False,
                                       soft_wrap=True))


app.command("data")(export_data_command)
