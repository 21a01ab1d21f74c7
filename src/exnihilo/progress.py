"""Progress bars on stderr (rich). Silent when stderr is not a terminal, so logs stay clean."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

_console = Console(stderr=True, markup=False)  # messages hold file names: data


def enabled() -> bool:
    return _console.is_terminal and not os.environ.get("EXNIHILO_NO_PROGRESS")


class TokenProgress:
    """Counts finished items and generated tokens; shows items, tokens/s and ETA (with
    `unit` other than "tok": items per second in that unit, e.g. "texts/s")."""

    def __init__(self, progress: Progress | None, task: int | None, unit: str = "tok"):
        self._progress, self._task, self.unit = progress, task, unit
        self.tokens = 0
        self.items = 0
        self.started = time.perf_counter()

    def advance(self, items: int = 0, tokens: int = 0) -> None:
        self.items += items
        self.tokens += tokens
        if self._progress is not None and self._task is not None:
            elapsed = max(time.perf_counter() - self.started, 1e-9)
            count = self.tokens if self.unit == "tok" else self.items
            self._progress.update(self._task, advance=items,
                                  rate=f"{count / elapsed:,.0f} {self.unit}/s")

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(time.perf_counter() - self.started, 1e-9)


@contextmanager
def token_progress(description: str, total: int, unit: str = "tok"
                   ) -> Iterator[TokenProgress]:
    if not enabled():
        yield TokenProgress(None, None, unit)
        return
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                        MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                        console=_console, transient=False)
    with progress:
        task = progress.add_task(description, total=total, rate="")
        yield TokenProgress(progress, task, unit)


def note(message: str) -> None:
    """A dim status line on stderr (kept in logs too: it is one line per long step)."""
    if os.environ.get("EXNIHILO_QUIET"):
        return
    _console.print(message, style="dim", soft_wrap=True, highlight=False)
