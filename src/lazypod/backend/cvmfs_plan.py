"""Which entries of a layer reach CVMFS by which path, and the tar that ingest reads.

What CVMFS keeps decides it (shared/docs/CVMFS.md): overlay whiteouts (0/0
character devices) come only through `ingest`, which drops xattrs; xattrs (the
opaque marker `trusted.overlay.opaque` among them) come only through a
transaction, on directories that transaction creates. So:

* in the transaction: every directory of the layer, with its owner, mode and
  xattrs, and every non-directory that carries xattrs (as a copy: hardlink
  identity is lost on CVMFS anyway);
* through ingest: every other entry (files, symlinks, devices, FIFOs, whiteouts),
  into the directories the transaction made; ingest leaves existing directories
  as they are, xattrs included.

Every entry is read from the layer as lazypod unpacked it into the local work
directory, through `securepath`'s door: nothing is listed or opened through a
symlink of the layer (an image's `dev/fd -> /proc/self/fd` is a symlink in the
tar, never the publisher's descriptors).
"""

from __future__ import annotations

import contextlib
import os
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..digest import Digest
from ..overlay import is_whiteout
from ..securepath import LayerDir, LayerEntry, walk_layer
from .cvmfs_server import TarContent

__all__ = ["LayerPlan"]


@dataclass
class LayerPlan:
    """One new layer: `local` is its unpacked `layerfs` in the work directory."""

    digest: Digest
    local: Path
    directories: list[LayerEntry] = field(default_factory=list)  # parents first
    with_xattrs: list[LayerEntry] = field(default_factory=list)  # written in the transaction
    ingested: list[LayerEntry] = field(default_factory=list)

    @classmethod
    def make(cls, digest: Digest, local: Path) -> LayerPlan:
        plan = cls(digest, local)
        for entry in walk_layer(local, xattrs="all"):
            if stat.S_ISDIR(entry.st.st_mode):
                plan.directories.append(entry)
            elif entry.xattrs and not is_whiteout(entry.st):
                plan.with_xattrs.append(entry)
            else:
                plan.ingested.append(entry)
        return plan

    @property
    def entries(self) -> int:
        return len(self.directories) + len(self.with_xattrs) + len(self.ingested)

    # -- inside the transaction ------------------------------------------------

    def write_transaction_part(self, dest: Path) -> None:
        """Into the empty directory `dest` (the layer's layerfs in the server view,
        made by this transaction): the directories and the files with xattrs."""
        target = LayerDir(dest, create_mode=0o700)
        source = LayerDir(self.local)
        try:
            for entry in self.directories:
                if entry.path:
                    parent, name = target.parent(_parts(entry.path), create=False)
                    os.mkdir(name, 0o700, dir_fd=parent)
            for entry in self.with_xattrs:
                _copy_entry(source, target, entry)
            for entry in self.directories:
                _set_meta(target, entry)  # last: creating children changed the times
        finally:
            target.close()
            source.close()

    # -- through ingest ----------------------------------------------------------

    def members(self, prefix: str) -> Iterator[tuple[tarfile.TarInfo, TarContent]]:
        """The ingested entries, named `<prefix>/<path>` (relative to the ingest's
        base); a file's second name is a hardlink member naming the first (ingest
        turns it into a catalog entry that shares the content)."""
        source = LayerDir(self.local)
        seen: dict[int, str] = {}
        try:
            for entry in self.ingested:
                name = f"{prefix}/{os.fsdecode(entry.path)}"
                yield _member(name, entry, source, seen)
        finally:
            source.close()


def _member(name: str, entry: LayerEntry, source: LayerDir,
            seen: dict[int, str]) -> tuple[tarfile.TarInfo, TarContent]:
    st = entry.st
    info = tarfile.TarInfo(name)
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    info.uname = info.gname = ""
    info.mtime = st.st_mtime_ns // 10**9
    kind = stat.S_IFMT(st.st_mode)
    if stat.S_ISREG(kind):
        if st.st_nlink > 1:
            if st.st_ino in seen:
                info.type = tarfile.LNKTYPE
                info.linkname = seen[st.st_ino]
                return info, None
            seen[st.st_ino] = name
        info.size = st.st_size
        path = _parts(entry.path)
        return info, lambda: source.open_file(path)
    if stat.S_ISLNK(kind):
        info.type = tarfile.SYMTYPE
        info.linkname = os.fsdecode(entry.target)
    elif stat.S_ISCHR(kind) or stat.S_ISBLK(kind):
        info.type = tarfile.CHRTYPE if stat.S_ISCHR(kind) else tarfile.BLKTYPE
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    elif stat.S_ISFIFO(kind):
        info.type = tarfile.FIFOTYPE
    else:
        raise ValueError(f"cannot ingest {name}: a socket")
    return info, None


def _parts(path: bytes) -> tuple[bytes, ...]:
    return tuple(path.split(b"/"))


def _copy_entry(source: LayerDir, target: LayerDir, entry: LayerEntry) -> None:
    path = _parts(entry.path)
    parent, name = target.parent(path, create=False)
    kind = stat.S_IFMT(entry.st.st_mode)
    if stat.S_ISREG(kind):
        src = source.open_file(path)
        try:
            dst = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                          dir_fd=parent)
            try:
                while chunk := os.read(src, 1 << 20):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(dst, view):]
            finally:
                os.close(dst)
        finally:
            os.close(src)
    else:  # a device or a FIFO with xattrs (never a whiteout: CVMFS cannot take those here)
        os.mknod(name, entry.st.st_mode, entry.st.st_rdev, dir_fd=parent)
    _set_meta(target, entry)


def _set_meta(target: LayerDir, entry: LayerEntry) -> None:
    st = entry.st
    if entry.path:
        parent, name = target.parent(_parts(entry.path), create=False)
        proc = target.proc_path(parent, name)
        os.chown(name, st.st_uid, st.st_gid, dir_fd=parent, follow_symlinks=False)
        os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=parent)
        for key, value in entry.xattrs.items():
            os.setxattr(proc, key, value, follow_symlinks=False)
        os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=parent,
                 follow_symlinks=False)
        return
    root = target.fd_path
    os.chown(root, st.st_uid, st.st_gid)
    os.chmod(root, stat.S_IMODE(st.st_mode))
    for key, value in entry.xattrs.items():
        with contextlib.suppress(OSError):
            os.setxattr(root, key, value)
    os.utime(root, ns=(st.st_atime_ns, st.st_mtime_ns))
