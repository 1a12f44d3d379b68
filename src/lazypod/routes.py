"""Where an image's requests go: its route, an ordered list of endpoints.

An endpoint is the image's reference rewritten to name another registry and
repository, so tokens, credentials, schemes, retries and error messages work per
host as for any image. The image keeps its own name everywhere else (metadata,
links, podman's store): only the requests move. Routes come from:

* DUCC's environment (`ducc_env`): when the first DUCC_AUTH_REGISTRIES entry that
  matches the image names a `_PROXY`, every request goes to that pull-through
  cache and nowhere else (DUCC's rule: no fallback);
* registries.conf (`registry_conf`): the `[[registry]]` table with the longest
  prefix of the image's name gives its mirrors (those serving this kind of pull,
  by tag or by digest), then its location, by default the image's registry. As in
  containers/image, any failure of a mirror (down, missing the image, refusing
  us, content that does not match its digest) moves on to the next endpoint, the
  last one failing as usual. A mirror is not retried (the next endpoint is the
  retry), and one that could not be reached is skipped for a while, so a mirror
  that is down costs one failure, not one per layer.

Whatever an endpoint serves is verified against the digests the image names, so
a mirror cannot substitute content for a digest; what a tag points to is the
mirror's word, as it is for podman.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TypeVar

from .auth import Credentials
from .ducc_env import DuccRegistry
from .errors import InvalidReference, LazypodError, RegistryConfigError, RegistryUnreachable
from .reference import ImageReference, parse_reference
from .registry_conf import RegistryNamespace

__all__ = ["Routes"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class Routes:
    """The endpoints of every image, and the DUCC logins by host; thread-safe.

    `skip_unreachable_for`: seconds a mirror that could not be reached is left out."""

    def __init__(self, ducc: Sequence[DuccRegistry] = (),
                 namespaces: Sequence[RegistryNamespace] = (), *,
                 skip_unreachable_for: float = 300.0) -> None:
        self._ducc = tuple(ducc)
        self._namespaces = tuple(namespaces)
        self._skip_for = skip_unreachable_for
        self._down: dict[str, float] = {}  # mirror host -> when to ask it again
        self._lock = threading.Lock()

    def endpoints(self, ref: ImageReference) -> tuple[ImageReference, ...]:
        """Where to ask for `ref`, in order; the last one is the origin (or DUCC's proxy)."""
        entry = self._ducc_entry(ref)
        if entry is not None and entry.proxy:
            return (entry.proxied(ref),)
        name = _full_name(ref)
        best: tuple[int, RegistryNamespace] | None = None
        for namespace in self._namespaces:
            length = _match_length(namespace.prefix, name)
            if length > 0 and (best is None or length > best[0]):
                best = (length, namespace)
        if best is None:
            return (ref,)
        namespace = best[1]
        prefix = ref.podman_registry if namespace.prefix.startswith("*.") else namespace.prefix
        by_digest = ref.digest is not None
        mirrors = [_rewritten(ref, name, prefix, m.location, None)
                   for m in namespace.mirrors if m.serves(by_digest)]
        origin = ref
        if namespace.location and namespace.location != prefix:
            origin = _rewritten(ref, name, prefix, namespace.location, ref.scheme)
        return (*mirrors, origin)

    def credentials(self, endpoint: ImageReference) -> Credentials | None:
        """The DUCC login for this endpoint, if the first entry matching it has one."""
        entry = self._ducc_entry(endpoint)
        return entry.credentials if entry is not None else None

    def follow(self, ref: ImageReference, attempt: Callable[[ImageReference, bool], T]) -> T:
        """`attempt(endpoint, last)` along the route until one succeeds; `last` says
        whether a failure is final (only then are transient failures retried)."""
        *mirrors, last = self.endpoints(ref)
        for endpoint in mirrors:
            if self._is_down(endpoint):
                log.debug("mirror %s of %s: skipped (unreachable a moment ago)",
                          endpoint.registry, ref)
                continue
            try:
                return attempt(endpoint, False)
            except LazypodError as exc:
                if isinstance(exc, RegistryUnreachable):
                    with self._lock:
                        self._down[endpoint.api_host] = time.monotonic() + self._skip_for
                log.warning("mirror %s of %s: %s; trying the next source", endpoint.registry,
                            ref.registry, exc)
        return attempt(last, True)

    def _ducc_entry(self, ref: ImageReference) -> DuccRegistry | None:
        return next((entry for entry in self._ducc if entry.matches(ref)), None)

    def _is_down(self, endpoint: ImageReference) -> bool:
        with self._lock:
            until = self._down.get(endpoint.api_host)
            if until is not None and until <= time.monotonic():
                del self._down[endpoint.api_host]
                until = None
        return until is not None


def _full_name(ref: ImageReference) -> str:
    """The name registries.conf prefixes are matched against, as podman writes it."""
    name = f"{ref.podman_registry}/{ref.repository}"
    if ref.tag is not None:
        name += f":{ref.tag}"
    if ref.digest is not None:
        name += f"@{ref.digest}"
    return name


def _match_length(prefix: str, name: str) -> int:
    """How much of `name` the prefix covers (0: no match). A prefix ends at a
    separator: `/`, `@`, or `:` after the host (a tag; at the host, a port)."""
    host = name.split("/", 1)[0]
    if prefix.startswith("*."):
        return len(prefix) if host.endswith(prefix[1:]) else 0
    if name == prefix:
        return len(prefix)
    if not name.startswith(prefix):
        return 0
    separators = "/@:" if "/" in prefix else "/@"
    return len(prefix) if name[len(prefix)] in separators else 0


def _rewritten(ref: ImageReference, name: str, prefix: str, location: str,
               scheme: str | None) -> ImageReference:
    new = location + name[len(prefix):]
    try:
        # The URL form: the first component is always the host, as in registries.conf.
        endpoint = parse_reference(f"https://{new}", allow_wildcard=True)
    except InvalidReference as exc:
        raise RegistryConfigError(f"registries.conf: {location!r} (for {prefix!r}) turns "
                                  f"{ref} into an invalid name: {exc}") from None
    return replace(endpoint, scheme=scheme)
