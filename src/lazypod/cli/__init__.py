"""The `lazypod` command: a thin layer over the library (see `app` for the group,
its global options and exit statuses)."""

from __future__ import annotations

from .app import main  # its commands are loaded when named (`app.COMMANDS`)

__all__ = ["main"]

if __name__ == "__main__":
    main()
