"""The `cvmfs` backend: publish into a CernVM-FS repository through `cvmfs_server`.

What a CVMFS 2.12 server keeps, by path of entry (shared/docs/CVMFS.md), decides
the write path. Overlay whiteouts (0/0 character devices) can only come in
through `cvmfs_server ingest`; xattrs (opaque markers included) only through a
transaction, and only on directories that transaction creates. So a run goes:

1. layers are unpacked into a local work directory (as the `dir` backend does);
2. transaction A: every directory of every new layer is created, with its owner,
   mode and xattrs (`trusted.overlay.opaque` and `user.overlay.opaque` on opaque
   directories), together with the whole subtree of any directory that carries
   xattrs and every file that does, and the `.cvmfscatalog` markers (one catalog
   per layer, in `.layers/<h2>/<h>/` beside `layerfs/` so that containers do not
   see it, and one per `.layers/<h2>`); publish;
3. one `ingest -k` of a single tar holding every other entry of every new layer
   (files, symlinks, devices, FIFOs, whiteouts as 0/0 devices): ingest creates no
   parent itself, so no directory ends up owned by 65534;
4. transaction B: layer records (`layers.json` last: it marks a layer complete)
   and image metadata; publish;
5. one `ingest -k` of a single tar holding every new flat tree;
6. transaction C: the podman store, origins and the public links; publish.

At most five publishes per run, whatever the number of images, layers and files
(DUCC needs several per layer). Whiteouts under an opaque directory are dropped
(the directory already hides everything below it); a directory with xattrs that
also holds whiteouts cannot be stored and fails the run loudly. Any failure
aborts the open transaction (`abort -f`), SIGTERM included; what was published
before stays, incomplete layers lack `layers.json`, and the next run redoes them.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import secrets
import shutil
import signal
import stat
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..digest import Digest
from ..errors import BackendError, LazypodError, RepositoryBusy
from ..fsutil import make_dirs, remove_tree
from ..layout import FLAT, LAYERS, Layout
from ..repository import TAR_SPLIT, WHITEOUTS, LayerRecord, LayerWhiteouts, layer_record_json
from ..unpack import OPAQUE_XATTRS
from . import TreeSource
from .staging import LocalLayer

__all__ = ["CvmfsBackend", "CvmfsRun"]

log = logging.getLogger(__name__)

CATALOG_MARKER = ".cvmfscatalog"
ALREADY_OPEN = "another transaction is already open"


class Terminated(LazypodError):
    """SIGTERM arrived; the open transaction is aborted on the way out."""


@dataclass
class CvmfsConfig:
    repository: str
    mount_root: Path = field(
        default_factory=lambda: Path(os.environ.get("LAZYPOD_CVMFS_MOUNT_ROOT", "/cvmfs")))
    config_dir: Path = field(
        default_factory=lambda: Path(os.environ.get("LAZYPOD_CVMFS_CONFIG_DIR", "/etc/cvmfs")))
    work_dir: Path = field(
        default_factory=lambda: Path(os.environ.get("LAZYPOD_WORK_DIR", "/var/spool/lazypod")))
    public_root: str | None = None
    force: bool = False
    cvmfs_server: str = "cvmfs_server"

    @property
    def server_conf(self) -> Path:
        return self.config_dir / "repositories.d" / self.repository / "server.conf"


class CvmfsBackend:
    name = "cvmfs"

    def __init__(self, config: CvmfsConfig) -> None:
        self.config = config
        self.layout = Layout(config.mount_root / config.repository)
        self.public_root = config.public_root or f"/cvmfs/{config.repository}"

    @contextlib.contextmanager
    def run(self) -> Iterator[CvmfsRun]:
        self._preflight()
        work = self.config.work_dir / self.config.repository
        work.mkdir(parents=True, exist_ok=True, mode=0o700)
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
            run = CvmfsRun(self, staging)
            with _sigterm_raises():
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
        if shutil.which(self.config.cvmfs_server) is None:
            raise BackendError("cvmfs_server is not installed: the cvmfs backend runs on the "
                               "repository's release manager machine")
        conf = self.config.server_conf
        try:
            text = conf.read_text()
        except OSError:
            raise BackendError(f"{conf} is missing: is {self.config.repository} a CVMFS "
                               "repository on this machine?") from None
        settings = dict(
            line.split("=", 1) for line in text.splitlines()
            if "=" in line and not line.lstrip().startswith("#")
        )
        if settings.get("CVMFS_INCLUDE_XATTRS", "").strip().strip("\"'") != "true":
            raise BackendError(f"{conf} must say CVMFS_INCLUDE_XATTRS=true (overlay opaque "
                               "directories and file xattrs are stored as xattrs): add that line")
        if not self.layout.root.is_dir():
            raise BackendError(f"{self.layout.root} is not mounted")


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into an exception, so transactions are aborted on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Terminated("terminated by SIGTERM; the open transaction was aborted")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class _PendingLayer:
    digest: Digest
    local: Path  # <work>/<hex> holding layerfs/ and .metadata/
    record: LayerRecord
    whiteouts: LayerWhiteouts


class CvmfsRun:
    """One run's writes into a CVMFS repository, in at most five publishes."""

    def __init__(self, backend: CvmfsBackend, staging: Path) -> None:
        self._backend = backend
        self._config = backend.config
        self.layout = backend.layout
        self.public_root = backend.public_root
        self._staging = staging
        self._pending_layers: list[_PendingLayer] = []
        self._buffered: list[Callable[[], None]] = []
        self._flushed = False
        self._in_transaction = False
        self.publishes = 0

    # -- cvmfs_server ----------------------------------------------------------

    def _server(self, *args: str, stdin: IO[bytes] | None = None,
                check: bool = True) -> subprocess.CompletedProcess[bytes]:
        cmd = [self._config.cvmfs_server, *args]
        log.debug("running %s", " ".join(cmd))
        proc = subprocess.run(cmd, stdin=stdin, capture_output=True, check=False)
        if check and proc.returncode != 0:
            message = (proc.stderr or proc.stdout).decode(errors="replace").strip()
            raise BackendError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): "
                               f"{message.splitlines()[-1] if message else 'no message'}")
        return proc

    def _open_transaction(self) -> None:
        repo = self._config.repository
        proc = self._server("transaction", repo, check=False)
        if proc.returncode != 0 and ALREADY_OPEN in (proc.stderr + proc.stdout).decode():
            if not self._config.force:
                raise BackendError(f"a transaction is already open on {repo} (another "
                                   "process, or an interrupted one): finish it, or rerun with "
                                   "--force to abort it")
            log.warning("aborting the transaction found open on %s (--force)", repo)
            self._server("abort", "-f", repo)
            proc = self._server("transaction", repo, check=False)
        if proc.returncode != 0:
            message = (proc.stderr or proc.stdout).decode(errors="replace").strip()
            raise BackendError(f"cannot open a transaction on {repo}: {message}")
        self._in_transaction = True

    def _publish(self) -> None:
        self._server("publish", self._config.repository)
        self._in_transaction = False
        self.publishes += 1

    def abort_open_transaction(self) -> None:
        if self._in_transaction:
            log.warning("aborting the open transaction on %s", self._config.repository)
            self._server("abort", "-f", self._config.repository, check=False)
            self._in_transaction = False

    def _ingest(self, base: str, members: Iterator[tuple[tarfile.TarInfo, Any]]) -> None:
        """One `cvmfs_server ingest -k` of a tar streamed from `members`."""
        if self._in_transaction:
            self._publish()
        cmd = [self._config.cvmfs_server, "ingest", "-k", "-t", "-", "-b", base,
               self._config.repository]
        self._in_transaction = True  # ingest opens one of its own: abort it if we stop
        log.debug("running %s", " ".join(cmd))
        # Output goes to a file: a pipe could fill up while we are still writing the tar.
        with tempfile.TemporaryFile() as output:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=output,
                                    stderr=subprocess.STDOUT)
            assert proc.stdin is not None
            try:
                with tarfile.open(fileobj=proc.stdin, mode="w|", format=tarfile.PAX_FORMAT,
                                  encoding="utf-8", errors="surrogateescape") as tar:
                    for info, content in members:
                        tar.addfile(info, content)
                        if content is not None:
                            content.close()
            except BrokenPipeError:
                pass  # cvmfs_server stopped reading: its exit status says why
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            finally:
                with contextlib.suppress(BrokenPipeError):
                    proc.stdin.close()
            proc.wait()
            output.seek(0)
            message = output.read().decode(errors="replace").strip()
        self._in_transaction = False
        if proc.returncode != 0:
            # A failed ingest may leave its own transaction open.
            self._server("abort", "-f", self._config.repository, check=False)
            raise BackendError(f"cvmfs_server ingest into {base} failed "
                               f"(exit {proc.returncode}): "
                               f"{message.splitlines()[-1] if message else 'no message'}")
        self.publishes += 1

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
            plans = [_LayerPlan.make(layer) for layer in layers]
            self._open_transaction()
            try:
                self._write_skeletons(plans)
            except OSError as exc:
                raise BackendError(f"writing layer directories into {self.layout.root} "
                                   f"failed: {exc}") from None
            self._publish()
            self._ingest(LAYERS, _layer_members(plans))
        self._flushed = True
        for layer in layers:
            self._write(functools.partial(self._write_layer_metadata, layer))
        buffered, self._buffered = self._buffered, []
        for action in buffered:
            self._write(action)

    def _write_skeletons(self, plans: list[_LayerPlan]) -> None:
        root = self.layout.root
        for base in (LAYERS, FLAT):
            _mkdir(root / base, 0o755)
        _touch(root / LAYERS / CATALOG_MARKER)
        for plan in plans:
            digest = plan.layer.digest
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
        log.info("cvmfs: %d publishes into %s", self.publishes, self._config.repository)

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

    def add_trees(self, trees: Mapping[str, TreeSource]) -> None:
        """All new flat trees in one ingest (explicit directory entries for every
        parent below `.flat`, so ingest creates none with owner 65534)."""
        if not trees:
            return
        if not self._path(FLAT).is_dir():
            self._write(lambda: _mkdir(self._path(FLAT), 0o755))
        self._ingest(FLAT, _flat_members(trees))


