"""A client for the OCI distribution API v2 (what docker.io, quay.io, GitLab and the
CNCF `registry` serve).

Every request follows the image's route (`routes`): DUCC's pull-through proxy, or
registries.conf mirrors before the origin. Auth: anonymous, HTTP basic, and the
bearer-token challenge flow; credentials come from DUCC_AUTH_REGISTRIES, then
`auth.find_credentials`, and never reach a log line (httpx drops the
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
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import httpx

from . import __version__
from .auth import Credentials, find_credentials
from .digest import Digest, VerifyingReader
from .errors import (
    AuthenticationFailed,
    ImageNotFound,
    IntegrityError,
    LazypodError,
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
from .routes import Routes
from .sources.base import (
    MAX_CONFIG_SIZE,
    MAX_MANIFEST_SIZE,
    ResolvedImage,
    checked_image,
    expand_tags,
)
from .sources.registry_io import (
    HTTPX_ERRORS,
    BytesReader,
    Dropped,
    ResponseReader,
    RetryBudget,
    next_link,
    read_limited,
)

__all__ = ["MAX_CONFIG_SIZE", "RegistryClient", "ResolvedImage", "checked_image"]

log = logging.getLogger(__name__)

_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')
_T = TypeVar("_T")


class _Transport:
    """One registry host: which scheme works, which tokens we hold."""

    def __init__(self, host: str, scheme: str | None) -> None:
        self.host = host
        self.scheme = scheme
        self.tokens: dict[str, str] = {}  # scope -> Authorization header value
        self.lock = threading.Lock()  # the fields above
        self._scope_locks: dict[str, threading.Lock] = {}

    def scope_lock(self, scope: str) -> threading.Lock:
        """One token request per scope at a time; scopes (repositories) in parallel."""
        with self.lock:
            return self._scope_locks.setdefault(scope, threading.Lock())


class RegistryClient:
    """Fetch manifests, configs and blobs; thread-safe (blobs are fetched concurrently).
    The registry's `ImageSource` (`lazypod.sources`).

    `insecure`: registries (host[:port]) reached over plain HTTP or unverified TLS.
    `routes`: proxies, mirrors and DUCC logins (default: every image from its registry).
    `retry_for`: how long transient failures of one request are retried.
    `transport`: an httpx transport to use instead of the network (tests)."""

    def __init__(
        self,
        *,
        insecure: Iterable[str] = (),
        routes: Routes | None = None,
        retry_for: float = 60.0,
        backoff: float = 0.5,
        timeout: float = 60.0,
        auth_files: Iterable[Path] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._insecure = set(insecure)
        self._routes = routes or Routes()
        self._retry_for = retry_for
        self._backoff = backoff
        self._auth_files = list(auth_files) if auth_files is not None else None
        headers = {"User-Agent": f"lazypod/{__version__}", "Accept-Encoding": "identity"}
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=16)
        tmo = httpx.Timeout(timeout, connect=15.0)
        self._http = httpx.Client(headers=headers, limits=limits, timeout=tmo,
                                  follow_redirects=True, transport=transport)
        self._http_noverify = httpx.Client(headers=headers, limits=limits, timeout=tmo,
                                           follow_redirects=True, verify=False,
                                           transport=transport)
        self._transports: dict[str, _Transport] = {}
        self._credentials: dict[tuple[str, str], Credentials | None] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        self._http.close()
        self._http_noverify.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- public API (ImageSource) -----------------------------------------

    def expand(self, ref: ImageReference) -> list[ImageReference]:
        return expand_tags(self, ref)

    def head_digest(self, ref: ImageReference) -> Digest | None:
        """The digest the registry gives for the tag (or digest) with a HEAD request,
        which Docker Hub does not count against its pull limit; None when the registry
        gives no `Docker-Content-Digest`."""
        headers = {"Accept": ", ".join(ACCEPTED_MANIFEST_TYPES)}

        def attempt(at: ImageReference, last: bool) -> str | None:
            path = f"/v2/{at.repository}/manifests/{ref.manifest_ref}"
            with self._stream(at, "HEAD", path, headers=headers, what=f"manifest of {ref}",
                              retry=self._retry(f"manifest of {ref}", last)) as resp:
                found = resp.headers.get("Docker-Content-Digest")
                return str(found) if found else None

        value = self._follow(ref, attempt)
        try:
            return Digest.parse(value) if value else None
        except LazypodError:
            return None

    def resolve_manifest(
        self, ref: ImageReference, platform: Platform | None = None
    ) -> tuple[ManifestIndex | None, ImageManifest]:
        """Fetch and verify the manifest, choosing a platform from an index."""
        top = self.get_manifest(ref, ref.manifest_ref)
        if ref.digest is not None and top.digest != ref.digest:
            raise IntegrityError(f"manifest of {ref} has digest {top.digest}, not {ref.digest}")
        if not isinstance(top, ManifestIndex):
            return None, top
        entry = top.select(platform or Platform.host())
        manifest = self.get_manifest(ref, str(entry.digest))
        if manifest.digest != entry.digest:
            raise IntegrityError(f"manifest {entry.digest} of {ref} does not match its digest")
        if isinstance(manifest, ManifestIndex):
            raise UnsupportedImage(f"{ref}: an index inside an index is not supported")
        return top, manifest

    def get_config(self, ref: ImageReference, manifest: ImageManifest) -> ImageConfig:
        raw = self.get_blob_bytes(ref, manifest.config, MAX_CONFIG_SIZE, "image config")
        return ImageConfig.parse(raw, manifest.config.digest)

    def resolve(self, ref: ImageReference, platform: Platform | None = None) -> ResolvedImage:
        """Manifest (platform chosen) and config, both verified."""
        index, manifest = self.resolve_manifest(ref, platform)
        config = self.get_config(ref, manifest)
        return checked_image(ref, manifest, config, index)

    def get_manifest(self, ref: ImageReference, reference: str) -> ImageManifest | ManifestIndex:
        """The manifest `reference` (a tag or digest) of `ref`'s repository; a digest
        is verified (an endpoint that fails it is passed over, as any failure)."""
        headers = {"Accept": ", ".join(ACCEPTED_MANIFEST_TYPES)}
        what = f"manifest of {ref}"

        def attempt(at: ImageReference, last: bool) -> ImageManifest | ManifestIndex:
            path = f"/v2/{at.repository}/manifests/{reference}"
            raw, resp_headers = self._get_bytes(at, path, headers=headers, what=what,
                                                limit=MAX_MANIFEST_SIZE, last=last)
            digest = Digest.of(raw)
            if reference.startswith("sha") and ":" in reference:
                expected = Digest.parse(reference)
                digest = Digest.of(raw, expected.algorithm)
                if digest != expected:
                    raise IntegrityError(
                        f"manifest {expected} of {ref} does not match its digest: registry "
                        f"{at.registry} served corrupt content")
            return parse_manifest(raw, resp_headers.get("Content-Type"), digest)

        return self._follow(ref, attempt)

    def get_blob_bytes(self, ref: ImageReference, desc: Descriptor, limit: int, what: str) -> bytes:
        """A small blob (a config), whole and verified; a drop is retried."""
        if desc.size > limit:
            raise UnsupportedImage(f"{what} {desc.digest} of {ref} is {desc.size} bytes: too big")

        def attempt(at: ImageReference, last: bool) -> bytes:
            raw, _ = self._get_bytes(at, f"/v2/{at.repository}/blobs/{desc.digest}",
                                     what=f"{what} {desc.digest.short} of {ref}", limit=limit,
                                     last=last)
            reader = VerifyingReader(BytesReader(raw), desc.digest, desc.size, what=what)
            return reader.read(-1) + reader.read(1)

        return self._follow(ref, attempt)

    @contextlib.contextmanager
    def open_blob(
        self, ref: ImageReference, desc: Descriptor, what: str = "blob"
    ) -> Iterator[VerifyingReader]:
        """A reader of the blob that raises IntegrityError at end of stream on a digest or
        size mismatch, and RegistryUnreachable if the connection drops mid-stream (the
        route is followed only until a response starts: a body is never switched)."""
        label = f"{what} {desc.digest.short} of {ref}"
        with contextlib.ExitStack() as stack:
            resp = self._follow(ref, lambda at, last: stack.enter_context(self._stream(
                at, "GET", f"/v2/{at.repository}/blobs/{desc.digest}", what=label,
                retry=self._retry(label, last))))
            raw = ResponseReader(resp, f"{what} {desc.digest} of {ref}")
            yield VerifyingReader(raw, desc.digest, desc.size, what=what)

    def list_tags(self, ref: ImageReference) -> list[str]:
        def attempt(at: ImageReference, last: bool) -> list[str]:
            tags: list[str] = []
            path: str | None = f"/v2/{at.repository}/tags/list?n=1000"
            while path:
                body, headers = self._get_bytes(at, path, what=f"tags of {ref}",
                                                limit=16 << 20, last=last)
                try:
                    tags.extend(json.loads(body).get("tags") or [])
                except (ValueError, AttributeError):
                    raise RegistryError(f"registry {at.registry} sent a malformed tag "
                                        "list") from None
                path = next_link(headers.get("Link"))
            return tags

        return self._follow(ref, attempt)

    # ---- transport --------------------------------------------------------

    def _follow(self, ref: ImageReference,
                attempt: Callable[[ImageReference, bool], _T]) -> _T:
        """`attempt` along the image's route (mirrors, proxy, then the origin)."""
        if ref.source is not None:  # never ask a registry called "localhost" for it
            raise UnsupportedImage(f"{ref} is not a registry image: this client reads only "
                                   "registries")
        return self._routes.follow(ref, attempt)

    def _transport(self, ref: ImageReference) -> _Transport:
        host = ref.api_host
        with self._lock:
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
        """DUCC_AUTH_REGISTRIES' login for this endpoint, else podman's and docker's."""
        key = (ref.registry, ref.repository)
        with self._lock:
            if key not in self._credentials:
                self._credentials[key] = self._routes.credentials(ref) or find_credentials(
                    ref.podman_registry, ref.repository, self._auth_files
                )
            return self._credentials[key]

    def _retry(self, what: str, last: bool) -> RetryBudget:
        """A request's retry budget: none for an endpoint with another one after it."""
        return RetryBudget(self._retry_for if last else 0.0, self._backoff, what)

    def _get_bytes(self, ref: ImageReference, path: str, *, what: str, limit: int,
                   headers: dict[str, str] | None = None,
                   last: bool = True) -> tuple[bytes, httpx.Headers]:
        """A whole (small) response body; a connection that drops mid-body is retried
        within the same budget as any other transient failure."""
        retry = self._retry(what, last)
        while True:
            try:
                with self._stream(ref, "GET", path, what=what, headers=headers,
                                  retry=retry) as resp:
                    return read_limited(resp, limit, what), resp.headers
            except Dropped as exc:
                retry.wait(exc)

    @contextlib.contextmanager
    def _stream(
        self,
        ref: ImageReference,
        method: str,
        path: str,
        *,
        what: str,
        headers: dict[str, str] | None = None,
        retry: RetryBudget | None = None,
    ) -> Iterator[httpx.Response]:
        transport = self._transport(ref)
        scope = f"repository:{ref.repository}:pull"
        retry = retry or RetryBudget(self._retry_for, self._backoff, what)
        authed = False
        while True:
            url = f"{self._scheme(transport, ref)}://{transport.host}{path}"
            req_headers = dict(headers or {})
            token = transport.tokens.get(scope)
            if token:
                req_headers["Authorization"] = token
            client = self._client_for(ref)
            try:
                resp = client.send(client.build_request(method, url, headers=req_headers),
                                   stream=True)
            except httpx.TransportError as exc:
                unreachable = RegistryUnreachable(_unreachable_message(ref, exc))
                if _is_tls_mismatch(exc):
                    raise unreachable from None  # no retry makes HTTPS of HTTP work
                # A registry that is down may come back soon, but no one should wait a
                # minute for a mistyped name: connection failures get a shorter budget.
                retry.wait(unreachable, budget=_CONNECT_BUDGET if isinstance(
                    exc, httpx.ConnectError) else None)
                continue
            except HTTPX_ERRORS as exc:  # redirect loops, invalid URLs: nothing to retry
                raise RegistryError(f"{what}: {exc}") from None
            try:
                if resp.status_code == 401 and not authed:
                    authed = True
                    challenge = resp.headers.get("WWW-Authenticate", "")
                    resp.close()
                    self._refresh_token(transport, ref, challenge, scope, token)
                    continue
                if resp.status_code in _RETRY_STATUS:
                    retry_after = resp.headers.get("Retry-After")
                    resp.close()
                    retry.wait(_http_error(ref, resp.status_code, b"", what, None), retry_after)
                    continue
                if resp.status_code >= 400:
                    body = b""
                    if method != "HEAD" and resp.status_code != 416:
                        with contextlib.suppress(*HTTPX_ERRORS):
                            body = resp.read()[:4096]
                    raise _http_error(ref, resp.status_code, body, what, self._creds(ref))
                yield resp
                return
            finally:
                resp.close()

    def _refresh_token(self, transport: _Transport, ref: ImageReference, challenge: str,
                       scope: str, stale: str | None) -> None:
        """A token for `scope`, one request at a time: another worker may have got a
        fresh one meanwhile (tokens are shared by every image of a repository)."""
        with transport.scope_lock(scope):
            with transport.lock:
                if transport.tokens.get(scope) not in (None, stale):
                    return
            token = self._authenticate(ref, challenge, scope)
            with transport.lock:
                transport.tokens[scope] = token

    def _scheme(self, transport: _Transport, ref: ImageReference) -> str:
        with transport.lock:
            if transport.scheme is None:
                # An insecure registry: HTTPS without verification if it speaks TLS.
                try:
                    self._http_noverify.get(f"https://{transport.host}/v2/", timeout=5.0)
                    transport.scheme = "https"
                except HTTPX_ERRORS:
                    transport.scheme = "http"
                log.debug("registry %s: using %s", transport.host, transport.scheme)
            return transport.scheme

    def _client_for(self, ref: ImageReference) -> httpx.Client:
        return self._http_noverify if self._is_insecure(ref) else self._http

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
        except HTTPX_ERRORS as exc:
            raise RegistryError(f"token service {params['realm']!r} of {ref.registry} "
                                f"cannot be used: {exc}") from None
        if resp.status_code in (401, 403):
            hint = (
                f"the credentials from {creds.source} were rejected: "
                f"{creds.hint or f'run `podman login {ref.podman_registry}` again'}"
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


_CONNECT_BUDGET = 10.0


def _is_tls_mismatch(exc: httpx.TransportError) -> bool:
    reason = str(exc)
    return "SSL" in reason or "certificate" in reason.lower() or "wrong version" in reason


def _unreachable_message(ref: ImageReference, exc: httpx.TransportError) -> str:
    reason = str(exc) or exc.__class__.__name__
    hint = "check the name, the network and the proxy settings"
    if _is_tls_mismatch(exc):
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
        fix = creds.hint or f"check them with `podman login {ref.podman_registry}`"
        return AuthenticationFailed(f"{what}: access denied by {ref.registry} with the "
                                    f"credentials from {creds.source}; {fix}")
    if status == 429:
        return RegistryError(f"{what}: {ref.registry} keeps rate-limiting us (HTTP 429); "
                             "retry later or log in for a higher limit")
    return RegistryError(f"{what}: registry {ref.registry} answered HTTP {status}"
                         + (f" ({', '.join(codes)})" if codes else ""))
