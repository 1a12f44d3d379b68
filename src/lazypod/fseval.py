"""What lazypod does differently on the file system as root and as an ordinary user, in
one object chosen for the process (`process_fs`) and passed in (umoci's `fseval`).

* `RootFs`: entries get the owners the tarball (or the layer) gives them; device
  nodes are made; a new directory or file is made with its final permissions at once
  (root may write into any directory, which saves a chmod per entry).
* `UnprivilegedFs`: entries stay the user's (the layer record's uidset/gidset still say
  whose they were); a device node is refused, as the kernel would refuse it (an
  overlay whiteout, a 0/0 character device, is not a device node: any user may make
  one); `trusted.*` xattrs are left out with a warning (only root may set them,
  `user.*` ones are kept); new directories are made 0700 and files 0600, so that the
  user can fill them, and get their modes with the rest of their metadata.

Both apply an entry's owner, mode, xattrs and times the same way (`apply_meta`), for
the unpacker, flat trees and the cvmfs backend alike. Tests choose either one whoever
runs them, as far as the kernel lets them (`RootFs` needs root to give files away).
"""

from __future__ import annotations

import errno
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from .errors import LayerError
from .fsutil import current_umask

__all__ = ["At", "FsEval", "Meta", "RootFs", "UnprivilegedFs", "Warn", "proc_path",
           "process_fs"]

Warn = Callable[[str], None]


@dataclass(frozen=True)
class Meta:
    """An entry's metadata, as a tarball (or a layer) gives it."""

    mode: int
    uid: int
    gid: int
    mtime_ns: int
    atime_ns: int
    xattrs: dict[str, bytes]


@dataclass(frozen=True, slots=True)
class At:
    """An entry to change: `name` in the open directory `fd`, never followed if it is a
    symlink (several components only in a tree lazypod made itself, whose symlinks are
    leaves; b"." for that directory itself); or, without `name`, the entry open as
    `fd` (an ordinary descriptor, not O_PATH)."""

    fd: int
    name: bytes | None = None

    def xattr_path(self) -> int | bytes:
        """What the xattr calls take: the descriptor, or a path through it (they have
        no dir_fd form); the last component is not followed."""
        if self.name is None:
            return self.fd
        return proc_path(self.fd, self.name)


def proc_path(dir_fd: int, name: bytes) -> bytes:
    """A path to `name` in an open directory, for calls that take no dir_fd (xattrs);
    the directory is pinned by its descriptor, the last component is not followed by
    the `l*` calls (`follow_symlinks=False`)."""
    return b"/proc/self/fd/%d/%s" % (dir_fd, name)


