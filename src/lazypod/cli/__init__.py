"""The `lazypod` command: a thin layer over the library (see `app` for the group,
its global options and exit statuses)."""

from __future__ import annotations

from . import convert, info, maintain, webhook  # noqa: F401  (each registers its commands)
from .app import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
