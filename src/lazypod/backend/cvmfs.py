"""The `cvmfs` backend: publish into a CernVM-FS repository through `cvmfs_server`.

What a CVMFS 2.12 server keeps, by path of entry (shared/docs/CVMFS.md), decides
the write path (`cvmfs_plan`); how the server is driven safely is `cvmfs_server`'s
job. A run is two publishes, whatever the number of images, layers and files:

1. layers are unpacked into a local work directory (as the `dir` backend does) and
   wait there, with every write the run issues;
2. at `settle()`, one `ingest -k` at the repository root brings, in one tar: every
   new layer (directories as explicit members, files, symlinks, devices, FIFOs,
   whiteouts as 0/0 devices) read from the work directory, with the `.cvmfscatalog`
   markers (one catalog per layer, in `.layers/<h2>/<h>/` beside `layerfs/` so that
   containers do not see it, one per `.layers/<h2>`); the whiteouts that complete
   opaque directories; every new flat tree, whose files are hardlink members naming
   the layers' files (CVMFS turns them into catalog entries sharing the content:
   nothing is read or sent twice);
3. one transaction: the xattrs and the files that carry xattrs, the layer records
   (`layers.json` last: it marks a layer complete), then every write the run issued
   (image metadata, the podman stores, origins, links), in order; published by
   `commit()`.

Published content is read through the client view (`/var/spool/cvmfs/NAME/rdonly`),
never through `/cvmfs/NAME`, and before `cvmfs_server` runs: nothing of the
repository is held open while it does. Any failure aborts the open transaction.
What a failed or killed run leaves: the last published revision, possibly with
layers and flat trees that no record or image names yet (the next run fetches
those layers again, replacing them).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import secrets
import shutil
import stat
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

from ..digest import Digest
from ..errors import BackendError, RepositoryBusy
from ..fseval import At, FsEval, Meta, process_fs
from ..fsutil import make_dirs, remove_tree
from ..layout import FLAT, LAYERFS, LAYERS, METADATA, Layout
from ..overlay import unmark_opaque
from ..repository import (
    LAYER_RECORD,
    TAR_SPLIT,
    WHITEOUTS,
    read_layer_record,
)
from . import TreeBatch
from .cvmfs_plan import LayerPlan
from .cvmfs_server import CvmfsServer, TarContent
from .staging import PENDING_RECORD, LocalLayer

__all__ = ["CvmfsBackend", "CvmfsConfig", "CvmfsRun"]

log = logging.getLogger(__name__)

CATALOG_MARKER = ".cvmfscatalog"


@dataclass
class CvmfsConfig:
    """Where a CVMFS repository is on its release manager machine."""

    repository: str
    mount_root: Path = Path("/cvmfs")  # the server view: <mount_root>/<repository>
    client_root: Path | None = None  # the client view (default /var/spool/cvmfs/NAME/rdonly)
    config_dir: Path = Path("/etc/cvmfs")
    work_dir: Path = Path("/var/spool/lazypod")
    public_root: str | None = None
    force: bool = False
    wait_for_readers: float = 0
    cvmfs_server: str = "cvmfs_server"

    @property
    def server_conf(self) -> Path:
        return self.config_dir / "repositories.d" / self.repository / "server.conf"

    @property
    def server_view(self) -> Path:
        return self.mount_root / self.repository

    @property
    def client_view(self) -> Path:
        return self.client_root or Path("/var/spool/cvmfs") / self.repository / "rdonly"


class CvmfsBackend:
    name = "cvmfs"

    def __init__(self, config: CvmfsConfig) -> None:
        self.config = config
        self.layout = Layout(config.server_view)
        self.public_root = config.public_root or f"/cvmfs/{config.repository}"

    def server(self, work: Path) -> CvmfsServer:
        views = [self.config.server_view, self.config.client_view]
        return CvmfsServer(self.config.repository, command=self.config.cvmfs_server,
                           work_dir=work, watched=views, own_mounts=views,
                           wait_for_holders=self.config.wait_for_readers)

    @contextlib.contextmanager
    def run(self) -> Iterator[CvmfsRun]:
        self._preflight()
        work = self.config.work_dir / self.config.repository
        try:
            work.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise BackendError(f"cannot create the work directory {work}: {exc.strerror} "
                               "(choose another with --work-dir)") from None
        lock_fd = os.open(work.parent / f"{self.config.repository}.lock",
                          os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RepositoryBusy(f"another lazypod is publishing into "
                                     f"{self.config.repository}; wait for it") from None
            for leftover in work.iterdir():  # killed runs' local files
                remove_tree(leftover, quiet=True)
            staging = work / f"{os.getpid()}-{secrets.token_hex(4)}"
            staging.mkdir(mode=0o700)
            server = self.server(staging)
            self._check_health(server)
            run = CvmfsRun(self, server, staging, process_fs())
            try:
                yield run
            except BaseException:
                run.abort_open_transaction()
                raise
            finally:
                remove_tree(staging, quiet=True)
        finally:
            os.close(lock_fd)

    def _preflight(self) -> None:
        config = self.config
        if shutil.which(config.cvmfs_server) is None:
            raise BackendError("cvmfs_server is not installed: the cvmfs backend runs on the "
                               "repository's release manager machine")
        conf = config.server_conf
        try:
            text = conf.read_text()
        except OSError:
            raise BackendError(f"{conf} is missing: is {config.repository} a CVMFS "
                               "repository on this machine?") from None
        settings = dict(
            line.split("=", 1) for line in text.splitlines()
            if "=" in line and not line.lstrip().startswith("#")
        )
        if settings.get("CVMFS_INCLUDE_XATTRS", "").strip().strip("\"'") != "true":
            raise BackendError(f"{conf} must say CVMFS_INCLUDE_XATTRS=true (overlay opaque "
                               "directories and file xattrs are stored as xattrs): add that line")
        for view, what in ((config.server_view, "server view"),
                           (config.client_view, "client view")):
            if not view.is_dir():
                raise BackendError(f"{view} ({what} of {config.repository}) is not mounted: "
                                   f"run `cvmfs_server mount {config.repository}`")
        cwd = os.getcwd()
        for view in (config.server_view, config.client_view):
            if cwd == str(view) or cwd.startswith(f"{view}/"):
                raise BackendError(f"the current directory is in {view}: cvmfs_server cannot "
                                   "publish while it is; cd elsewhere and rerun")

    def _check_health(self, server: CvmfsServer) -> None:
        """A repository in a transaction (someone else's, or an interrupted run's) or
        unhealthy is reported; --force aborts a transaction found open."""
        name = self.config.repository
        status = server.status()
        if "in transaction" in status:
            if not self.config.force:
                raise BackendError(
                    f"a transaction is already open on {name} (another process, or an "
                    "interrupted one): finish it, or rerun with --force to abort it")
            log.warning("aborting the transaction found open on %s (--force)", name)
            server.abort()
            status = server.status()
        if "unhealthy" in status:
            raise BackendError(f"{name} is unhealthy (`cvmfs_server list`: {status.strip()}): "
                               f"repair it with `cvmfs_server mount {name}` and rerun")


Member = tuple[tarfile.TarInfo, TarContent]


class CvmfsRun:
    """One run's writes into a CVMFS repository: one ingest and one transaction. `fs`:
    what depends on privilege, for the layers it unpacks and the xattrs it sets."""

    checkpoints = False  # a settle costs publishes

    def __init__(self, backend: CvmfsBackend, server: CvmfsServer, staging: Path,
                 fs: FsEval) -> None:
        self._config = backend.config
        self._fs = fs
        self.layout = backend.layout
        self._client = Layout(backend.config.client_view)
        self.public_root = backend.public_root
        self._server = server
        self._staging = staging
        self._pending: dict[Digest, CvmfsStagedLayer] = {}
        self._waiting: list[Callable[[], None]] = []  # writes that wait for settle()
        self._ingest_parts: list[Iterator[Member]] = []  # whiteouts, flat trees
        self._after_ingest: list[Callable[[], None]] = []
        self._copies: list[tuple[str, str, int, int, int, int]] = []  # see _chunked_source
        self._fresh: set[str] = set()
        self._in_transaction = False

    @property
    def publishes(self) -> int:
        return self._server.counts["publish"]

    @property
    def counts(self) -> dict[str, int]:
        return dict(self._server.counts)

    # -- transactions ------------------------------------------------------------

    def _open_transaction(self) -> None:
        if not self._in_transaction:
            self._server.transaction(force=self._config.force)
            self._in_transaction = True

    def abort_open_transaction(self) -> None:
        """Abort the transaction this run opened (never one found open: not ours)."""
        if self._in_transaction:
            log.warning("aborting the open transaction on %s", self._config.repository)
            self._in_transaction = False
            self._server.abort()

    def _tx(self, action: Callable[[], None]) -> None:
        self._open_transaction()
        try:
            action()
        except OSError as exc:
            raise BackendError(f"writing into {self.layout.root} failed: {exc}") from None

    def _write(self, action: Callable[[], None]) -> None:
        """Before settle(), a write waits for the layers; after, it goes into the
        open transaction."""
        if self._in_transaction or not (self._pending or self._ingest_parts):
            self._tx(action)
        else:
            self._waiting.append(action)

    # -- layers --------------------------------------------------------------

    def has_layer(self, digest: Digest) -> bool:
        """Pending in this run, or published with a sound record."""
        return digest in self._pending or \
            read_layer_record(self.layout.layer_dir(digest), digest).complete

    def stage_layer(self, digest: Digest) -> CvmfsStagedLayer:
        local = self._staging / f"{digest.hex}-{secrets.token_hex(4)}"
        return CvmfsStagedLayer(self, digest, local, self._fs)

    def layer_dir(self, digest: Digest) -> Path:
        pending = self._pending.get(digest)
        return pending.path if pending is not None else self._client.layer_dir(digest)

    def _add_pending(self, layer: CvmfsStagedLayer) -> None:
        self._pending.setdefault(layer.digest, layer)

    # -- settle and commit ---------------------------------------------------------

    def write_back(self) -> None:
        """Nothing to start: the layers go into the repository with the ingest."""

    def settle(self) -> None:
        pending, self._pending = self._pending, {}
        self._fresh = {digest.hex for digest in pending}  # their files go with this ingest
        parts, self._ingest_parts = self._ingest_parts, []
        plans = [LayerPlan.make(layer.digest, layer.path / LAYERFS)
                 for layer in pending.values()]
        if plans or parts:
            if self._in_transaction:  # a second round: its ingest needs the first published
                self._server.publish()
                self._in_transaction = False
            # A layer whose content an interrupted run published without its record
            # (an ingest is all or nothing) is the same content: ingest merges into it.
            self._server.ingest("/", chain(self._skeleton(plans), *(
                plan.members(f"{self.layout.layer_rel(plan.digest)}/{LAYERFS}")
                for plan in plans), *parts))
        copies, self._copies = self._copies, []
        for copy in copies:
            self._tx(functools.partial(self._copy_published, *copy))
        for plan in plans:
            if plan.needs_transaction:
                self._tx(functools.partial(plan.write_xattrs, self.layout.layerfs(plan.digest),
                                           self._fs))
        for layer in pending.values():
            self._tx(functools.partial(self._write_records, layer))
        actions = self._after_ingest + self._waiting
        self._after_ingest, self._waiting = [], []
        for action in actions:
            self._tx(action)

    def _skeleton(self, plans: list[LayerPlan]) -> Iterator[Member]:
        """Explicit directories above the layers (ingest -k would make them owned by
        -1), each new one with its catalog marker. A marker for a directory that
        exists already would make ingest rewrite that directory's entry with owner -1
        (measured): markers go only with the directories this ingest makes."""
        made: set[str] = set()
        now = int(time.time())

        def directory(rel: str, *, catalog: bool) -> Iterator[Member]:
            if rel in made or (self._client.root / rel).is_dir():
                return
            made.add(rel)
            info = tarfile.TarInfo(rel)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, now
            info.uname = info.gname = ""
            yield info, None
            if catalog:
                yield _marker(f"{rel}/{CATALOG_MARKER}")

        for plan in plans:
            rel = self.layout.layer_rel(plan.digest)
            yield from directory(LAYERS, catalog=True)
            yield from directory(FLAT, catalog=False)
            yield from directory(rel.rsplit("/", 1)[0], catalog=True)
            yield from directory(rel, catalog=True)
            yield from directory(f"{rel}/{METADATA}", catalog=False)

    def _write_records(self, layer: CvmfsStagedLayer) -> None:
        meta = self.layout.layer_metadata(layer.digest)
        local = layer.path / METADATA
        shutil.copyfile(local / TAR_SPLIT, meta / TAR_SPLIT)
        os.chmod(meta / TAR_SPLIT, 0o644)
        _write_bytes(meta / WHITEOUTS, (local / WHITEOUTS).read_bytes())
        _write_bytes(meta / LAYER_RECORD, (local / PENDING_RECORD).read_bytes())  # complete

    def commit(self) -> None:
        self.settle()
        if self._in_transaction:
            self._server.publish()
            self._in_transaction = False
        counts = self._server.counts
        log.info("cvmfs: %d publishes into %s (%d transactions, %d ingests)",
                 counts["publish"], self._config.repository, counts["transaction"],
                 counts["ingest"])

    # -- TreeWriter ----------------------------------------------------------

    def _path(self, rel: str) -> Path:
        return self.layout.root / rel

    def write_file(self, rel: str, data: bytes, mode: int = 0o644) -> None:
        self._write(lambda: _write_bytes(self._path(rel), data, mode))

    def symlink(self, rel: str, target: str) -> None:
        path = self._path(rel)
        with contextlib.suppress(OSError):
            if os.readlink(path) == target:
                return  # already so: no transaction for it

        def action() -> None:
            make_dirs(path.parent)
            if path.is_symlink() or path.exists():
                remove_tree(path)
            os.symlink(target, path)

        self._write(action)

    def replace_dir(self, rel: str, fill: Callable[[Path], None]) -> None:
        def action() -> None:
            path = self._path(rel)
            make_dirs(path.parent)
            if path.exists() or path.is_symlink():
                remove_tree(path)
            _mkdir(path, 0o755)
            fill(path)

        self._write(action)

    def remove(self, rel: str) -> None:
        def action() -> None:
            path = self._path(rel)
            if path.exists() or path.is_symlink():
                remove_tree(path)

        if self._path(rel).exists() or self._path(rel).is_symlink() or self._waiting:
            self._write(action)

    def make_dir(self, rel: str) -> None:
        if not self._path(rel).is_dir():
            self._write(lambda: make_dirs(self._path(rel)))

    def touch_lock(self, rel: str, token: bytes) -> None:
        self._write(lambda: _write_bytes(self._path(rel), token, 0o644))

    @contextlib.contextmanager
    def lock_files(self, rels: list[str]) -> Iterator[None]:
        """Clients cannot share locks with the publisher: the transaction is the lock."""
        yield

    def add_whiteouts(self, layer: Digest, paths: list[bytes]) -> None:
        """Whiteouts only come through ingest: they go with the run's one ingest."""
        prefix = f"{self.layout.layer_rel(layer)}/{LAYERFS}/"
        members: list[Member] = []
        for path in paths:
            info = tarfile.TarInfo(prefix + os.fsdecode(path))
            info.type, info.mode = tarfile.CHRTYPE, 0
            info.uname = info.gname = ""
            members.append((info, None))
        self._ingest_parts.append(iter(members))

    def unmark_opaque(self, layer: Digest, path: bytes) -> None:
        """In the transaction after the ingest that brings the layer's whiteouts."""
        self._after_ingest.append(lambda: unmark_opaque(self.layout.layerfs(layer), path))

    def add_trees(self, batch: TreeBatch) -> None:
        """The new flat trees go with the run's one ingest; the layers they need are
        read now (not while cvmfs_server runs). A tree an older version left half done
        is the same tree: ingest merges into it."""
        if not len(batch):
            return
        batch.prefetch()
        self._ingest_parts.append(_flat_members(batch, self._client.root, self._chunked_source))

    def _chunked_source(self, name: str, linkname: str, node: Any) -> bool:
        """A flat tree's file that a hardlink member cannot carry: a published layer
        file that a transaction stored in chunks (files with xattrs are rewritten by
        one, and large ones are chunked then); cvmfs_server's ingest copies the entry
        of a hardlink member but not its chunk list (the copy reads as EIO). Such a
        file is copied in the transaction instead (`_copy_published`)."""
        if node.size < _MIN_CHUNKED or node.layer in self._fresh:
            return False
        try:
            chunks = int(os.getxattr(self._client.root / linkname, "user.chunks") or b"1")
        except (OSError, ValueError):
            return False
        if chunks <= 1:
            return False
        self._copies.append((name, linkname, node.st_mode, node.uid, node.gid, node.mtime_ns))
        log.info("%s: published in %d chunks, copied in the transaction", name, chunks)
        return True

    def _copy_published(self, name: str, source: str, mode: int, uid: int, gid: int,
                        mtime_ns: int) -> None:
        dest = self._path(name)
        with contextlib.suppress(FileNotFoundError):
            dest.unlink()
        with open(self._client.root / source, "rb") as src, \
                open(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                             0o600), "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
            out.flush()  # before the times are set
            self._fs.apply_meta(At(out.fileno()),
                                Meta(stat.S_IMODE(mode), uid, gid, mtime_ns, mtime_ns, {}),
                                name, ours=True, created=0o600, warn=None)


