"""A synthetic registry for scale benchmarks: N images of 3 layers (a base shared by
all, a layer shared by groups of 10, a layer of its own), served from memory with the
distribution API (GET and HEAD manifests with Docker-Content-Digest, blobs, tag
lists) behind Docker Hub's bearer-token flow, with a chosen round-trip time added to
every request (token requests included).

    with SyntheticRegistry(images=1000, repositories=100, rtt=0.05) as registry:
        registry.names   # ["127.0.0.1:PORT/bench/r007:t3", ...]
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import json
import secrets
import socketserver
import tarfile
import threading
import time
from dataclasses import dataclass
from urllib.parse import parse_qs, urlparse

__all__ = ["SyntheticRegistry"]

_BUSYBOX = "/bin/busybox"


def _tar(files: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs = sorted({"/".join(p.split("/")[:i]) for p in files for i in
                       range(1, p.count("/") + 1)})
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            tar.addfile(info)
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o755, 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
        for name, target in sorted((links or {}).items()):
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.mtime = tarfile.SYMTYPE, target, 1_700_000_000
            tar.addfile(info)
    return buf.getvalue()


@dataclass
class _Blob:
    data: bytes
    media_type: str = "application/vnd.oci.image.layer.v1.tar+gzip"

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.data).hexdigest()


def _layer(raw: bytes) -> tuple[_Blob, str]:
    return _Blob(gzip.compress(raw, compresslevel=1, mtime=0)), \
        "sha256:" + hashlib.sha256(raw).hexdigest()


class SyntheticRegistry:
    def __init__(self, *, images: int, repositories: int = 100, rtt: float = 0.0,
                 port: int = 0) -> None:
        """`port`: 0 for any; a fixed one serves a kept repository's images again (their
        names hold the registry's address, and the content is the same every time)."""
        self.rtt = rtt
        self.requests = 0
        self._blobs: dict[str, _Blob] = {}
        self._manifests: dict[tuple[str, str], tuple[bytes, str]] = {}  # (repo, ref)
        self._tags: dict[str, list[str]] = {}
        self._tokens: set[str] = set()
        self._lock = threading.Lock()
        base_raw = _tar({"bin/busybox": open(_BUSYBOX, "rb").read()},  # noqa: SIM115
                        {f"bin/{a}": "busybox" for a in ("sh", "cat", "ls")})
        base, base_diff = _layer(base_raw)
        self._add(base)
        groups: dict[int, tuple[_Blob, str]] = {}
        self.names: list[str] = []
        self._server = _Server(("127.0.0.1", port), _Handler)
        self._server.registry = self
        self.host = f"127.0.0.1:{self._server.server_address[1]}"
        for i in range(images):
            group = i // 10
            if group not in groups:
                groups[group] = _layer(_tar({f"opt/group-{group}/lib": b"g" * 2048}))
                self._add(groups[group][0])
            top, top_diff = _layer(_tar({f"opt/app-{i}/run": f"#!/bin/sh\necho {i}\n".encode()}))
            self._add(top)
            layers = [(base, base_diff), groups[group], (top, top_diff)]
            config = json.dumps({
                "architecture": "amd64", "os": "linux", "created": "2024-01-01T00:00:00Z",
                "config": {"Cmd": [f"/opt/app-{i}/run"]},
                "rootfs": {"type": "layers", "diff_ids": [d for _, d in layers]},
            }, sort_keys=True).encode()
            config_blob = _Blob(config, "application/vnd.oci.image.config.v1+json")
            self._add(config_blob)
            manifest = json.dumps({
                "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": config_blob.media_type, "digest": config_blob.digest,
                           "size": len(config)},
                "layers": [{"mediaType": b.media_type, "digest": b.digest, "size": len(b.data)}
                           for b, _ in layers],
            }, indent=2).encode()
            repo, tag = f"bench/r{i % repositories:03d}", f"t{i // repositories}"
            digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
            media = "application/vnd.oci.image.manifest.v1+json"
            self._manifests[(repo, tag)] = self._manifests[(repo, digest)] = (manifest, media)
            self._tags.setdefault(repo, []).append(tag)
            self.names.append(f"{self.host}/{repo}:{tag}")
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _add(self, blob: _Blob) -> None:
        self._blobs[blob.digest] = blob

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> SyntheticRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512
    registry: SyntheticRegistry


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else small responses wait for delayed ACKs (40 ms)
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        registry = self.server.registry
        with registry._lock:
            registry.requests += 1
        if registry.rtt:
            time.sleep(registry.rtt)
        url = urlparse(self.path)
        if url.path == "/token":
            token = secrets.token_hex(16)
            with registry._lock:
                registry._tokens.add(token)
            scope = parse_qs(url.query).get("scope", [""])[0]
            self._send(200, json.dumps({"token": token, "scope": scope}).encode(),
                       "application/json", head)
            return
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in registry._tokens:
            parts = url.path.split("/")
            repo = "/".join(parts[2:4]) if len(parts) > 3 else ""
            self.send_response(401)
            self.send_header("WWW-Authenticate", f'Bearer realm="http://{registry.host}/token",'
                             f'service="synthetic",scope="repository:{repo}:pull"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        parts = url.path.split("/")  # /v2/bench/rNNN/<kind>/<ref>
        if len(parts) < 6 or parts[1] != "v2":
            self._send(404, b"{}", "application/json", head)
            return
        repo, kind, ref = f"{parts[2]}/{parts[3]}", parts[4], parts[5]
        if kind == "manifests" and (repo, ref) in registry._manifests:
            data, media = registry._manifests[(repo, ref)]
            self._send(200, data, media, head,
                       {"Docker-Content-Digest": "sha256:" + hashlib.sha256(data).hexdigest()})
        elif kind == "blobs" and ref in registry._blobs:
            self._send(200, registry._blobs[ref].data, "application/octet-stream", head)
        elif kind == "tags":
            body = json.dumps({"name": repo, "tags": registry._tags.get(repo, [])}).encode()
            self._send(200, body, "application/json", head)
        else:
            self._send(404, json.dumps({"errors": [{"code": "MANIFEST_UNKNOWN"}]}).encode(),
                       "application/json", head)

    def _send(self, status: int, body: bytes, media: str, head: bool,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", media)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)
