"""Unpack a layer tarball into the overlay format every podman overlay reads.

The tar stream is judged member by member (names through `securepath`,
hardlink targets inside the layer, no writing through symlinks, reserved
overlay xattrs refused) and handed to a `LayerSink` as plain operations; the
sink decides where they land (a directory on disk for the `dir` backend, a
rewritten tar for `cvmfs_server ingest`). Whiteouts are translated here, in
one place:

* `.wh.NAME`       -> `sink.whiteout(NAME)`: a 0/0 character device
* `.wh..wh..opq`   -> `sink.opaque(DIR)`: recorded (the layer's whiteouts.json);
                      the directory gets no marker, but explicit whiteouts of what
                      the layers below it hold (`views.opaque`), which every overlay
                      reads and no container sees
* `.wh..wh.*`      -> dropped (AUFS bookkeeping, as containers/storage does)

A tar-split of the stream is written on the way, so podman can rebuild the
original tarball byte for byte (`podman save`, `podman push`).
"""

from __future__ import annotations

import base64
import errno
import json
import os
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Protocol

import fastcrc

from .errors import BackendError, LayerError, UnsafeLayer
from .fseval import At, FsEval, Meta, Warn, process_fs
from .overlay import (
    AUFS_META_PREFIX,
    AUFS_OPAQUE,
    AUFS_PREFIX,
    RESERVED_XATTR_PREFIXES,
    make_whiteout,
)
from .securepath import LayerDir, SafePath, clean_member_name, display
from .tarstream import MemberType, TarMember, TarReader

__all__ = [
    "DirectorySink",
    "LayerSink",
    "Meta",
    "TarSplitWriter",
    "UnpackStats",
    "unpack_layer",
]

ROOT_MODE = 0o555


class LayerSink(Protocol):
    """Where the judged operations of one layer land."""

    def directory(self, path: SafePath, meta: Meta) -> None: ...
    def file(self, path: SafePath, meta: Meta, chunks: Iterable[memoryview]) -> None: ...
    def symlink(self, path: SafePath, meta: Meta, target: bytes) -> None: ...
    def hardlink(self, path: SafePath, target: SafePath, meta: Meta) -> None: ...
    def device(self, path: SafePath, meta: Meta, kind: str, major: int, minor: int) -> None: ...
    def fifo(self, path: SafePath, meta: Meta) -> None: ...
    def whiteout(self, path: SafePath, meta: Meta) -> None: ...
    def opaque(self, path: SafePath) -> None: ...
    def finish(self) -> None: ...


@dataclass
class UnpackStats:
    uids: set[int] = field(default_factory=set)
    gids: set[int] = field(default_factory=set)
    entries: int = 0
    content_bytes: int = 0
    whiteouts: list[SafePath] = field(default_factory=list)
    opaque_dirs: list[SafePath] = field(default_factory=list)


