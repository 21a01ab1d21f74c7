"""`exnihilo train …`: thin shells over exnihilo.train.* (flags → config → library call)."""

from __future__ import annotations

import typer
from pydantic import ValidationError

from exnihilo.cli.common import (
    console,
    deprecated_option,
    emit,
    input_argument,
    pick_input,
    report_to_option,
    train_dtype_option,
)
from exnihilo.errors import ExnihiloError
from exnihilo.models import DEFAULT_MODEL

app = typer.Typer(help="Train a model: SFT, DPO/IPO/SimPO, DICE, reward models, pretraining, "
                  "distillation.",
                  no_args_is_help=True)


def _config_error(e: ValidationError) -> ExnihiloError:
    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"]).replace("_", "-")
    return ExnihiloError(f"--{where}: {first['msg']}")


@app.command("sft")
def sft_command(
    data: str = input_argument("Training data: our JSONL records, Alpaca JSON/JSONL, "
                               "ShareGPT, TRL, parquet or hf:org/name[:split]."),
    out: str = typer.Option(..., "-o", "--out", help="Output folder: becomes a plain Hugging "
                            "Face model folder (LoRA merged in) plus metrics.jsonl."),
    model: str = typer.Option(DEFAULT_MODEL, "-m", "--model", help="Base model: an embedded "
                              "name (see `exnihilo models`), a Hugging Face folder or a .gguf "
                              "file."),
    style: str = typer.Option("chat", "--style", help="Prompt style: chat (the model's "
                              "template), alpaca or phi3."),
    mask_prompt: bool = typer.Option(False, "--mask-prompt", help="Train only on assistant "
                                     "tokens (prompt and every non-assistant turn → -100)."),
    full: bool = typer.Option(False, "--full", help="Full finetuning instead of LoRA."),
    epochs: int = typer.Option(1, "--epochs"),
    lr: float | None = typer.Option(None, "--lr", help="Learning rate (default: 2e-4 with "
                                    "LoRA, 5e-5 with --full)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Rows per micro-batch."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per optimizer "
                                   "step."),
    max_length: int = typer.Option(512, "--max-length", help="Longest example in tokens "
                                   "(EOS included); longer ones are truncated (or dropped "
                                   "with --drop-long) and counted."),
    drop_long: bool = typer.Option(False, "--drop-long", help="Drop examples longer than "
                                   "--max-length instead of truncating them."),
    pack: bool = typer.Option(False, "--pack", help="Pack several examples per row "
                              "(position ids restart, no attention across examples)."),
    lora_r: int = typer.Option(16, "--lora-r"),
    lora_alpha: float = typer.Option(32, "--lora-alpha"),
    lora_targets: str = typer.Option("all-linear", "--lora-targets", help="Comma-separated "
                                     "module names (e.g. q_proj,v_proj) or all-linear."),
    lora_dropout: float = typer.Option(0.05, "--lora-dropout"),
    dora: bool = typer.Option(False, "--dora", help="DoRA (weight-decomposed LoRA, peft's "
                              "use_dora): often better at low rank, slower per step."),
    lora_plus_ratio: float | None = typer.Option(
        None, "--lora-plus-ratio", help="LoRA+: the B matrices learn at this multiple of "
        "--lr (its paper suggests 16)."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="AdamW weight decay; "
                                       "never applied to norms, biases and embeddings."),
    val_fraction: float = typer.Option(0.05, "--val-fraction", help="Share of records held "
                                       "out for validation loss (seeded)."),
    eval_every: int = typer.Option(50, "--eval-every", help="Validation loss every N steps "
                                   "(and at the end)."),
    save_every: int = typer.Option(50, "--save-every", help="Checkpoint every N steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in "
                                "--out from its last checkpoint."),
    seed: int = typer.Option(0, "--seed"),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Stop after N optimizer "
                                         "steps (the schedule is fitted to N)."),
    dtype: str = train_dtype_option(),
    gradient_checkpointing: bool | None = typer.Option(
        None, "--gradient-checkpointing/--no-gradient-checkpointing",
        help="Recompute activations in backward: much less memory for long batches, about "
        "a third more compute. Default: on from 2,048 positions per micro-batch."),
    report_to: list[str] = report_to_option(),
    data_option: str = deprecated_option("--data", "-d"),
) -> None:
    """Supervised finetuning: LoRA by default, --full for every weight."""
    from exnihilo.train.sft import SFTConfig, run_sft

    data = pick_input(data, data_option, "DATA", "--data")
    try:
        cfg = SFTConfig(
            data=data, out=out, model=model, style=style, mask_prompt=mask_prompt, full=full,
            epochs=epochs, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
            max_length=max_length, length_policy="drop" if drop_long else "truncate",
            pack=pack, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
            dora=dora, lora_plus_ratio=lora_plus_ratio, weight_decay=weight_decay,
            lora_targets=[t.strip() for t in lora_targets.split(",") if t.strip()],
            val_fraction=val_fraction, eval_every=eval_every, save_every=save_every,
            seed=seed, max_steps=max_steps, dtype=dtype,
            gradient_checkpointing=gradient_checkpointing, report_to=report_to)
    except ValidationError as e:
        raise _config_error(e) from None
    result = run_sft(cfg, resume=resume)
    emit(result, lambda: _print_sft(result))


def _print_sft(result) -> None:
    val = f"{result.val_loss:.4f}" if result.val_loss is not None else "–"
    train = f"{result.train_loss:.4f}" if result.train_loss is not None else "–"
    console.print(
        f"done: {result.steps} steps in {result.train_seconds:.0f} s · "
        f"train loss {train} · val loss {val} · "
        f"{result.trained_tokens_per_s:,.0f} trained tok/s · padding "
        f"{100 * result.padding_waste:.1f}%")
    console.print(f"model: {result.out}  (metrics: {result.out}/metrics.jsonl; try "
                  f"`exnihilo generate --model {result.out} …`)")
