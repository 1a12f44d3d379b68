"""Manifests: platform selection in indexes and manifest lists (as podman chooses),
the formats lazypod accepts, and manifests as DUCC re-encodes them in a repository
it wrote (Go field names)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from helpers import HOST, FakeRegistry, convert

from lazypod import Digest, Layout, Platform, RepositoryState, UnsupportedImage, parse_reference
from lazypod.manifest import ImageManifest, ManifestIndex, parse_manifest
from support.ducc import ducc_manifest, write_ducc_repository
from support.images import Entry, image, index, layer

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def make_index(platforms: list[str], media_type: str = OCI_INDEX) -> tuple[ManifestIndex,
                                                                          dict[str, str]]:
    """An index with one entry per "os/arch[/variant]" (given in index order), and the
    digest of each entry by platform."""
    manifests, digests = [], {}
    for text in platforms:
        digest = "sha256:" + hashlib.sha256(text.encode()).hexdigest()
        parts = text.split("/")
        plat = {"os": parts[0], "architecture": parts[1]}
        if len(parts) == 3:
            plat["variant"] = parts[2]
        manifests.append({"mediaType": OCI_MANIFEST, "digest": digest, "size": 100,
                          "platform": plat})
        digests[text] = digest
    raw = json.dumps({"schemaVersion": 2, "mediaType": media_type,
                      "manifests": manifests}).encode()
    parsed = parse_manifest(raw, None, Digest.of(raw))
    assert isinstance(parsed, ManifestIndex)
    return parsed, digests


def chosen(platforms: list[str], wanted: str) -> str:
    idx, digests = make_index(platforms)
    digest = str(idx.select(Platform.parse(wanted)).digest)
    return next(p for p, d in digests.items() if d == digest)


# -- platform selection -------------------------------------------------------------------

@pytest.mark.parametrize("media_type", [OCI_INDEX, DOCKER_LIST])
def test_the_wanted_os_and_architecture(media_type: str) -> None:
    idx, digests = make_index(["windows/amd64", "linux/arm64/v8", "linux/amd64", "linux/s390x"],
                              media_type)
    assert str(idx.select(Platform("linux", "amd64")).digest) == digests["linux/amd64"]
    assert str(idx.select(Platform("linux", "s390x")).digest) == digests["linux/s390x"]
    assert str(idx.select(Platform("windows", "amd64")).digest) == digests["windows/amd64"]


def test_arm64_entries_without_a_variant_are_v8() -> None:
    assert chosen(["linux/amd64", "linux/arm64"], "linux/arm64/v8") == "linux/arm64"
    assert chosen(["linux/amd64", "linux/arm64/v8"], "linux/arm64") == "linux/arm64/v8"


def test_arm_variants() -> None:
    offered = ["linux/arm/v6", "linux/arm/v7", "linux/arm64/v8"]
    assert chosen(offered, "linux/arm/v6") == "linux/arm/v6"
    assert chosen(offered, "linux/arm/v7") == "linux/arm/v7"
    assert chosen(offered, "linux/arm") == "linux/arm/v7"  # arm without a variant: v7
    assert chosen(["linux/arm/v6"], "linux/arm") == "linux/arm/v6"  # the only arm there is


def test_a_newer_variant_does_not_run_on_an_older_cpu() -> None:
    idx, _ = make_index(["linux/arm/v7", "linux/amd64"])
    with pytest.raises(UnsupportedImage, match="linux/arm/v6") as caught:
        idx.select(Platform.parse("linux/arm/v6"))
    # The message lists what there is and how to choose.
    assert "linux/amd64, linux/arm/v7" in str(caught.value)
    assert "--platform" in str(caught.value)


def test_an_older_variant_runs_on_a_newer_cpu_as_podman_chooses() -> None:
    assert chosen(["linux/amd64", "linux/arm/v6"], "linux/arm/v7") == "linux/arm/v6"
    assert chosen(["linux/arm/v5", "linux/arm/v6"], "linux/arm/v7") == "linux/arm/v6"
    with pytest.raises(UnsupportedImage):  # never a newer one
        chosen(["linux/arm/v7"], "linux/arm/v6")


def test_no_match_names_the_platforms_offered() -> None:
    idx, _ = make_index(["linux/amd64"])
    with pytest.raises(UnsupportedImage, match=r"linux/ppc64le.*offered: linux/amd64"):
        idx.select(Platform("linux", "ppc64le"))


def test_platform_names() -> None:
    assert Platform.parse("linux/arm/v7") == Platform("linux", "arm", "v7")
    assert str(Platform.parse("linux/amd64")) == "linux/amd64"
    for bad in ("linux", "linux/", "/amd64", "linux/arm/v7/x", ""):
        with pytest.raises(UnsupportedImage, match="os/arch"):
            Platform.parse(bad)


def test_the_host_platform_uses_oci_architecture_names() -> None:
    machine = os.uname().machine
    expected = {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)
    host = Platform.host()
    assert (host.os, host.architecture) == ("linux", expected)


def test_resolving_an_index_fetches_the_chosen_platform() -> None:
    registry = FakeRegistry()
    amd = image([layer([Entry("arch", data=b"amd64")])])
    arm = image([layer([Entry("arch", data=b"arm64")])], arch="arm64")
    raw = index([(amd, "linux", "amd64", None), (arm, "linux", "arm64", "v8")])
    name = registry.push_index("library/multi", "1", raw, [amd, arm])
    with registry.client() as client:
        resolved = client.resolve(parse_reference(name), Platform.parse("linux/arm64"))
    assert resolved.index is not None and resolved.index.raw == raw
    assert str(resolved.manifest.digest) == arm.manifest_digest
    assert resolved.config.raw == arm.config.data
    assert not any(amd.manifest_digest in p or amd.config.digest in p for p in registry.paths())


def test_an_index_entry_whose_manifest_does_not_match_is_refused() -> None:
    from lazypod import IntegrityError

    registry = FakeRegistry()
    amd = image([layer([Entry("arch", data=b"amd64")])])
    raw = index([(amd, "linux", "amd64", None)])
    name = registry.push_index("library/multi", "1", raw, [amd])
    repo = registry.repos["library/multi"]
    repo.manifests[amd.manifest_digest] = (amd.manifest + b" ", OCI_MANIFEST)
    with registry.client() as client, pytest.raises(IntegrityError):
        client.resolve(parse_reference(name), Platform.parse("linux/amd64"))


# -- formats ------------------------------------------------------------------------------

def test_docker_schema1_is_refused_with_what_to_do() -> None:
    raw = json.dumps({"schemaVersion": 1, "name": "x", "fsLayers": []}).encode()
    with pytest.raises(UnsupportedImage, match=r"schema 1.*re-push"):
        parse_manifest(raw, "application/vnd.docker.distribution.manifest.v1+prettyjws",
                       Digest.of(raw))


def test_the_media_type_may_come_from_the_content_type_only() -> None:
    img = image([layer([Entry("x", data=b"x")])])
    obj = json.loads(img.manifest)
    del obj["mediaType"]
    raw = json.dumps(obj).encode()
    parsed = parse_manifest(raw, OCI_MANIFEST + "; charset=utf-8", Digest.of(raw))
    assert isinstance(parsed, ImageManifest) and parsed.media_type == OCI_MANIFEST
    assert [str(d.digest) for d in parsed.layers] == [b.digest for b in img.layers]


def test_a_layer_that_is_not_a_tar_is_refused_when_resolved() -> None:
    registry = FakeRegistry()
    img = image([layer([Entry("x", data=b"x")])])
    obj = json.loads(img.manifest)
    obj["layers"][0]["mediaType"] = "application/vnd.example.helm.chart"
    img.manifest = json.dumps(obj).encode()
    name = registry.push("library/chart", "1", img)
    with registry.client() as client, pytest.raises(UnsupportedImage, match="not a tar layer"):
        client.resolve(parse_reference(name))


# -- DUCC's re-encoded manifests ----------------------------------------------------------

def test_a_manifest_ducc_reencoded_is_read(tmp_path: Path) -> None:
    base = layer([Entry("etc/", "dir"), Entry("etc/os", data=b"os")])
    top = layer([Entry("app", data=b"app")], compression="none")
    img = image([base, top])
    write_ducc_repository(tmp_path, f"{HOST}/library/app:1", img, records_for={0})
    state = RepositoryState.load(Layout(tmp_path))
    assert state.unreadable == {}
    [record] = state.images
    assert record.public_name == f"{HOST}/library/app:1"
    assert record.reference == parse_reference(f"{HOST}/library/app:1")
    manifest = record.manifest
    assert str(manifest.config.digest) == img.config_digest
    assert [(str(d.digest), d.size, d.media_type) for d in manifest.layers] == \
        [(b.digest, len(b.data), b.media_type) for b in img.layers]
    assert [d.compression for d in manifest.layers] == ["gzip", "none"]
    assert record.config is None  # DUCC writes no config.json
    # DUCC's oldest layers have no layers.json: present, but not complete.
    assert state.layers[Digest.parse(base.digest)].complete
    assert not state.layers[Digest.parse(top.digest)].complete


def test_a_digest_only_image_ducc_named_keeps_its_registry_digest(tmp_path: Path) -> None:
    img = image([layer([Entry("x", data=b"x")])])
    folder = f"{HOST}/library/app"
    write_ducc_repository(tmp_path, folder, img)
    config_hex = img.config_digest.split(":", 1)[1]
    # DUCC's link for a digest-only image: `<repository>:sha256:...` -> its flat tree.
    link = tmp_path / f"{folder}:{img.manifest_digest}"
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(f"../../.flat/{config_hex[:2]}/{config_hex}", link)
    [record] = RepositoryState.load(Layout(tmp_path)).images
    assert record.public_name == folder
    assert record.link == f"{folder}:{img.manifest_digest}"
    # The reference carries the registry's manifest digest (from the link), not the
    # digest of the re-encoded manifest.json.
    assert record.reference.digest == Digest.parse(img.manifest_digest)
    assert hashlib.sha256(ducc_manifest(img)).hexdigest() != img.manifest_digest[7:]


def test_converting_an_image_ducc_published_by_digest_keeps_ducc_names(tmp_path: Path) -> None:
    registry = FakeRegistry()
    img = image([layer([Entry("x", data=b"x")])])
    registry.push("library/app", None, img)
    folder = f"{HOST}/library/app"
    write_ducc_repository(tmp_path, folder, img)
    config_hex = img.config_digest.split(":", 1)[1]
    link = tmp_path / f"{folder}:{img.manifest_digest}"
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(f"../../.flat/{config_hex[:2]}/{config_hex}", link)
    convert(registry, tmp_path, f"{folder}@{img.manifest_digest}")
    # The metadata folder DUCC made now holds the registry's manifest, and config.json.
    assert (tmp_path / ".metadata" / folder / "manifest.json").read_bytes() == img.manifest
    assert (tmp_path / ".metadata" / folder / "config.json").read_bytes() == img.config.data
    assert not (tmp_path / ".metadata" / f"{folder}@{img.manifest_digest}").exists()
    assert link.is_symlink() and (link / "x").read_bytes() == b"x"
