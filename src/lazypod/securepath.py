"""The one door through which a name from a tarball becomes a place on disk.

Two checks, both needed:

* `clean_member_name` judges the name alone: no absolute names, no `..`, no
  NUL; `./a//b/` becomes ("a", "b").
* `LayerDir` walks a cleaned name component by component with `O_NOFOLLOW`
  from an open descriptor of the layer directory, so nothing (a symlink planted
  by an earlier member, a directory swapped under us) can lead outside it.

Nothing else in lazypod joins paths taken from a tarball.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import OrderedDict
from pathlib import Path

from .errors import LayerError, UnsafeLayer

__all__ = ["LayerDir", "SafePath", "clean_member_name", "display"]

SafePath = tuple[bytes, ...]
# Deeper trees than any real image has; it keeps every later walk of the layer (flat
# trees, removal) far from Python's recursion limit.
MAX_DEPTH = 256

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def display(name: bytes | SafePath) -> str:
    """A printable form of a (possibly non-UTF-8) member name, for messages."""
    if isinstance(name, tuple):
        name = b"/".join(name)
    return name.decode("utf-8", "backslashreplace")


def clean_member_name(unsafe_name: bytes) -> SafePath:
    """The components of a member name, or UnsafeLayer if it could escape the layer."""
    if b"\0" in unsafe_name:
        raise UnsafeLayer(f"layer member {display(unsafe_name)!r} has a NUL byte in its name")
    if unsafe_name.startswith(b"/"):
        raise UnsafeLayer(
            f"layer member {display(unsafe_name)!r} has an absolute name: refusing the layer"
        )
    parts = tuple(p for p in unsafe_name.split(b"/") if p and p != b".")
    if len(parts) > MAX_DEPTH:
        raise UnsafeLayer(f"layer member {display(unsafe_name)[:80]!r}... is nested "
                          f"{len(parts)} directories deep (at most {MAX_DEPTH}): refusing "
                          "the layer")
    if b".." in parts:
        raise UnsafeLayer(
            f"layer member {display(unsafe_name)!r} climbs out with '..': refusing the layer"
        )
    return parts


class LayerDir:
    """An open layer directory; resolves cleaned names without following symlinks."""

    def __init__(self, path: Path, *, create_mode: int = 0o755) -> None:
        self.path = path
        self.fd = os.open(path, _DIR_FLAGS)
        self._create_mode = create_mode
        self._is_root = os.geteuid() == 0
        self._cache: OrderedDict[SafePath, int] = OrderedDict()

    def close(self) -> None:
        self.forget()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def forget(self) -> None:
        """Drop cached directory descriptors (after something was removed or replaced)."""
        for fd in self._cache.values():
            os.close(fd)
        self._cache.clear()

    def forget_under(self, path: SafePath) -> None:
        """Drop cached descriptors of `path` and everything below it (it was removed)."""
        depth = len(path)
        for key in [k for k in self._cache if k[:depth] == path]:
            os.close(self._cache.pop(key))

    def parent(self, path: SafePath, *, create: bool = True) -> tuple[int, bytes]:
        """(descriptor of the parent directory, last component) for `path`.

        Missing parents are created (0755, root) when `create`; a symlink or a
        non-directory on the way raises UnsafeLayer or LayerError.
        """
        if not path:
            raise LayerError("internal: the layer root has no parent")
        return self.directory(path[:-1], create=create), path[-1]

    def directory(self, path: SafePath, *, create: bool = True) -> int:
        """An O_PATH descriptor of directory `path` inside the layer.

        Descriptors are cached and stay open until the next `trim()`, so a caller may
        hold several (a hardlink's two parents) while it works."""
        depth = len(path)
        while depth and path[:depth] not in self._cache:
            depth -= 1
        fd = self._cache[path[:depth]] if depth else self.fd
        if depth:
            self._cache.move_to_end(path[:depth])
        for end in range(depth + 1, len(path) + 1):
            fd = self._open_child(fd, path[:end], create)
            self._cache[path[:end]] = fd
        return fd

    def _open_child(self, parent: int, path: SafePath, create: bool) -> int:
        name = path[-1]
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise
            os.mkdir(name, self._create_mode, dir_fd=parent)
            if self._is_root:
                os.chown(name, 0, 0, dir_fd=parent, follow_symlinks=False)
            return os.open(name, _DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                raise UnsafeLayer(
                    f"layer writes through symlink {display(path)!r}: refusing the layer"
                ) from None
            raise LayerError(
                f"layer needs a directory at {display(path)!r}, where it has a file"
            ) from None

    def trim(self, keep: int = 128) -> None:
        """Close the least recently used descriptors beyond `keep` (between members)."""
        while len(self._cache) > keep:
            _, old = self._cache.popitem(last=False)
            os.close(old)

    @property
    def fd_path(self) -> str:
        """A path to the layer directory itself, through its open descriptor."""
        return f"/proc/self/fd/{self.fd}"

    def proc_path(self, dir_fd: int, name: bytes) -> bytes:
        """A path to `name` in an open directory, for calls that take no dir_fd (xattrs)."""
        return b"/proc/self/fd/%d/%s" % (dir_fd, name)