class TarSplitWriter:
    """Writes the tar-split of a layer (vbatts/tar-split JSON lines, as podman stores it)."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self._position = 0

    def segment(self, raw: bytes) -> None:
        if raw:
            self._out.write(b'{"type":2,"payload":"%s","position":%d}\n'
                            % (base64.b64encode(raw), self._position))
            self._position += 1

    def file(self, name: bytes, size: int, crc: int | None) -> None:
        try:
            name_field = b'"name":' + json.dumps(name.decode("utf-8")).encode()
        except UnicodeDecodeError:
            name_field = b'"name_raw":"' + base64.b64encode(name) + b'"'
        if size:
            assert crc is not None
            payload = b'"' + base64.b64encode(crc.to_bytes(8, "big")) + b'"'
            self._out.write(b'{"type":1,%s,"size":%d,"payload":%s,"position":%d}\n'
                            % (name_field, size, payload, self._position))
        else:
            self._out.write(b'{"type":1,%s,"payload":null,"position":%d}\n'
                            % (name_field, self._position))
        self._position += 1


class _Crc:
    """CRC-64/ISO of a payload as it streams past (tar-split's file checksum)."""

    def __init__(self) -> None:
        self.value = 0

    def wrap(self, chunks: Iterator[memoryview]) -> Iterator[memoryview]:
        for chunk in chunks:
            self.value = fastcrc.crc64.go_iso(chunk, self.value)
            yield chunk


def unpack_layer(
    tar: TarReader,
    sink: LayerSink,
    tar_split: TarSplitWriter | None = None,
    *,
    warn: Callable[[str], None] = lambda message: None,
) -> UnpackStats:
    """Judge every member of `tar` and hand it to `sink`; raise on the first bad one."""
    stats = UnpackStats()
    judge = _Judge()
    for member in tar:
        if tar_split is not None:
            tar_split.segment(member.raw_header)
        crc = _Crc()
        chunks = crc.wrap(member.chunks()) if tar_split is not None else member.chunks()
        try:
            _dispatch(member, chunks, sink, judge, stats, warn)
        except OSError as exc:
            raise _os_error(exc, member.unsafe_name) from None
        except ValueError as exc:  # a NUL byte where a system call takes a C string
            raise LayerError(f"layer member {display(member.unsafe_name)!r} cannot be "
                             f"written: {exc}") from None
        for _ in chunks:  # payload the sink did not want (whiteouts, dump dirs)
            pass
        if tar_split is not None:
            tar_split.file(member.unsafe_name, member.size, crc.value if member.size else None)
        stats.entries += 1
        stats.uids.add(member.uid)
        stats.gids.add(member.gid)
        stats.content_bytes += member.size
    if tar_split is not None:
        tar_split.segment(tar.trailer)
    try:
        sink.finish()
    except OSError as exc:
        raise _os_error(exc, b"(directory metadata)") from None
    return stats


class _Judge:
    """What this layer has put where so far: refuses links out and writes through symlinks."""

    def __init__(self) -> None:
        self.seen: dict[SafePath, str] = {}
        self.symlinks: set[SafePath] = set()
        self.devices: dict[SafePath, tuple[str, int, int]] = {}  # kind, major, minor

    def check_parents(self, path: SafePath, unsafe_name: bytes) -> None:
        if self.symlinks:
            for i in range(1, len(path)):
                if path[:i] in self.symlinks:
                    raise UnsafeLayer(
                        f"layer member {display(unsafe_name)!r} is written through symlink "
                        f"{display(path[:i])!r}: refusing the layer"
                    )

    def record(self, path: SafePath, kind: str,
               device: tuple[str, int, int] | None = None) -> None:
        self.seen[path] = kind
        if kind == MemberType.SYMLINK:
            self.symlinks.add(path)
        else:
            self.symlinks.discard(path)
        if device is not None:
            self.devices[path] = device
        else:
            self.devices.pop(path, None)


def _dispatch(
    member: TarMember,
    chunks: Iterator[memoryview],
    sink: LayerSink,
    judge: _Judge,
    stats: UnpackStats,
    warn: Callable[[str], None],
) -> None:
    path = clean_member_name(member.unsafe_name)
    judge.check_parents(path, member.unsafe_name)
    meta = Meta(
        mode=member.mode,
        uid=member.uid,
        gid=member.gid,
        mtime_ns=member.mtime_ns,
        atime_ns=member.atime_ns if member.atime_ns is not None else member.mtime_ns,
        xattrs=_allowed_xattrs(member, warn),
    )
    base = path[-1] if path else b""
    if base.startswith(AUFS_PREFIX):
        if base == AUFS_OPAQUE:
            sink.opaque(path[:-1])
            stats.opaque_dirs.append(path[:-1])
        elif not base.startswith(AUFS_META_PREFIX):
            hidden = base[len(AUFS_PREFIX) :]
            if hidden in (b"", b".", b".."):
                raise UnsafeLayer(f"layer member {display(member.unsafe_name)!r} is a "
                                  "whiteout of nothing: refusing the layer")
            sink.whiteout((*path[:-1], hidden), meta)
            judge.record((*path[:-1], hidden), "whiteout")
            stats.whiteouts.append((*path[:-1], hidden))
        return
    kind = member.type
    if not path:
        if kind != MemberType.DIR:
            raise LayerError(f"layer member {display(member.unsafe_name)!r} names the layer "
                             "root but is not a directory")
        return  # containers/storage ignores the root entry: the layer root is always 0555

    if kind == MemberType.DIR:
        sink.directory(path, meta)
    elif kind == MemberType.FILE:
        sink.file(path, meta, chunks)
    elif kind == MemberType.SYMLINK:
        sink.symlink(path, meta, member.unsafe_linkname)
    elif kind == MemberType.HARDLINK:
        try:
            target = clean_member_name(member.unsafe_linkname)
            judge.check_parents(target, member.unsafe_linkname)
        except UnsafeLayer as exc:
            raise UnsafeLayer(f"layer member {display(member.unsafe_name)!r} is a hardlink "
                              f"out of the layer: {exc}") from None
        target_kind = judge.seen.get(target)
        if target_kind is None or target_kind in (MemberType.DIR, "whiteout"):
            raise UnsafeLayer(
                f"layer member {display(member.unsafe_name)!r} is a hardlink to "
                f"{display(member.unsafe_linkname)!r}, which is not a file of this layer: "
                "refusing the layer"
            )
        device = judge.devices.get(target)
        if device is not None:  # the link's header sets the shared inode's owner and mode
            meta = _tame_device(member.unsafe_name, *device, meta, warn)
        if target != path:
            sink.hardlink(path, target, meta)
        judge.record(path, target_kind, device)
        return
    elif kind in (MemberType.CHAR, MemberType.BLOCK):
        meta = _tame_device(member.unsafe_name, kind, member.devmajor, member.devminor, meta,
                            warn)
        sink.device(path, meta, kind, member.devmajor, member.devminor)
        judge.record(path, kind, (kind, member.devmajor, member.devminor))
        return
    elif kind == MemberType.FIFO:
        sink.fifo(path, meta)
    judge.record(path, kind)


# Character devices any container may have (null, zero, full, random, urandom, tty,
# console, ptmx): they give nothing away on the host.
_HARMLESS_DEVICES = frozenset({(1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 1), (5, 2)})


def _tame_device(unsafe_name: bytes, kind: str, major: int, minor: int, meta: Meta,
                 warn: Callable[[str], None]) -> Meta:
    """A repository is readable by every user of the machine: a device node from an
    image (a disk, say) must not open the host's device to them. Other devices than
    the harmless ones are kept, but root's alone, whatever name (a hardlink's header
    too) sets their owner and mode."""
    harmless = kind == MemberType.CHAR and (major, minor) in _HARMLESS_DEVICES
    if harmless or (meta.uid == meta.gid == 0 and not meta.mode & 0o077):
        return meta
    letter = "c" if kind == MemberType.CHAR else "b"
    warn(f"device {display(unsafe_name)!r} ({letter} {major}:{minor}, mode {meta.mode:o}, "
         f"owner {meta.uid}:{meta.gid}) kept as root's with mode 0600: the repository must "
         "not open host devices to its readers")
    return replace(meta, uid=0, gid=0, mode=meta.mode & 0o7700 & ~0o100)


def _allowed_xattrs(member: TarMember, warn: Callable[[str], None]) -> dict[str, bytes]:
    if not member.xattrs:
        return member.xattrs
    allowed = {}
    for name, value in member.xattrs.items():
        if name.startswith(RESERVED_XATTR_PREFIXES):
            warn(f"dropped xattr {name} of {display(member.unsafe_name)!r}: it would steer "
                 "overlayfs")
        else:
            allowed[name] = value
    return allowed


def _os_error(exc: OSError, unsafe_name: bytes) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return BackendError(f"no space left on device while writing {display(unsafe_name)!r}: "
                            "free space in the repository and rerun")
    return LayerError(f"cannot write layer member {display(unsafe_name)!r}: "
                      f"{exc.strerror or exc}")


_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class DirectorySink:
    """Writes a layer into a directory on a local (or any POSIX) file system; what
    depends on privilege is `fs`'s (the process's by default)."""

    def __init__(self, root: Path, *, fs: FsEval | None = None,
                 warn: Warn = lambda message: None) -> None:
        self._fs = fs if fs is not None else process_fs()
        self._dir = LayerDir(root, fs=self._fs)
        # Directory metadata waits until every child exists; with it, the mode the
        # directory was made with (None: it existed already).
        self._deferred: dict[SafePath, tuple[Meta, int | None]] = {}
        self._warn = warn

    # -- operations ----------------------------------------------------------

    def directory(self, path: SafePath, meta: Meta) -> None:
        self._dir.trim()
        parent, name = self._dir.parent(path)
        # Root may write into any directory: give it its final mode at once, which
        # usually saves a chmod (fewer system calls per entry is what speed is made of).
        mode = self._fs.new_dir_mode(meta.mode)
        created: int | None = mode
        try:
            os.mkdir(name, mode, dir_fd=parent)
        except FileExistsError:
            if stat.S_ISDIR(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
                created = None
            else:
                self._clear(path, parent, name)
                os.mkdir(name, mode, dir_fd=parent)
        self._deferred[path] = (meta, created)

    def file(self, path: SafePath, meta: Meta, chunks: Iterable[memoryview]) -> None:
        self._dir.trim()
        parent, name = self._dir.parent(path)
        # Made with its final permissions (the staging directory is root's alone), so
        # that most files need no chmod; a new file of root's needs no chown.
        mode = self._fs.new_file_mode(meta.mode)
        try:
            fd = os.open(name, _FILE_FLAGS, mode, dir_fd=parent)
        except FileExistsError:
            self._clear(path, parent, name)
            fd = os.open(name, _FILE_FLAGS, mode, dir_fd=parent)
        try:
            for chunk in chunks:
                while chunk:
                    written = os.write(fd, chunk)
                    chunk = chunk[written:]
            self._fs.apply_meta(At(fd), meta, display(path), ours=True, created=mode,
                                warn=self._warn)
        finally:
            os.close(fd)

    def symlink(self, path: SafePath, meta: Meta, target: bytes) -> None:
        self._dir.trim()
        parent, name = self._dir.parent(path)
        try:
            os.symlink(target, name, dir_fd=parent)
        except FileExistsError:
            self._clear(path, parent, name)
            os.symlink(target, name, dir_fd=parent)
        self._fs.apply_meta(At(parent, name), meta, display(path), ours=True, created=None,
                            symlink=True, warn=self._warn)

    def hardlink(self, path: SafePath, target: SafePath, meta: Meta) -> None:
        self._dir.trim()
        target_parent, target_name = self._dir.parent(target, create=False)
        parent, name = self._dir.parent(path)
        try:
            os.link(target_name, name, src_dir_fd=target_parent, dst_dir_fd=parent,
                    follow_symlinks=False)
        except FileExistsError:
            self._clear(path, parent, name)
            target_parent, target_name = self._dir.parent(target, create=False)
            os.link(target_name, name, src_dir_fd=target_parent, dst_dir_fd=parent,
                    follow_symlinks=False)
        # As podman does, the link's own header sets owner, mode and times of the shared
        # inode (a link to a symlink keeps only the owner).
        at = At(parent, name)
        if stat.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
            self._fs.chown(at, meta.uid, meta.gid)
        else:
            self._fs.apply_meta(at, meta, display(path), ours=False, created=None,
                                warn=self._warn)

    def device(self, path: SafePath, meta: Meta, kind: str, major: int, minor: int) -> None:
        at = self._replace(path)
        kind_bits = stat.S_IFCHR if kind == MemberType.CHAR else stat.S_IFBLK
        self._fs.make_device(at, kind_bits | meta.mode, os.makedev(major, minor), display(path))
        self._fs.apply_meta(at, meta, display(path), ours=True, created=None, warn=self._warn)

    def fifo(self, path: SafePath, meta: Meta) -> None:
        at = self._replace(path)
        assert at.name is not None
        os.mknod(at.name, stat.S_IFIFO | meta.mode, dir_fd=at.fd)
        self._fs.apply_meta(at, meta, display(path), ours=True, created=None, warn=self._warn)

    def whiteout(self, path: SafePath, meta: Meta) -> None:
        at = self._replace(path)
        assert at.name is not None
        make_whiteout(at.fd, at.name)
        self._fs.chown(at, meta.uid, meta.gid)

    def opaque(self, path: SafePath) -> None:
        self._dir.trim()
        self._dir.directory(path)

    def finish(self) -> None:
        for path, (meta, created) in self._deferred.items():
            self._dir.trim()
            parent, name = self._dir.parent(path, create=False)
            # Ours if made here (else made as a parent by the door, root's as well).
            self._fs.apply_meta(At(parent, name), meta, display(path), ours=True,
                                created=created, warn=self._warn)
        # The layer root as containers/storage makes every layer's: 0555, root's.
        root = At(self._dir.fd, b".")
        self._fs.chown(root, 0, 0)
        self._fs.chmod(root, ROOT_MODE)
        self._dir.close()

    def abandon(self) -> None:
        self._dir.close()

    # -- helpers -------------------------------------------------------------

    def _replace(self, path: SafePath) -> At:
        """Where a node goes, whatever was there before removed."""
        self._dir.trim()
        parent, name = self._dir.parent(path)
        self._remove_if_present(path, parent, name)
        return At(parent, name)

    def _remove_if_present(self, path: SafePath, parent: int, name: bytes) -> None:
        try:
            os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return
        self._clear(path, parent, name)

    def _clear(self, path: SafePath, parent: int, name: bytes) -> None:
        """Remove what a later member replaces (a directory goes with its content)."""
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=parent)
            return
        shutil.rmtree(name, dir_fd=parent)
        self._dir.forget_under(path)
        depth = len(path)
        self._deferred = {p: d for p, d in self._deferred.items() if p[:depth] != path}
