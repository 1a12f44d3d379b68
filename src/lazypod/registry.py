"""A client for the OCI distribution API v2 (what docker.io, quay.io, GitLab and the
CNCF `registry` serve).

Auth: anonymous, HTTP basic, and the bearer-token challenge flow; credentials come
from `auth.find_credentials` and never reach a log line (httpx drops the
Authorization header on cross-origin redirects, so blob redirects to object
stores do not leak it either). Transient failures (connection drops, 429, 5xx)
are retried with exponential backoff, honouring Retry-After. Plain HTTP is used
only for registries the user declared insecure (`--insecure-registry`,
registries.conf `insecure = true`, or an `http://` DUCC URL).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import re
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from . import __version__
from .auth import Credentials, find_credentials
from .digest import Digest, VerifyingReader
from .errors import (
    AuthenticationFailed,
    ImageNotFound,
    IntegrityError,
    RegistryError,
    RegistryUnreachable,
    UnsupportedImage,
)
from .manifest import (
    ACCEPTED_MANIFEST_TYPES,
    Descriptor,
    ImageConfig,
    ImageManifest,
    ManifestIndex,
    Platform,
    parse_manifest,
)
from .reference import ImageReference

__all__ = ["RegistryClient", "ResolvedImage", "insecure_registries_from_conf"]

log = logging.getLogger(__name__)

MAX_MANIFEST_SIZE = 4 << 20
MAX_CONFIG_SIZE = 8 << 20
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True)
class ResolvedImage:
    """One platform's image as the registry serves it, manifest and config verified."""

    reference: ImageReference
    manifest: ImageManifest
    config: ImageConfig
    index: ManifestIndex | None = None


class _Transport:
    """One registry host: which scheme works, which tokens we hold."""

    def __init__(self, host: str, scheme: str | None) -> None:
        self.host = host
        self.scheme = scheme
        self.tokens: dict[str, str] = {}  # scope -> Authorization header value


