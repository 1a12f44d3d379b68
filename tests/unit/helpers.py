"""An in-memory registry behind `httpx.MockTransport`, and conversions through it.

The registry speaks the parts of the distribution API lazypod uses (manifests by tag
or digest, GET and HEAD, blobs, paginated tag lists) and, on request, HTTP basic or
the bearer-token challenge flow; it records every request so tests can say what
was asked, and `faults` lets a test make chosen requests fail first.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from lazypod import Converter, ConvertOptions, DirectoryBackend, RegistryClient, RunReport
from lazypod.reference import parse_reference
from support.images import Image

HOST = "registry.test"
REALM = "https://auth.test/token"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"

Fault = Callable[[httpx.Request], httpx.Response | None]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Repo:
    manifests: dict[str, tuple[bytes, str]] = field(default_factory=dict)  # ref -> (raw, type)
    blobs: dict[str, bytes] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)


class FakeRegistry:
    """`auth`: None, "basic" or "bearer"; `users`: username -> password accepted."""

    def __init__(self, *, auth: str | None = None, users: dict[str, str] | None = None,
                 tag_page: int = 0, send_digest_header: bool = True) -> None:
        self.repos: dict[str, Repo] = defaultdict(Repo)
        self.auth = auth
        self.users = users or {}
        self.tag_page = tag_page  # tags per page (0: all in one)
        self.send_digest_header = send_digest_header
        self.requests: list[httpx.Request] = []
        self.token_requests: list[httpx.Request] = []
        self.issued: dict[str, str] = {}  # token -> scope
        self.faults: list[Fault] = []  # consulted in order; the first answer wins

    # -- content ----------------------------------------------------------------------

    def push(self, repository: str, tag: str | None, img: Image) -> str:
        repo = self.repos[repository]
        for blob in [img.config, *img.layers]:
            repo.blobs[blob.digest] = blob.data
        media = json.loads(img.manifest)["mediaType"]
        repo.manifests[img.manifest_digest] = (img.manifest, media)
        if tag is not None:
            repo.manifests[tag] = (img.manifest, media)
            if tag not in repo.tags:
                repo.tags.append(tag)
        return f"{HOST}/{repository}:{tag}" if tag else f"{HOST}/{repository}@{img.manifest_digest}"

    def push_index(self, repository: str, tag: str, raw: bytes, images: list[Image]) -> str:
        for img in images:
            self.push(repository, None, img)
        repo = self.repos[repository]
        repo.manifests[sha256(raw)] = repo.manifests[tag] = (raw, OCI_INDEX)
        repo.tags.append(tag)
        return f"{HOST}/{repository}:{tag}"

    # -- the transport ----------------------------------------------------------------

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def client(self, **kwargs: Any) -> RegistryClient:
        kwargs.setdefault("auth_files", [])
        kwargs.setdefault("backoff", 0.001)
        kwargs.setdefault("retry_for", 5.0)
        return RegistryClient(transport=self.transport(), **kwargs)

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.test":
            return self._token(request)
        self.requests.append(request)
        for fault in list(self.faults):
            answer = fault(request)
            if answer is not None:
                return answer
        path = request.url.path
        if not path.startswith("/v2/"):
            return httpx.Response(404)
        repository, kind, rest = _split(path[len("/v2/"):])
        if path == "/v2/" or not kind:
            return httpx.Response(200, json={})
        denied = self._check_auth(request, repository)
        if denied is not None:
            return denied
        repo = self.repos.get(repository)
        if repo is None:
            return _error(404, "NAME_UNKNOWN")
        if kind == "manifests":
            found = repo.manifests.get(rest)
            if found is None:
                return _error(404, "MANIFEST_UNKNOWN")
            raw, media = found
            headers = {"Content-Type": media}
            if self.send_digest_header:
                headers["Docker-Content-Digest"] = sha256(raw)
            if request.method == "HEAD":
                headers["Content-Length"] = str(len(raw))
                return httpx.Response(200, headers=headers)
            return respond(200, raw, headers)
        if kind == "blobs":
            data = repo.blobs.get(rest)
            if data is None:
                return _error(404, "BLOB_UNKNOWN")
            return respond(200, data)
        if kind == "tags" and rest == "list":
            return self._tags(request, repository, repo)
        return httpx.Response(404)

    def _tags(self, request: httpx.Request, repository: str, repo: Repo) -> httpx.Response:
        tags = sorted(repo.tags)
        last = request.url.params.get("last")
        if last:
            tags = [t for t in tags if t > last]
        headers = {}
        if self.tag_page and len(tags) > self.tag_page:
            tags = tags[:self.tag_page]
            headers["Link"] = (f'</v2/{repository}/tags/list?n={self.tag_page}&last={tags[-1]}>; '
                               'rel="next"')
        return respond(200, json.dumps({"name": repository, "tags": tags}).encode(), headers)

    def _check_auth(self, request: httpx.Request, repository: str) -> httpx.Response | None:
        given = request.headers.get("Authorization", "")
        if self.auth == "basic":
            for user, password in self.users.items():
                if given == basic(user, password):
                    return None
            return httpx.Response(401, headers={"WWW-Authenticate": f'Basic realm="{HOST}"'})
        if self.auth == "bearer":
            scope = f"repository:{repository}:pull"
            token = given.removeprefix("Bearer ")
            if given.startswith("Bearer ") and self.issued.get(token) == scope:
                return None
            challenge = f'Bearer realm="{REALM}",service="{HOST}",scope="{scope}"'
            return httpx.Response(401, headers={"WWW-Authenticate": challenge})
        return None

    def _token(self, request: httpx.Request) -> httpx.Response:
        self.token_requests.append(request)
        given = request.headers.get("Authorization")
        if self.users and given not in {basic(u, p) for u, p in self.users.items()}:
            return httpx.Response(401, json={"details": "incorrect username or password"})
        scope = request.url.params.get("scope", "")
        token = f"token-{len(self.issued)}"
        self.issued[token] = scope
        return httpx.Response(200, json={"token": token})

    # -- what was asked ---------------------------------------------------------------

    def paths(self, method: str = "GET") -> list[str]:
        return [r.url.path for r in self.requests if r.method == method]

    def blob_gets(self) -> list[str]:
        return [p for p in self.paths() if "/blobs/" in p]


class Body(httpx.SyncByteStream):
    """A response body as a network transport gives it: not read yet, in chunks, and
    optionally broken off after `drop_after` bytes."""

    def __init__(self, data: bytes, *, chunk: int = 1 << 16, drop_after: int | None = None
                 ) -> None:
        self._data = data
        self._chunk = chunk
        self._drop_after = drop_after

    def __iter__(self) -> Iterator[bytes]:
        end = len(self._data) if self._drop_after is None else self._drop_after
        for start in range(0, end, self._chunk):
            yield self._data[start:min(start + self._chunk, end)]
        if self._drop_after is not None:
            raise httpx.RemoteProtocolError("peer closed connection without sending "
                                            "complete message body")


def respond(status: int, data: bytes, headers: dict[str, str] | None = None, *,
            drop_after: int | None = None) -> httpx.Response:
    """A streamed response (httpx's `content=` would be read already, as no network
    response is)."""
    all_headers = {"Content-Length": str(len(data)), **(headers or {})}
    return httpx.Response(status, headers=all_headers, stream=Body(data, drop_after=drop_after))


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _split(rest: str) -> tuple[str, str, str]:
    """`library/app/manifests/1` -> ("library/app", "manifests", "1")."""
    for kind in ("manifests", "blobs", "tags"):
        marker = f"/{kind}/"
        if marker in rest:
            repository, _, tail = rest.rpartition(marker)
            return repository, kind, tail
    return rest, "", ""


def _error(status: int, code: str) -> httpx.Response:
    body = {"errors": [{"code": code, "message": code.lower()}]}
    return respond(status, json.dumps(body).encode())


def status_once(status: int, *, path_part: str = "", times: int = 1,
                headers: dict[str, str] | None = None) -> Fault:
    """A fault: the first `times` requests whose path contains `path_part` get `status`."""
    left = [times]

    def fault(request: httpx.Request) -> httpx.Response | None:
        if left[0] > 0 and path_part in request.url.path:
            left[0] -= 1
            return httpx.Response(status, headers=headers or {})
        return None

    return fault


# -- conversions through the fake registry ------------------------------------------------

def convert(registry: FakeRegistry, root: Path, *names: str,
            options: ConvertOptions | None = None) -> RunReport:
    """Convert `names` into the directory repository `root`, all in this process."""
    with registry.client() as client:
        converter = Converter(DirectoryBackend(root), client, options or ConvertOptions(workers=2))
        report = converter.convert([parse_reference(n, allow_wildcard="*" in n)
                                    for n in names])
    errors = [f"{i.reference}: {i.error}" for i in report.images if i.error]
    assert not errors and not report.rejected, (errors, report.rejected)
    return report


def tree(root: Path) -> dict[str, str]:
    """What a directory holds, one word per entry: `file:<content>`, `dir`, `link:<target>`,
    `whiteout`, `fifo`, `char`, ... (enough to compare with overlayfs's view)."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            out[str(path.relative_to(root))] = describe(path)
    return out


def describe(path: Path) -> str:
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        return f"link:{os.readlink(path)}"
    if stat.S_ISDIR(st.st_mode):
        return "dir"
    if stat.S_ISREG(st.st_mode):
        try:
            return "file:" + path.read_bytes().decode(errors="replace")
        except PermissionError:  # mode 0000, read by an ordinary user
            return "file:?"
    if stat.S_ISCHR(st.st_mode):
        return "whiteout" if st.st_rdev == 0 else "char"
    if stat.S_ISFIFO(st.st_mode):
        return "fifo"
    return "other"


def walk_names(root: Path) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            yield str(Path(dirpath, name).relative_to(root))


IS_ROOT = os.geteuid() == 0
