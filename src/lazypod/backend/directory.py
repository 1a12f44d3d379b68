"""The `dir` backend: the repository is a directory on a local or shared file system.

Atomicity: everything is first written under `<root>/.lazypod-staging/<run>/`
(same file system), then renamed into place; directories are swapped with
`renameat2(RENAME_EXCHANGE)`. A killed run leaves only its staging directory,
which the next run removes (under the repository lock) before it starts.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import itertools
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from ..digest import Digest
from ..errors import BackendError, RepositoryBusy, RepositoryError
from ..fsutil import make_dirs
from ..layout import LOCK, STAGING, Layout
from ..overlay import add_whiteouts, unmark_opaque
from ..repository import WHITEOUTS, LayerRecord, LayerWhiteouts, layer_record_json
from . import TreeBatch
from .staging import LocalLayer

__all__ = ["DirectoryBackend", "DirectoryRun"]

log = logging.getLogger(__name__)

_RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths; False where the kernel or file system cannot."""
    renameat2 = getattr(_libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd = -100
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


class DirectoryBackend:
    name = "dir"

    def __init__(self, root: Path, *, public_root: str | None = None) -> None:
        self.layout = Layout(root)
        self.public_root = public_root or str(root.absolute())

    @contextlib.contextmanager
    def run(self) -> Iterator[DirectoryRun]:
        root = self.layout.root
        try:
            root.mkdir(parents=True, exist_ok=True)
            os.chmod(root, os.stat(root).st_mode | 0o755)
        except OSError as exc:
            raise RepositoryError(f"cannot create repository {root}: {exc.strerror}") from None
        lock_fd = _lock(root / LOCK)
        try:
            staging_root = root / STAGING
            _clean_staging(staging_root)
            staging = staging_root / f"{os.getpid()}-{secrets.token_hex(4)}"
            staging.mkdir(parents=True, mode=0o700)
            run = DirectoryRun(self.layout, self.public_root, staging)
            try:
                yield run
            finally:
                shutil.rmtree(staging, ignore_errors=True)
                with contextlib.suppress(OSError):
                    staging_root.rmdir()
        finally:
            os.close(lock_fd)


def _lock(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RepositoryBusy(
            f"another lazypod (pid {holder}) is writing {path.parent}; wait for it to finish"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _clean_staging(staging_root: Path) -> None:
    """Remove what killed runs left; safe because we hold the repository lock."""
    if not staging_root.is_dir():
        return
    for entry in staging_root.iterdir():
        log.info("removing leftovers of an interrupted run: %s", entry)
        shutil.rmtree(entry, ignore_errors=True)


class DirectoryRun:
    """One run's writes into a directory repository."""

    def __init__(self, layout: Layout, public_root: str, staging: Path) -> None:
        self.layout = layout
        self.read_layout = layout
        self.public_root = public_root
        self._staging = staging
        self._counter = itertools.count()
        self._commits = 0

    def _temp(self, hint: str) -> Path:
        return self._staging / f"{next(self._counter)}-{hint}"

    def _final(self, rel: str) -> Path:
        path = self.layout.root / rel
        make_dirs(path.parent, stop=self.layout.root)
        return path

    # -- layers --------------------------------------------------------------

    def has_layer(self, digest: Digest) -> bool:
        return (self.layout.layer_metadata(digest) / "layers.json").is_file()

    def stage_layer(self, digest: Digest) -> DirectoryStagedLayer:
        return DirectoryStagedLayer(self, digest, self._temp(f"layer-{digest.hex[:12]}"))

    # -- TreeWriter ----------------------------------------------------------

    def write_file(self, rel: str, data: bytes, mode: int = 0o644) -> None:
        temp = self._temp("file")
        with _wrap_io(rel):
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fchmod(fd, mode)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, self._final(rel))

    def symlink(self, rel: str, target: str) -> None:
        final = self.layout.root / rel
        with contextlib.suppress(OSError):
            if os.readlink(final) == target:
                return
        temp = self._temp("link")
        with _wrap_io(rel):
            os.symlink(target, temp)
            os.replace(temp, self._final(rel))

    def replace_dir(self, rel: str, fill: Callable[[Path], None]) -> None:
        temp = self._temp("dir")
        temp.mkdir(mode=0o755)
        with _wrap_io(rel):
            fill(temp)
            final = self._final(rel)
            if final.exists() or final.is_symlink():
                if not _exchange(temp, final):
                    old = self._temp("old")
                    os.rename(final, old)
                    os.rename(temp, final)
                    temp = old
                shutil.rmtree(temp, ignore_errors=True)
            else:
                os.rename(temp, final)

    def remove(self, rel: str) -> None:
        path = self.layout.root / rel
        with _wrap_io(rel):
            if path.is_dir() and not path.is_symlink():
                trash = self._temp("trash")
                os.rename(path, trash)
                shutil.rmtree(trash)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def touch_lock(self, rel: str, token: bytes) -> None:
        path = self._final(rel)
        with _wrap_io(rel):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                os.fchmod(fd, 0o644)
                os.pwrite(fd, token, 0)
            finally:
                os.close(fd)

    def make_dir(self, rel: str) -> None:
        with _wrap_io(rel):
            make_dirs(self.layout.root / rel, stop=self.layout.root)

    @contextlib.contextmanager
    def lock_files(self, rels: list[str]) -> Iterator[None]:
        """Hold containers/storage's write locks (POSIX record locks, as podman takes them)."""
        fds = []
        try:
            for rel in rels:
                path = self._final(rel)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                fds.append(fd)
                os.fchmod(fd, 0o644)
                fcntl.lockf(fd, fcntl.LOCK_EX)
            yield
        finally:
            for fd in fds:
                os.close(fd)

    def add_trees(self, batch: TreeBatch) -> None:
        for rel, tree in batch:
            self.replace_dir(rel, tree.materialize)

    def add_whiteouts(self, layer: Digest, paths: list[bytes]) -> None:
        """In place: each whiteout hides a name that the chains already published do
        not have below it (that is why it is needed), so no reader sees a change."""
        with _wrap_io(f"layer {layer.short}"):
            add_whiteouts(self.layout.layerfs(layer), paths)

    def unmark_opaque(self, layer: Digest, path: bytes) -> None:
        """In place, after the layer's whiteouts (add_whiteouts, called first)."""
        with _wrap_io(f"layer {layer.short}"):
            unmark_opaque(self.layout.layerfs(layer), path)

    def settle(self) -> None:
        """Every write of the dir backend is already in place."""

    def flush(self) -> None:
        """Every write of the dir backend is already in place."""

    def commit(self) -> None:
        self._commits += 1

    @property
    def publishes(self) -> int:
        return self._commits


@contextlib.contextmanager
def _wrap_io(what: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise BackendError(f"no space left on device while writing {what}: free space "
                               "and rerun") from None
        raise BackendError(f"cannot write {what}: {exc.strerror or exc}") from None


class DirectoryStagedLayer(LocalLayer):
    """Unpacked under the run's staging directory, renamed into `.layers/` on commit."""

    def __init__(self, run: DirectoryRun, digest: Digest, path: Path) -> None:
        super().__init__(digest, path)
        self._run = run

    def commit(self, record: LayerRecord, whiteouts: LayerWhiteouts) -> None:
        self.finish_writing()
        meta = self.path / ".metadata"
        with _wrap_io(f"layer {self.digest}"):
            (meta / WHITEOUTS).write_bytes(whiteouts.to_json())
            (meta / "layers.json").write_bytes(layer_record_json(record))
            for name in (WHITEOUTS, "layers.json"):
                os.chmod(meta / name, 0o644)
            final = self._run.layout.layer_dir(self.digest)
            make_dirs(final.parent, stop=self._run.layout.root)
            if final.exists():
                # An earlier, incomplete copy (no layers.json): replace it whole.
                old = self._run._temp("old-layer")
                os.rename(final, old)
                os.rename(self.path, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(self.path, final)
