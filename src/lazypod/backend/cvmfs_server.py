"""`cvmfs_server`, driven so that a run can always be undone and never hangs a mount.

What a CernVM-FS 2.12 server does, measured (shared/docs/CVMFS.md), and what it
asks of a publisher here:

* `ingest` and `publish` refuse to go on while any process holds a read-only file
  under `/cvmfs/NAME`: they ask "Do you want to proceed anyway?" on standard input.
  With `ingest -t -` that input is the tar stream. So a tar is streamed through a
  FIFO (`-t FIFO`), standard input is /dev/null (the question, if it ever comes, is
  answered "no"), and before every ingest and publish lazypod looks for holders
  itself and fails with a line that names them.
* Closing a transaction unmounts the client view (`/var/spool/cvmfs/NAME/rdonly`);
  if anything holds a file there, the server waits 60 s and unmounts lazily, which
  can leave an orphaned `cvmfs2` client holding the cache lock. Nothing lazypod
  streams into `ingest` is read from a CVMFS mount while the server runs.
* A `cvmfs_server` killed half-way leaves the repository "in transaction -
  unhealthy". It runs in its own session (a terminal's Ctrl-C does not reach it)
  and is never killed: an interruption stops feeding it (an ingest then fails on a
  truncated tar and aborts itself) and waits for it to finish.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import BackendError

__all__ = ["CvmfsServer", "Holder", "TarContent", "find_holders"]

log = logging.getLogger(__name__)

ALREADY_OPEN = "another transaction is already open"
# A member's content: bytes, or a function that opens a local file (a descriptor).
TarContent = bytes | Callable[[], int] | None
_BLOCK = 512
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Holder:
    """A process that holds something under a path: a file, its cwd, or a mount."""

    pid: int
    command: str
    what: str

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.command}: {self.what})"


def find_holders(paths: Iterable[Path], *, ignore_mounts: Iterable[Path] = ()) -> list[Holder]:
    """Processes with an open file, a working directory or a root under one of
    `paths`, and mounts (other than `ignore_mounts`) that lie on them or use them as
    a lower directory, as `cvmfs_server` would find them (it checks /proc too)."""
    prefixes = [str(p).rstrip("/") for p in paths]

    def under(target: str) -> bool:
        return any(target == p or target.startswith(p + "/") for p in prefixes)

    found: list[Holder] = []
    for pid_text in os.listdir("/proc"):
        if not pid_text.isdigit():
            continue
        pid = int(pid_text)
        base = f"/proc/{pid_text}"
        hits: list[str] = []
        for kind in ("cwd", "root"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"{base}/{kind}")
                if under(target) and not (kind == "root" and target == "/"):
                    hits.append(kind)
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"{base}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"{base}/fd/{fd}")
                    if under(target):
                        hits.append(f"open {target}")
                        break
        if hits:
            found.append(Holder(pid, _command(pid), ", ".join(hits)))
    ignored = {str(p).rstrip("/") for p in ignore_mounts}
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as mounts:
        for line in mounts:
            fields = line.split()
            mount_point = _unescape(fields[4])
            if mount_point in ignored:
                continue
            options = line.split(" - ", 1)[-1]
            lower = any(f"{p}/" in options or options.endswith(p) for p in prefixes)
            if under(mount_point) or (lower and "overlay" in options.split()[0]):
                found.append(Holder(0, "mount", mount_point))
    return found


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n") \
        .replace("\\134", "\\")


class CvmfsServer:
    """The `cvmfs_server` commands a publisher needs, for one repository."""

    def __init__(self, repository: str, *, command: str, work_dir: Path,
                 watched: list[Path], own_mounts: list[Path], wait_for_holders: float = 0,
                 ) -> None:
        self.repository = repository
        self._command = command
        self._work_dir = work_dir
        self._watched = watched
        self._own_mounts = own_mounts
        self._wait = wait_for_holders
        self.counts = {"transaction": 0, "publish": 0, "ingest": 0, "abort": 0}

    # -- state ----------------------------------------------------------------

    def status(self) -> str:
        """The repository's line of `cvmfs_server list` ("" if it is not listed)."""
        proc = self._run(["list"], check=False)
        for line in proc.stdout.decode(errors="replace").splitlines():
            if line.split(" ", 1)[0] == self.repository:
                return line
        return ""

    def in_transaction(self) -> bool:
        return "in transaction" in self.status()

    def check_holders(self, before: str) -> None:
        """Fail, naming them, if processes hold files under the repository's mounts
        (after waiting up to `wait_for_holders` seconds for them to go)."""
        deadline = time.monotonic() + self._wait
        while True:
            holders = find_holders(self._watched, ignore_mounts=self._own_mounts)
            if not holders:
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        listed = "; ".join(str(h) for h in holders[:5])
        more = f" and {len(holders) - 5} more" if len(holders) > 5 else ""
        ours = " (lazypod itself: a bug, please report it)" if any(
            h.pid == os.getpid() for h in holders) else ""
        raise BackendError(
            f"cannot {before} {self.repository}: {listed}{more} hold files under "
            f"{', '.join(str(p) for p in self._watched)}{ours}; end them (or give "
            "--wait-for-readers SECONDS) and rerun")

    # -- commands -------------------------------------------------------------

    def transaction(self, *, force: bool) -> None:
        self.check_holders("open a transaction on")  # the publish would refuse: fail now
        proc = self._run(["transaction", self.repository], check=False)
        if proc.returncode != 0 and ALREADY_OPEN in _text(proc):
            if not force:
                raise BackendError(
                    f"a transaction is already open on {self.repository} (another process, "
                    "or an interrupted one): finish it, or rerun with --force to abort it")
            log.warning("aborting the transaction found open on %s (--force)", self.repository)
            self.abort()
            proc = self._run(["transaction", self.repository], check=False)
        if proc.returncode != 0:
            raise BackendError(f"cannot open a transaction on {self.repository}: "
                               f"{_last_line(proc)}")
        self.counts["transaction"] += 1

    def publish(self) -> None:
        self.check_holders("publish")
        self._run(["publish", self.repository])
        self.counts["publish"] += 1

    def abort(self) -> None:
        holders = find_holders(self._watched, ignore_mounts=self._own_mounts)
        if holders:
            log.warning("aborting with files held under the repository (the server will "
                        "remount it forcibly): %s", "; ".join(map(str, holders[:5])))
        proc = self._run(["abort", "-f", self.repository], check=False)
        self.counts["abort"] += 1
        if proc.returncode != 0 and self.in_transaction():
            raise BackendError(f"`cvmfs_server abort -f {self.repository}` failed: "
                               f"{_last_line(proc)}; run it by hand")

    def ingest(self, base: str, members: Iterator[tuple[tarfile.TarInfo, TarContent]]) -> None:
        """One `cvmfs_server ingest -k` of the tar made of `members`, under `base`.

        On any failure (ours while producing the tar, or the server's), the ingest is
        made to fail and the server aborts its own transaction; nothing of it is
        published."""
        self.check_holders("ingest into")
        with tempfile.TemporaryDirectory(dir=self._work_dir) as tmp:
            fifo = Path(tmp) / "ingest.tar"
            os.mkfifo(fifo, 0o600)
            output = (Path(tmp) / "output").open("w+b")
            cmd = [self._command, "ingest", "-k", "-t", str(fifo), "-b", base, self.repository]
            log.debug("running %s", " ".join(cmd))
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=output,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            failure: BaseException | None = None
            stream: _TarStream | None = None
            try:
                fd = _open_fifo(fifo, proc)
                if fd is not None:
                    stream = _TarStream(fd)
                    for info, content in members:
                        stream.add(info, content)
                    stream.finish()
            except BrokenPipeError:
                pass  # the server stopped reading: its exit status says why
            except BaseException as exc:
                failure = exc
                stream = _break(stream, fifo, proc)
            finally:
                if stream is not None:
                    stream.close()
            _wait(proc)
            output.seek(0)
            message = output.read().decode(errors="replace").strip()
            output.close()
        self.counts["ingest"] += 1
        if failure is not None or proc.returncode != 0:
            if self.in_transaction():  # a server that failed before aborting
                self.abort()
            if failure is not None:
                raise failure
            raise BackendError(f"cvmfs_server ingest into {base or '/'} failed "
                               f"(exit {proc.returncode}): {_summary(message)}")
        self.counts["publish"] += 1

    # -- running ----------------------------------------------------------------

    def _run(self, args: list[str], *, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        cmd = [self._command, *args]
        log.debug("running %s", " ".join(cmd))
        with tempfile.TemporaryFile() as output:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=output,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            _wait(proc)
            output.seek(0)
            result = subprocess.CompletedProcess(cmd, proc.returncode, output.read(), b"")
        if check and result.returncode != 0:
            raise BackendError(f"`{' '.join(cmd)}` failed (exit {result.returncode}): "
                               f"{_last_line(result)}")
        return result


class Interrupted(BackendError):
    """An interruption (SIGTERM, Ctrl-C) asked the run to stop during an ingest."""


def _wait(proc: subprocess.Popen[bytes]) -> None:
    """Wait for cvmfs_server, whatever interrupts us: killed half-way it would leave
    the repository unhealthy. The first interruption is raised once it is done."""
    pending: BaseException | None = None
    while True:
        try:
            proc.wait()
            break
        except BaseException as exc:
            if pending is None:
                log.warning("waiting for cvmfs_server to finish (interrupting it would "
                            "leave the repository unhealthy)")
                pending = exc
    if pending is not None:
        raise pending


def _break(stream: _TarStream | None, fifo: Path,
           proc: subprocess.Popen[bytes]) -> _TarStream | None:
    """Make the ingest fail for certain: the server may otherwise wait on a FIFO no one
    will write, or publish a tar that merely stopped between two members."""
    try:
        if stream is None:
            fd = _open_fifo(fifo, proc)
            if fd is None:
                return None
            stream = _TarStream(fd)
        stream.poison()
    except BaseException:  # noqa: S110 (a second interruption: the server fails anyway)
        pass
    return stream


def _open_fifo(fifo: Path, proc: subprocess.Popen[bytes]) -> int | None:
    """The FIFO's write end, once the server opened its read end; None if the server
    ended first (it failed before reading: its exit status says why)."""
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            if proc.poll() is not None:
                return None
            time.sleep(0.02)
            continue
        os.set_blocking(fd, True)
        return fd


class _TarStream:
    """A tar writer that knows, to the byte, where it stands, so that a stream it must
    abandon can be made to fail for certain: a prefix that ends between members is a
    valid tar, and zeros where a header belongs read as the end of the archive."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._header_left = b""  # what is still to be written of the current member
        self._data_left = 0
        self._pad_left = 0

    def add(self, info: tarfile.TarInfo, content: TarContent) -> None:
        if isinstance(content, bytes):
            info.size = len(content)
        size = info.size if info.isreg() else 0
        self._header_left = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        self._data_left, self._pad_left = size, -size % _BLOCK
        self._put(self._header_left, "header")
        if isinstance(content, bytes):
            self._put(content, "data")
        elif size:
            assert content is not None
            fd = content()
            try:
                while self._data_left:
                    chunk = os.read(fd, min(_CHUNK, self._data_left))
                    if not chunk:
                        raise BackendError(f"{info.name} changed while it was published "
                                           "(shorter than it was)")
                    self._put(chunk, "data")
            finally:
                os.close(fd)
        self._put(bytes(self._pad_left), "pad")

    def finish(self) -> None:
        self._put(bytes(2 * _BLOCK), "end")

    def poison(self) -> None:
        """End the stream so that the server's tar reader fails: inside a member's
        content if one is half-sent, else after a header that announces content
        which never comes."""
        with contextlib.suppress(OSError):
            if self._header_left:
                self._put(self._header_left, "header")
            if self._data_left:
                return
            self._put(bytes(self._pad_left), "pad")
            info = tarfile.TarInfo(".lazypod-interrupted")
            info.size = 1 << 20
            self._put(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"), "header")

    def _put(self, data: bytes, part: str) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
            if part == "header":
                self._header_left = self._header_left[written:]
            elif part == "data":
                self._data_left -= written
            elif part == "pad":
                self._pad_left -= written

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


def _text(proc: subprocess.CompletedProcess[bytes]) -> str:
    return (proc.stdout + proc.stderr).decode(errors="replace")


def _last_line(proc: subprocess.CompletedProcess[bytes]) -> str:
    return _summary(_text(proc).strip())


# cvmfs_server's chatter that says nothing about what went wrong.
_NOISE = ("Executed Command", "cvmfs_swissknife ", "CernVM-FS: ", "Failed to set requested "
          "number of open files")


def _summary(message: str) -> str:
    """The line of cvmfs_server's output that says what went wrong."""
    lines = [line.strip() for line in message.splitlines()
             if line.strip() and not line.strip().startswith(_NOISE)]
    for marker in ("PANIC", "Fatal", "aborted.", "error", "failed", "Failed"):
        for line in lines:
            if marker in line:
                return line[:300]
    return lines[-1][:300] if lines else "no message"
