"""A CVMFS repository served by the stand-in `cvmfs_server`, and the environment that
makes lazypod (a subprocess) use it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import cvmfs_standin

BIN = Path(__file__).parent / "bin"


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

    @property
    def published(self) -> Path:
        return self.home / self.name / "published"

    def state(self) -> dict[str, Any]:
        return json.loads((self.home / self.name / "state.json").read_text())

    def ingest_started(self) -> bool:
        return (self.home / self.name / "ingest-started").exists()

    def counts(self) -> dict[str, int]:
        return dict(self.state()["counts"])

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

    def lazypod_args(self) -> list[str]:
        return ["--backend", "cvmfs", "--public-root", str(self.client_view), self.name]

    def destroy(self) -> None:
        cvmfs_standin.rmfs(self.name)
        # Lazily: podman's last container may still hold the client view for a moment.
        subprocess.run(["umount", "-R", "-l", str(self.base)], check=False,
                       capture_output=True)
        subprocess.run(["rm", "-rf", str(self.base)], check=False)
