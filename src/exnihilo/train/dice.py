"""DICE (Chen et al., arXiv 2406.09760): bootstrap a DPO'd model with its own implicit reward.

Iteration t = 1..K, starting from π_0 (a DPO'd model) and its reference ρ_0:

1. sample N responses per prompt from π_{t−1} (T 0.9), scored by the implicit reward
   Σ log π_{t−1}(y|x) − Σ log ρ_{t−1}(y|x) (`synth.preference.ImplicitScorer`);
2. pairs = best vs worst by the length-regularized reward, α swept (`synth.preference`);
3. mix in replay pairs (`--replay γ`, DICE's `mix_gamma`: the share of offline pairs, on
   prompts disjoint from the new ones; needs `--offline`);
4. DPO on the mix with init = reference = π_{t−1} (LoRA: the adapter disabled is π_{t−1});
   then π_t = that model and ρ_t = π_{t−1}.

Layout: `<out>/iter-t/` holds `pairs.jsonl` (its samples and summary in `.exnihilo/`),
`train_pairs.jsonl` and `model/` (a DPO run folder), and `manifest.json` saying which stages
are done. Every stage resumes: sampling from its samples file, the mix by its file, DPO from
its checkpoint; rerunning the same command after a kill at any point continues there.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from exnihilo import progress
from exnihilo.engines.base import Engine
from exnihilo.errors import ExnihiloError
from exnihilo.models import load_model, load_tokenizer
from exnihilo.records import read_any, write_jsonl_atomic
from exnihilo.styles import StyleName
from exnihilo.synth.preference import (
    ImplicitScorer,
    PairsConfig,
    mix_replay,
    summary_path,
    synthesize_pairs,
)
from exnihilo.train.dpo import DPOConfig, ModelReference, check_same_tokenizer, run_dpo
from exnihilo.train.preference_data import read_preferences
from exnihilo.train.run import RUN_INFO, read_run_info, write_json_atomic

MANIFEST = "manifest.json"


class DiceConfig(BaseModel):
    model: str  # π_0: a DPO'd model folder
    reference: str | None = None  # ρ_0; default: the run's recorded base model
    prompts: str
    out: str
    iterations: int = Field(2, ge=1)
    n: int = Field(8, ge=2)
    min_valid: int = Field(2, ge=2)
    temperature: float = Field(0.9, ge=0)
    max_new_tokens: int = Field(512, ge=1)
    alpha_step: float = Field(0.001, gt=0)
    replay: float = Field(0.0, ge=0, lt=1)
    offline: str | None = None  # offline pairs for replay
    seed: int = 0
    style: StyleName = "chat"
    dpo: dict[str, Any] = Field(default_factory=dict)  # DPOConfig overrides (beta, lr …)


def iteration_dir(out: Path, t: int) -> Path:
    return out / f"iter-{t}"


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    return json.loads(path.read_text()) if path.exists() else {"stages": {}}


def mark(folder: Path, manifest: dict[str, Any], stage: str, info: dict[str, Any]) -> None:
    manifest["stages"][stage] = info
    write_json_atomic(folder / MANIFEST, manifest)


def default_reference(model: str) -> str:
    info = read_run_info(model) or {}
    base = info.get("reference_model") or info.get("base_model")
    if not base or str(base).startswith("in-memory"):
        raise ExnihiloError(f"--model {model}: no recorded base model to use as the "
                            f"reference; pass --reference")
    return str(base)


def check_dice_out(out: Path, cfg: DiceConfig) -> None:
    """Refuse a folder holding another DICE run (or anything else)."""
    path = out / "dice_config.json"
    ident = cfg.model_dump(exclude={"out"})
    if out.exists() and any(out.iterdir()):
        if not path.exists():
            raise ExnihiloError(f"--out {out} is not empty and holds no DICE run")
        previous = json.loads(path.read_text())
        differs = sorted(k for k in set(previous) | set(ident) if previous.get(k) != ident.get(k))
        if differs:
            raise ExnihiloError(f"--out {out} holds a DICE run with other settings "
                                f"({', '.join(differs)}); choose a new folder")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, ident)


def run_dice(cfg: DiceConfig, engine_factory: Callable[[str], Engine],
             on_step: Any = None, tokenizer: Any = None) -> list[dict[str, Any]]:
    """Run (or resume) every iteration; return their manifests."""
    out = Path(cfg.out)
    if cfg.replay and not cfg.offline:
        raise ExnihiloError("--replay needs --offline (the pairs to replay)")
    prompts = read_any(cfg.prompts)
    offline = read_preferences(cfg.offline) if cfg.offline else []
    reference = cfg.reference or default_reference(cfg.model)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
    check_same_tokenizer(tokenizer, load_tokenizer(reference), reference)
    check_dice_out(out, cfg)
    policy = cfg.model
    manifests = []
    for t in range(1, cfg.iterations + 1):
        folder = iteration_dir(out, t)
        folder.mkdir(parents=True, exist_ok=True)
        manifest = read_manifest(folder)
        manifest.update({"iteration": t, "policy": policy, "reference": reference})
        stages = manifest["stages"]
        pairs_path, mix_path, model_dir = (folder / "pairs.jsonl", folder / "train_pairs.jsonl",
                                           folder / "model")
        if "pairs" not in stages:
            progress.note(f"DICE iteration {t}: sampling {cfg.n} responses × {len(prompts)} "
                          f"prompts from {policy}")
            scorer = ImplicitScorer(load_model(policy), ModelReference(load_model(reference)),
                                    tokenizer, cfg.style)
            pairs_cfg = PairsConfig(n=cfg.n, min_valid=cfg.min_valid,
                                    temperature=cfg.temperature,
                                    max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + t,
                                    alpha_step=cfg.alpha_step)
            summary = synthesize_pairs(engine_factory(policy), scorer, prompts, pairs_cfg,
                                       pairs_path)
            del scorer
            mark(folder, manifest, "pairs", {"pairs": summary.pairs, "alpha": summary.alpha,
                                             "too_few_valid": summary.too_few_valid,
                                             "tied": summary.tied})
        if "mix" not in stages:
            if not stages["pairs"]["pairs"]:
                raise ExnihiloError(f"{pairs_path}: iteration {t} produced no pairs (see "
                                    f"{summary_path(pairs_path)})")
            generated = read_preferences(pairs_path)
            mixed = mix_replay(generated, offline, cfg.replay, cfg.seed + t)
            write_jsonl_atomic(mix_path, mixed)
            mark(folder, manifest, "mix", {"pairs": len(mixed), "replay": cfg.replay})
        if "dpo" not in stages:
            dpo_cfg = DPOConfig(**{"style": cfg.style, "seed": cfg.seed, **cfg.dpo,
                                   "data": str(mix_path), "model": policy,
                                   "out": str(model_dir)})
            finished = (model_dir / RUN_INFO).exists()
            if not finished:
                result = run_dpo(dpo_cfg, resume=model_dir.exists(), on_step=on_step,
                                 tokenizer=tokenizer)
                progress.note(f"DICE iteration {t}: DPO done, loss {result.train_loss:.4f}")
            info = read_run_info(model_dir) or {}
            mark(folder, manifest, "dpo", {"model": str(model_dir),
                                           "train_loss": info.get("train_loss"),
                                           "final_metrics": info.get("final_metrics")})
        manifests.append(manifest)
        reference, policy = policy, str(model_dir)
    return manifests
