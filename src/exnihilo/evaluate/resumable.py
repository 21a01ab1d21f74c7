"""Resumable outputs for the eval stages: the shared helper (`exnihilo.resume`), under the
name the eval modules use. Results are appended whole as they finish and reused on a rerun
after each row's settings are checked; a file made with other settings is refused."""

from __future__ import annotations

from exnihilo.resume import process_resumable as _resumable

__all__ = ["_resumable"]
