"""The overlay format of a layer directory, in one place: what marks a whiteout and
an opaque directory, in every form a repository may hold them.

* overlay: a whiteout is a character device 0/0 named as the entry it hides; an
  opaque directory may carry `trusted.overlay.opaque=y` (or, from older lazypod
  versions and other tools, `user.overlay.opaque` / `user.fuseoverlayfs.opaque`);
* AUFS (the tarball form, in layers DUCC ingested): `.wh.NAME` files, and
  `.wh..wh..opq` in an opaque directory; `.wh..wh.*` are AUFS bookkeeping.

Readers honour every form. Layers lazypod writes carry no opaque marker at all: an
opaque directory holds explicit whiteouts of what the layers below it hold
(`views.opaque`) and is listed in the layer's `whiteouts.json`. A `user.*` marker
would reach containers (and images built on top of them); the trusted one would
not, but kernel overlay lists a marked directory's whiteouts as entries.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from .securepath import LayerDir

__all__ = [
    "AUFS_META_PREFIX",
    "AUFS_OPAQUE",
    "AUFS_PREFIX",
    "OPAQUE_XATTRS",
    "RESERVED_XATTR_PREFIXES",
    "TRUSTED_OVERLAY",
    "USER_FUSE_OVERLAYFS",
    "USER_OVERLAY",
    "add_whiteouts",
    "is_whiteout",
    "make_whiteout",
    "unmark_opaque",
]

AUFS_PREFIX = b".wh."
AUFS_OPAQUE = b".wh..wh..opq"
AUFS_META_PREFIX = b".wh..wh."
# Where each overlay implementation keeps its xattrs: rootful kernel overlayfs; rootless
# kernel overlayfs (`userxattr`); fuse-overlayfs run by a user.
TRUSTED_OVERLAY = "trusted.overlay."
USER_OVERLAY = "user.overlay."
USER_FUSE_OVERLAYFS = "user.fuseoverlayfs."
# Xattrs that steer an overlay implementation: a layer must not bring its own, and
# copies of layer files (flat trees) leave them out.
RESERVED_XATTR_PREFIXES = (TRUSTED_OVERLAY, USER_OVERLAY, USER_FUSE_OVERLAYFS)
# Opaque markers, which readers honour and a normal run removes from lazypod's own
# layers (older versions wrote the first two).
OPAQUE_XATTRS = tuple(prefix + "opaque" for prefix in RESERVED_XATTR_PREFIXES)


def is_whiteout(st: os.stat_result) -> bool:
    """An overlay whiteout: a character device with device number 0/0."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def make_whiteout(dir_fd: int, name: bytes) -> None:
    """Make an overlay whiteout named `name` in an open directory (any user may: the
    kernel lets everyone make a 0/0 character device, and no other)."""
    os.mknod(name, stat.S_IFCHR, os.makedev(0, 0), dir_fd=dir_fd)


def add_whiteouts(layerfs: Path, paths: list[bytes]) -> None:
    """Make whiteouts in a layer directory, through the door (parents must exist)."""
    layer = LayerDir(layerfs)
    try:
        for path in paths:
            parent, name = layer.parent(tuple(path.split(b"/")), create=False)
            with contextlib.suppress(FileExistsError):
                make_whiteout(parent, name)
    finally:
        layer.close()


def unmark_opaque(layerfs: Path, path: bytes) -> None:
    """Remove every opaque marker from a directory of a layer (its whiteouts hide
    what lies below it)."""
    layer = LayerDir(layerfs)
    try:
        if path:
            parent, name = layer.parent(tuple(path.split(b"/")), create=False)
            target, follow = layer.proc_path(parent, name), False
        else:
            target, follow = os.fsencode(layer.fd_path), True
        for marker in OPAQUE_XATTRS:
            with contextlib.suppress(OSError):
                os.removexattr(target, marker, follow_symlinks=follow)
    finally:
        layer.close()