class RegistryClient:
    """Fetch manifests, configs and blobs. Thread-safe for concurrent blob downloads."""

    def __init__(
        self,
        *,
        insecure: Iterable[str] = (),
        attempts: int = 4,
        backoff: float = 0.5,
        timeout: float = 60.0,
        auth_files: Iterable[Path] | None = None,
    ) -> None:
        self._insecure = set(insecure) | insecure_registries_from_conf()
        self._attempts = max(1, attempts)
        self._backoff = backoff
        self._auth_files = list(auth_files) if auth_files is not None else None
        headers = {"User-Agent": f"lazypod/{__version__}", "Accept-Encoding": "identity"}
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=16)
        tmo = httpx.Timeout(timeout, connect=15.0)
        self._http = httpx.Client(headers=headers, limits=limits, timeout=tmo,
                                  follow_redirects=True)
        self._http_noverify = httpx.Client(headers=headers, limits=limits, timeout=tmo,
                                           follow_redirects=True, verify=False)
        self._transports: dict[str, _Transport] = {}
        self._credentials: dict[tuple[str, str], Credentials | None] = {}

    def close(self) -> None:
        self._http.close()
        self._http_noverify.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- public API -------------------------------------------------------

    def resolve(
        self,
        ref: ImageReference,
        platform: Platform | None = None,
        known_config: Callable[[Digest], bytes | None] | None = None,
    ) -> ResolvedImage:
        """Fetch and verify the manifest (choosing a platform from an index) and the config.

        `known_config` may supply the config from a local copy (verified here), so a
        conversion that is already done downloads no blob at all."""
        top = self.get_manifest(ref, ref.manifest_ref)
        if ref.digest is not None and top.digest != ref.digest:
            raise IntegrityError(f"manifest of {ref} has digest {top.digest}, not {ref.digest}")
        index: ManifestIndex | None = None
        manifest = top
        if isinstance(top, ManifestIndex):
            index = top
            entry = top.select(platform or Platform.host())
            manifest = self.get_manifest(ref, str(entry.digest))
            if manifest.digest != entry.digest:
                raise IntegrityError(f"manifest {entry.digest} of {ref} does not match its digest")
            if isinstance(manifest, ManifestIndex):
                raise UnsupportedImage(f"{ref}: an index inside an index is not supported")
        assert isinstance(manifest, ImageManifest)
        config_raw = known_config(manifest.config.digest) if known_config else None
        if config_raw is None or Digest.of(config_raw, manifest.config.digest.algorithm) != \
                manifest.config.digest:
            config_raw = self.get_blob_bytes(ref, manifest.config, MAX_CONFIG_SIZE, "image config")
        config = ImageConfig.parse(config_raw, manifest.config.digest)
        wanted = [layer for layer in manifest.layers if not layer.is_foreign]
        if len(config.diff_ids) != len(manifest.layers):
            raise UnsupportedImage(
                f"{ref}: the config lists {len(config.diff_ids)} layers but the manifest "
                f"{len(manifest.layers)}"
            )
        for layer in wanted:
            _ = layer.compression  # raise early on layer types we cannot unpack
        return ResolvedImage(ref, manifest, config, index)

    def get_manifest(self, ref: ImageReference, reference: str) -> ImageManifest | ManifestIndex:
        path = f"/v2/{ref.repository}/manifests/{reference}"
        headers = {"Accept": ", ".join(ACCEPTED_MANIFEST_TYPES)}
        with self._stream(ref, "GET", path, headers=headers, what=f"manifest of {ref}") as resp:
            raw = _read_limited(resp, MAX_MANIFEST_SIZE, f"manifest of {ref}")
            content_type = resp.headers.get("Content-Type")
        digest = Digest.of(raw)
        if reference.startswith("sha") and ":" in reference:
            expected = Digest.parse(reference)
            digest = Digest.of(raw, expected.algorithm)
            if digest != expected:
                raise IntegrityError(
                    f"manifest {expected} of {ref} does not match its digest: the registry "
                    "served corrupt content"
                )
        return parse_manifest(raw, content_type, digest)

    def get_blob_bytes(self, ref: ImageReference, desc: Descriptor, limit: int, what: str) -> bytes:
        if desc.size > limit:
            raise UnsupportedImage(f"{what} {desc.digest} of {ref} is {desc.size} bytes: too big")
        with self.open_blob(ref, desc, what=what) as reader:
            data = reader.read(desc.size + 1)
            while True:
                more = reader.read(1 << 16)
                if not more:
                    break
                data += more
        return data

    @contextlib.contextmanager
    def open_blob(
        self, ref: ImageReference, desc: Descriptor, what: str = "blob"
    ) -> Iterator[VerifyingReader]:
        """A reader of the blob that raises IntegrityError at end of stream on a digest or
        size mismatch, and RegistryUnreachable if the connection drops mid-stream."""
        path = f"/v2/{ref.repository}/blobs/{desc.digest}"
        with self._stream(ref, "GET", path, what=f"{what} {desc.digest.short} of {ref}") as resp:
            raw = _ResponseReader(resp, f"{what} {desc.digest} of {ref}")
            yield VerifyingReader(raw, desc.digest, desc.size, what=what)

    def list_tags(self, ref: ImageReference) -> list[str]:
        tags: list[str] = []
        path: str | None = f"/v2/{ref.repository}/tags/list?n=1000"
        while path:
            with self._stream(ref, "GET", path, what=f"tags of {ref}") as resp:
                body = _read_limited(resp, 16 << 20, f"tags of {ref}")
                link = resp.headers.get("Link")
            try:
                tags.extend(json.loads(body).get("tags") or [])
            except (ValueError, AttributeError):
                raise RegistryError(f"registry {ref.registry} sent a malformed tag list") from None
            path = _next_link(link)
        return tags

    # ---- transport --------------------------------------------------------

    def _transport(self, ref: ImageReference) -> _Transport:
        host = ref.api_host
        transport = self._transports.get(host)
        if transport is None:
            scheme = ref.scheme if ref.scheme == "http" else None
            if scheme is None and not self._is_insecure(ref):
                scheme = "https"
            transport = self._transports[host] = _Transport(host, scheme)
        return transport

    def _is_insecure(self, ref: ImageReference) -> bool:
        return ref.registry in self._insecure or ref.api_host in self._insecure

    def _creds(self, ref: ImageReference) -> Credentials | None:
        key = (ref.podman_registry, ref.repository)
        if key not in self._credentials:
            self._credentials[key] = find_credentials(
                ref.podman_registry, ref.repository, self._auth_files
            )
        return self._credentials[key]

    @contextlib.contextmanager
    def _stream(
        self,
        ref: ImageReference,
        method: str,
        path: str,
        *,
        what: str,
        headers: dict[str, str] | None = None,
    ) -> Iterator[httpx.Response]:
        transport = self._transport(ref)
        scope = f"repository:{ref.repository}:pull"
        authed_once = False
        attempt = 0
        while True:
            attempt += 1
            url = f"{self._scheme(transport, ref)}://{transport.host}{path}"
            req_headers = dict(headers or {})
            if scope in transport.tokens:
                req_headers["Authorization"] = transport.tokens[scope]
            client = self._client_for(transport, ref)
            try:
                request = client.build_request(method, url, headers=req_headers)
                resp = client.send(request, stream=True)
            except httpx.TransportError as exc:
                if attempt < self._attempts:
                    self._sleep(attempt, None, what, exc.__class__.__name__)
                    continue
                raise RegistryUnreachable(_unreachable_message(ref, exc)) from None
            try:
                if resp.status_code == 401 and not authed_once:
                    authed_once = True
                    challenge = resp.headers.get("WWW-Authenticate", "")
                    resp.close()
                    transport.tokens[scope] = self._authenticate(ref, challenge, scope)
                    attempt -= 1
                    continue
                if resp.status_code in _RETRY_STATUS and attempt < self._attempts:
                    retry_after = resp.headers.get("Retry-After")
                    resp.close()
                    self._sleep(attempt, retry_after, what, f"HTTP {resp.status_code}")
                    continue
                if resp.status_code >= 400:
                    body = resp.read()[:4096] if resp.status_code != 416 else b""
                    raise _http_error(ref, resp.status_code, body, what, self._creds(ref))
                yield resp
                return
            finally:
                resp.close()

    def _scheme(self, transport: _Transport, ref: ImageReference) -> str:
        if transport.scheme is None:
            # An insecure registry: HTTPS without verification if it speaks TLS, else HTTP.
            try:
                self._http_noverify.get(f"https://{transport.host}/v2/", timeout=5.0)
                transport.scheme = "https"
            except httpx.TransportError:
                transport.scheme = "http"
            log.debug("registry %s: using %s", transport.host, transport.scheme)
        return transport.scheme

    def _client_for(self, transport: _Transport, ref: ImageReference) -> httpx.Client:
        return self._http_noverify if self._is_insecure(ref) else self._http

    def _sleep(self, attempt: int, retry_after: str | None, what: str, why: str) -> None:
        delay = self._backoff * (2 ** (attempt - 1))
        if retry_after and retry_after.isdigit():
            delay = max(delay, min(float(retry_after), 60.0))
        log.warning("%s: %s, retrying in %.1fs (attempt %d of %d)", what, why, delay,
                    attempt + 1, self._attempts)
        time.sleep(delay)

    def _authenticate(self, ref: ImageReference, challenge: str, scope: str) -> str:
        creds = self._creds(ref)
        kind, _, params_text = challenge.partition(" ")
        params = dict(_CHALLENGE_PARAM.findall(params_text))
        if kind.lower() == "basic":
            if creds is None:
                raise AuthenticationFailed(
                    f"registry {ref.registry} requires a login: run `podman login "
                    f"{ref.podman_registry}` (lazypod reads podman's auth.json)"
                )
            return _basic_header(creds)
        if kind.lower() != "bearer" or "realm" not in params:
            raise AuthenticationFailed(
                f"registry {ref.registry} asked for an unsupported authentication "
                f"scheme {kind!r}"
            )
        query = {"scope": params.get("scope", scope)}
        if "service" in params:
            query["service"] = params["service"]
        auth = (creds.username, creds.password) if creds and creds.username != "<token>" else None
        try:
            resp = self._http.get(params["realm"], params=query, auth=auth)
        except httpx.TransportError as exc:
            raise RegistryUnreachable(
                f"token service {params['realm']} of {ref.registry} is unreachable: {exc}"
            ) from None
        if resp.status_code in (401, 403):
            hint = (
                f"the credentials from {creds.source} were rejected: run `podman login "
                f"{ref.podman_registry}` again"
                if creds
                else f"a login is needed: run `podman login {ref.podman_registry}`"
            )
            raise AuthenticationFailed(f"registry {ref.registry} refused access to "
                                       f"{ref.repository}: {hint}")
        if resp.status_code >= 400:
            raise RegistryError(
                f"token service of {ref.registry} answered HTTP {resp.status_code}"
            )
        try:
            body = resp.json()
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not token:
            raise AuthenticationFailed(f"token service of {ref.registry} sent no token")
        return f"Bearer {token}"


