"""In front of the real `cvmfs_server` for the tests (LAZYPOD_TEST_CVMFS=real): logs
every command and its exit status, keeps a record of every tar `ingest` reads, and
injects the faults a test asks for; everything else is the real server's doing."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REAL = "/usr/bin/cvmfs_server"


def main() -> int:
    state_path = Path(os.environ["LAZYPOD_TEST_CVMFS_SHIM"])
    args = sys.argv[1:]
    command = args[0] if args else ""
    with _locked(state_path) as state:
        state.setdefault("started", []).append({"args": args})
        faults = state["fail"]
        number = 1 + sum(1 for e in state["log"] if e["args"][:1] == [command])
    rc = _run(command, args, faults, number, state_path)
    with _locked(state_path) as state:
        state["log"].append({"args": args, "rc": rc})
    return rc


def _run(command: str, args: list[str], faults: dict, number: int, state_path: Path) -> int:
    name = args[-1] if args else ""
    if command == "publish":
        if faults.get("publish") == number:
            print("injected failure: publish failed (the transaction stays open)",
                  file=sys.stderr)
            return 1
        time.sleep(float(faults.get("publish_sleep", 0)))
    if command == "ingest":
        source = args[args.index("-t") + 1] if "-t" in args else None
        if faults.get("ingest") == number:
            if source is not None:
                with open(source, "rb") as stream:
                    stream.read(4096)
            if faults.get("ingest_leaves_transaction"):
                subprocess.run([REAL, "transaction", name], check=False,
                               stdin=subprocess.DEVNULL, capture_output=True)
            print("injected failure: ingest failed", file=sys.stderr)
            return 1
        time.sleep(float(faults.get("ingest_sleep", 0)))
        if source is not None:
            return _ingest_recorded(args, source, state_path, number)
    return subprocess.run([REAL, *args], check=False).returncode


def _ingest_recorded(args: list[str], source: str, state_path: Path, number: int) -> int:
    """Pass the tar on through a FIFO of our own, listing its members on the way."""
    fifo = state_path.parent / f"ingest-{number}.fifo"
    with contextlib.suppress(FileNotFoundError):
        fifo.unlink()
    os.mkfifo(fifo)
    args = list(args)
    args[args.index("-t") + 1] = str(fifo)
    proc = subprocess.Popen([REAL, *args])
    out_fd = None
    while out_fd is None:  # the server opens the FIFO once its checks are done
        try:
            out_fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.02)
    members: list[dict[str, object]] = []
    stream = sys.stdin.buffer if source == "-" else open(source, "rb")  # noqa: SIM115
    try:
        if out_fd is not None:
            os.set_blocking(out_fd, True)
            with open(out_fd, "wb") as out:
                _relay(_Tee(stream, out), members)
        else:
            while stream.read(1 << 20):
                pass
    finally:
        stream.close()
    listing = state_path.parent / f"ingest-{number}.json"
    listing.write_text(json.dumps(members))
    with _locked(state_path) as state:
        state.setdefault("tars", []).append(str(listing))
    return proc.wait()


def _relay(tee: _Tee, members: list[dict[str, object]]) -> None:
    try:
        with tarfile.open(fileobj=tee, mode="r|", encoding="utf-8",
                          errors="surrogateescape") as tar:
            for member in tar:
                digest = ""
                if member.isreg():
                    data = tar.extractfile(member)
                    h = hashlib.sha256()
                    while data is not None and (chunk := data.read(1 << 20)):
                        h.update(chunk)
                    digest = h.hexdigest()
                members.append({"name": member.name, "type": member.type.decode(),
                                "linkname": member.linkname, "size": member.size,
                                "sha256": digest, "mode": member.mode})
    except tarfile.TarError:
        pass  # a broken tar goes on as it is: the server judges it
    with contextlib.suppress(BrokenPipeError, OSError):
        while tee.read(1 << 20):
            pass


class _Tee:
    """Hands on to the server exactly what is read from the source."""

    def __init__(self, stream, out) -> None:  # type: ignore[no-untyped-def]
        self.stream = stream
        self.out = out
        self.broken = False

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        if data and not self.broken:
            try:
                self.out.write(data)
            except (BrokenPipeError, OSError):
                self.broken = True  # the server stopped reading; drain the source
        return data


@contextlib.contextmanager
def _locked(path: Path):  # type: ignore[no-untyped-def]
    """Read, change and replace the state file whole (readers never see half of it)."""
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = json.loads(path.read_text())
        yield state
        temp = path.with_suffix(".tmp")
        temp.write_text(json.dumps(state))
        os.replace(temp, path)


if __name__ == "__main__":
    sys.exit(main())
