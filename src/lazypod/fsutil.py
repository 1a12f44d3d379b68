"""Small file-system helpers every writer and reader of a repository shares."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from pathlib import Path

__all__ = ["current_umask", "listdir", "make_dirs", "read_or_none", "remove_tree",
           "write_new"]


def current_umask() -> int:
    """The process's umask now: what a mode given to mkdir/open becomes. Read from
    /proc (setting it to read it back would change it for every thread meanwhile)."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: the only other way to read it
    os.umask(mask)
    return mask


def listdir(path: str | os.PathLike[str]) -> list[str]:
    """Sorted names in a directory; none if it is missing or unreadable."""
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def make_dirs(path: Path, *, stop: Path | None = None) -> None:
    """mkdir -p with mode 0755 whatever the umask (a repository is read by all);
    `stop`, if given, is the highest directory it may create."""
    missing = []
    while not path.exists():
        missing.append(path)
        if path == stop or path.parent == path:
            break
        path = path.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=0o755)
            directory.chmod(0o755)


def write_new(path: str | os.PathLike[str] | bytes, data: bytes, mode: int = 0o644, *,
              dir_fd: int | None = None) -> None:
    """Create the file `path` (it must not exist) holding `data`, with `mode` whatever
    the umask (one fchmod costs less than reading the umask)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode,
                 dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def remove_tree(path: Path, *, quiet: bool = False) -> None:
    """Remove a file, a symlink or a whole directory; nothing if it is not there.
    Read-only directories (a layer's root is 0555, and images hold 0555 and 0000
    ones) stop only an ordinary user: they are then made writable and the removal
    tried again. `quiet`: what still cannot be removed is left, silently."""
    try:
        if path.is_dir() and not path.is_symlink():
            try:
                shutil.rmtree(path)
            except PermissionError:
                _make_writable(path)
                shutil.rmtree(path)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    except OSError:
        if not quiet:
            raise


def _make_writable(path: Path | str) -> None:
    """Give the owner rwx on every directory below `path` (symlinks not followed),
    each before it is listed."""
    try:
        mode = os.lstat(path).st_mode
        if not stat.S_ISDIR(mode):
            return
        if mode & 0o700 != 0o700:
            os.chmod(path, stat.S_IMODE(mode) | 0o700)
        with os.scandir(path) as entries:
            subdirs = [e.path for e in entries if e.is_dir(follow_symlinks=False)]
    except OSError:
        return  # not ours: rmtree says so
    for subdir in subdirs:
        _make_writable(subdir)