def _basic_header(creds: Credentials) -> str:
    raw = f"{creds.username}:{creds.password}".encode()
    return "Basic " + base64.b64encode(raw).decode()


def _unreachable_message(ref: ImageReference, exc: httpx.TransportError) -> str:
    reason = str(exc) or exc.__class__.__name__
    hint = "check the name, the network and the proxy settings"
    if "SSL" in reason or "certificate" in reason.lower() or "wrong version" in reason:
        hint = (
            f"if {ref.registry} serves plain HTTP, allow it with "
            f"--insecure-registry {ref.registry}"
        )
    return f"registry {ref.registry} is unreachable ({reason}): {hint}"


def _http_error(
    ref: ImageReference, status: int, body: bytes, what: str, creds: Credentials | None
) -> RegistryError:
    codes: list[str] = []
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        codes = [str(e.get("code")) for e in json.loads(body).get("errors", [])]
    unknown = {"MANIFEST_UNKNOWN", "NAME_UNKNOWN", "BLOB_UNKNOWN", "TAG_INVALID"}
    if status == 404 or unknown.intersection(codes):
        return ImageNotFound(f"{what}: not found in registry {ref.registry} "
                             "(check the repository name and tag)")
    if status in (401, 403):
        if creds is None:
            return AuthenticationFailed(
                f"{what}: access denied by {ref.registry}; the image may not exist, or it "
                f"needs a login (`podman login {ref.podman_registry}`)"
            )
        return AuthenticationFailed(
            f"{what}: access denied by {ref.registry} with the credentials from "
            f"{creds.source}; check them with `podman login {ref.podman_registry}`"
        )
    if status == 429:
        return RegistryError(f"{what}: {ref.registry} keeps rate-limiting us (HTTP 429); "
                             "retry later or log in for a higher limit")
    return RegistryError(f"{what}: registry {ref.registry} answered HTTP {status}"
                         + (f" ({', '.join(codes)})" if codes else ""))


