"""The `dir` backend: the repository is a directory on a local or shared file system.

Atomicity: everything is first written under `<root>/.lazypod-staging/<run>/`
(same file system), then renamed into place; directories are swapped with
`renameat2(RENAME_EXCHANGE)`. Layers: at `settle()` the staged layer directories
are renamed into `.layers/` with their record still named `layers.json.pending`,
the file system is synced once, and only then are the records renamed to
`layers.json` (a layer is complete when that file exists, and its files are on
disk before it). A killed run leaves its staging directory, which the next run
removes (under the repository lock) before it starts, and possibly layers without
a record, which the next run fetches again.
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
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from .. import faults
from ..digest import Digest
from ..errors import BackendError, RepositoryBusy, RepositoryError
from ..fseval import FsEval, process_fs
from ..fsutil import make_dirs, remove_tree
from ..layout import LAYERFS, LOCK, METADATA, STAGING, Layout
from ..overlay import add_whiteouts, unmark_opaque
from ..repository import LAYER_RECORD, LayerRecord, LayerWhiteouts, read_layer_record
from . import TreeBatch
from .staging import PENDING_RECORD, LocalLayer

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


def sync_file_system(path: Path) -> None:
    """One syncfs(2) of the file system that holds `path` (what durability costs)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        syncfs = getattr(_libc, "syncfs", None)
        if syncfs is None or syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def _sync_quietly(path: Path) -> None:
    """`sync_file_system` ahead of time: a failure is `settle()`'s to report."""
    with contextlib.suppress(OSError):
        sync_file_system(path)


class DirectoryBackend:
    name = "dir"

    def __init__(self, root: Path, *, public_root: str | None = None,
                 create: bool = True) -> None:
        """`create`: make the repository if it does not exist (a conversion; it is
        removed again if the run leaves nothing in it). Without, a missing repository
        is an error (rm, garbage-collection: nothing is created for a mistyped path)."""
        self.layout = Layout(root)
        self.public_root = public_root or str(root.absolute())
        self._create = create

    @contextlib.contextmanager
    def run(self) -> Iterator[DirectoryRun]:
        root = self.layout.root
        created = not root.exists()
        if created and not self._create:
            raise RepositoryError(f"{root} does not exist: give the path of a repository")
        if not created and not root.is_dir():
            raise RepositoryError(f"{root} is not a directory")
        try:
            if created:
                root.mkdir(parents=True)
                os.chmod(root, 0o755)
            elif os.stat(root).st_mode & 0o755 != 0o755 and os.access(root, os.W_OK):
                os.chmod(root, os.stat(root).st_mode | 0o755)
        except OSError as exc:
            raise RepositoryError(f"cannot create repository {root}: {exc.strerror}") from None
        try:
            lock_fd = _lock(root / LOCK)
        except BaseException:
            if created:
                remove_tree(root, quiet=True)
            raise
        try:
            staging_root = root / STAGING
            _clean_staging(staging_root)
            staging = staging_root / f"{os.getpid()}-{secrets.token_hex(4)}"
            staging.mkdir(parents=True, mode=0o700)
            run = DirectoryRun(self.layout, self.public_root, staging)
            try:
                yield run
            finally:
                run._written_back()
                remove_tree(staging, quiet=True)
                with contextlib.suppress(OSError):
                    staging_root.rmdir()
                if created and set(os.listdir(root)) <= {LOCK}:  # the run wrote nothing
                    remove_tree(root, quiet=True)
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
        remove_tree(entry, quiet=True)


