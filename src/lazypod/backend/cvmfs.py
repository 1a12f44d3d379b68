"""The `cvmfs` backend: publish into a CernVM-FS repository through `cvmfs_server`.

What a CVMFS 2.12 server keeps, by path of entry (shared/docs/CVMFS.md), decides
the write path (`cvmfs_plan`); how the server is driven safely is `cvmfs_server`'s
job. A run goes:

1. layers are unpacked into a local work directory (as the `dir` backend does);
2. transaction A: every directory of every new layer, with owner, mode and xattrs
   (the opaque marker among them), the files that carry xattrs, and the
   `.cvmfscatalog` markers (one catalog per layer, in `.layers/<h2>/<h>/` beside
   `layerfs/` so that containers do not see it, and one per `.layers/<h2>`); publish;
3. one `ingest -k` of every other entry of every new layer (files, symlinks,
   devices, FIFOs, whiteouts as 0/0 devices), read from the work directory;
4. transaction B: layer records (`layers.json` last: it marks a layer complete)
   and image metadata; publish;
5. one `ingest -k` of every new flat tree: directories, symlinks and made-up files
   as such, every file from a layer as a hardlink member naming that file, which
   CVMFS turns into a catalog entry sharing its content (nothing is read or sent
   twice); the layers were scanned through the client view before it started;
6. transaction C: the podman stores, origins and the public links; publish.

At most five publishes per run, whatever the number of images, layers and files.
Reads of published content go through the client view
(`/var/spool/cvmfs/NAME/rdonly`), never through `/cvmfs/NAME`, and nothing of the
repository is held open while `cvmfs_server` runs. Any failure aborts the open
transaction; what was published before stays, incomplete layers lack
`layers.json`, and the next run redoes them.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import secrets
import shutil
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

from ..digest import Digest
from ..errors import BackendError, RepositoryBusy
from ..fsutil import make_dirs, remove_tree
from ..layout import FLAT, LAYERS, Layout
from ..overlay import unmark_opaque
from ..repository import TAR_SPLIT, WHITEOUTS, LayerRecord, LayerWhiteouts, layer_record_json
from . import TreeBatch
from .cvmfs_plan import LayerPlan
from .cvmfs_server import CvmfsServer, TarContent
from .staging import LocalLayer

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
                shutil.rmtree(leftover, ignore_errors=True)
            staging = work / f"{os.getpid()}-{secrets.token_hex(4)}"
            staging.mkdir(mode=0o700)
            server = self.server(staging)
            self._check_health(server)
            run = CvmfsRun(self, server, staging)
            try:
                yield run
            except BaseException:
                run.abort_open_transaction()
                raise
            finally:
                shutil.rmtree(staging, ignore_errors=True)
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
        status = server.status()
        if "unhealthy" in status and "in transaction" not in status:
            raise BackendError(f"{self.config.repository} is unhealthy (`cvmfs_server list`: "
                               f"{status.strip()}): repair it with `cvmfs_server mount "
                               f"{self.config.repository}` and rerun")


@dataclass
class _PendingLayer:
    digest: Digest
    local: Path  # <work>/<hex> holding layerfs/ and .metadata/
    record: LayerRecord
    whiteouts: LayerWhiteouts


class CvmfsRun:
    """One run's writes into a CVMFS repository, in at most five publishes."""

    def __init__(self, backend: CvmfsBackend, server: CvmfsServer, staging: Path) -> None:
        self._config = backend.config
        self.layout = backend.layout
        self.read_layout = Layout(backend.config.client_view)
        self.public_root = backend.public_root
        self._server = server
        self._staging = staging
        self._pending_layers: list[_PendingLayer] = []
        self._buffered: list[Callable[[], None]] = []  # writes that wait for transaction B
        self._whiteouts: list[tuple[tarfile.TarInfo, TarContent]] = []  # for the next ingest
        self._after_ingest: list[Callable[[], None]] = []
        self._flushed = False
        self._in_transaction = False

    @property
    def publishes(self) -> int:
        return self._server.counts["publish"]

    @property
    def counts(self) -> dict[str, int]:
        return dict(self._server.counts)

    # -- transactions ------------------------------------------------------------

    def _open_transaction(self) -> None:
        self._server.transaction(force=self._config.force)
        self._in_transaction = True

    def _publish(self) -> None:
        self._server.publish()
        self._in_transaction = False

    def abort_open_transaction(self) -> None:
        """Abort the transaction this run opened (never one found open: not ours)."""
        if self._in_transaction:
            log.warning("aborting the open transaction on %s", self._config.repository)
            self._in_transaction = False
            self._server.abort()

    def _ingest(self, base: str, members: Iterator[tuple[tarfile.TarInfo, TarContent]]) -> None:
        if self._in_transaction:
            self._publish()
        self._server.ingest(base, members)

    def _write(self, action: Callable[[], None]) -> None:
        """Run a write inside the current transaction (opened when needed); before
        flush(), keep it for the metadata transaction."""
        if not self._flushed:
            self._buffered.append(action)
            return
        if not self._in_transaction:
            self._open_transaction()
        try:
            action()
        except OSError as exc:
            raise BackendError(f"writing into {self.layout.root} failed: {exc}") from None

    # -- layers --------------------------------------------------------------

    def has_layer(self, digest: Digest) -> bool:
        """Published and complete, or already unpacked earlier in this run."""
        return any(layer.digest == digest for layer in self._pending_layers) or (
            self.layout.layer_metadata(digest) / "layers.json").is_file()

    def stage_layer(self, digest: Digest) -> CvmfsStagedLayer:
        local = self._staging / f"{digest.hex}-{secrets.token_hex(4)}"
        return CvmfsStagedLayer(self, digest, local)

    def _add_pending(self, layer: _PendingLayer) -> None:
        self._pending_layers.append(layer)

    # -- the phases ----------------------------------------------------------

    def flush(self) -> None:
        """Transaction A and the layer ingest; then open transaction B with the
        buffered writes, so the repository reads as complete from here on."""
        layers = self._pending_layers
        if layers:
            plans = [LayerPlan.make(layer.digest, layer.local / "layerfs") for layer in layers]
            self._open_transaction()
            try:
                self._write_skeletons(plans)
            except OSError as exc:
                raise BackendError(f"writing layer directories into {self.layout.root} "
                                   f"failed: {exc}") from None
            self._publish()
            self._ingest(LAYERS, chain.from_iterable(
                plan.members(f"{plan.digest.hex[:2]}/{plan.digest.hex}/layerfs")
                for plan in plans))
        self._flushed = True
        for layer in layers:
            self._write(functools.partial(self._write_layer_metadata, layer))
        buffered, self._buffered = self._buffered, []
        for action in buffered:
            self._write(action)

    def _write_skeletons(self, plans: list[LayerPlan]) -> None:
        root = self.layout.root
        for base in (LAYERS, FLAT):
            _mkdir(root / base, 0o755)
        _touch(root / LAYERS / CATALOG_MARKER)
        for plan in plans:
            digest = plan.digest
            prefix_dir = root / LAYERS / digest.hex[:2]
            _mkdir(prefix_dir, 0o755)
            _touch(prefix_dir / CATALOG_MARKER)
            layer_dir = self.layout.layer_dir(digest)
            if layer_dir.exists():  # an incomplete layer of an interrupted run
                shutil.rmtree(layer_dir)
            _mkdir(layer_dir, 0o755)
            _mkdir(layer_dir / ".metadata", 0o755)
            _mkdir(layer_dir / "layerfs", 0o755)
            plan.write_transaction_part(self.layout.layerfs(digest))
            # The layer's catalog marker sits beside layerfs/, not in it: a container
            # would see a /.cvmfscatalog it does not have.
            _touch(layer_dir / CATALOG_MARKER)

    def _write_layer_metadata(self, layer: _PendingLayer) -> None:
        meta = self.layout.layer_metadata(layer.digest)
        _mkdir(meta, 0o755)
        shutil.copyfile(layer.local / ".metadata" / TAR_SPLIT, meta / TAR_SPLIT)
        _write_bytes(meta / WHITEOUTS, layer.whiteouts.to_json())
        _write_bytes(meta / "layers.json", layer_record_json(layer.record))  # complete now

    def commit(self) -> None:
        if not self._flushed:
            self.flush()
        if self._in_transaction:
            self._publish()
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

        if self._flushed or self._path(rel).exists() or self._path(rel).is_symlink():
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
        """Whiteouts only come through ingest: kept for the next one (at the root)."""
        prefix = f"{self.layout.layer_rel(layer)}/layerfs/"
        for path in paths:
            info = tarfile.TarInfo(prefix + os.fsdecode(path))
            info.type, info.mode = tarfile.CHRTYPE, 0
            info.uname = info.gname = ""
            self._whiteouts.append((info, None))

    def unmark_opaque(self, layer: Digest, path: bytes) -> None:
        """In the transaction after the ingest that brings the layer's whiteouts."""
        self._after_ingest.append(lambda: unmark_opaque(self.layout.layerfs(layer), path))

    def settle(self) -> None:
        """Whiteouts no flat tree's ingest took along get an ingest of their own."""
        if self._whiteouts:
            whiteouts, self._whiteouts = self._whiteouts, []
            self._ingest("/", iter(whiteouts))
        actions, self._after_ingest = self._after_ingest, []
        for action in actions:
            self._write(action)

    def add_trees(self, batch: TreeBatch) -> None:
        """All new flat trees in one ingest at the repository root (their files are
        hardlink members naming the layers' files), with the pending whiteouts.
        Explicit directory entries for every parent below `.flat`, so ingest creates
        none with owner 65534."""
        if not len(batch):
            return
        if not self._path(FLAT).is_dir():
            self._write(lambda: _mkdir(self._path(FLAT), 0o755))
        for rel in batch.rels():  # leftovers of a tree that never completed
            if self._path(rel).exists():
                self.remove(rel)
        batch.prefetch()  # the client view is read now, not while cvmfs_server runs
        whiteouts, self._whiteouts = self._whiteouts, []
        self._ingest("/", chain(whiteouts, _flat_members(batch, self.read_layout.root)))


class CvmfsStagedLayer(LocalLayer):
    """Unpacked into the local work directory; published by the run's flush."""

    def __init__(self, run: CvmfsRun, digest: Digest, local: Path) -> None:
        super().__init__(digest, local)
        self._run = run

    def commit(self, record: LayerRecord, whiteouts: LayerWhiteouts) -> None:
        self.finish_writing()
        self._run._add_pending(_PendingLayer(self.digest, self.path, record, whiteouts))


def _flat_members(batch: TreeBatch, published: Path) -> Iterator[tuple[tarfile.TarInfo,
                                                                       TarContent]]:
    parents_done: set[str] = set()
    for rel, tree in batch:
        parent = rel.rsplit("/", 1)[0]
        if parent not in parents_done:
            parents_done.add(parent)
            if not (published / parent).is_dir():
                info = tarfile.TarInfo(parent)
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                yield info, None
            yield _marker(f"{parent}/{CATALOG_MARKER}")
        yield from tree.tar_members(rel)
        yield _marker(f"{rel}/{CATALOG_MARKER}")


def _marker(name: str) -> tuple[tarfile.TarInfo, TarContent]:
    info = tarfile.TarInfo(name)
    info.mode = 0o644
    return info, b""


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
