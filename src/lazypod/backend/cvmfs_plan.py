"""Which entries of a layer reach CVMFS by which path, and the tar that ingest reads.

What CVMFS keeps decides it (shared/docs/CVMFS.md, and test_cvmfs_semantics):
whiteouts (0/0 character devices) come only through `ingest`, which drops xattrs;
xattrs come only through a transaction, and an entry that transaction creates or
changes (a directory made by ingest takes xattrs later, as long as ingest was
given it: parents that `ingest -k` makes itself belong to -1 and cannot be
copied up). So:

* through ingest: every entry of the layer (directories as explicit members, with
  their owner, mode and time);
* in the transaction that follows: the xattrs of the entries that carry some (a
  file is copied up whole for it); the times of the directories that held them
  are put back.

Every entry is read from the layer as lazypod unpacked it into the local work
directory, through `securepath`'s door: nothing is listed or opened through a
symlink of the layer (an image's `dev/fd -> /proc/self/fd` is a symlink in the
tar, never the publisher's descriptors).
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..digest import Digest
from ..fseval import At, FsEval, process_fs
from ..overlay import is_whiteout
from ..securepath import LayerDir, LayerEntry, display, walk_layer
from .cvmfs_server import TarContent

__all__ = ["LayerPlan"]


@dataclass
class LayerPlan:
    """One new layer: `local` is its unpacked `layerfs` in the work directory."""

    digest: Digest
    local: Path
    entries: list[LayerEntry] = field(default_factory=list)  # parents first

    @classmethod
    def make(cls, digest: Digest, local: Path) -> LayerPlan:
        return cls(digest, local, list(walk_layer(local, xattrs="all")))


    # -- through ingest ----------------------------------------------------------

    def members(self, prefix: str) -> Iterator[tuple[tarfile.TarInfo, TarContent]]:
        """The layer's entries, named `<prefix>/<path>` (`prefix` itself for the layer
        root); a file's second name is a hardlink member naming the first (ingest
        turns it into a catalog entry that shares the content)."""
        source = LayerDir(self.local)
        seen: dict[int, str] = {}
        try:
            for entry in self.entries:
                name = f"{prefix}/{os.fsdecode(entry.path)}" if entry.path else prefix
                yield _member(name, entry, source, seen)
        finally:
            source.close()

    # -- in the transaction -------------------------------------------------------

    def write_xattrs(self, dest: Path, fs: FsEval | None = None) -> None:
        """Into the layer's layerfs in the server view, which ingest made: the xattrs
        of every entry that has some, then the times of the directories holding them
        (the copy-up may have changed them). Every xattr must land: a failure raises."""
        fs = fs or process_fs()
        target = LayerDir(dest, fs=fs)
        touched: dict[bytes, LayerEntry] = {}
        directories = {entry.path: entry for entry in self.entries
                       if stat.S_ISDIR(entry.st.st_mode)}
        try:
            for entry in self.entries:
                if entry.xattrs and not is_whiteout(entry.st):
                    fs.set_xattrs(_at(target, entry), entry.xattrs, display(entry.path),
                                  warn=None)
                    if entry.path:
                        parent = entry.path.rpartition(b"/")[0]
                        touched[parent] = directories[parent]
            for entry in touched.values():
                fs.set_times(_at(target, entry), entry.st.st_atime_ns, entry.st.st_mtime_ns)
        finally:
            target.close()

    @property
    def needs_transaction(self) -> bool:
        return any(entry.xattrs and not is_whiteout(entry.st) for entry in self.entries)


def _member(name: str, entry: LayerEntry, source: LayerDir,
            seen: dict[int, str]) -> tuple[tarfile.TarInfo, TarContent]:
    st = entry.st
    info = tarfile.TarInfo(name)
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    info.uname = info.gname = ""
    info.mtime = st.st_mtime_ns // 10**9
    kind = stat.S_IFMT(st.st_mode)
    if stat.S_ISDIR(kind):
        info.type = tarfile.DIRTYPE
    elif stat.S_ISREG(kind):
        if st.st_nlink > 1:
            if st.st_ino in seen:
                info.type = tarfile.LNKTYPE
                info.linkname = seen[st.st_ino]
                return info, None
            seen[st.st_ino] = name
        info.size = st.st_size
        path = _parts(entry.path)
        return info, lambda: source.open_file(path)
    elif stat.S_ISLNK(kind):
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


def _at(layer: LayerDir, entry: LayerEntry) -> At:
    if not entry.path:
        return At(layer.fd, b".")
    parent, name = layer.parent(_parts(entry.path), create=False)
    return At(parent, name)
