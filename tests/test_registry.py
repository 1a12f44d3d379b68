"""The registry client against the real registry: authentication, manifest kinds,
platform selection, retries, and credentials that never reach a log."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from support.auth import PASSWORD, USER, TokenService, htpasswd_registry
from support.images import Entry, busybox_entries, image, index, layer
from support.registry import Registry

pytestmark = [pytest.mark.registry]


def write_auth(lazypod, registry_host: str, password: str, *, docker: bool = False) -> None:
    auth = base64.b64encode(f"{USER}:{password}".encode()).decode()
    data = json.dumps({"auths": {registry_host: {"auth": auth}}})
    if docker:
        path = Path(lazypod.env["HOME"]) / ".docker" / "config.json"
        del lazypod.env["REGISTRY_AUTH_FILE"]
    else:
        path = Path(lazypod.env["REGISTRY_AUTH_FILE"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data)


@pytest.fixture(scope="module")
def private_image(registry) -> str:
    img = image([layer(busybox_entries()), layer([Entry("private", data=b"secret stuff")])],
                label="private")
    registry.push("team/private", "1", img)
    return "team/private:1"


@pytest.fixture(scope="module")
def token_registry(registry, private_image, tmp_path_factory) -> Iterator[Registry]:
    service = TokenService(tmp_path_factory.mktemp("tokens"))
    reg = service.registry(tmp_path_factory.mktemp("token-registry"), registry.storage)
    yield reg
    reg.stop()
    service.stop()


@pytest.fixture(scope="module")
def basic_registry(registry, private_image, tmp_path_factory) -> Iterator[Registry]:
    reg = htpasswd_registry(tmp_path_factory.mktemp("basic-registry"), registry.storage)
    yield reg
    reg.stop()


@pytest.mark.parametrize("kind", ["token", "basic"])
def test_login_needed_wrong_and_right_credentials(
    request, kind, private_image, lazypod, repo
):
    reg = request.getfixturevalue(f"{kind}_registry")
    name = f"{reg.host}/{private_image}"

    proc = lazypod.convert(name, repo, check=False)
    assert proc.returncode == 1
    assert f"podman login {reg.host}" in proc.stderr

    write_auth(lazypod, reg.host, "wrong-password")
    proc = lazypod.convert(name, repo, check=False)
    assert proc.returncode == 1
    assert "auth.json" in proc.stderr and ("rejected" in proc.stderr or "denied" in proc.stderr)

    write_auth(lazypod, reg.host, PASSWORD)
    proc = lazypod("-vvv", "convert-single-image", "--insecure-registry", reg.host, name,
                   str(repo))
    assert (repo / ".metadata" / reg.host / "team/private:1" / "manifest.json").exists()
    secret_forms = [PASSWORD, base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()]
    for form in secret_forms:
        assert form not in proc.stderr and form not in proc.stdout


def test_docker_config_credentials_are_used(token_registry, private_image, lazypod, repo):
    write_auth(lazypod, token_registry.host, PASSWORD, docker=True)
    lazypod.convert(f"{token_registry.host}/{private_image}", repo)


def test_multi_platform_index_selects_the_platform(registry, lazypod, repo, tmp_path):
    amd = image([layer([*busybox_entries(), Entry("arch", data=b"amd64\n")])], label="amd64")
    arm = image([layer([*busybox_entries(), Entry("arch", data=b"arm64\n")])], arch="arm64",
                label="arm64")
    for img in (amd, arm):
        registry.push("test/multi", img.manifest_digest.replace(":", "-"), img)
    idx = index([(amd, "linux", "amd64", None), (arm, "linux", "arm64", "v8")])
    with httpx.Client(base_url=f"http://{registry.host}") as client:
        Registry.push_manifest(client, "test/multi", "1", idx,
                               "application/vnd.oci.image.index.v1+json")
    name = f"{registry.host}/test/multi:1"

    lazypod.convert(name, repo)
    meta = repo / ".metadata" / registry.host / "test/multi:1"
    assert json.loads((meta / "manifest.json").read_bytes())["config"]["digest"] == \
        amd.config_digest
    assert (meta / "index.json").read_bytes() == idx

    other = tmp_path / "arm"
    lazypod.convert(name, other, "--platform", "linux/arm64")
    meta = other / ".metadata" / registry.host / "test/multi:1"
    assert json.loads((meta / "manifest.json").read_bytes())["config"]["digest"] == \
        arm.config_digest

    proc = lazypod.convert(name, tmp_path / "none", "--platform", "linux/s390x", check=False)
    assert proc.returncode == 1
    assert "no image for platform linux/s390x (offered: linux/amd64, linux/arm64/v8)" in \
        proc.stderr


def test_docker_schema2_and_uncompressed_layers(registry, lazypod, repo):
    img = image([layer(busybox_entries(), compression="none"),
                 layer([Entry("gz", data=b"gzip")])], docker=True, label="docker")
    name = registry.push("test/docker", "1", img)
    lazypod.convert(name, repo)
    for blob in img.layers:
        assert (repo / ".layers" / blob.digest[7:9] / blob.digest[7:] / "layerfs").is_dir()
    store = json.loads((repo / ".podmanStore/overlay-layers/layers.json").read_text())
    assert [entry.get("compression") for entry in store] == [None, 2]


def test_server_errors_are_retried(registry, proxy, lazypod, repo):
    img = image([layer(busybox_entries())], label="retry")
    registry.push("test/retry", "1", img)
    proxy.faults.status_once["/manifests/1"] = 503
    proc = lazypod.convert(f"{proxy.host}/test/retry:1", repo)
    assert "HTTP 503; retrying" in proc.stderr
    assert (repo / ".metadata" / proxy.host / "test/retry:1" / "manifest.json").exists()


def test_digest_pinned_reference_is_verified(registry, lazypod, repo):
    img = image([layer(busybox_entries())], label="pinned")
    registry.push("test/pinned", "1", img)
    name = f"{registry.host}/test/pinned:1@{img.manifest_digest}"
    lazypod.convert(name, repo)
    assert (repo / ".metadata" / registry.host / "test/pinned:1" / "manifest.json").read_bytes() \
        == img.manifest
    wrong = f"{registry.host}/test/pinned@sha256:{'0' * 64}"
    proc = lazypod.convert(wrong, repo, check=False)
    assert proc.returncode == 1 and "not found" in proc.stderr


def test_foreign_layers_are_skipped_as_ducc_does(registry, lazypod, repo):
    base = layer(busybox_entries())
    foreign = layer([Entry("windows-base", data=b"never fetched")])
    foreign.media_type = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
    img = image([foreign, base], docker=True, label="foreign")
    manifest = json.loads(img.manifest)
    manifest["layers"][0]["urls"] = ["https://example.invalid/blob"]
    img.manifest = json.dumps(manifest).encode()
    with httpx.Client(base_url=f"http://{registry.host}") as client:
        for blob in (img.config, base):
            Registry.push_blob(client, "test/foreign", blob.data, blob.digest)
        Registry.push_manifest(client, "test/foreign", "1", img.manifest,
                               "application/vnd.docker.distribution.manifest.v2+json")
    name = f"{registry.host}/test/foreign:1"

    mark = registry.mark()
    proc = lazypod.convert(name, repo)
    assert foreign.digest not in registry.blob_gets(since=mark)
    assert "skipping foreign layer" in proc.stderr
    assert (repo / ".layers" / base.digest[7:9] / base.digest[7:] / "layerfs/bin/busybox").exists()
    assert "foreign (non-distributable) layers" in proc.stderr  # no podman store entry


def test_credential_helpers_are_asked(token_registry, private_image, lazypod, repo, tmp_path):
    """auth.json's credHelpers, as podman reads them: `docker-credential-<name> get`."""
    helper_dir = tmp_path / "helpers"
    helper_dir.mkdir()
    asked = tmp_path / "asked"
    helper = helper_dir / "docker-credential-lazytest"
    helper.write_text("#!/bin/sh\n"
                      f"cat > {asked}\n"
                      f'printf \'{{"ServerURL":"x","Username":"{USER}","Secret":"{PASSWORD}"}}\'\n')
    helper.chmod(0o755)
    lazypod.env["PATH"] = f"{helper_dir}:{lazypod.env['PATH']}"
    Path(lazypod.env["REGISTRY_AUTH_FILE"]).write_text(
        json.dumps({"credHelpers": {token_registry.host: "lazytest"}}))

    lazypod.convert(f"{token_registry.host}/{private_image}", repo)
    assert asked.read_text() == token_registry.host

    Path(lazypod.env["REGISTRY_AUTH_FILE"]).write_text(
        json.dumps({"credHelpers": {token_registry.host: "missing"}}))
    proc = lazypod.convert(f"{token_registry.host}/{private_image}", tmp_path / "r2",
                           check=False)
    assert proc.returncode == 1
    assert "docker-credential-missing, which is not installed" in proc.stderr


