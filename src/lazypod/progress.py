"""Progress of long work: a bar per layer on a terminal, nothing elsewhere."""

from __future__ import annotations

import sys
import threading
from typing import Protocol

__all__ = [
    "CountingReader",
    "NullProgress",
    "ProgressReporter",
    "TerminalProgress",
    "make_progress",
]


class ProgressReporter(Protocol):
    def start(self, label: str, total: int) -> int: ...
    def advance(self, task: int, amount: int) -> None: ...
    def finish(self, task: int) -> None: ...
    def close(self) -> None: ...


class NullProgress:
    def start(self, label: str, total: int) -> int:
        return 0

    def advance(self, task: int, amount: int) -> None:
        pass

    def finish(self, task: int) -> None:
        pass

    def close(self) -> None:
        pass


class TerminalProgress:
    def __init__(self) -> None:
        # Imported here: rich costs a tenth of the start-up, and only terminals need it.
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._progress.start()
        self._lock = threading.Lock()

    def start(self, label: str, total: int) -> int:
        with self._lock:
            return int(self._progress.add_task(label, total=total))

    def advance(self, task: int, amount: int) -> None:
        self._progress.advance(task, amount)  # type: ignore[arg-type]

    def finish(self, task: int) -> None:
        with self._lock:
            self._progress.remove_task(task)  # type: ignore[arg-type]

    def close(self) -> None:
        self._progress.stop()


def make_progress(enabled: bool | None = None) -> ProgressReporter:
    """Bars when stderr is a terminal (or when asked), else nothing."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    return TerminalProgress() if enabled else NullProgress()


class CountingReader:
    """Reports bytes as they are read, in steps of at least 256 KiB."""

    def __init__(self, inner: object, progress: ProgressReporter, task: int) -> None:
        self._inner = inner
        self._progress = progress
        self._task = task
        self._pending = 0

    def read(self, n: int = -1) -> bytes:
        data: bytes = self._inner.read(n)  # type: ignore[attr-defined]
        self._pending += len(data)
        if self._pending >= 1 << 18 or not data:
            self._progress.advance(self._task, self._pending)
            self._pending = 0
        return data
