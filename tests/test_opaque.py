"""Opaque directories carry no marker a container can see, and stay opaque for every
overlay: rootful and rootless kernel overlay, fuse-overlayfs (views/opaque.py)."""

from __future__ import annotations

import gzip
import io
import json
import os
import stat
import tarfile
from pathlib import Path

import httpx
import pytest

from support.images import Entry, busybox_entries, edge_case_layers, image, layer
from support.podman import ROOTLESS_USER

pytestmark = [pytest.mark.podman, pytest.mark.registry]

OPAQUE_DIR = "var/lib/replaced"  # opaque in the edge-case image's second layer


def store_opts(repo: Path) -> list[str]:
    return [f"additionalimagestore={repo}/.podmanStore"]


def layer_tar(registry, name: str, digest: str) -> tarfile.TarFile:
    repo = name.split("/", 1)[1].rsplit(":", 1)[0]
    blob = httpx.get(f"http://{registry.host}/v2/{repo}/blobs/{digest}", timeout=60).content
    return tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob)
                                           if blob[:2] == b"\x1f\x8b" else blob))


@pytest.mark.rootless
def test_an_image_built_on_top_keeps_the_base_files_for_rootless_users(
    registry, lazypod, podman_factory, repo, tmp_path
):
    base = registry.push("test/opaque-base", "1", image(edge_case_layers(), label="ob"))
    lazypod.convert(base, repo)

    builder = podman_factory("builder", storage_opts=store_opts(repo))
    context = tmp_path / "context"
    context.mkdir()
    (context / "Containerfile").write_text(f"FROM {base}\nRUN touch /{OPAQUE_DIR}/x\n")
    derived = f"{registry.host}/test/opaque-derived:1"
    builder("build", "--network=none", "-t", derived, str(context))
    builder("push", "--tls-verify=false", derived)

    # The derived image's own layer carries no overlay marker for the directory.
    manifest = json.loads(httpx.get(
        f"http://{registry.host}/v2/test/opaque-derived/manifests/1", timeout=60,
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json,"
                           "application/vnd.docker.distribution.manifest.v2+json"}).text)
    top = layer_tar(registry, derived, manifest["layers"][-1]["digest"])
    for member in top.getmembers():
        assert not any("overlay" in key or ".wh." in key for key in member.pax_headers), \
            (member.name, member.pax_headers)
        assert ".wh." not in member.name

    for label, opts in (("native", []),
                        ("fuse", ["overlay.mount_program=/usr/bin/fuse-overlayfs"])):
        rootless = podman_factory(f"rootless-{label}", user=ROOTLESS_USER, storage_opts=opts)
        rootless("pull", "--tls-verify=false", derived)
        listed = rootless.text("run", "--rm", "--network=none", derived, "/bin/busybox", "ls",
                               "-a", f"/{OPAQUE_DIR}").split()
        assert sorted(listed) == [".", "..", "new", "x"], label


def old_format(repo: Path, blob_digest: str) -> Path:
    """Make a converted layer look as older lazypod versions wrote it: both markers on
    its opaque directory, no explicit whiteouts, no record of completed chains (and no
    record of the views' format in the store)."""
    (repo / ".podmanStore/lazypod-views").unlink()
    layer_dir = repo / ".layers" / blob_digest[7:9] / blob_digest[7:]
    opaque = layer_dir / "layerfs" / OPAQUE_DIR
    for entry in os.listdir(opaque):
        st = os.lstat(opaque / entry)
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            os.unlink(opaque / entry)
    for key in ("trusted.overlay.opaque", "user.overlay.opaque"):
        os.setxattr(opaque, key, b"y")
    (layer_dir / ".metadata/opaque-chains.json").unlink()
    return opaque


def test_layers_written_before_are_migrated_by_a_normal_run(
    registry, lazypod, podman_factory, repo
):
    img = image(edge_case_layers(), label="migrate")
    name = registry.push("test/opaque-old", "1", img)
    lazypod.convert(name, repo)
    opaque = old_format(repo, img.layers[1].digest)

    other = registry.push("test/unrelated", "1", image([layer(busybox_entries())],
                                                        label="unrelated"))
    lazypod.convert(other, repo)  # a normal run, about another image

    assert os.listxattr(opaque) == []
    assert sorted(os.listdir(opaque)) == ["new", "old-a", "sub"]
    assert os.lstat(opaque / "old-a").st_rdev == 0
    podman = podman_factory(storage_opts=store_opts(repo))
    out = podman.text("run", "--rm", "--network=none", name, "/bin/busybox", "ls",
                      f"/{OPAQUE_DIR}")
    assert out.split() == ["new"]


def test_a_new_chain_under_a_published_layer_gets_its_own_whiteouts(
    registry, lazypod, podman_factory, repo
):
    base_a = layer([*busybox_entries(), Entry("opt/", "dir"), Entry("opt/from-a", data=b"a")])
    base_b = layer([*busybox_entries(), Entry("opt/", "dir"), Entry("opt/from-b", data=b"b")])
    shared = layer([Entry("opt/", "dir"), Entry("opt/.wh..wh..opq"),
                    Entry("opt/mine", data=b"m")])
    first = registry.push("test/chain", "a", image([base_a, shared], label="a"))
    second = registry.push("test/chain", "b", image([base_b, shared], label="b"))
    lazypod.convert(first, repo)
    lazypod.convert(second, repo)

    opt = repo / ".layers" / shared.digest[7:9] / shared.digest[7:] / "layerfs/opt"
    assert sorted(os.listdir(opt)) == ["from-a", "from-b", "mine"]
    chains = json.loads((opt.parent.parent / ".metadata/opaque-chains.json").read_text())
    assert len(chains["chains"]) == 2
    podman = podman_factory(storage_opts=store_opts(repo))
    for name in (first, second):
        out = podman.text("run", "--rm", "--network=none", name, "/bin/busybox", "ls", "/opt")
        assert out.split() == ["mine"], name


def test_the_layer_store_leaves_out_layers_with_opaque_directories(registry, lazypod, repo):
    img = image(edge_case_layers(), label="als-opaque")
    name = registry.push("test/opaque-als", "1", img)
    lazypod.convert(name, repo)
    present = {p.name for p in (repo / ".podmanLayers").iterdir()}
    # Layers 2 and 3 have opaque directories: under a chain the repository does not
    # publish, their whiteouts would not cover what lies below.
    assert present == {f"sha256:{img.layers[0].digest[7:]}"}