class FsEval(ABC):
    """The file-system effects that depend on privilege. `umask`: what a mode given to
    mkdir/open becomes, as the process had it when this object was made."""

    privileged: ClassVar[bool]

    def __init__(self, *, umask: int) -> None:
        self.umask = umask

    def __repr__(self) -> str:
        return f"{type(self).__name__}(umask=0o{self.umask:03o})"

    # -- what differs --------------------------------------------------------------

    @abstractmethod
    def new_dir_mode(self, mode: int) -> int:
        """The mode to make a directory with, before its children are written."""

    @abstractmethod
    def new_file_mode(self, mode: int) -> int:
        """The mode to make a regular file with, before its content is written."""

    @abstractmethod
    def chown(self, at: At, uid: int, gid: int) -> None:
        """Give the entry (never followed) to uid:gid."""

    @abstractmethod
    def make_device(self, at: At, mode: int, device: int, what: str) -> None:
        """Make a character or block device node (`mode` holds the kind);
        LayerError, naming it `what`, if this process may not."""

    @abstractmethod
    def may_set_xattr(self, key: str) -> bool:
        """Whether this process may set an xattr of that name at all."""

    # -- what is the same ------------------------------------------------------------

    def made(self, mode: int) -> int:
        """The mode an entry made with `mode` has."""
        return mode & ~self.umask

    def set_xattrs(self, at: At, xattrs: dict[str, bytes], what: str,
                   warn: Warn | None) -> None:
        """Set xattrs on an entry. With `warn`, one the file system or this user cannot
        keep (an unsupported namespace, `user.*` on a symlink) is a warning, as
        containers/storage makes it; without, every failure raises."""
        if not xattrs:
            return
        target = at.xattr_path()
        follow = at.name is None
        for key, value in xattrs.items():
            if warn is not None and not self.may_set_xattr(key):
                warn(f"xattr {key} of {what!r} not kept: only root may set it")
                continue
            try:
                os.setxattr(target, key, value, follow_symlinks=follow)
            except OSError as exc:
                if warn is None or exc.errno not in (errno.ENOTSUP, errno.EPERM):
                    raise
                warn(f"xattr {key} of {what!r} not kept: {exc.strerror}")

    def set_times(self, at: At, atime_ns: int, mtime_ns: int) -> None:
        if at.name is None:
            os.utime(at.fd, ns=(atime_ns, mtime_ns))
        else:
            os.utime(at.name, ns=(atime_ns, mtime_ns), dir_fd=at.fd, follow_symlinks=False)

    def chmod(self, at: At, mode: int) -> None:
        """Never on a symlink (Linux cannot change a symlink's mode)."""
        if at.name is None:
            os.chmod(at.fd, mode)
        else:
            os.chmod(at.name, mode, dir_fd=at.fd)

    def apply_meta(self, at: At, meta: Meta, what: str, *, ours: bool, created: int | None,
                   symlink: bool = False, times: bool = True, warn: Warn | None) -> None:
        """Owner, mode, xattrs and times, in the order that keeps each (chown clears
        setuid bits, a chmod or xattr changes ctime only). `ours`: this process has
        just made the entry (so it is root's when root made it); `created`: the mode
        it was made with (None: unknown); a symlink's mode is not set; `times`: False
        leaves the times the entry got when it was made."""
        chown = not ours or meta.uid or meta.gid
        if chown:
            self.chown(at, meta.uid, meta.gid)
        if not symlink and (created is None or self.made(created) != meta.mode
                            or (chown and meta.mode & 0o6000)):  # cleared by chown
            self.chmod(at, meta.mode)
        self.set_xattrs(at, meta.xattrs, what, warn)
        if times:
            self.set_times(at, meta.atime_ns, meta.mtime_ns)


def _mknod(at: At, mode: int, device: int) -> None:
    assert at.name is not None
    os.mknod(at.name, mode, device, dir_fd=at.fd)


def _no_device(what: str) -> LayerError:
    return LayerError(f"cannot create device node {what!r}: unpacking device nodes needs root")


class RootFs(FsEval):
    privileged = True

    def new_dir_mode(self, mode: int) -> int:
        return mode & 0o777

    def new_file_mode(self, mode: int) -> int:
        return mode & 0o777

    def chown(self, at: At, uid: int, gid: int) -> None:
        if at.name is None:
            os.chown(at.fd, uid, gid)
        else:
            os.chown(at.name, uid, gid, dir_fd=at.fd, follow_symlinks=False)

    def make_device(self, at: At, mode: int, device: int, what: str) -> None:
        try:
            _mknod(at, mode, device)
        except PermissionError:  # root of a user namespace, or a container without mknod
            raise _no_device(what) from None

    def may_set_xattr(self, key: str) -> bool:
        return True


class UnprivilegedFs(FsEval):
    privileged = False

    def new_dir_mode(self, mode: int) -> int:
        return 0o700

    def new_file_mode(self, mode: int) -> int:
        return 0o600

    def chown(self, at: At, uid: int, gid: int) -> None:
        """Nothing: what an ordinary user makes is its own."""

    def make_device(self, at: At, mode: int, device: int, what: str) -> None:
        raise _no_device(what)

    def may_set_xattr(self, key: str) -> bool:
        return not key.startswith("trusted.")


def process_fs() -> FsEval:
    """The evaluator for this process as it is now: root's when it runs as root, with
    its present umask."""
    kind = RootFs if os.geteuid() == 0 else UnprivilegedFs
    return kind(umask=current_umask())
