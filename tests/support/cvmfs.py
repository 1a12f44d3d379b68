"""A CVMFS repository for the cvmfs backend's tests, and the environment that makes
lazypod (a subprocess) use it.

`LAZYPOD_TEST_CVMFS` chooses the server:

* `standin` (the default, what CI runs): the strict stand-in `cvmfs_server`
  (`cvmfs_standin.py`), with its repository under a temporary directory;
* `real`: the real CernVM-FS 2.12 stratum 0 of this machine (built and started by
  shared/tools/cvmfs-stratum0.sh). Each test gets the repository
  `lzp-test.example.org` made anew (`cvmfs_server mkfs -o root`, with
  `CVMFS_INCLUDE_XATTRS=true`); lazypod reaches the real `cvmfs_server` through a
  small shim (`bin-real/cvmfs_server`) that counts commands and injects the faults
  tests ask for. After each test the repository must be healthy, not in a
  transaction, and pass `cvmfs_server check`.

Both expose the same surface: `env`, `name`, `base` (scratch space), `server_view`,
`client_view`, `state()`, `counts()`, `inject()`, `server()`, `ingests()`,
`destroy()`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import cvmfs_standin

BIN = Path(__file__).parent / "bin"
REAL_BIN = Path(__file__).parent / "bin-real"
REAL_NAME = "lzp-test.example.org"


def real_server() -> bool:
    return os.environ.get("LAZYPOD_TEST_CVMFS", "standin") == "real"


def make_repo(name: str = "unpacked.test.ch", *, include_xattrs: bool = True) -> Any:
    if real_server():
        return RealRepo(include_xattrs=include_xattrs)
    return StandinRepo(name, include_xattrs=include_xattrs)


class StandinRepo:
    def __init__(self, name: str = "unpacked.test.ch", *, include_xattrs: bool = True) -> None:
        # Short paths under /tmp: overlayfs mount options and podman's runroot are picky.
        self.base = Path(tempfile.mkdtemp(prefix="lzp-cvmfs-", dir="/tmp"))
        os.chmod(self.base, 0o755)
        self.name = name
        self.home = self.base / "home"
        self.mount_root = self.base / "cvmfs"
        self.client_root = self.base / "client"
        self.config_dir = self.base / "etc-cvmfs"
        self.work_dir = self.base / "work"
        self.env = {
            "CVMFS_STANDIN_HOME": str(self.home),
            "LAZYPOD_CVMFS_MOUNT_ROOT": str(self.mount_root),
            "LAZYPOD_CVMFS_CLIENT_ROOT": str(self.client_root),
            "LAZYPOD_CVMFS_CONFIG_DIR": str(self.config_dir),
            "LAZYPOD_WORK_DIR": str(self.work_dir),
            "LAZYPOD_TEST_PYTHON": sys.executable,
            "PYTHONPATH": str(Path(__file__).parent.parent),
            "PATH": f"{BIN}:{os.environ['PATH']}",
        }
        os.environ["CVMFS_STANDIN_HOME"] = str(self.home)
        self.server_view = cvmfs_standin.mkfs(
            name, mount_root=self.mount_root, client_root=self.client_root,
            config_dir=self.config_dir, include_xattrs=include_xattrs)

    @property
    def client_view(self) -> Path:
        """What a client mounting the repository sees (clients run podman from here)."""
        return self.client_root / self.name

    def state(self) -> dict[str, Any]:
        return json.loads((self.home / self.name / "state.json").read_text())

    def ingest_started(self) -> bool:
        return (self.home / self.name / "ingest-started").exists()

    def publish_started(self) -> bool:
        return (self.home / self.name / "publish-started").exists()

    def counts(self) -> dict[str, int]:
        return dict(self.state()["counts"])

    def ingests(self) -> list[list[dict[str, Any]]]:
        """What each successful or failed ingest received: name, type, link, sha256."""
        found = sorted((self.home / self.name).glob("ingest-*.json"),
                       key=lambda p: int(p.stem.split("-")[1]))
        return [json.loads(p.read_text()) for p in found]

    def inject(self, **faults: Any) -> None:
        path = self.home / self.name / "state.json"
        state = json.loads(path.read_text())
        state["fail"] = faults
        path.write_text(json.dumps(state))

    def server(self, *args: str, input: bytes | None = None,
               check: bool = False) -> subprocess.CompletedProcess[bytes]:
        env = {**os.environ, **self.env}
        return subprocess.run(["cvmfs_server", *args], env=env, input=input,
                              capture_output=True, check=check)

    def destroy(self) -> None:
        forced = self.counts().get("forced_remounts", 0)
        cvmfs_standin.rmfs(self.name)
        # Lazily: podman's last container may still hold the client view for a moment.
        subprocess.run(["umount", "-R", "-l", str(self.base)], check=False,
                       capture_output=True)
        subprocess.run(["rm", "-rf", str(self.base)], check=False)
        assert forced == 0, "a transaction was closed while files were held in the client view"


class RealRepo:
    """The repository `lzp-test.example.org` of this machine's real stratum 0."""

    def __init__(self, *, include_xattrs: bool = True) -> None:
        if shutil.which("cvmfs_server") is None:
            raise RuntimeError("LAZYPOD_TEST_CVMFS=real, but cvmfs_server is not installed "
                               "(shared/tools/cvmfs-stratum0.sh build)")
        self.name = REAL_NAME
        self.base = Path(tempfile.mkdtemp(prefix="lzp-cvmfs-", dir="/tmp"))
        os.chmod(self.base, 0o755)
        self.server_view = Path("/cvmfs") / self.name
        self.client_view = Path("/var/spool/cvmfs") / self.name / "rdonly"
        self._shim_state = self.base / "shim.json"
        self._shim_state.write_text(json.dumps({"fail": {}, "log": []}))
        self.env = {
            "LAZYPOD_WORK_DIR": str(self.base / "work"),
            "LAZYPOD_TEST_CVMFS_SHIM": str(self._shim_state),
            "LAZYPOD_TEST_PYTHON": sys.executable,
            "PATH": f"{REAL_BIN}:{os.environ['PATH']}",
        }
        _release_rootless_mounts()
        self._run("abort", "-f", self.name)  # a repository left by an earlier test run
        if Path(f"/etc/cvmfs/repositories.d/{self.name}").exists():
            self._run("rmfs", "-f", self.name, check=True)
        self._run("mkfs", "-o", "root", self.name, check=True)
        conf = Path(f"/etc/cvmfs/repositories.d/{self.name}/server.conf")
        lines = [line for line in conf.read_text().splitlines()
                 if not line.startswith("CVMFS_INCLUDE_XATTRS=")]
        if include_xattrs:
            lines.append("CVMFS_INCLUDE_XATTRS=true")
        conf.write_text("\n".join(lines) + "\n")
        if "in transaction" in self.status():
            self._run("abort", "-f", self.name, check=True)

    def _run(self, *args: str, check: bool = False, input: bytes | None = None,
             ) -> subprocess.CompletedProcess[bytes]:
        proc = subprocess.run(["/usr/bin/cvmfs_server", *args], input=input,
                              stdin=None if input is not None else subprocess.DEVNULL,
                              capture_output=True, check=False)
        if check and proc.returncode != 0:
            raise RuntimeError(f"cvmfs_server {' '.join(args)} failed: "
                               f"{(proc.stdout + proc.stderr).decode()[-2000:]}")
        return proc

    def status(self) -> str:
        out = self._run("list").stdout.decode()
        return next((line for line in out.splitlines() if line.startswith(self.name + " ")),
                    "")

    def state(self) -> dict[str, Any]:
        return {"transaction": "in transaction" in self.status()}

    def _shim(self) -> dict[str, Any]:
        return json.loads(self._shim_state.read_text())

    def counts(self) -> dict[str, int]:
        counts = {"transaction": 0, "publish": 0, "abort": 0, "ingest": 0}
        for entry in self._shim()["log"]:
            command, rc = entry["args"][0], entry["rc"]
            if command in ("transaction", "abort") and rc == 0:
                counts[command] += 1
            elif command == "publish" and rc == 0:
                counts["publish"] += 1
            elif command == "ingest" and rc == 0:
                counts["ingest"] += 1
                counts["publish"] += 1
        return counts

    def ingest_started(self) -> bool:
        return any(e["args"][0] == "ingest" for e in self._shim().get("started", []))

    def publish_started(self) -> bool:
        return any(e["args"][0] == "publish" for e in self._shim().get("started", []))

    def ingests(self) -> list[list[dict[str, Any]]]:
        return [json.loads(Path(p).read_text()) for p in self._shim().get("tars", [])]

    def inject(self, **faults: Any) -> None:
        state = self._shim()
        state["fail"] = faults
        temp = self._shim_state.with_suffix(".tmp")
        temp.write_text(json.dumps(state))
        os.replace(temp, self._shim_state)

    def server(self, *args: str, input: bytes | None = None,
               check: bool = False) -> subprocess.CompletedProcess[bytes]:
        """cvmfs_server as lazypod runs it (through the shim, which counts)."""
        proc = subprocess.run([str(REAL_BIN / "cvmfs_server"), *args], input=input,
                              stdin=None if input is not None else subprocess.DEVNULL,
                              env={**os.environ, **self.env}, capture_output=True,
                              check=False)
        if check and proc.returncode != 0:
            raise AssertionError((proc.stdout + proc.stderr).decode()[-2000:])
        return proc

    def destroy(self) -> None:
        """The repository must be as a careful operator wants it after any run."""
        _release_rootless_mounts()
        status = self.status()
        check = self._run("check", self.name)
        shutil.rmtree(self.base, ignore_errors=True)
        assert "in transaction" not in status and "unhealthy" not in status, status
        assert check.returncode == 0, check.stdout.decode()[-2000:]


def _release_rootless_mounts() -> None:
    """A rootless podman's pause process keeps copies of the mounts that existed when it
    started; after a remount of the repository the old cvmfs2 client cannot exit and the
    next mount waits for its cache lock (shared/docs/CVMFS.md). End those processes."""
    from .podman import ROOTLESS_USER

    subprocess.run(["pkill", "-u", ROOTLESS_USER, "-x", "catatonit"], check=False)
    time.sleep(0.2)