class CvmfsStagedLayer(LocalLayer):
    """Unpacked into the local work directory; published by the run's flush."""

    def __init__(self, run: CvmfsRun, digest: Digest, local: Path) -> None:
        super().__init__(digest, local)
        self._run = run

    def commit(self, record: LayerRecord, whiteouts: LayerWhiteouts) -> None:
        self.finish_writing()
        self._run._add_pending(_PendingLayer(self.digest, self.path, record, whiteouts))


# -- planning a layer's two paths into CVMFS ------------------------------------------------

@dataclass
class _LayerPlan:
    """Which entries of a local layer go through the transaction, which through ingest."""

    layer: _PendingLayer
    directories: list[bytes]  # every directory, parents first ("" is the layer root)
    transaction_roots: list[bytes]  # subtrees written whole inside the transaction
    transaction_files: list[bytes]  # single non-directories with xattrs

    @classmethod
    def make(cls, layer: _PendingLayer) -> _LayerPlan:
        root = os.fsencode(layer.local / "layerfs")
        opaque = set(layer.whiteouts.opaque_dirs)
        directories: list[bytes] = [b""]
        roots: list[bytes] = []
        files: list[bytes] = []
        for dirpath, dirnames, filenames in os.walk(root):
            rel_dir = os.path.relpath(dirpath, root)
            rel_dir = b"" if rel_dir == b"." else rel_dir
            keep = []
            for name in sorted(dirnames):
                rel = os.path.join(rel_dir, name) if rel_dir else name
                if rel in opaque or _has_xattrs(os.path.join(dirpath, name)):
                    roots.append(rel)
                    _check_storable(root, rel, opaque)
                else:
                    directories.append(rel)
                    keep.append(name)
            dirnames[:] = keep
            for name in filenames:
                full = os.path.join(dirpath, name)
                if not os.path.islink(full) and _has_xattrs(full):
                    files.append(os.path.join(rel_dir, name) if rel_dir else name)
        return cls(layer, directories, roots, files)

    def write_transaction_part(self, layerfs: Path) -> None:
        """Inside the open transaction: every directory, the xattr subtrees, the
        files with xattrs (hardlinks become copies, as CVMFS keeps them)."""
        source = os.fsencode(self.layer.local / "layerfs")
        dest = os.fsencode(layerfs)
        for rel in self.directories:
            src = os.path.join(source, rel) if rel else source
            dst = os.path.join(dest, rel) if rel else dest
            if rel:
                os.mkdir(dst, 0o700)
            _copy_meta(src, dst)
        for rel in self.transaction_roots:
            _copy_tree(os.path.join(source, rel), os.path.join(dest, rel))
        for rel in self.transaction_files:
            _copy_entry(os.path.join(source, rel), os.path.join(dest, rel))
        for rel in self.directories:  # times last: creating children changed them
            src = os.path.join(source, rel) if rel else source
            st = os.lstat(src)
            os.utime(os.path.join(dest, rel) if rel else dest,
                     ns=(st.st_atime_ns, st.st_mtime_ns))


