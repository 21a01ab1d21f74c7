"""Preference commands (registered by `cli/__init__.py`): `train dpo`, `synth pairs`,
`synth constraints`. Thin shells: flags → config → library call → a summary line."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from pydantic import ValidationError

from exnihilo.cli.common import (
    base_url_option,
    build_engine,
    concurrency_option,
    console,
    deprecated_option,
    dtype_option,
    emit,
    engine_option,
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


def dpo_command(
    data: str = input_argument("Preference pairs: our records (messages + chosen + "
                               "rejected), TRL's prompt/chosen/rejected (strings or "
                               "conversations) or instruction/input/chosen/rejected JSON."),
    out: str = typer.Option(..., "-o", "--out", help="Output folder: becomes a plain Hugging "
                            "Face model folder plus metrics.jsonl."),
    model: str = typer.Option(DEFAULT_MODEL, "-m", "--model", help="Starting model (and, with "
                              "LoRA, the reference: the adapter disabled)."),
    loss: str = typer.Option("sigmoid", "--loss", help="sigmoid (DPO), ipo, hinge, robust, "
                             "simpo, sft, or a weighted sum such as sigmoid+0.5*sft."),
    beta: float = typer.Option(0.1, "--beta", help="β: strength of the KL anchor (SimPO: "
                               "reward scale, ~2)."),
    gamma: float = typer.Option(0.5, "--gamma", help="SimPO's target reward margin."),
    label_smoothing: float = typer.Option(0.0, "--label-smoothing", help="ε for robust and "
                                          "SimPO (assumed share of flipped labels)."),
    ref_model: str | None = typer.Option(None, "--ref-model", help="Reference model (must "
                                         "share the tokenizer); default: the starting "
                                         "weights."),
    precompute_ref: bool = typer.Option(False, "--precompute-ref", help="Compute reference "
                                        "log-probs once, cached on disk by weights + data "
                                        "hash (reused by --resume and reruns)."),
    ema_anchor: float | None = typer.Option(None, "--ema-anchor", help="WARP: the reference "
                                            "is an EMA of the policy, updated with rate μ "
                                            "after every step (e.g. 0.01)."),
    steps: int = typer.Option(1, "--steps", help="sDPO: split the data into K steps; step "
                              "t starts from and is referenced to step t−1's model."),
    style: str = typer.Option("chat", "--style", help="Prompt style: chat, alpaca or phi3."),
    full: bool = typer.Option(False, "--full", help="Full finetuning instead of LoRA (the "
                              "reference is then a frozen copy, or --ref-model)."),
    epochs: int = typer.Option(1, "--epochs"),
    lr: float | None = typer.Option(None, "--lr", help="Learning rate (default 5e-5 with "
                                    "LoRA, 1e-6 with --full)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Pairs per micro-batch."),
    grad_accum: int = typer.Option(1, "--grad-accum"),
    max_length: int = typer.Option(512, "--max-length", help="Longest prompt + response in "
                                   "tokens; longer pairs are skipped and counted."),
    truncate_long: bool = typer.Option(False, "--truncate-long", help="Cut over-long "
                                       "responses to fit instead of skipping the pair."),
    lora_r: int = typer.Option(16, "--lora-r"),
    lora_alpha: float = typer.Option(32, "--lora-alpha"),
    lora_dropout: float = typer.Option(0.05, "--lora-dropout"),
    lora_targets: str = typer.Option("all-linear", "--lora-targets"),
    dora: bool = typer.Option(False, "--dora", help="Weight-decomposed LoRA."),
    lora_plus_ratio: float | None = typer.Option(None, "--lora-plus-ratio"),
    val_fraction: float = typer.Option(0.05, "--val-fraction"),
    eval_every: int = typer.Option(50, "--eval-every"),
    save_every: int = typer.Option(50, "--save-every"),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run."),
    seed: int = typer.Option(0, "--seed"),
    max_steps: int | None = typer.Option(None, "--max-steps"),
    dtype: str = train_dtype_option(frozen_bf16=False),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing"),
    threads: int | None = typer.Option(None, "--threads", help="Torch CPU threads."),
    report_to: list[str] = report_to_option(),
    data_option: str = deprecated_option("--data"),
) -> None:
    """Preference optimization: DPO, IPO, SimPO … on pairs (LoRA by default)."""
    from exnihilo.train.dpo import DPOConfig, run_dpo

    data = pick_input(data, data_option, "DATA", "--data")
    try:
        cfg = DPOConfig(
            data=data, out=out, model=model, loss=loss, beta=beta, gamma=gamma,
            label_smoothing=label_smoothing, ref_model=ref_model, precompute_ref=precompute_ref,
            ema_anchor=ema_anchor, steps=steps, style=style, full=full, epochs=epochs, lr=lr,
            batch_size=batch_size, grad_accum=grad_accum, max_length=max_length,
            length_policy="truncate" if truncate_long else "drop", lora_r=lora_r,
            lora_alpha=lora_alpha, lora_dropout=lora_dropout,
            lora_targets=[t.strip() for t in lora_targets.split(",") if t.strip()], dora=dora,
            lora_plus_ratio=lora_plus_ratio, val_fraction=val_fraction,
            eval_every=eval_every, save_every=save_every, seed=seed, max_steps=max_steps,
            dtype=dtype, gradient_checkpointing=gradient_checkpointing, report_to=report_to)
    except ValidationError as e:
        raise _config_error(e) from None
    _threads(threads)
    result = run_dpo(cfg, resume=resume)
    emit(result, lambda: _print_dpo(result, cfg.out))


def _print_dpo(result, out: str) -> None:
    m = result.final_metrics
    acc = m.get("val_reward_accuracy", m.get("reward_accuracy"))
    margin = m.get("val_reward_margin", m.get("reward_margin"))
    console.print(
        f"done: {result.steps} steps in {result.train_seconds:.0f} s · "
        f"loss {result.train_loss:.4f} · reward accuracy "
        f"{'–' if acc is None else f'{acc:.2f}'} · margin "
        f"{'–' if margin is None else f'{margin:.3f}'} · {result.pairs_per_s:.2f} pairs/s")
    console.print(f"model: {out}  (reference: {result.reference}; metrics: "
                  f"{result.out}/metrics.jsonl)")


def synth_pairs_command(
    prompts: str = input_argument("Prompts: any records (a trailing answer is ignored), or "
                                  "IFEval-format rows from `synth constraints`.",
                                  metavar="PROMPTS"),
    out: str = typer.Option(..., "-o", "--out", help="Output JSONL of preference records "
                            "(samples and scores kept in meta); .exnihilo/<out>.samples.jsonl "
                            "holds progress, so rerunning resumes."),
    model: str = typer.Option(DEFAULT_MODEL, "-m", "--model", help="The model that samples."),
    n: int = typer.Option(8, "-n", help="Samples per prompt."),
    scorer: str = typer.Option("ifeval", "--scorer", help="ifeval (checkers on the prompt's "
                               "constraints), implicit (DPO reward of --model vs "
                               "--reference), judge (--judge rates 1-10) or reward "
                               "(--reward-model, a sequence-classification model)."),
    reward_model: str | None = typer.Option(None, "--reward-model", help="reward: e.g. a "
                                            "`train reward` run."),
    reference: str | None = typer.Option(None, "--reference", help="implicit: the reference "
                                         "model the policy was trained against."),
    judge_model: str | None = typer.Option(None, "-j", "--judge", help="judge: the rating "
                                           "model (same --engine)."),
    style: str = typer.Option("chat", "--style", help="implicit: the prompt style the policy "
                              "was trained with."),
    min_valid: int = typer.Option(2, "--min-valid", help="Skip prompts with fewer valid "
                                  "samples (not cut off, 4..6699 characters)."),
    alpha: float | None = typer.Option(None, "--alpha", help="Fixed length penalty per "
                                       "character; default: swept to zero the mean "
                                       "chosen−rejected length gap (DICE)."),
    alpha_step: float = typer.Option(0.001, "--alpha-step", help="Sweep grid step (DICE: "
                                     "0.001; use ~1e-5 for scores in [0, 1])."),
    temperature: float = typer.Option(0.9, "--temperature"),
    top_p: float = typer.Option(1.0, "--top-p"),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens"),
    seed: int = typer.Option(0, "--seed"),
    limit: int | None = typer.Option(None, "--limit", help="Use only the first N prompts."),
    engine: str = engine_option(),
    base_url: list[str] = base_url_option(),
    concurrency: int = concurrency_option(),
    dtype: str = dtype_option(),
    batch_size: int = typer.Option(32, "--batch-size", help="Sequences per generate call."),
    threads: int | None = typer.Option(None, "--threads"),
    prompts_option: str = deprecated_option("--prompts"),
    judge_model_option: str = deprecated_option("--judge-model"),
) -> None:
    """Preference pairs from a model's own samples: best vs worst by a scorer, with DICE's
    length-regularized choice."""
    from exnihilo.cli.common import deprecated
    from exnihilo.records import read_any
    from exnihilo.synth.preference import PairsConfig, summary_path, synthesize_pairs

    prompts = pick_input(prompts, prompts_option, "PROMPTS", "--prompts")
    if judge_model_option is not None:
        deprecated("--judge-model", "use -j/--judge")
        judge_model = judge_model or judge_model_option
    if scorer not in ("ifeval", "implicit", "judge", "reward"):
        raise ExnihiloError(f"--scorer {scorer!r}: known scorers are ifeval, implicit, judge, "
                            f"reward")
    if scorer == "reward" and not reward_model:
        raise ExnihiloError("--scorer reward needs --reward-model")
    if scorer == "implicit" and not reference:
        raise ExnihiloError("--scorer implicit needs --reference (the policy's reference)")
    if scorer == "judge" and not judge_model:
        raise ExnihiloError("--scorer judge needs --judge")
    records = read_any(prompts)[:limit] if limit else read_any(prompts)
    if not records:
        raise ExnihiloError(f"{prompts}: no prompts")
    cfg = PairsConfig(n=n, min_valid=min_valid, temperature=temperature, top_p=top_p,
                      max_new_tokens=max_new_tokens, seed=seed, alpha=alpha,
                      alpha_step=alpha_step)
    _threads(threads)
    scoring = make_scorer(scorer, model, reference, judge_model, style, dtype, engine,
                          base_url, concurrency, reward_model)
    sampler = build_engine(engine, model, dtype, batch_size, base_url, concurrency,
                           label="sampling")
    summary = synthesize_pairs(sampler, scoring, records, cfg, out)

    def show() -> None:
        console.print(
            f"done: {summary.pairs} pairs from {summary.prompts} prompts "
            f"({summary.too_few_valid} with too few valid samples, {summary.tied} tied) · "
            f"α {summary.alpha:g} · chosen {summary.mean_chosen_chars:.0f} chars vs rejected "
            f"{summary.mean_rejected_chars:.0f} · score {summary.mean_chosen_score:.3f} vs "
            f"{summary.mean_rejected_score:.3f}")
        console.print(f"pairs: {out}  (summary: {summary_path(Path(out))})")
    emit(summary, show)


def make_scorer(kind: str, model: str, reference: str | None, judge_model: str | None,
                style: str, dtype: str, engine: str, base_url: list[str], concurrency: int,
                reward_model: str | None = None):
    from exnihilo.synth.preference import IFEvalScorer, ImplicitScorer, JudgeScorer

    if kind == "ifeval":
        return IFEvalScorer()
    if kind == "reward":
        from exnihilo.train.reward import RewardScorer

        return RewardScorer(str(reward_model), style, dtype=dtype)
    if kind == "implicit":
        from exnihilo.models import load_model, load_tokenizer
        from exnihilo.train.dpo import ModelReference, check_same_tokenizer

        tokenizer = load_tokenizer(model)
        check_same_tokenizer(tokenizer, load_tokenizer(str(reference)), str(reference))
        return ImplicitScorer(load_model(model, dtype),
                              ModelReference(load_model(str(reference), dtype)), tokenizer,
                              style)
    return JudgeScorer(build_engine(engine, str(judge_model), dtype, 16, base_url, concurrency,
                                    label="judging"))


def synth_constraints_command(
    source: str = input_argument("Instructions: any records (Magpie output, Alpaca, …); the "
                                 "first user message is used."),
    out: str = typer.Option(..., "-o", "--out", help="Output JSONL in IFEval's input format "
                            "(prompt, instruction_id_list, kwargs)."),
    seed: int = typer.Option(0, "--seed"),
    max_constraints: int = typer.Option(3, "--max-constraints", help="1 to 3 constraints "
                                        "per prompt."),
    eval_set: str | None = typer.Option(None, "--eval-set", help="IFEval's input_data.jsonl: "
                                        "instructions overlapping its prompts are dropped."),
    source_option: str = deprecated_option("--from"),
) -> None:
    """IFEval-style constraint prompts (never the evaluation prompts) for `synth pairs
    --scorer ifeval`."""
    from exnihilo.records import read_any, write_jsonl_atomic
    from exnihilo.synth.constraints import make_constraint_prompts

    source = pick_input(source, source_option, "DATA", "--from")
    rows, dropped = make_constraint_prompts(read_any(source), seed, max_constraints, eval_set)
    write_jsonl_atomic(out, rows)
    counts = {k: sum(len(r["instruction_id_list"]) == k for r in rows) for k in (1, 2, 3)}
    emit({"prompts": len(rows), "by_constraints": counts, "dropped_overlap": dropped,
          "out": out},
         lambda: console.print(f"done: {len(rows)} prompts ({json.dumps(counts)} by number of "
                               f"constraints; {dropped} dropped as evaluation overlap) → "
                               f"{Path(out)}"))


def dice_command(
    prompts: str = input_argument("Prompts to sample (any records).", metavar="PROMPTS"),
    model: str = typer.Option(..., "-m", "--model", help="π_0: a DPO'd model folder (e.g. a "
                              "`train dpo` run)."),
    out: str = typer.Option(..., "-o", "--out", help="Output folder: iter-t/ per iteration "
                            "(pairs, mix, model, manifest.json)."),
    reference: str | None = typer.Option(None, "--reference", help="π_0's reference; "
                                         "default: the base model its run recorded."),
    iterations: int = typer.Option(2, "--iterations"),
    n: int = typer.Option(8, "-n", help="Samples per prompt (DICE: 16)."),
    min_valid: int = typer.Option(2, "--min-valid"),
    temperature: float = typer.Option(0.9, "--temperature"),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens"),
    alpha_step: float = typer.Option(0.001, "--alpha-step", help="Length-penalty sweep step."),
    replay: float = typer.Option(0.0, "--replay", help="Share of offline pairs mixed in "
                                 "(DICE: 0.5), on prompts disjoint from the new ones."),
    offline: str | None = typer.Option(None, "--offline", help="Offline pairs to replay."),
    beta: float = typer.Option(0.1, "--beta"),
    lr: float | None = typer.Option(None, "--lr"),
    epochs: int = typer.Option(1, "--epochs"),
    batch_size: int = typer.Option(8, "--batch-size"),
    max_steps: int | None = typer.Option(None, "--max-steps"),
    style: str = typer.Option("chat", "--style"),
    seed: int = typer.Option(0, "--seed"),
    dtype: str = dtype_option(),
    threads: int | None = typer.Option(None, "--threads"),
    report_to: list[str] = report_to_option(),
    prompts_option: str = deprecated_option("--prompts"),
) -> None:
    """DICE: iterate DPO on pairs the model ranks with its own implicit reward; rerun the
    same command to resume at any stage."""
    from exnihilo.train.dice import DiceConfig, run_dice
    from exnihilo.train.tracking import parse_report_to

    prompts = pick_input(prompts, prompts_option, "PROMPTS", "--prompts")
    dpo = {"beta": beta, "epochs": epochs, "batch_size": batch_size, "dtype": dtype}
    if lr is not None:
        dpo["lr"] = lr
    if max_steps is not None:
        dpo["max_steps"] = max_steps
    if report_to:  # each iteration's DPO run reports; checked here, before any model loads
        dpo["report_to"] = parse_report_to(report_to)
    try:
        cfg = DiceConfig(model=model, reference=reference, prompts=prompts, out=out,
                         iterations=iterations, n=n, min_valid=min_valid,
                         temperature=temperature, max_new_tokens=max_new_tokens,
                         alpha_step=alpha_step, replay=replay, offline=offline, seed=seed,
                         style=style, dpo=dpo)
    except ValidationError as e:
        raise _config_error(e) from None
    _threads(threads)
    manifests = run_dice(cfg, lambda m: build_engine("transformers", m, dtype,
                                                     label="sampling"))
    def show() -> None:
        for m in manifests:
            s = m["stages"]
            console.print(f"iteration {m['iteration']}: {s['pairs']['pairs']} new pairs (α "
                          f"{s['pairs']['alpha']:g}), {s['mix']['pairs']} trained · DPO loss "
                          f"{s['dpo']['train_loss']:.4f} → {s['dpo']['model']}")
    emit({"out": out, "iterations": manifests}, show)


def reward_command(
    data: str = input_argument("Preference pairs (any supported format)."),
    out: str = typer.Option(..., "-o", "--out", help="Output folder: a sequence-classification "
                            "model (one scalar) plus metrics.jsonl."),
    model: str = typer.Option(DEFAULT_MODEL, "-m", "--model",
                              help="The causal LM under the head."),
    style: str = typer.Option("chat", "--style"),
    full: bool = typer.Option(False, "--full", help="Train every weight instead of LoRA."),
    epochs: int = typer.Option(1, "--epochs"),
    lr: float | None = typer.Option(None, "--lr", help="Default 1e-4 (LoRA), 1e-5 (full)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Pairs per micro-batch."),
    grad_accum: int = typer.Option(1, "--grad-accum"),
    max_length: int = typer.Option(512, "--max-length"),
    lora_r: int = typer.Option(16, "--lora-r"),
    val_fraction: float = typer.Option(0.05, "--val-fraction", help="Held-out pairs for "
                                       "pairwise accuracy."),
    eval_every: int = typer.Option(50, "--eval-every"),
    save_every: int = typer.Option(50, "--save-every"),
    resume: bool = typer.Option(False, "--resume"),
    seed: int = typer.Option(0, "--seed"),
    max_steps: int | None = typer.Option(None, "--max-steps"),
    dtype: str = train_dtype_option(),
    threads: int | None = typer.Option(None, "--threads"),
    report_to: list[str] = report_to_option(),
    data_option: str = deprecated_option("--data"),
) -> None:
    """A Bradley–Terry reward model: a scalar head on a causal LM, trained on pairs."""
    from exnihilo.train.reward import RewardConfig, run_reward

    data = pick_input(data, data_option, "DATA", "--data")
    try:
        cfg = RewardConfig(data=data, out=out, model=model, style=style, full=full,
                           epochs=epochs, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
                           max_length=max_length, lora_r=lora_r, val_fraction=val_fraction,
                           eval_every=eval_every, save_every=save_every, seed=seed,
                           max_steps=max_steps, dtype=dtype, report_to=report_to)
    except ValidationError as e:
        raise _config_error(e) from None
    _threads(threads)
    result = run_reward(cfg, resume=resume)

    def show() -> None:
        acc = "–" if result.val_accuracy is None else f"{result.val_accuracy:.3f}"
        console.print(f"done: {result.steps} steps in {result.train_seconds:.0f} s · "
                      f"train loss {result.train_loss:.4f} · held-out pairwise accuracy {acc}")
        console.print(f"reward model: {result.out}  (use: `synth pairs --scorer reward "
                      f"--reward-model {result.out}`)")
    emit(result, show)