def _read_limited(resp: httpx.Response, limit: int, what: str) -> bytes:
    data = bytearray()
    try:
        for chunk in resp.iter_raw():
            data += chunk
            if len(data) > limit:
                raise UnsupportedImage(f"{what} is larger than {limit} bytes")
    except httpx.TransportError as exc:
        raise RegistryUnreachable(f"{what}: connection dropped ({exc})") from None
    return bytes(data)


def _next_link(link: str | None) -> str | None:
    if not link:
        return None
    match = re.search(r"<([^>]+)>\s*;\s*rel=\"?next\"?", link)
    if not match:
        return None
    target = match.group(1)
    if "://" in target:
        target = "/" + target.split("://", 1)[1].split("/", 1)[1]
    return target


class _ResponseReader:
    """A file-like view of a streamed response body that translates transport errors."""

    def __init__(self, resp: httpx.Response, what: str) -> None:
        self._chunks = resp.iter_raw(1 << 20)
        self._buffer = b""
        self._what = what

    def read(self, n: int = -1) -> bytes:
        try:
            if n < 0:
                rest = self._buffer + b"".join(self._chunks)
                self._buffer = b""
                return rest
            while len(self._buffer) < n:
                chunk = next(self._chunks, None)
                if chunk is None:
                    break
                if not self._buffer and len(chunk) >= n:
                    self._buffer = chunk
                    break
                self._buffer += chunk
        except httpx.TransportError as exc:
            raise RegistryUnreachable(f"{self._what}: connection dropped ({exc})") from None
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data


def insecure_registries_from_conf() -> set[str]:
    """Registries marked `insecure = true` in podman's registries.conf (v2 and v1 formats)."""
    env = os.environ.get("CONTAINERS_REGISTRIES_CONF")
    user_conf = Path.home() / ".config" / "containers" / "registries.conf"
    if env:
        files = [Path(env)]
    elif os.geteuid() != 0 and user_conf.exists():
        files = [user_conf]
    else:
        files = [Path("/etc/containers/registries.conf")]
    dropin_dir = files[0].parent / "registries.conf.d"
    if dropin_dir.is_dir():
        files += sorted(dropin_dir.glob("*.conf"))
    found: set[str] = set()
    for path in files:
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError):
            continue
        for entry in data.get("registry", []) or []:
            if isinstance(entry, dict) and entry.get("insecure"):
                loc = str(entry.get("location") or entry.get("prefix") or "")
                if loc:
                    found.add(loc.split("/", 1)[0])
        legacy = (data.get("registries") or {}).get("insecure") or {}
        found.update(str(r) for r in legacy.get("registries", []) or [])
    return found