def _check_storable(root: bytes, rel: bytes, opaque: set[bytes]) -> None:
    """Whiteouts under an opaque directory are redundant (dropped); under a directory
    that only has other xattrs they would need ingest, which CVMFS cannot combine."""
    if rel in opaque:
        return
    for dirpath, _dirs, files in os.walk(os.path.join(root, rel)):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                raise BackendError(
                    f"directory {os.fsdecode(rel)!r} of layer has xattrs and holds whiteouts: "
                    "CVMFS can store the first only in a transaction and the second only "
                    "through ingest"
                )


def _layer_members(plans: list[_LayerPlan]) -> Iterator[tuple[tarfile.TarInfo, Any]]:
    """Every entry of every layer that ingest must bring: no directories (they exist),
    nothing below transaction subtrees, whiteouts as 0/0 devices."""
    for plan in plans:
        digest = plan.layer.digest
        prefix = f"{digest.hex[:2]}/{digest.hex}/layerfs"
        root = os.fsencode(plan.layer.local / "layerfs")
        skip = set(plan.transaction_roots) | set(plan.transaction_files)
        seen: dict[tuple[int, int], str] = {}
        for rel_dir in plan.directories:
            directory = os.path.join(root, rel_dir) if rel_dir else root
            for name in sorted(os.listdir(directory)):
                rel = os.path.join(rel_dir, name) if rel_dir else name
                full = os.path.join(directory, name)
                st = os.lstat(full)
                if stat.S_ISDIR(st.st_mode) or rel in skip:
                    continue
                yield _tar_entry(f"{prefix}/{os.fsdecode(rel)}", full, st, seen)


