"""The one door between a layer's names and the disk, for writers and readers alike.

Writing (unpacking a tarball), two checks, both needed:

* `clean_member_name` judges the name alone: no absolute names, no `..`, no
  NUL; `./a//b/` becomes ("a", "b").
* `LayerDir` walks a cleaned name component by component with `O_NOFOLLOW`
  from an open descriptor of the layer directory, so nothing (a symlink planted
  by an earlier member, a directory swapped under us) can lead outside it.

Reading (flat trees, the cvmfs backend's plan and ingest, `check`, the client
views' scan): `walk_layer` lists a layer from descriptors, never through a
symlink (a layer's `dev/fd -> /proc/self/fd` or `var/run -> /run` is an entry, not
a way in), and `LayerDir.open_file` opens one of its files the same way.

Nothing else in lazypod joins paths taken from a tarball or found in a layer.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import LayerError, UnsafeLayer
from .fseval import At, FsEval, proc_path, process_fs

__all__ = ["LayerDir", "LayerEntry", "SafePath", "clean_member_name", "display", "walk_layer"]

SafePath = tuple[bytes, ...]
# Deeper trees than any real image has; it keeps every later walk of the layer (flat
# trees, removal) far from Python's recursion limit.
MAX_DEPTH = 256

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_LIST_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


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
    """An open layer directory; resolves cleaned names without following symlinks.
    `fs` owns the parents it makes (the process's by default)."""

    def __init__(self, path: Path, *, create_mode: int = 0o755,
                 fs: FsEval | None = None) -> None:
        self.path = path
        self.fd = os.open(path, _DIR_FLAGS)
        self._create_mode = create_mode
        self._fs = fs
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
            if self._fs is None:
                self._fs = process_fs()
            self._fs.chown(At(parent, name), 0, 0)
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
        return proc_path(dir_fd, name)

    def open_file(self, path: SafePath) -> int:
        """A read-only descriptor of the regular file `path`, reached without following
        any symlink; LayerError if it is not a regular file."""
        parent, name = self.parent(path, create=False)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                         dir_fd=parent)
        except OSError as exc:
            raise LayerError(f"cannot open {display(path)!r} in layer {self.path}: "
                             f"{exc.strerror}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise LayerError(f"{display(path)!r} in layer {self.path} is not a regular file")
        os.set_blocking(fd, True)
        return fd


@dataclass(frozen=True, slots=True)
class LayerEntry:
    """One entry of a layer, as `walk_layer` found it: `path` is relative to the
    layer root (b"" for the root itself), `st` its lstat, `xattrs` what was asked."""

    path: bytes
    st: os.stat_result
    xattrs: dict[str, bytes]
    target: bytes = b""  # a symlink's target

    @property
    def name(self) -> bytes:
        return self.path.rsplit(b"/", 1)[-1]


# Whose xattrs a walk reads: nobody's, directories', everything but regular files and
# symlinks ("special": what a hardlinked copy of the layer does not carry), everyone's.
XattrsWanted = Literal["none", "dirs", "special", "all"]


def walk_layer(root: Path | str, *, xattrs: XattrsWanted = "none",
               skip_unreadable: bool = False) -> Iterator[LayerEntry]:
    """Every entry of the layer directory `root`, parents before children, names in
    byte order, read from open descriptors without following any symlink below
    `root`. Descriptors stay open only while the walk runs (close the generator, or
    exhaust it, to release them). `xattrs`: whose xattrs to read (see XattrsWanted).
    `skip_unreadable`: leave out the content of directories this user may not
    list, instead of failing."""
    try:
        fd = os.open(root, _LIST_FLAGS)
    except OSError as exc:
        raise LayerError(f"cannot read layer {os.fsdecode(root)}: {exc.strerror}") from None
    stack: list[tuple[int, bytes, Iterator[bytes]]] = []
    try:
        yield LayerEntry(b"", os.fstat(fd), _fd_xattrs(fd) if xattrs != "none" else {})
        stack.append((fd, b"", _names(fd, root, skip_unreadable)))
        while stack:
            dir_fd, prefix, names = stack[-1]
            name = next(names, None)
            if name is None:
                os.close(dir_fd)
                stack.pop()
                continue
            rel = prefix + b"/" + name if prefix else name
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                if stat.S_ISLNK(st.st_mode):
                    yield LayerEntry(rel, st, {}, os.readlink(name, dir_fd=dir_fd))
                    continue
                wanted = xattrs == "all" or (xattrs == "special"
                                             and not stat.S_ISREG(st.st_mode))
                yield LayerEntry(rel, st, _path_xattrs(proc_path(dir_fd, name)) if wanted
                                 else {})
                continue
            if len(stack) > MAX_DEPTH:
                raise LayerError(f"layer {os.fsdecode(root)} nests directories deeper than "
                                 f"{MAX_DEPTH} at {display(rel)[:80]!r}")
            try:
                child = os.open(name, _LIST_FLAGS, dir_fd=dir_fd)
            except PermissionError:
                if not skip_unreadable:
                    raise
                yield LayerEntry(rel, st, {})
                continue
            except OSError as exc:  # ELOOP, ENOTDIR: swapped for a symlink or a file
                raise LayerError(f"layer {os.fsdecode(root)} changed while it was read "
                                 f"({display(rel)!r}: {exc.strerror})") from None
            stack.append((child, rel, _names(child, root, skip_unreadable)))
            yield LayerEntry(rel, st, _fd_xattrs(child) if xattrs != "none" else {})
    finally:
        for dir_fd, _, _ in stack:
            os.close(dir_fd)


def _names(fd: int, root: Path | str, skip_unreadable: bool) -> Iterator[bytes]:
    try:
        names = os.listdir(fd)
    except PermissionError:
        if not skip_unreadable:
            raise
        names = []
    return iter(sorted(os.fsencode(n) for n in names))


def _fd_xattrs(fd: int) -> dict[str, bytes]:
    try:
        return {key: os.getxattr(fd, key) for key in os.listxattr(fd)}
    except OSError:
        return {}


def _path_xattrs(path: bytes) -> dict[str, bytes]:
    try:
        return {key: os.getxattr(path, key, follow_symlinks=False)
                for key in os.listxattr(path, follow_symlinks=False)}
    except OSError:
        return {}
