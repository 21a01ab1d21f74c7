"""`exnihilo train pretrain | distill` and `exnihilo prune`: thin shells over
exnihilo.train.pretrain, exnihilo.train.distill and exnihilo.prune (flags → config → call);
registered in `cli/__init__.py`.
"""

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


def _config_error(e: ValidationError) -> ExnihiloError:
    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"]).replace("_", "-")
    return ExnihiloError(f"--{where}: {first['msg']}")


def _threads(threads: int | None) -> None:
    """The command's own --threads (the root option and EXNIHILO_THREADS work too)."""
    from exnihilo.threads import apply_threads

    apply_threads(threads)


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "–" if x is None else format(x, spec)


THREADS_HELP = "Torch threads (default: $EXNIHILO_THREADS or torch's own choice)."


def pretrain_command(
    data: str = input_argument("Text corpus: {\"text\"} JSONL (e.g. `synth documents "
                               "--corpus-out`), parquet with a text column, "
                               "hf:org/name[:split] from the local hub cache, a .txt/.md "
                               "file, or a folder of them."),
    out: str = typer.Option(..., "-o", "--out", help="Output folder: a plain Hugging Face model "
                            "folder plus metrics.jsonl."),
    arch: str | None = typer.Option(None, "--arch", help="A Gemma 2 preset to train from "
                                    "scratch: gemma2-micro, gemma2-tiny, gemma2-small, "
                                    "gemma2-base."),
    from_model: str | None = typer.Option(None, "--from", help="Continue pretraining this "
                                          "model (name, folder or .gguf) instead of --arch."),
    tokenizer: str = typer.Option(DEFAULT_MODEL, "--tokenizer", help="With --arch: whose "
                                  "tokenizer the new model uses."),
    tokens: str | None = typer.Option(None, "--tokens", help="Token budget, e.g. 20M (the "
                                      "corpus repeats, reshuffled, as often as needed)."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per packed row."),
    batch_size: int = typer.Option(8, "--batch-size", help="Rows per micro-batch."),
    grad_accum: int = typer.Option(1, "--grad-accum"),
    epochs: int = typer.Option(1, "--epochs", help="Passes over the data when no --tokens."),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate (default 1e-3 "
                                    "from scratch, 5e-5 continual)."),
    weight_decay: float = typer.Option(0.1, "--weight-decay", help="On matrices only (not "
                                       "norms, biases, embeddings)."),
    warmup_ratio: float = typer.Option(0.02, "--warmup-ratio"),
    layers: int | None = typer.Option(None, "--layers", help="Override the preset's layers."),
    hidden: int | None = typer.Option(None, "--hidden"),
    intermediate: int | None = typer.Option(None, "--intermediate"),
    heads: int | None = typer.Option(None, "--heads"),
    kv_heads: int | None = typer.Option(None, "--kv-heads", help="Grouped-query attention: "
                                        "KV heads (divides --heads)."),
    head_dim: int | None = typer.Option(None, "--head-dim"),
    sliding_window: int | None = typer.Option(None, "--sliding-window", help="Window of the "
                                              "local layers (every other layer, from 0)."),
    attn_softcap: float | None = typer.Option(None, "--attn-softcap", help="Attention score "
                                              "soft-cap (0 = off; Gemma 2: 50)."),
    final_softcap: float | None = typer.Option(None, "--final-softcap", help="Final logit "
                                               "soft-cap (0 = off; Gemma 2: 30)."),
    tie_embeddings: bool | None = typer.Option(None, "--tie-embeddings/--untie-embeddings"),
    val_fraction: float = typer.Option(0.02, "--val-fraction", help="Share of documents held "
                                       "out for perplexity (seeded, whole documents)."),
    val_tokens: int = typer.Option(65536, "--val-tokens", help="Held-out positions evaluated."),
    eval_every: int = typer.Option(200, "--eval-every"),
    save_every: int = typer.Option(200, "--save-every"),
    resume: bool = typer.Option(False, "--resume"),
    seed: int = typer.Option(0, "--seed"),
    max_steps: int | None = typer.Option(None, "--max-steps"),
    dtype: str = train_dtype_option(),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing"),
    threads: int | None = typer.Option(None, "--threads", help=THREADS_HELP),
    report_to: list[str] = report_to_option(),
    data_option: str = deprecated_option("--data"),
) -> None:
    """Pretrain a Gemma 2 model from a preset, or continue pretraining a model, on text."""
    from exnihilo.train.pretrain import PretrainConfig, run_pretrain
    from exnihilo.train.tokens import parse_token_count

    data = pick_input(data, data_option, "DATA", "--data")
    if (arch is None) == (from_model is None):
        raise ExnihiloError("give exactly one of --arch PRESET (from scratch) or --from MODEL "
                            "(continual pretraining)")
    options = {"layers": layers, "hidden": hidden, "intermediate": intermediate,
               "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
               "sliding_window": sliding_window, "attn_softcap": attn_softcap,
               "final_softcap": final_softcap, "tie_embeddings": tie_embeddings}
    options = {k: v for k, v in options.items() if v is not None}
    if options and from_model:
        raise ExnihiloError(f"--{next(iter(options)).replace('_', '-')} changes an "
                            f"architecture: only with --arch")
    _threads(threads)
    try:
        cfg = PretrainConfig(
            data=data, out=out, arch=arch, model=from_model or tokenizer,
            tokens=parse_token_count(tokens), seq_len=seq_len, batch_size=batch_size,
            grad_accum=grad_accum, epochs=epochs, lr=lr, weight_decay=weight_decay,
            warmup_ratio=warmup_ratio, arch_options=options, val_fraction=val_fraction,
            val_tokens=val_tokens, eval_every=eval_every, save_every=save_every, seed=seed,
            max_steps=max_steps, dtype=dtype, gradient_checkpointing=gradient_checkpointing,
            report_to=report_to)
    except ValidationError as e:
        raise _config_error(e) from None
    r = run_pretrain(cfg, resume=resume)
    emit(r, lambda: _print_pretrain(r))


def _print_pretrain(r) -> None:
    mfu = f"{100 * r.mfu:.1f}%" if r.mfu is not None else "–"
    console.print(f"[bold]done[/bold]: {r.steps} steps, {r.trained_tokens:,} tokens in "
                  f"{r.train_seconds:.0f} s · {r.trained_tokens_per_s:,.0f} tok/s · MFU {mfu}"
                  f" · train loss {_fmt(r.train_loss)} · held-out perplexity "
                  f"{_fmt(r.val_perplexity, '.2f')}")
    console.print(f"model: {r.out}  ({r.total_params:,} parameters; metrics: "
                  f"{r.out}/metrics.jsonl)")


def distill_command(
    data: str = input_argument("Text corpus (as `train pretrain DATA`)."),
    teacher: str = typer.Option(..., "--teacher", help="Teacher model (name, folder, .gguf)."),
    out: str = typer.Option(..., "-o", "--out", help="Output folder: the student as a plain "
                            "Hugging Face model folder plus metrics.jsonl."),
    student: str | None = typer.Option(None, "--student", help="Student model to train "
                                       "(name or folder, e.g. a `prune` output)."),
    student_arch: str | None = typer.Option(None, "--student-arch", help="Or a fresh Gemma 2 "
                                            "preset on the teacher's tokenizer."),
    loss: str = typer.Option("forward_kl", "--loss", help="forward_kl (KL(T‖S), classic), "
                             "reverse_kl (KL(S‖T)) or jsd (generalized JSD with --beta)."),
    beta: float = typer.Option(0.5, "--beta", help="JSD mixture weight (0 = forward KL, "
                               "1 = reverse KL)."),
    temperature: float = typer.Option(1.0, "--temperature", help="τ dividing both logits."),
    lmbda: float = typer.Option(0.0, "--lmbda", help="Fraction of batches on the student's "
                                "own samples (on-policy, GKD)."),
    prompt_len: int = typer.Option(32, "--prompt-len", help="On-policy: prompt tokens from "
                                   "the start of each row's document."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="On-policy: tokens "
                                       "sampled per prompt."),
    top_k: int = typer.Option(32, "--top-k", help="Cache the teacher's top-k log-probs once "
                              "(0: run the teacher live on the full distribution)."),
    topk_renormalize: bool = typer.Option(False, "--topk-renormalize", help="Compare over "
                                          "the top-k only, both sides renormalized (default: "
                                          "the top-k plus one bucket for the rest)."),
    tokens: str | None = typer.Option(None, "--tokens", help="Token budget, e.g. 5M."),
    seq_len: int = typer.Option(512, "--seq-len"),
    batch_size: int = typer.Option(8, "--batch-size"),
    grad_accum: int = typer.Option(1, "--grad-accum"),
    epochs: int = typer.Option(1, "--epochs"),
    lr: float | None = typer.Option(None, "--lr", help="Default 1e-3 for a fresh preset, "
                                    "1e-4 for a trained student."),
    lora: bool = typer.Option(False, "--lora", help="Train LoRA adapters instead of every "
                              "weight."),
    val_fraction: float = typer.Option(0.02, "--val-fraction"),
    eval_every: int = typer.Option(200, "--eval-every"),
    save_every: int = typer.Option(200, "--save-every"),
    resume: bool = typer.Option(False, "--resume"),
    seed: int = typer.Option(0, "--seed"),
    max_steps: int | None = typer.Option(None, "--max-steps"),
    dtype: str = train_dtype_option(),
    threads: int | None = typer.Option(None, "--threads", help=THREADS_HELP),
    report_to: list[str] = report_to_option(),
    data_option: str = deprecated_option("--data"),
) -> None:
    """Distill a teacher into a student on text: KL / reverse KL / JSD, optionally on-policy."""
    from exnihilo.train.distill import DistillConfig, run_distill
    from exnihilo.train.tokens import parse_token_count

    data = pick_input(data, data_option, "DATA", "--data")
    if (student is None) == (student_arch is None):
        raise ExnihiloError("give exactly one of --student MODEL or --student-arch PRESET")
    _threads(threads)
    try:
        cfg = DistillConfig(
            data=data, out=out, teacher=teacher, model=student or teacher,
            student_arch=student_arch, loss=loss, beta=beta, temperature=temperature,
            lmbda=lmbda, prompt_len=prompt_len, max_new_tokens=max_new_tokens, top_k=top_k,
            topk_tail=not topk_renormalize,
            tokens=parse_token_count(tokens), seq_len=seq_len, batch_size=batch_size,
            grad_accum=grad_accum, epochs=epochs, lr=lr, full=not lora,
            val_fraction=val_fraction, eval_every=eval_every, save_every=save_every,
            seed=seed, max_steps=max_steps, dtype=dtype, report_to=report_to)
    except ValidationError as e:
        raise _config_error(e) from None
    r = run_distill(cfg, resume=resume)
    emit(r, lambda: _print_distill(r, loss))


def _print_distill(r, loss: str) -> None:
    console.print(f"[bold]done[/bold]: {r.steps} steps in {r.train_seconds:.0f} s · "
                  f"{r.trained_tokens_per_s:,.0f} tok/s · train {loss} {_fmt(r.train_loss)} · "
                  f"held-out {loss} {_fmt(r.val_loss)}")
    console.print(f"model: {r.out}  ({r.total_params:,} parameters"
                  + (f"; teacher cache {r.teacher_cache})" if r.teacher_cache else ")"))


def prune_command(
    model: str = typer.Option(DEFAULT_MODEL, "-m", "--model", help="Model to prune."),
    calibration: str = typer.Option(..., "--calibration", help="Text corpus whose "
                                    "activations score importance."),
    out: str = typer.Option(..., "-o", "--out", help="Folder for the smaller HF model."),
    depth: int | None = typer.Option(None, "--depth", help="Layers to keep."),
    depth_method: str = typer.Option("block", "--depth-method", help="block (1 − cos of a "
                                     "layer's input and output) or loss (loss increase when "
                                     "the layer is skipped)."),
    mlp: float | None = typer.Option(None, "--mlp", help="MLP neurons to keep per layer: a "
                                     "fraction ≤ 1 or a count."),
    heads: int | None = typer.Option(None, "--heads", help="Query heads to keep per layer "
                                     "(whole grouped-query groups)."),
    hidden: float | None = typer.Option(None, "--hidden", help="Embedding channels to keep: "
                                        "a fraction ≤ 1 or a count."),
    rows: int = typer.Option(64, "--calibration-rows", help="Rows of --seq-len tokens scored "
                             "(Minitron: 1024 samples)."),
    seq_len: int = typer.Option(256, "--seq-len"),
    batch_size: int = typer.Option(4, "--batch-size"),
    dtype: str = typer.Option("float32", "--dtype"),
    threads: int | None = typer.Option(None, "--threads", help=THREADS_HELP),
) -> None:
    """Prune a model by activation importance (Minitron): depth, MLP, heads, channels."""
    from exnihilo.prune import PruneTargets, run_prune

    if depth_method not in ("block", "loss"):
        raise ExnihiloError(f"--depth-method {depth_method!r}: block or loss")
    if all(v is None for v in (depth, mlp, heads, hidden)):
        raise ExnihiloError("nothing to prune: give --depth, --mlp, --heads and/or --hidden")
    _threads(threads)
    targets = PruneTargets(depth=depth, mlp=mlp, heads=heads, hidden=hidden,
                           depth_method=depth_method)  # type: ignore[arg-type]
    r = run_prune(model, calibration, out, targets, rows=rows, seq_len=seq_len,
                  batch_size=batch_size, dtype=dtype)
    emit(r, lambda: _print_prune(r, model))


def _print_prune(r, model: str) -> None:
    console.print(f"[bold]done[/bold]: {r.params_before:,} → {r.params_after:,} parameters "
                  f"({100 * r.params_after / r.params_before:.0f}%) · {r.shape_before} → "
                  f"{r.shape_after} · calibration loss {r.calibration_loss_before:.3f} → "
                  f"{r.calibration_loss_after:.3f}")
    console.print(f"model: {r.out}  (recover it with `exnihilo train distill --teacher "
                  f"{model} --student {r.out} …`)")
