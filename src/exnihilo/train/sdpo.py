"""sDPO (stepwise DPO, Kim et al., arXiv 2403.19270): split the preference data into K parts
and run plain DPO on part t with both the starting weights and the reference = the model
step t−1 produced (M_0 = `--model`). The reference's log-ratio floor rises step by step,
which works as a curriculum. K = 1 is exactly DPO.

Layout: `<out>/steps/step-t/` is each step's complete DPO run (a model folder); a killed run
resumes inside the step it was in, finished steps are skipped. When the last step is done,
its model files are copied into `<out>` itself with `exnihilo_run.json` (kind "sdpo"), so
`<out>` is a model folder like any other run's.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

from exnihilo import progress
from exnihilo.errors import ExnihiloError
from exnihilo.records import Record
from exnihilo.train.dpo import DPOConfig, DPOResult, run_dpo
from exnihilo.train.preference_data import read_preferences
from exnihilo.train.run import (
    RUN_INFO,
    prepare_out,
    read_run_info,
    run_identity,
    write_json_atomic,
)


def split_parts(records: list[Record], k: int, seed: int) -> list[list[Record]]:
    """A seeded shuffle cut into k contiguous parts whose sizes differ by at most one."""
    if k > len(records):
        raise ExnihiloError(f"--steps {k} needs at least {k} pairs, the data has "
                            f"{len(records)}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    size, extra = divmod(len(records), k)
    parts, start = [], 0
    for t in range(k):
        end = start + size + (1 if t < extra else 0)
        parts.append([records[i] for i in order[start:end]])
        start = end
    return parts


def step_dir(out: Path, t: int) -> Path:
    return out / "steps" / f"step-{t}"


def run_sdpo(cfg: DPOConfig, resume: bool = False, on_step: Any = None, model_obj: Any = None,
             tokenizer: Any = None, ref_model_obj: Any = None) -> list[DPOResult | None]:
    """Run the K steps (skipping finished ones) and publish the last model in `cfg.out`.
    Returns each step's result (None for steps finished by an earlier invocation)."""
    out = Path(cfg.out)
    records = read_preferences(cfg.data)
    parts = split_parts(records, cfg.steps, cfg.seed)
    prepare_out(out, run_identity(cfg, {"data": cfg.data}), resume)
    results: list[DPOResult | None] = []
    previous: str | None = None
    for t, part in enumerate(parts, start=1):
        folder = step_dir(out, t)
        first = t == 1
        step_cfg = cfg.model_copy(update={
            "out": str(folder), "steps": 1,
            "model": cfg.model if first else str(previous),
            "ref_model": cfg.ref_model if first else None})
        previous = str(folder)
        if (folder / RUN_INFO).exists():
            results.append(None)
            continue
        progress.note(f"sDPO step {t}/{cfg.steps}: {len(part)} pairs, reference = "
                      f"{'--model' if first and not cfg.ref_model else step_cfg.model}")
        results.append(run_dpo(
            step_cfg, resume=folder.exists(), on_step=on_step,
            model_obj=model_obj if first else None, tokenizer=tokenizer,
            ref_model_obj=ref_model_obj if first else None, records=part))
    publish(out, step_dir(out, cfg.steps), cfg)
    return results


def publish(out: Path, last: Path, cfg: DPOConfig) -> None:
    """Copy the last step's model files into `out`; exnihilo_run.json goes last."""
    for path in sorted(last.iterdir(), key=lambda p: p.name == "config.json"):
        if path.is_file() and path.name not in (RUN_INFO, "run_config.json", "metrics.jsonl"):
            shutil.copy2(path, out / path.name)
    info = read_run_info(last) or {}
    steps = [read_run_info(step_dir(out, t)) or {} for t in range(1, cfg.steps + 1)]
    write_json_atomic(out / RUN_INFO, {
        **info, "kind": "sdpo", "base_model": cfg.model, "config": cfg.model_dump(),
        "steps": [{"step": t, "train_loss": s.get("train_loss"), "val_loss": s.get("val_loss"),
                   "data": s.get("data"), "final_metrics": s.get("final_metrics")}
                  for t, s in enumerate(steps, start=1)]})