class DirectoryRun:
    """One run's writes into a directory repository."""

    checkpoints = True  # a settle costs one sync

    def __init__(self, layout: Layout, public_root: str, staging: Path) -> None:
        self.layout = layout
        self.public_root = public_root
        self._staging = staging
        self._counter = itertools.count()
        self._pending: dict[Digest, DirectoryStagedLayer] = {}
        self._waiting: list[Callable[[], None]] = []
        self._settles = 0
        self._fs = process_fs()  # chosen once per run, for every layer it unpacks
        self._writing_back: threading.Thread | None = None

    def _temp(self, hint: str) -> Path:
        return self._staging / f"{next(self._counter)}-{hint}"

    def _final(self, rel: str) -> Path:
        path = self.layout.root / rel
        make_dirs(path.parent, stop=self.layout.root)
        return path

    def _later(self, action: Callable[[], None]) -> None:
        """Writes issued while layers are pending wait for them (see the contract)."""
        if self._pending:
            self._waiting.append(action)
        else:
            action()

    # -- layers --------------------------------------------------------------

    def has_layer(self, digest: Digest) -> bool:
        if digest in self._pending:
            return True
        try:
            return read_layer_record(self.layout.layer_dir(digest), digest).complete
        except (ValueError, KeyError, TypeError, OSError):
            return False  # a damaged record: the layer is fetched again

    def stage_layer(self, digest: Digest) -> DirectoryStagedLayer:
        return DirectoryStagedLayer(self, digest, self._temp(f"layer-{digest.hex[:12]}"),
                                    self._fs)

    def layer_dir(self, digest: Digest) -> Path:
        pending = self._pending.get(digest)
        return pending.path if pending is not None else self.layout.layer_dir(digest)

    def _add_pending(self, layer: DirectoryStagedLayer) -> None:
        self._pending.setdefault(layer.digest, layer)

    def write_back(self) -> None:
        """Start writing the staged layers to disk (one syncfs, in a thread) while the
        caller builds views: the sync `settle()` owes before the layer records then
        finds little left to write. Durability still rests on that sync."""
        if self._pending and self._writing_back is None:
            self._writing_back = threading.Thread(
                target=_sync_quietly, args=(self._staging,), name="write-back", daemon=True)
            self._writing_back.start()

    def _written_back(self) -> None:
        if self._writing_back is not None:
            self._writing_back.join()
            self._writing_back = None

    def settle(self) -> None:
        self._written_back()
        pending, self._pending = self._pending, {}
        with _wrap_io("layers"):
            for layer in pending.values():
                final = self.layout.layer_dir(layer.digest)
                make_dirs(final.parent, stop=self.layout.root)
                faults.reached("layer")
                if final.exists() or final.is_symlink():
                    # An earlier copy that is not complete (no record, or a damaged one).
                    if not _exchange(layer.path, final):
                        old = self._temp("old-layer")
                        os.rename(final, old)
                        os.rename(layer.path, final)
                        layer.path = old
                    remove_tree(layer.path, quiet=True)
                else:
                    os.rename(layer.path, final)
                layer.path = final
            if pending:
                sync_file_system(self.layout.root)  # the files, before the records
            for layer in pending.values():
                meta = layer.path / METADATA
                faults.reached("layer record")
                os.replace(meta / PENDING_RECORD, meta / LAYER_RECORD)
        self._settles += 1
        waiting, self._waiting = self._waiting, []
        for action in waiting:
            action()

    def commit(self) -> None:
        """Settle what is left. No sync of its own: what was written after the layers'
        sync (metadata, views) is rewritten by the next run if a crash loses it."""
        self.settle()

    @property
    def publishes(self) -> int:
        return self._settles

    # -- TreeWriter ----------------------------------------------------------

    def write_file(self, rel: str, data: bytes, mode: int = 0o644) -> None:
        self._later(lambda: self._write_file(rel, data, mode))

    def _write_file(self, rel: str, data: bytes, mode: int) -> None:
        temp = self._temp("file")
        with _wrap_io(rel):
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fchmod(fd, mode)
            finally:
                os.close(fd)
            faults.reached("file")
            os.replace(temp, self._final(rel))

    def symlink(self, rel: str, target: str) -> None:
        self._later(lambda: self._symlink(rel, target))

    def _symlink(self, rel: str, target: str) -> None:
        final = self.layout.root / rel
        with contextlib.suppress(OSError):
            if os.readlink(final) == target:
                return
        temp = self._temp("link")
        with _wrap_io(rel):
            os.symlink(target, temp)
            faults.reached("symlink")
            os.replace(temp, self._final(rel))

    def replace_dir(self, rel: str, fill: Callable[[Path], None]) -> None:
        """Filled now (in staging), put in place when the run settles."""
        temp = self._temp("dir")
        temp.mkdir(mode=0o755)
        with _wrap_io(rel):
            fill(temp)
        self._later(lambda: self._put_dir(rel, temp))

    def _put_dir(self, rel: str, temp: Path) -> None:
        with _wrap_io(rel):
            final = self._final(rel)
            faults.reached("directory")
            if final.exists() or final.is_symlink():
                if not _exchange(temp, final):
                    old = self._temp("old")
                    os.rename(final, old)
                    os.rename(temp, final)
                    temp = old
                remove_tree(temp, quiet=True)
            else:
                os.rename(temp, final)

    def remove(self, rel: str) -> None:
        self._later(lambda: self._remove(rel))

    def _remove(self, rel: str) -> None:
        path = self.layout.root / rel
        faults.reached("remove")
        with _wrap_io(rel):
            if path.is_dir() and not path.is_symlink():
                trash = self._temp("trash")
                os.rename(path, trash)
                remove_tree(trash)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def touch_lock(self, rel: str, token: bytes) -> None:
        self._later(lambda: self._touch_lock(rel, token))

    def _touch_lock(self, rel: str, token: bytes) -> None:
        path = self._final(rel)
        faults.reached("lock token")
        with _wrap_io(rel):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                os.fchmod(fd, 0o644)
                os.pwrite(fd, token, 0)
            finally:
                os.close(fd)

    def make_dir(self, rel: str) -> None:
        self._later(lambda: self._make_dir(rel))

    def _make_dir(self, rel: str) -> None:
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
            add_whiteouts(self.layer_dir(layer) / LAYERFS, paths)

    def unmark_opaque(self, layer: Digest, path: bytes) -> None:
        """In place, after the layer's whiteouts (add_whiteouts, called first)."""
        with _wrap_io(f"layer {layer.short}"):
            unmark_opaque(self.layer_dir(layer) / LAYERFS, path)


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
    """Unpacked under the run's staging directory; moved into `.layers/` when the
    run settles."""

    def __init__(self, run: DirectoryRun, digest: Digest, path: Path, fs: FsEval) -> None:
        super().__init__(digest, path, fs=fs)
        self._run = run

    def seal(self, record: LayerRecord, whiteouts: LayerWhiteouts) -> None:
        with _wrap_io(f"layer {self.digest}"):
            super().seal(record, whiteouts)

    def commit(self) -> None:
        self._run._add_pending(self)
