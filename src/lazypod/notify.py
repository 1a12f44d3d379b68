"""DUCC's notification file (`-n FILE`): one JSON object per line, appended.

The format is DUCC's, so that what reads DUCC's files (its webhook listener scans
them for `"status":"error"`, dashboards count `publish_layer`) reads lazypod's:
every value a string, keys sorted, `time` in DUCC's layout (`_2 Jan 2006 -
15:04:05.000`, local time), `time_elapsed_s` with six decimals, `id` pairing a
`start_` line with its `end_` line. Actions, as DUCC names them:

    start_ducc / end_ducc                       every command (pid, time_elapsed_s;
                                                lazypod adds status and exit_code)
    start_layer_conversion / end_layer_conversion   a layer fetched and unpacked
                                                (image, layer, id, size_bytes, status)
    publish_layer                               the layer is in the repository
    start_flat_conversion / end_flat_conversion     a request's flat trees
    publish_flat_image                          a public link written
    start_podman_ingestion / end_podman_ingestion   the podman store
    start_image_conversion / end_image_conversion   lazypod's own: one image, with
                                                status (an image can fail before any
                                                layer, where DUCC has no line)

Lines are written whole with one `write` on a file opened `O_APPEND`, so several
processes may share a file. A file that cannot be opened is one error line, at the
start, not a run that silently reports nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Protocol

from .errors import LazypodError

__all__ = ["FileNotifier", "Notifier", "NullNotifier", "ducc_time", "open_notifier"]

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class Notifier(Protocol):
    def emit(self, action: str, **fields: object) -> None: ...
    def start(self, action: str, **fields: object) -> str: ...
    def end(self, action: str, ident: str, *, error: str | None = None,
            with_status: bool = True, **fields: object) -> None: ...
    def close(self) -> None: ...


class NullNotifier:
    def emit(self, action: str, **fields: object) -> None:
        pass

    def start(self, action: str, **fields: object) -> str:
        return ""

    def end(self, action: str, ident: str, *, error: str | None = None,
            with_status: bool = True, **fields: object) -> None:
        pass

    def close(self) -> None:
        pass


def ducc_time(now: float | None = None) -> str:
    """Go's `_2 Jan 2006 - 15:04:05.000`, local time."""
    now = time.time() if now is None else now
    t = time.localtime(now)
    millis = int((now % 1) * 1000)
    return (f"{t.tm_mday:2d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} - "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}.{millis:03d}")


class FileNotifier:
    """Appends notification lines to a file; thread-safe."""

    def __init__(self, path: Path) -> None:
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                               0o660)
        except OSError as exc:
            raise LazypodError(f"cannot open the notification file {path}: {exc.strerror} "
                               "(choose another with -n)") from None
        self._lock = threading.Lock()
        self._started: dict[str, float] = {}

    def emit(self, action: str, **fields: object) -> None:
        record = {key: _text(value) for key, value in fields.items() if value is not None}
        record["action"] = action
        record["time"] = ducc_time()
        line = json.dumps(record, sort_keys=True, separators=(",", ":")).encode() + b"\n"
        with self._lock:
            if self._fd < 0:
                return
            with contextlib.suppress(OSError):  # a full disk must not fail the run
                os.write(self._fd, line)

    def start(self, action: str, **fields: object) -> str:
        ident = str(uuid.uuid4())
        with self._lock:
            self._started[ident] = time.monotonic()
        self.emit(action, id=ident, **fields)
        return ident

    def end(self, action: str, ident: str, *, error: str | None = None,
            with_status: bool = True, **fields: object) -> None:
        with self._lock:
            started = self._started.pop(ident, time.monotonic())
        status: dict[str, object] = {}
        if with_status:
            status = {"status": "error", "error": error} if error else {"status": "ok"}
        self.emit(action, id=ident, time_elapsed_s=f"{time.monotonic() - started:f}",
                  **status, **fields)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def open_notifier(path: Path | None) -> Notifier:
    return FileNotifier(path) if path is not None else NullNotifier()
