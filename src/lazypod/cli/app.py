"""The `lazypod` group, its global options, and how every command ends.

Command names and flags follow DUCC (`convert`, `convert-single-image`, `loop`,
`garbage-collection`/`gc`, `check-image-syntax`, `-n FILE`, `-t DIR`, ...) so that
its users' scripts run unchanged. Exit status (see EXIT_* below): 0 done, 1 the run
failed (one line on stderr says what to do; the repository is as before), 2 bad
usage, 3 some images failed and the others were published, 130 interrupted.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import importlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click

from .. import __version__, faults
from ..errors import LazypodError
from ..logs import setup_logging
from ..notify import Notifier, NullNotifier, open_notifier

__all__ = [
    "EXIT_FAILED",
    "EXIT_PARTIAL",
    "CommandFailed",
    "ducc_globals",
    "main",
    "notifier",
    "runs_cleanly",
]

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK = 0
EXIT_FAILED = 1  # nothing was published, or the run could not complete
EXIT_USAGE = 2  # click's own
EXIT_PARTIAL = 3  # some images failed; the others are published
EXIT_INTERRUPTED = 130

_NOTIFY_FILE = "lazypod.notification_file"
_NOTIFIER = "lazypod.notifier"
_TEMP_DIR = "lazypod.temporary_dir"


class CommandFailed(LazypodError):
    """A failure whose exit status is not 1 (a partial run)."""

    def __init__(self, message: str, status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.status = status


class Terminated(LazypodError):
    """SIGTERM arrived: the run stops the way an error stops it (an open CVMFS
    transaction is aborted on the way out)."""


# Each command, and the module of this package that defines it: a command's module is
# imported when the command runs (`ls` does not load the HTTP stack `convert` needs).
COMMANDS: dict[str, str] = {
    "convert": "convert", "convert-single-image": "convert", "loop": "convert",
    "check-image-syntax": "info", "download-manifest": "info", "version": "info",
    "rm": "maintain", "garbage-collection": "maintain", "check": "maintain",
    "podman-config": "maintain", "views": "maintain", "ls": "maintain",
    "webhook": "webhook",
}
# DUCC's other names for commands.
ALIASES: dict[str, str] = {
    "gc": "garbage-collection", "check-image": "check-image-syntax",
    "image-check": "check-image-syntax", "get-manifest": "download-manifest", "v": "version",
}


class _LazyGroup(click.Group):
    """Commands loaded when named (`COMMANDS`), under DUCC's aliases too (`ALIASES`)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        name = ALIASES.get(cmd_name, cmd_name)
        module = COMMANDS.get(name)
        if module is not None and name not in self.commands:
            importlib.import_module(f"{__package__}.{module}")  # registers its commands
        return super().get_command(ctx, name)

    def resolve_command(self, ctx: click.Context, args: list[str],
                        ) -> tuple[str | None, click.Command | None, list[str]]:
        _, cmd, rest = super().resolve_command(ctx, args)
        return (cmd.name if cmd else None), cmd, rest


