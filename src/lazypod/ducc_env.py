"""DUCC's registry settings from the environment, read as DUCC reads them.

`DUCC_AUTH_REGISTRIES=A,B` names entries (verbatim; empty names are skipped).
Entry X has:

* `DUCC_X_IDENT` (required): matched as a substring of the image's registry or of
  its request URL (`https://registry.hub.docker.com/v2/library/redis/`); the first
  entry that matches an image is the one used;
* `DUCC_X_USER` and `DUCC_X_PASS`: the login, sent to the registry's token service
  (and, lazypod's addition, to a registry asking for HTTP basic auth);
* `DUCC_X_PROXY`: a pull-through cache asked instead of the registry, as
  `host/path` (requests go to `host/v2/path/<repository>/…`) or `host`
  (`host/v2/<repository>/…`); the login is then not used (DUCC's rule).

An entry without IDENT, or with neither a full login nor a proxy, is an error (DUCC
exits at start-up); the message names the variable, never a value.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace

from .auth import Credentials
from .errors import RegistryConfigError
from .reference import ImageReference

__all__ = ["DuccRegistry", "ducc_registries"]


@dataclass(frozen=True)
class DuccRegistry:
    """One entry of DUCC_AUTH_REGISTRIES."""

    name: str
    ident: str
    credentials: Credentials | None = None
    proxy: str = ""

    def matches(self, ref: ImageReference) -> bool:
        scheme = ref.scheme or "https"
        urls = (f"{scheme}://{host}/v2/{ref.repository}/" for host in
                (ref.registry, ref.api_host))
        return self.ident in ref.registry or any(self.ident in url for url in urls)

    def proxied(self, ref: ImageReference) -> ImageReference:
        """`ref` as the proxy serves it. A scheme written in the proxy wins; else the
        image's (DUCC's `http://` URLs), else the insecure registries decide."""
        scheme: str | None
        scheme, sep, rest = self.proxy.partition("://")
        if not sep:
            scheme, rest = ref.scheme, self.proxy
        host, _, path = rest.strip("/").partition("/")
        repository = f"{path.strip('/')}/{ref.repository}" if path else ref.repository
        return replace(ref, registry=host, repository=repository, scheme=scheme)


def ducc_registries(env: Mapping[str, str] | None = None) -> tuple[DuccRegistry, ...]:
    """The entries of DUCC_AUTH_REGISTRIES, in order; RegistryConfigError names the
    first variable that is missing."""
    env = os.environ if env is None else env
    found: list[DuccRegistry] = []
    for name in env.get("DUCC_AUTH_REGISTRIES", "").split(","):
        if not name:
            continue
        ident_var, user_var, pass_var, proxy_var = (
            f"DUCC_{name}_{kind}" for kind in ("IDENT", "USER", "PASS", "PROXY"))
        ident, user, password, proxy = (env.get(var, "") for var in
                                        (ident_var, user_var, pass_var, proxy_var))
        if not ident:
            raise RegistryConfigError(
                f"${ident_var} is not set (DUCC_AUTH_REGISTRIES names {name!r}): set it "
                "to a part of the registry's address, e.g. gitlab-registry.cern.ch")
        if not proxy and not (user and password):
            missing = " and ".join(f"${var}" for var, value in
                                   ((user_var, user), (pass_var, password)) if not value)
            raise RegistryConfigError(
                f"{missing} {'are' if ' and ' in missing else 'is'} not set "
                f"(DUCC_AUTH_REGISTRIES names {name!r}): give ${user_var} and ${pass_var}, "
                f"or ${proxy_var}")
        if proxy and not proxy.split("://", 1)[-1].strip("/"):
            raise RegistryConfigError(f"${proxy_var} names no host: write host[:port][/path]")
        credentials = None
        if user and password and not proxy:
            credentials = Credentials(user, password, f"${user_var} and ${pass_var}",
                                      hint="correct them")
        found.append(DuccRegistry(name, ident, credentials, proxy))
    return tuple(found)
