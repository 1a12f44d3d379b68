"""The CNCF distribution registry (`docker-registry` from Debian) on loopback,
started by the test run, with its access log parsed so tests can count requests."""

from __future__ import annotations

import re
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from .images import Image

_ACCESS = re.compile(
    r'^\S+ - \S+ \[[^\]]+\] "(?P<method>[A-Z]+) (?P<path>\S+) [^"]*" (?P<status>\d+)'
    r'(?: \S+ "[^"]*" "(?P<agent>[^"]*)")?'
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    status: int
    user_agent: str = ""

    @property
    def is_blob_get(self) -> bool:
        return self.method == "GET" and "/blobs/sha256:" in self.path


class Registry:
    def __init__(self, workdir: Path, *, auth: str = "", storage: Path | None = None,
                 proxy_of: str | None = None, notifications: str = "") -> None:
        """`auth`: a registry `auth:` section (YAML, indented by two); `storage`: share
        the blobs and manifests of another registry (to read them with other auth);
        `proxy_of`: host:port of a registry this one is a pull-through cache of (over
        plain HTTP; such a registry refuses pushes); `notifications`: a `notifications:`
        section (YAML, indented by two), e.g. endpoints for a webhook."""
        self.workdir = workdir
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.log_path = workdir / "registry.log"
        self.storage = storage or workdir / "data"
        config = workdir / "config.yml"
        config.write_text(
            "version: 0.1\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.storage}\n"
            "  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.host}\n"
            "log:\n  level: info\n  accesslog:\n    disabled: false\n"
            # Foreign layers name where they live; let manifests carry such URLs.
            "validation:\n  manifests:\n    urls:\n      allow:\n        - ^https?://\n"
            + (f"auth:\n{auth}" if auth else "")
            + (f"proxy:\n  remoteurl: http://{proxy_of}\n" if proxy_of else "")
            + (f"notifications:\n{notifications}" if notifications else "")
        )
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(["docker-registry", "serve", str(config)],
                                      stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                httpx.get(f"http://{self.host}/", timeout=1)
                return
            except httpx.TransportError:
                if self._proc.poll() is not None:
                    raise RuntimeError(
                        f"docker-registry exited: {self.log_path.read_text()}") from None
                time.sleep(0.05)
        raise RuntimeError("docker-registry did not start")

    def stop(self) -> None:
        self._proc.terminate()
        self._proc.wait(10)
        self._log.close()

    # -- pushing -------------------------------------------------------------

    def push(self, name: str, tag: str, img: Image, *, auth: tuple[str, str] | None = None) -> str:
        with httpx.Client(base_url=f"http://{self.host}", auth=auth, timeout=60) as client:
            for blob in [img.config, *img.layers]:
                self.push_blob(client, name, blob.data, blob.digest)
            self.push_manifest(client, name, tag, img.manifest,
                               json_media_type(img.manifest))
        return f"{self.host}/{name}:{tag}"

    @staticmethod
    def push_blob(client: httpx.Client, name: str, data: bytes, digest: str) -> None:
        if client.head(f"/v2/{name}/blobs/{digest}").status_code == 200:
            return
        start = client.post(f"/v2/{name}/blobs/uploads/")
        start.raise_for_status()
        location = start.headers["Location"]
        sep = "&" if "?" in location else "?"
        put = client.put(f"{location}{sep}digest={digest}", content=data,
                         headers={"Content-Type": "application/octet-stream"})
        put.raise_for_status()

    @staticmethod
    def push_manifest(
        client: httpx.Client, name: str, ref: str, data: bytes, media_type: str
    ) -> None:
        resp = client.put(f"/v2/{name}/manifests/{ref}", content=data,
                          headers={"Content-Type": media_type})
        resp.raise_for_status()

    # -- the access log --------------------------------------------------------

    def mark(self) -> int:
        """A position in the log; `requests(since=mark)` lists what came after."""
        time.sleep(0.05)  # let the registry flush lines of requests already answered
        return self.log_path.stat().st_size

    def requests(self, since: int = 0) -> list[Request]:
        time.sleep(0.05)
        with self.log_path.open("rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        found = []
        for line in text.splitlines():
            match = _ACCESS.match(line)
            if match:
                found.append(Request(match["method"], match["path"], int(match["status"]),
                                     match["agent"] or ""))
        return found

    def blob_gets(self, since: int = 0) -> list[str]:
        """Digests of the blobs fetched (GET, success) since `since`."""
        return [r.path.rsplit("/", 1)[1] for r in self.requests(since)
                if r.is_blob_get and r.status < 300]


def json_media_type(data: bytes) -> str:
    import json

    return str(json.loads(data)["mediaType"])
