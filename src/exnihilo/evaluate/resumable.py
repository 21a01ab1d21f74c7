"""Resumable outputs for the eval stages: results appended whole, reused on a rerun."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from exnihilo.errors import ExnihiloError
from exnihilo.records import JsonlAppender, Record


def _resumable(items: list[Record], key: Callable[[Record], str],
               process: Callable[[list[Record]], list[Record]], out: str | Path | None,
               chunk_size: int, mismatch: Callable[[Record], str | None]
               ) -> tuple[list[Record], int]:
    """Run `process` over `items` in chunks, appending each result to `out` as it comes.

    `key` must give the same value for an input and for its result (a prompt id, or a
    record id that judging keeps). Results already in `out` (same key) are reused, after
    `mismatch` confirms they came from the same settings (it returns a reason when not:
    then we refuse rather than mix).
    Returns the results in input order and how many were reused.
    """
    done: dict[str, Record] = {}
    appender = JsonlAppender(out) if out is not None else None
    if appender is not None:
        for lineno, old in enumerate(appender.existing(), start=1):
            reason = mismatch(old)
            if reason:
                appender.close()
                raise ExnihiloError(f"{out}:{lineno}: {reason}; choose another output file or "
                                    f"remove it (nothing was overwritten)")
            done[key(old)] = old
    reused = sum(1 for item in items if key(item) in done)
    if reused:
        from exnihilo.progress import note

        note(f"resuming: {reused} of {len(items)} already in {out}")
    todo, queued = [], set(done)
    for item in items:  # an input listed twice is processed (and written) once
        if key(item) not in queued:
            queued.add(key(item))
            todo.append(item)
    try:
        for start in range(0, len(todo), chunk_size):
            for result in process(todo[start:start + chunk_size]):
                done[key(result)] = result
                if appender is not None:
                    appender.append(result)
    finally:
        if appender is not None:
            appender.close()
    return [done[key(item)] for item in items], reused