class CvmfsStagedLayer(LocalLayer):
    """Unpacked into the local work directory; published when the run settles."""

    def __init__(self, run: CvmfsRun, digest: Digest, local: Path, fs: FsEval) -> None:
        super().__init__(digest, local, fs=fs)
        self._run = run

    def commit(self) -> None:
        self._run._add_pending(self)


def _flat_members(batch: TreeBatch, published: Path,
                  defer: Callable[[str, str, Any], bool]) -> Iterator[Member]:
    """Each tree with a catalog of its own, each new `.flat/<c2>` too (markers only
    with directories this ingest makes, as `_skeleton` explains)."""
    parents_done: set[str] = set()
    for rel, tree in batch:
        parent = rel.rsplit("/", 1)[0]
        if parent not in parents_done:
            parents_done.add(parent)
            if not (published / parent).is_dir():
                info = tarfile.TarInfo(parent)
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, int(time.time())
                info.uname = info.gname = ""
                yield info, None
                yield _marker(f"{parent}/{CATALOG_MARKER}")
        new = not (published / rel).is_dir()
        yield from tree.tar_members(rel, defer)
        if new:
            yield _marker(f"{rel}/{CATALOG_MARKER}")


def _marker(name: str) -> Member:
    info = tarfile.TarInfo(name)
    info.mode = 0o644
    info.uname = info.gname = ""
    return info, b""


# CVMFS_MIN_CHUNK_SIZE's default: smaller files are never chunked (a repository that sets
# it lower makes such files reach the check, which asks the client view).
_MIN_CHUNKED = 4 * 1024 * 1024

# -- file system helpers (inside a transaction) ----------------------------------------------

def _mkdir(path: Path, mode: int) -> None:
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=mode)
        path.chmod(mode)


def _touch(path: Path) -> None:
    if not path.exists():
        _write_bytes(path, b"")


def _write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    make_dirs(path.parent)
    with contextlib.suppress(FileNotFoundError):
        if path.is_symlink() or path.is_dir():
            remove_tree(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