def _tar_entry(name: str, full: bytes, st: os.stat_result,
               seen: dict[tuple[int, int], str]) -> tuple[tarfile.TarInfo, Any]:
    info = tarfile.TarInfo(name)
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    info.uname = info.gname = ""
    info.mtime = st.st_mtime_ns / 1e9
    kind = stat.S_IFMT(st.st_mode)
    key = (st.st_dev, st.st_ino)
    if stat.S_ISREG(kind):
        if st.st_nlink > 1 and key in seen:
            info.type = tarfile.LNKTYPE
            info.linkname = seen[key]
            return info, None
        seen[key] = name
        info.size = st.st_size
        return info, open(full, "rb")
    if stat.S_ISLNK(kind):
        info.type = tarfile.SYMTYPE
        info.linkname = os.fsdecode(os.readlink(full))
    elif stat.S_ISCHR(kind) or stat.S_ISBLK(kind):
        info.type = tarfile.CHRTYPE if stat.S_ISCHR(kind) else tarfile.BLKTYPE
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    elif stat.S_ISFIFO(kind):
        info.type = tarfile.FIFOTYPE
    return info, None


def _flat_members(trees: Mapping[str, TreeSource]) -> Iterator[tuple[tarfile.TarInfo, Any]]:
    parents_done: set[str] = set()
    for rel, tree in trees.items():
        under_flat = rel.removeprefix(f"{FLAT}/")
        parent = under_flat.rsplit("/", 1)[0]
        if parent not in parents_done:
            parents_done.add(parent)
            info = tarfile.TarInfo(parent)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            yield info, None
            yield _marker(f"{parent}/{CATALOG_MARKER}")
        for info, source, data in tree.tar_members(under_flat):
            if source is not None:
                yield info, open(source, "rb")  # noqa: SIM115 (closed by the ingest writer)
            else:
                yield info, _BytesReader(data or b"") if info.isreg() else None
        yield _marker(f"{under_flat}/{CATALOG_MARKER}")


def _marker(name: str) -> tuple[tarfile.TarInfo, Any]:
    info = tarfile.TarInfo(name)
    info.mode = 0o644
    return info, _BytesReader(b"")


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def read(self, n: int = -1) -> bytes:
        data, self._data = (self._data, b"") if n < 0 else (self._data[:n], self._data[n:])
        return data

    def close(self) -> None:
        pass


# -- file system helpers (inside a transaction) ----------------------------------------------

def _has_xattrs(path: bytes) -> bool:
    try:
        return bool(os.listxattr(path, follow_symlinks=False))
    except OSError:
        return False


def _copy_meta(src: bytes, dst: bytes) -> None:
    st = os.lstat(src)
    os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(dst, stat.S_IMODE(st.st_mode))
        for name in os.listxattr(src, follow_symlinks=False):
            if name in OPAQUE_XATTRS or not name.startswith("trusted.overlay."):
                os.setxattr(dst, name, os.getxattr(src, name, follow_symlinks=False),
                            follow_symlinks=False)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _copy_entry(src: bytes, dst: bytes) -> None:
    st = os.lstat(src)
    kind = stat.S_IFMT(st.st_mode)
    if stat.S_ISREG(kind):
        shutil.copyfile(src, dst, follow_symlinks=False)
    elif stat.S_ISLNK(kind):
        os.symlink(os.readlink(src), dst)
    elif stat.S_ISCHR(kind) and st.st_rdev == 0:
        return  # a whiteout under an opaque directory: the directory hides it already
    elif stat.S_ISDIR(kind):
        os.mkdir(dst, 0o700)
    else:
        os.mknod(dst, st.st_mode, st.st_rdev)
    _copy_meta(src, dst)


def _copy_tree(src: bytes, dst: bytes) -> None:
    _copy_entry(src, dst)
    for name in sorted(os.listdir(src)):
        child = os.path.join(src, name)
        if stat.S_ISDIR(os.lstat(child).st_mode):
            _copy_tree(child, os.path.join(dst, name))
        else:
            _copy_entry(child, os.path.join(dst, name))
    st = os.lstat(src)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


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
