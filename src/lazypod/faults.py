"""Named points where a run changes a repository, so that fault injection can stop
a run at each of them (the tests kill lazypod at every one and check that the next
run completes the work). Nothing happens at a point unless a hook is installed;
the CLI installs one from LAZYPOD_KILL_AT / LAZYPOD_COUNT_POINTS (see cli.py)."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["install", "reached"]

_hook: Callable[[str], None] | None = None


def reached(point: str) -> None:
    """A run is about to make one change visible (a rename, a removal)."""
    if _hook is not None:
        _hook(point)


def install(hook: Callable[[str], None] | None) -> None:
    global _hook
    _hook = hook
