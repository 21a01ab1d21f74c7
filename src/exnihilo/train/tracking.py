"""Experiment trackers fed from the training loop: `--report-to tensorboard|trackio|wandb`.

The loop already writes every step's metrics to `metrics.jsonl` (and `exnihilo report RUN_DIR`
draws them); a tracker sends the same rows, at the same steps, to a dashboard the user
already runs. Nothing is tracked by default, and no tracker package is a dependency: each
backend is imported only when asked for, and a missing one is a one-line error raised when
the config is built — before any model loads.

What is sent: the run's config once at the start (with any secret-looking key dropped, and
never the environment), then each metrics row's numeric values under the names
`metrics.jsonl` uses (`loss`, `lr`, `val_loss`, `val_reward_accuracy`, …) at its optimizer
step. wandb runs offline unless the user's environment sets WANDB_MODE (so no account or
network is needed; `wandb sync` uploads later).

Why not transformers' `report_to` integrations: they are TrainerCallbacks bound to its
Trainer state; ours are ten lines each over the backends' own logging calls.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from exnihilo import progress
from exnihilo.errors import ExnihiloError

PROJECT = "exnihilo"  # the trackio / wandb project every run is logged under
SECRET_KEY = re.compile(r"(^|_)(api_?key|secret|password|passwd|token|credentials?)$",
                        re.IGNORECASE)


class Tracker(Protocol):
    """One open run in one backend."""

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Backend:
    """A tracker kind: its `--report-to` name, the pip package that provides it, a cheap
    installed-check (no import), and how to open a run (folder, run name, config)."""

    name: str
    package: str
    available: Callable[[], bool]
    open: Callable[[Path, str, dict[str, Any]], Tracker]


def _installed(*modules: str) -> Callable[[], bool]:
    """True when any of `modules` can be imported (find_spec looks, it does not import)."""
    def check() -> bool:
        return any(importlib.util.find_spec(m) is not None for m in modules)
    return check


# ------------------------------------------------------------------------------- backends

class TensorBoardTracker:
    """Scalars into `<out>/tensorboard/` (one event file per run or resume)."""

    def __init__(self, out: Path, name: str, config: dict[str, Any]):
        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter
        else:
            from tensorboardX import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        self.writer.add_text("config", "```json\n" + json.dumps(config, indent=2) + "\n```", 0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()  # a dashboard open during training sees each step

    def close(self) -> None:
        self.writer.close()


class TrackioTracker:
    """A trackio run in project `exnihilo` (trackio's local store unless its own env says a
    Space)."""

    def __init__(self, out: Path, name: str, config: dict[str, Any]):
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=PROJECT, name=name, config=config)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.trackio.log(metrics, step=step)

    def close(self) -> None:
        self.trackio.finish()


class WandbTracker:
    """A wandb run under `<out>/wandb/`, offline unless WANDB_MODE says otherwise; no code
    or git state is saved with it."""

    def __init__(self, out: Path, name: str, config: dict[str, Any]):
        import wandb

        kwargs: dict[str, Any] = {}
        if not os.environ.get("WANDB_MODE"):
            kwargs["mode"] = "offline"
        self.run = wandb.init(project=PROJECT, name=name, config=config, dir=str(out),
                              settings=wandb.Settings(save_code=False, disable_git=True),
                              **kwargs)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


BACKENDS: dict[str, Backend] = {
    "tensorboard": Backend("tensorboard", "tensorboard",
                           _installed("tensorboard", "tensorboardX"), TensorBoardTracker),
    "trackio": Backend("trackio", "trackio", _installed("trackio"), TrackioTracker),
    "wandb": Backend("wandb", "wandb", _installed("wandb"), WandbTracker),
}


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend by name: a plugin's tracker, or a test's recorder."""
    BACKENDS[backend.name] = backend


# -------------------------------------------------------------------------------- choosing

def parse_report_to(values: str | Iterable[str] | None) -> list[str]:
    """`--report-to` values (repeatable, each may be a comma list) → backend names, in order,
    once each. `none` alone means no tracking. Unknown or not-installed backends are errors
    naming the backend and the pip package."""
    if values is None:
        return []
    raw = [values] if isinstance(values, str) else list(values)
    names: list[str] = []
    for value in raw:
        for part in str(value).split(","):
            name = part.strip().lower()
            if name and name not in names:
                names.append(name)
    if names == ["none"]:
        return []
    for name in names:
        backend = BACKENDS.get(name)
        if backend is None:
            raise ExnihiloError(f"--report-to {name}: unknown tracker (choose from "
                                f"{', '.join(sorted(BACKENDS))}, or none)")
        if not backend.available():
            raise ExnihiloError(f"--report-to {name}: the {backend.package} package is not "
                                f"installed (pip install {backend.package})")
    return names


def safe_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The run config as JSON-safe values, without keys that look like secrets (api_key,
    token, password …), at any depth."""
    def clean(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): clean(v) for k, v in value.items() if not SECRET_KEY.search(str(k))}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        if value is None or isinstance(value, bool | int | float | str):
            return value
        return str(value)
    return clean(config)


def numeric_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics row, except the step itself (it is the x-axis)."""
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
            and math.isfinite(v)}


# ------------------------------------------------------------------------------- the fan-out

class Trackers:
    """Every chosen backend's open run. A backend that fails while logging is warned about
    once and dropped: hours of training are worth more than a dashboard."""

    def __init__(self, opened: list[tuple[str, Tracker]]):
        self.opened = opened

    def log(self, row: Mapping[str, Any], step: int) -> None:
        metrics = numeric_metrics(row)
        if not metrics:
            return
        for name, tracker in list(self.opened):
            try:
                tracker.log(metrics, step)
            except Exception as e:  # a dashboard's failure must not end the run
                progress.note(f"--report-to {name}: logging failed ({type(e).__name__}: "
                              f"{e}); continuing without it (metrics.jsonl has every step)")
                self.opened.remove((name, tracker))

    def close(self) -> None:
        for name, tracker in self.opened:
            try:
                tracker.close()
            except Exception as e:
                progress.note(f"--report-to {name}: closing failed ({type(e).__name__}: {e})")
        self.opened = []


def open_trackers(names: Iterable[str], out: Path, config: Mapping[str, Any] | None = None,
                  run_name: str | None = None) -> Trackers:
    """Open one run per backend name (checked again here, for library callers that skip
    the config), each given the secret-free config once."""
    names = parse_report_to(list(names))
    clean = safe_config(config or {})
    opened: list[tuple[str, Tracker]] = []
    try:
        for name in names:
            try:
                opened.append((name, BACKENDS[name].open(out, run_name or out.name, clean)))
            except ExnihiloError:
                raise
            except Exception as e:
                raise ExnihiloError(f"--report-to {name}: could not start a run "
                                    f"({type(e).__name__}: {e})") from None
    except BaseException:
        Trackers(opened).close()
        raise
    return Trackers(opened)
