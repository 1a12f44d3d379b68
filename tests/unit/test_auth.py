"""Where credentials come from: the files podman and docker write, in podman's order,
their key forms, and docker credential helpers (a fake helper on PATH)."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest
from helpers import IS_ROOT

from lazypod import AuthenticationFailed
from lazypod.auth import Credentials, auth_files, find_credentials

REGISTRY = "registry.test"


def entry(user: str, password: str = "pw") -> dict[str, str]:
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


def write(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty environment: a home of our own, no auth variables, no helpers on PATH."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "DOCKER_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    return home


def user_for(registry: str = REGISTRY, repository: str = "library/app") -> str | None:
    found = find_credentials(registry, repository)
    return found.username if found else None


# -- the order of the files ---------------------------------------------------------------

def test_lookup_order(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = tmp_path / "run"
    files = {
        "REGISTRY_AUTH_FILE": tmp_path / "explicit.json",
        "XDG_RUNTIME_DIR": runtime / "containers/auth.json",
        "config home": home / ".config/containers/auth.json",
        "docker": home / ".docker/config.json",
    }
    for name, path in files.items():
        write(path, {"auths": {REGISTRY: entry(name)}})
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(files["REGISTRY_AUTH_FILE"]))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert user_for() == "REGISTRY_AUTH_FILE"
    monkeypatch.delenv("REGISTRY_AUTH_FILE")
    assert user_for() == "XDG_RUNTIME_DIR"
    files["XDG_RUNTIME_DIR"].unlink()
    assert user_for() == "config home"
    files["config home"].unlink()
    assert user_for() == "docker"
    files["docker"].unlink()
    assert user_for() is None


def test_a_file_without_an_entry_for_the_registry_is_passed_over(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = tmp_path / "run"
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    write(runtime / "containers/auth.json", {"auths": {"other.test": entry("other")}})
    write(home / ".config/containers/auth.json", {"auths": {REGISTRY: entry("config")}})
    assert user_for() == "config"
    assert user_for("other.test") == "other"


def test_xdg_config_home_and_docker_config_move_their_files(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(home / ".config/containers/auth.json", {"auths": {REGISTRY: entry("default")}})
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert user_for() is None
    write(tmp_path / "xdg/containers/auth.json", {"auths": {REGISTRY: entry("xdg")}})
    assert user_for() == "xdg"
    (tmp_path / "xdg/containers/auth.json").unlink()
    write(home / ".docker/config.json", {"auths": {REGISTRY: entry("home docker")}})
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    assert user_for() is None
    write(tmp_path / "docker/config.json", {"auths": {REGISTRY: entry("DOCKER_CONFIG")}})
    assert user_for() == "DOCKER_CONFIG"


def test_the_runtime_file_without_xdg_runtime_dir(home: Path) -> None:
    files = auth_files()
    if IS_ROOT:  # podman's rootful default, when it exists
        assert all("/run/user/" not in str(f) for f in files)
    else:
        assert files[0] == Path(f"/run/user/{os.geteuid()}/containers/auth.json")
    assert files[-2:] == [home / ".config/containers/auth.json", home / ".docker/config.json"]


def test_registry_auth_file_is_the_only_file_read(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(home / ".docker/config.json", {"auths": {REGISTRY: entry("personal")}})
    chosen = write(tmp_path / "service.json", {"auths": {"other.test": entry("service")}})
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(chosen))
    assert user_for() is None


# -- keys ---------------------------------------------------------------------------------

def test_the_most_specific_key_wins(home: Path) -> None:
    write(home / ".config/containers/auth.json", {"auths": {
        "quay.io": entry("registry-wide"),
        "quay.io/org": entry("org"),
        "quay.io/org/app": entry("app"),
        "quay.io/organisation": entry("not a path prefix of quay.io/org/..."),
    }})
    assert user_for("quay.io", "org/app") == "app"
    assert user_for("quay.io", "org/other") == "org"
    assert user_for("quay.io", "orgx/app") == "registry-wide"
    assert user_for("quay.io", "organisation/x") == "not a path prefix of quay.io/org/..."


@pytest.mark.parametrize("key", ["https://index.docker.io/v1/", "index.docker.io", "docker.io",
                                 "registry-1.docker.io"])
@pytest.mark.parametrize("registry", ["docker.io", "registry-1.docker.io", "index.docker.io"])
def test_docker_hub_under_any_of_its_names(home: Path, key: str, registry: str) -> None:
    write(home / ".docker/config.json", {"auths": {key: entry("hub")}})
    assert user_for(registry, "library/debian") == "hub"


def test_url_keys(home: Path) -> None:
    write(home / ".docker/config.json", {"auths": {f"https://{REGISTRY}/v2/": entry("url")}})
    assert user_for() == "url"


def test_entry_forms(home: Path) -> None:
    write(home / ".config/containers/auth.json", {"auths": {
        "plain.test": {"username": "u", "password": "p"},
        "token.test": {"identitytoken": "refresh-token"},
        "colon.test": entry("user", "pass:with:colons"),
    }})
    plain = find_credentials("plain.test", "x")
    assert plain is not None and (plain.username, plain.password) == ("u", "p")
    token = find_credentials("token.test", "x")
    assert token is not None and (token.username, token.password) == ("<token>",
                                                                       "refresh-token")
    colon = find_credentials("colon.test", "x")
    assert colon is not None and colon.password == "pass:with:colons"


class _any(str):
    def __eq__(self, other: object) -> bool:
        return isinstance(other, str)

    def __hash__(self) -> int:
        return 0


def test_the_source_names_the_file_and_key(home: Path) -> None:
    path = write(home / ".config/containers/auth.json", {"auths": {REGISTRY: entry("u")}})
    found = find_credentials(REGISTRY, "x")
    assert found is not None and str(path) in found.source and REGISTRY in found.source


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"auths": {REGISTRY: {"auth": "%%%"}}}), "base64"),
    (json.dumps({"auths": {REGISTRY: {"auth": base64.b64encode(b"nocolon").decode()}}}),
     "user:password"),
])
def test_unusable_files_are_errors_that_name_the_file(home: Path, content: str,
                                                      message: str) -> None:
    path = home / ".config/containers/auth.json"
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(AuthenticationFailed, match=message) as caught:
        find_credentials(REGISTRY, "x")
    assert str(path) in str(caught.value)


def test_the_password_is_never_in_a_repr() -> None:
    creds = Credentials("alice", "s3cret", "somewhere")
    assert "s3cret" not in repr(creds) and "alice" in repr(creds)
    assert "s3cret" not in str(creds)


# -- credential helpers -------------------------------------------------------------------

def helper(tmp_path: Path, name: str, script: str) -> Path:
    """`docker-credential-<name>` on PATH; it records what it was asked in `<name>.asked`."""
    path = tmp_path / "bin" / f"docker-credential-{name}"
    asked = tmp_path / f"{name}.asked"
    path.write_text(f'#!/bin/sh\necho "$1 $(cat)" >> {asked}\n{script}\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return asked


def test_cred_helpers_are_asked_for_their_registry(home: Path, tmp_path: Path) -> None:
    asked = helper(tmp_path, "fake", """echo '{"Username":"helped","Secret":"s"}'""")
    path = write(home / ".docker/config.json", {
        "auths": {REGISTRY: entry("file")},  # the helper comes first
        "credHelpers": {REGISTRY: "fake"},
    })
    found = find_credentials(REGISTRY, "library/app")
    assert found is not None and (found.username, found.password) == ("helped", "s")
    assert "docker-credential-fake" in found.source and str(path) in found.source
    assert asked.read_text() == f"get {REGISTRY}\n"


def test_docker_hub_helpers_get_dockers_server_url(home: Path, tmp_path: Path) -> None:
    asked = helper(tmp_path, "hub", """echo '{"Username":"hub","Secret":"s"}'""")
    write(home / ".docker/config.json", {"credHelpers": {"docker.io": "hub"}})
    assert user_for("registry-1.docker.io", "library/debian") == "hub"
    assert asked.read_text() == "get https://index.docker.io/v1/\n"


def test_creds_store_is_asked_after_the_auths(home: Path, tmp_path: Path) -> None:
    asked = helper(tmp_path, "store", """echo '{"Username":"stored","Secret":"s"}'""")
    write(home / ".docker/config.json", {"auths": {"other.test": entry("file")},
                                         "credsStore": "store"})
    assert user_for("other.test") == "file"
    assert not asked.exists()
    assert user_for() == "stored"


def test_a_store_without_the_registry_means_anonymous(home: Path, tmp_path: Path) -> None:
    helper(tmp_path, "store", "echo 'credentials not found in native keychain'; exit 1")
    write(home / ".docker/config.json", {"credsStore": "store"})
    assert user_for() is None


def test_a_helper_that_is_not_installed_is_an_error(home: Path) -> None:
    path = write(home / ".docker/config.json", {"credHelpers": {REGISTRY: "missing"}})
    with pytest.raises(AuthenticationFailed, match="docker-credential-missing") as caught:
        find_credentials(REGISTRY, "x")
    assert str(path) in str(caught.value) and "not installed" in str(caught.value)


def test_a_failing_helper_is_an_error_without_its_output(home: Path, tmp_path: Path) -> None:
    helper(tmp_path, "broken", "echo 'token=SECRET-IN-OUTPUT' >&2; exit 3")
    write(home / ".docker/config.json", {"credHelpers": {REGISTRY: "broken"}})
    with pytest.raises(AuthenticationFailed, match="exit 3") as caught:
        find_credentials(REGISTRY, "x")
    assert "SECRET-IN-OUTPUT" not in str(caught.value)


def test_a_helper_answer_that_is_not_json_is_an_error(home: Path, tmp_path: Path) -> None:
    helper(tmp_path, "garbled", "echo 'Username: x'")
    write(home / ".docker/config.json", {"credHelpers": {REGISTRY: "garbled"}})
    with pytest.raises(AuthenticationFailed, match="cannot read"):
        find_credentials(REGISTRY, "x")