def test_a_manifest_or_config_that_breaks_off_is_fetched_again(registry, proxy, lazypod,
                                                                 repo):
    img = image([layer(busybox_entries())], label="dropped-small")
    registry.push("test/dropped", "1", img)
    proxy.faults.drop_once.update({"/manifests/1", img.config_digest})
    proc = lazypod.convert(f"{proxy.host}/test/dropped:1", repo)
    assert proc.stderr.count("connection dropped") == 2
    assert (repo / ".metadata" / proxy.host / "test/dropped:1" / "config.json").exists()


def test_a_registry_that_keeps_failing_is_retried_for_a_while(registry, proxy, lazypod, repo):
    img = image([layer(busybox_entries())], label="many-503")
    registry.push("test/flaky503", "1", img)
    proxy.faults.status_times["/manifests/1"] = [503, 5]  # 5 in a row: about 8 s
    lazypod.convert(f"{proxy.host}/test/flaky503:1", repo)

    proxy.faults.status["/manifests/1"] = 503  # for good
    started = time.monotonic()
    proc = lazypod.convert(f"{proxy.host}/test/flaky503:1", repo, "--retry-for", "3",
                           check=False)
    assert proc.returncode == 1 and 2.5 < time.monotonic() - started < 20
    lines = [x for x in proc.stderr.splitlines() if x.startswith("lazypod: error:")]
    assert len(lines) == 1 and "HTTP 503" in lines[0] and "tried for" in lines[0]