def _remember(key: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is not None:
            ctx.meta[key] = value
        return value

    return callback


def ducc_globals(func: F) -> F:
    """DUCC's persistent flags, accepted after the command name as DUCC accepts them
    (`convert-single-image -n LOG IMAGE REPO`) as well as before it."""
    return click.option("-n", "--notification-file", type=click.Path(dir_okay=False,
                        path_type=Path), expose_value=False, is_eager=True,
                        callback=_remember(_NOTIFY_FILE),
                        help="Append DUCC's notification lines (JSON) to FILE.")(func)


def temporary_dir_option(func: F) -> F:
    """`-t DIR` for commands that have no work directory: accepted, unused."""
    return click.option("-t", "--temporary-dir", type=click.Path(file_okay=False,
                        path_type=Path), expose_value=False, callback=_remember(_TEMP_DIR),
                        help="DUCC's temporary directory (unused by this command).")(func)


def temporary_dir() -> Path | None:
    """`-t` given before the command name, if any."""
    ctx = click.get_current_context(silent=True)
    value = ctx.meta.get(_TEMP_DIR) if ctx is not None else None
    return Path(value) if value is not None else None


def notifier() -> Notifier:
    ctx = click.get_current_context(silent=True)
    found = ctx.meta.get(_NOTIFIER) if ctx is not None else None
    return found if found is not None else NullNotifier()


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into an exception in the main thread, as Ctrl-C is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Terminated("terminated by SIGTERM; nothing half-written was left (rerun to "
                         "complete the work)")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_status(func: Callable[[], Any]) -> int:
    """Run the command; errors become one line on stderr and an exit status."""
    try:
        with _sigterm_raises():
            func()
        return EXIT_OK
    except CommandFailed as exc:
        click.echo(f"lazypod: error: {exc}", err=True)
        return exc.status
    except LazypodError as exc:
        click.echo(f"lazypod: error: {exc}", err=True)
        return EXIT_FAILED
    except OSError as exc:  # the last boundary: the system refused something
        where = f": {exc.filename}" if exc.filename else ""
        hint = " (free space and rerun)" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        click.echo(f"lazypod: error: {exc.strerror or exc}{where}{hint}", err=True)
        return EXIT_FAILED
    except KeyboardInterrupt:
        click.echo("lazypod: interrupted; the repository is as before this run (rerun to "
                   "complete the work)", err=True)
        return EXIT_INTERRUPTED


def runs_cleanly(func: F) -> F:
    """Every command: DUCC's start_ducc/end_ducc notification lines around it, and
    its errors as one line and an exit status, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        try:
            notes = open_notifier(ctx.meta.get(_NOTIFY_FILE))
        except LazypodError as exc:
            click.echo(f"lazypod: error: {exc}", err=True)
            sys.exit(EXIT_FAILED)
        ctx.meta[_NOTIFIER] = notes
        started = time.monotonic()
        notes.emit("start_ducc", pid=os.getpid(), command=ctx.info_name)
        status = EXIT_FAILED
        try:
            status = _exit_status(lambda: func(*args, **kwargs))
        except SystemExit as exc:  # a command's own exit status (check)
            status = exc.code if isinstance(exc.code, int) else EXIT_FAILED
            raise
        except click.ClickException as exc:  # a bad argument found late
            status = exc.exit_code
            raise
        finally:
            notes.emit("end_ducc", pid=os.getpid(),
                       time_elapsed_s=f"{time.monotonic() - started:f}",
                       status="ok" if status == EXIT_OK else "error", exit_code=status)
            notes.close()
        if status:
            sys.exit(status)

    return wrapper  # type: ignore[return-value]


def _fault_hook() -> None:
    """Fault injection for the tests: LAZYPOD_KILL_AT=N kills lazypod (SIGKILL) at the
    N-th point where it makes a change visible; LAZYPOD_COUNT_POINTS=FILE writes how
    many points a run reached (see lazypod.faults)."""
    kill_at = os.environ.get("LAZYPOD_KILL_AT")
    count_file = os.environ.get("LAZYPOD_COUNT_POINTS")
    if not kill_at and not count_file:
        return
    reached = [0]

    def hook(point: str) -> None:
        reached[0] += 1
        if count_file:
            Path(count_file).write_text(f"{reached[0]}\n")
        if kill_at and reached[0] == int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)

    faults.install(hook)


@click.group(cls=_LazyGroup,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="lazypod")
@click.option("-v", "--verbose", count=True, help="More detail (-v: info, -vv: debug).")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="Log lines as text, or as JSON objects for daemons.")
@ducc_globals
@temporary_dir_option
def main(verbose: int, log_format: str) -> None:
    """Publish container images as unpacked layers on CVMFS (or any shared file
    system) and let podman run them from there, with no pull.

    Exit status: 0 done; 1 failed (the repository is as before); 2 bad usage; 3
    some images failed, the others are published; 130 interrupted.
    """
    setup_logging(verbose, log_format == "json")
    _fault_hook()
