"""A misbehaving front for the real registry: serves everything it proxies, except
that it can corrupt, truncate or slow down chosen blobs, or drop a connection."""

from __future__ import annotations

import http.server
import threading
import time
from dataclasses import dataclass, field

import httpx

from .registry import free_port


@dataclass
class Faults:
    corrupt: set[str] = field(default_factory=set)   # blob digests: flip a byte
    truncate: set[str] = field(default_factory=set)  # blob digests: stop half-way
    drop_once: set[str] = field(default_factory=set)  # path suffixes: close mid-body once
    slow: dict[str, float] = field(default_factory=dict)  # digest -> seconds per 64 KiB
    status: dict[str, int] = field(default_factory=dict)  # path suffix -> forced status
    status_once: dict[str, int] = field(default_factory=dict)  # the same, one time
    status_times: dict[str, list[int]] = field(default_factory=dict)  # suffix -> [status, n]


class FaultyProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.faults = Faults()
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self._forward(head=True)

            def do_GET(self) -> None:
                self._forward(head=False)

            def _forward(self, head: bool) -> None:
                faults = proxy.faults
                once = [s for s in faults.status_once if self.path.endswith(s)]
                times = []
                for suffix, (status, left) in list(faults.status_times.items()):
                    if self.path.endswith(suffix) and left > 0:
                        faults.status_times[suffix] = [status, left - 1]
                        times.append((suffix, status))
                for suffix, status in [*faults.status.items(), *times,
                                       *((s, faults.status_once.pop(s)) for s in once)]:
                    if self.path.endswith(suffix):
                        self.send_response(status)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                with httpx.Client() as client:
                    resp = client.request("HEAD" if head else "GET",
                                          f"http://{proxy.upstream}{self.path}", headers=headers)
                body = resp.content
                digest = self.path.rsplit("/", 1)[-1] if "/blobs/" in self.path else ""
                self.send_response(resp.status_code)
                for k, v in resp.headers.items():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body) if not head else
                                                       resp.headers.get("content-length", 0)))
                self.end_headers()
                if head:
                    return
                if digest in faults.corrupt:
                    body = body[:-10] + bytes([body[-10] ^ 0xFF]) + body[-9:]
                if digest in faults.truncate:
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True
                    return
                dropped = next((k for k in faults.drop_once if self.path.endswith(k)), None)
                if dropped is not None:
                    faults.drop_once.discard(dropped)
                    self.wfile.write(body[: len(body) // 3])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                delay = faults.slow.get(digest)
                try:
                    if delay:
                        for i in range(0, len(body), 1 << 16):
                            self.wfile.write(body[i:i + (1 << 16)])
                            self.wfile.flush()
                            time.sleep(delay)
                    else:
                        self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client went away (killed on purpose)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
