"""Registry credentials, read from the files podman and docker write.

Lookup order (first file that has an entry for the registry wins), as podman does
(`credHelpers` and docker's `credsStore` run `docker-credential-<helper> get`):
`${XDG_RUNTIME_DIR}/containers/auth.json`, `~/.config/containers/auth.json`,
`~/.docker/config.json`; `$REGISTRY_AUTH_FILE` alone when set. Keys may be a
registry (`quay.io`), a registry with a namespace (`quay.io/org`, most specific
wins) or a URL (`https://index.docker.io/v1/`). The registry client asks the
logins of DUCC_AUTH_REGISTRIES (`ducc_env`) before these files. Credentials are
never logged: `Credentials.__repr__` hides the secret.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import AuthenticationFailed
from .reference import DOCKER_HUB, DOCKER_HUB_ALIASES

__all__ = ["Credentials", "auth_files", "find_credentials"]


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)
    source: str = ""
    hint: str = ""
    """What to do when a registry refuses them (default: `podman login` again)."""

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, password=***, source={self.source!r})"


def auth_files() -> list[Path]:
    """The auth files podman reads, in its order; a file the user chose
    (`$REGISTRY_AUTH_FILE`) is the only one, as in podman."""
    if env := os.environ.get("REGISTRY_AUTH_FILE"):
        return [Path(env)]
    files: list[Path] = []
    if runtime := os.environ.get("XDG_RUNTIME_DIR"):
        files.append(Path(runtime) / "containers" / "auth.json")
    elif os.geteuid() != 0:
        files.append(Path(f"/run/user/{os.geteuid()}/containers/auth.json"))
    elif (Path("/run/containers/0/auth.json")).exists():
        files.append(Path("/run/containers/0/auth.json"))
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    files.append(config_home / "containers" / "auth.json")
    docker_config = os.environ.get("DOCKER_CONFIG")
    docker_dir = Path(docker_config) if docker_config else Path.home() / ".docker"
    files.append(docker_dir / "config.json")
    return files


def find_credentials(
    registry: str, repository: str, files: Iterable[Path] | None = None
) -> Credentials | None:
    """Credentials for `registry/repository`, or None for anonymous access."""
    for path in auth_files() if files is None else files:
        data = _read_json(path)
        if data is None:
            continue
        helpers = _mapping(data, "credHelpers")
        helper_registry = DOCKER_HUB if registry in DOCKER_HUB_ALIASES else registry
        if helper_registry in helpers:
            return _from_helper(str(helpers[helper_registry]), helper_registry, path)
        auths = _mapping(data, "auths")
        best = _best_entry(auths, registry, repository)
        if best is not None:
            key, entry = best
            return _decode(entry, f"{path} [{key}]")
        if isinstance(data.get("credsStore"), str):
            found = _from_helper(data["credsStore"], helper_registry, path, missing_ok=True)
            if found is not None:
                return found
    return None


def _mapping(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def _from_helper(helper: str, registry: str, source: Path, *,
                 missing_ok: bool = False) -> Credentials | None:
    """Ask a docker credential helper (`docker-credential-<helper> get`), as podman does."""
    program = f"docker-credential-{helper}"
    if shutil.which(program) is None:
        raise AuthenticationFailed(f"{source} names the credential helper {program}, which is "
                                   "not installed")
    server = "https://index.docker.io/v1/" if registry == DOCKER_HUB else registry
    try:
        proc = subprocess.run([program, "get"], input=server.encode(), capture_output=True,
                              timeout=60, check=False)
    except subprocess.TimeoutExpired:
        raise AuthenticationFailed(f"credential helper {program} did not answer for "
                                   f"{registry} within 60 s") from None
    except OSError as exc:
        raise AuthenticationFailed(f"credential helper {program} could not be run: "
                                   f"{exc.strerror or exc}") from None
    if proc.returncode != 0:
        if missing_ok or b"credentials not found" in proc.stdout + proc.stderr:
            return None
        raise AuthenticationFailed(f"credential helper {program} failed for {registry} "
                                   f"(exit {proc.returncode})")
    try:
        answer = json.loads(proc.stdout)
        return Credentials(str(answer["Username"]), str(answer["Secret"]),
                           f"{program} ({source})")
    except (ValueError, KeyError, TypeError):
        raise AuthenticationFailed(f"credential helper {program} gave an answer lazypod "
                                   "cannot read") from None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AuthenticationFailed(f"cannot read credentials file {path}: {exc.strerror}") from None
    try:
        data = json.loads(text) if text.strip() else {}
    except ValueError:
        raise AuthenticationFailed(
            f"credentials file {path} is not valid JSON: fix or remove it"
        ) from None
    return data if isinstance(data, dict) else {}


def _normalise_key(key: str) -> str:
    for prefix in ("https://", "http://"):
        if key.startswith(prefix):
            key = key[len(prefix) :]
    key = key.removesuffix("/v1/").removesuffix("/v2/").rstrip("/")
    if key == "index.docker.io/v1" or key in DOCKER_HUB_ALIASES:
        key = DOCKER_HUB
    return key


def _best_entry(
    auths: dict[str, dict[str, str]], registry: str, repository: str
) -> tuple[str, dict[str, str]] | None:
    if registry in DOCKER_HUB_ALIASES:
        registry = DOCKER_HUB
    wanted = f"{registry}/{repository}"
    best: tuple[int, str, dict[str, str]] | None = None
    for key, entry in auths.items():
        norm = _normalise_key(key)
        if norm in (wanted, registry) or wanted.startswith(norm + "/"):
            score = len(norm)
            if isinstance(entry, dict) and (best is None or score > best[0]):
                best = (score, key, entry)
    return (best[1], best[2]) if best else None


def _decode(entry: dict[str, str], source: str) -> Credentials | None:
    if entry.get("auth"):
        try:
            decoded = base64.b64decode(entry["auth"], validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise AuthenticationFailed(
                f"credentials in {source} are not base64 'user:password'"
            ) from None
        user, sep, password = decoded.partition(":")
        if not sep:
            raise AuthenticationFailed(f"credentials in {source} are not 'user:password'")
        return Credentials(user, password, source)
    if entry.get("username") and entry.get("password"):
        return Credentials(entry["username"], entry["password"], source)
    if entry.get("identitytoken"):
        return Credentials("<token>", entry["identitytoken"], source)
    return None
