"""podman's registries.conf (containers-registries.conf(5)), as far as pulling reads
it: which registries are insecure, and which mirrors stand in front of a namespace.

Files, as podman finds them: `$CONTAINERS_REGISTRIES_CONF`, else
`~/.config/containers/registries.conf` (rootless, when it exists), else
`/etc/containers/registries.conf`; then the `*.conf` drop-ins of the
`registries.conf.d` directory next to it, in name order, where a `[[registry]]`
table replaces an earlier one with the same prefix. Read: v2's `[[registry]]`
tables (`prefix`, `location`, `insecure`, `mirror-by-digest-only`, and
`[[registry.mirror]]` tables with `location`, `insecure`, `pull-from-mirror`) and
v1's `[registries.insecure]` list. A file that does not parse, or a table podman
would refuse, is an error naming the file: a mirror silently dropped would send
pulls where the administrator did not mean them to go.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import RegistryConfigError

__all__ = [
    "Mirror",
    "RegistriesConf",
    "RegistryNamespace",
    "read_registries_conf",
    "registries_conf_files",
]

PULL_FROM_MIRROR = ("all", "digest-only", "tag-only")


@dataclass(frozen=True)
class Mirror:
    """One `[[registry.mirror]]`: where to try first, and for which pulls."""

    location: str
    insecure: bool = False
    pull_from: str = "all"  # one of PULL_FROM_MIRROR

    def serves(self, by_digest: bool) -> bool:
        """Whether a pull by digest (or by tag, when False) may use this mirror."""
        return self.pull_from == "all" or (self.pull_from == "digest-only") == by_digest


@dataclass(frozen=True)
class RegistryNamespace:
    """One `[[registry]]` table: the names under `prefix` live at `location`, and
    `mirrors` are tried before it. A `*.example.com` prefix has no location (the
    image's own registry)."""

    prefix: str
    location: str
    insecure: bool = False
    mirrors: tuple[Mirror, ...] = ()


@dataclass(frozen=True)
class RegistriesConf:
    insecure: frozenset[str] = frozenset()
    """Hosts (host[:port]) reached over plain HTTP or unverified TLS."""
    namespaces: tuple[RegistryNamespace, ...] = ()


def registries_conf_files() -> list[Path]:
    """The files podman reads, main file first (the drop-ins that exist)."""
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
    return files


def read_registries_conf(files: list[Path] | None = None) -> RegistriesConf:
    """The insecure registries and the mirrored namespaces of `files` (podman's)."""
    tables: dict[str, RegistryNamespace] = {}
    legacy_insecure: set[str] = set()
    for path in registries_conf_files() if files is None else files:
        data = _read_toml(path)
        if data is None:
            continue
        entries = data.get("registry", [])
        if not isinstance(entries, list):
            raise RegistryConfigError(f"{path}: `registry` must be a list of [[registry]] "
                                      "tables")
        for entry in entries:
            namespace = _namespace(entry, path)
            tables[namespace.prefix] = namespace  # a later file replaces the same prefix
        legacy = _table(_table(data, "registries", path), "insecure", path)
        legacy_insecure.update(str(r) for r in legacy.get("registries", []) or [])
    insecure = set(legacy_insecure)
    for namespace in tables.values():
        if namespace.insecure:
            insecure.add(_host(namespace.location or namespace.prefix))
        insecure.update(_host(m.location) for m in namespace.mirrors if m.insecure)
    return RegistriesConf(frozenset(insecure), tuple(tables.values()))


def _read_toml(path: Path) -> dict[str, Any] | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RegistryConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RegistryConfigError(f"{path} is not valid TOML ({exc}): fix it (podman "
                                  "cannot read it either)") from None


def _namespace(entry: object, path: Path) -> RegistryNamespace:
    if not isinstance(entry, dict):
        raise RegistryConfigError(f"{path}: a [[registry]] entry must be a table")
    location = _location(entry, "location", path)
    prefix = _location(entry, "prefix", path) or location
    if not prefix:
        raise RegistryConfigError(f"{path}: a [[registry]] table has neither `prefix` nor "
                                  "`location`")
    if prefix.startswith("*.") and ("/" in prefix or location):
        raise RegistryConfigError(f"{path}: the wildcard prefix {prefix!r} must be a bare "
                                  "*.domain without a location")
    if "*" in prefix.removeprefix("*.") or "*" in location:
        raise RegistryConfigError(f"{path}: {prefix!r}: a wildcard may only open a prefix "
                                  "(*.example.com)")
    digest_only = _flag(entry, "mirror-by-digest-only", path)
    mirrors_raw = entry.get("mirror", [])
    if not isinstance(mirrors_raw, list):
        raise RegistryConfigError(f"{path}: `mirror` of {prefix!r} must be a list of "
                                  "[[registry.mirror]] tables")
    mirrors = tuple(_mirror(m, prefix, digest_only, path) for m in mirrors_raw)
    return RegistryNamespace(prefix, location, _flag(entry, "insecure", path), mirrors)


def _mirror(entry: object, prefix: str, digest_only: bool, path: Path) -> Mirror:
    if not isinstance(entry, dict):
        raise RegistryConfigError(f"{path}: a mirror of {prefix!r} must be a table")
    location = _location(entry, "location", path)
    if not location:
        raise RegistryConfigError(f"{path}: a mirror of {prefix!r} has no `location`")
    pull_from = entry.get("pull-from-mirror") or "all"
    if pull_from not in PULL_FROM_MIRROR:
        raise RegistryConfigError(f"{path}: mirror {location!r}: pull-from-mirror must be "
                                  f"one of {', '.join(PULL_FROM_MIRROR)}, not {pull_from!r}")
    if digest_only:
        if pull_from != "all":
            raise RegistryConfigError(f"{path}: {prefix!r} sets mirror-by-digest-only, so "
                                      f"its mirror {location!r} cannot set pull-from-mirror")
        pull_from = "digest-only"
    return Mirror(location, _flag(entry, "insecure", path), pull_from)


def _location(entry: dict[str, Any], key: str, path: Path) -> str:
    value = entry.get(key, "")
    if not isinstance(value, str):
        raise RegistryConfigError(f"{path}: `{key}` must be a string, not {value!r}")
    value = value.strip().rstrip("/")
    if "://" in value:
        raise RegistryConfigError(f"{path}: {key} {value!r}: write host[:port][/path], "
                                  "without a scheme (use `insecure = true` for plain HTTP)")
    if any(c.isspace() for c in value):
        raise RegistryConfigError(f"{path}: {key} {value!r} contains white space")
    return value


def _flag(entry: dict[str, Any], key: str, path: Path) -> bool:
    value = entry.get(key, False)
    if not isinstance(value, bool):
        raise RegistryConfigError(f"{path}: `{key}` must be true or false, not {value!r}")
    return value


def _table(data: dict[str, Any], key: str, path: Path) -> dict[str, Any]:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise RegistryConfigError(f"{path}: `{key}` must be a table")
    return value


def _host(location: str) -> str:
    return location.split("/", 1)[0]
