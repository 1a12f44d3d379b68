"""Convert from a real registry, run with the real podman from the repository."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path

import pytest

from support.images import Entry, busybox_entries, edge_case_layers, image, layer
from support.podman import snapshot

pytestmark = [pytest.mark.podman, pytest.mark.registry]


def store_opts(repo: Path) -> list[str]:
    return [f"additionalimagestore={repo}/.podmanStore"]


def test_podman_runs_converted_image_without_contacting_the_registry(
    registry, busybox_image, lazypod, podman_factory, repo
):
    name, _ = busybox_image
    lazypod.convert(name, repo)

    podman = podman_factory(storage_opts=store_opts(repo))
    mark = registry.mark()
    out = podman.text("run", "--rm", "--network=none", name, "/bin/cat", "/etc/passwd")

    assert out.startswith("root:x:0:0:root:/root:/bin/sh\n")
    assert registry.requests(since=mark) == []
    # The layer is used in place: podman's own storage records no layer of its own
    # (podman 5 keeps a --rm container's layer in volatile-layers.json).
    recorded = [layer for path in (podman.root / "overlay-layers").glob("*layers.json")
                for layer in json.loads(path.read_text() or "[]")]
    assert recorded == []


def test_image_from_repository_equals_the_image_pulled_by_podman(
    registry, lazypod, podman_factory, repo
):
    img = image(edge_case_layers())
    name = registry.push("test/edge", "1", img)
    lazypod.convert(name, repo)

    from_repo = podman_factory("from-repo", storage_opts=store_opts(repo))
    pulled = podman_factory("pulled")
    pulled("pull", "--tls-verify=false", name)

    trees = []
    for podman in (from_repo, pulled):
        container = podman.text("create", "--network=none", name, "/bin/busybox", "true").strip()
        mountpoint = Path(podman.text("mount", container).strip())
        trees.append(snapshot(mountpoint))
        podman("umount", container)

    repo_tree, pulled_tree = trees
    assert repo_tree == pulled_tree
    # No overlay marker of any kind reaches the container (an image built on top would
    # carry it): opaque directories are marked with trusted.overlay.opaque alone.
    for path in ("var/lib/replaced", "var/lib/gone"):
        assert repo_tree[path][-1] == ()
    # Spot checks of what the comparison covers, so an empty tree cannot pass.
    assert "opt/remove-me" not in repo_tree and "var/lib/replaced/old-a" not in repo_tree
    assert "var/lib/gone/x" not in repo_tree and "var/lib/gone/y" in repo_tree
    assert repo_tree["usr/local/bin/suid"][0] == "-rwsr-xr-x"
    assert repo_tree["home/user/file"][1:3] == (1000, 1000)
    assert repo_tree["srv/xattr-file"][-1] == (("user.lazypod", b"hello"),)
    assert repo_tree["usr/local/bin/hl-b"][-2] == "link-group:usr/local/bin/hl-a"
    assert repo_tree["srv/fifo"][0].startswith("p")


def test_layers_are_the_repository_directories(registry, lazypod, repo):
    img = image(edge_case_layers())
    name = registry.push("test/edge", "by-reference", img)
    lazypod.convert(name, repo)

    store = repo / ".podmanStore"
    layers = json.loads((store / "overlay-layers/layers.json").read_text())
    assert len(layers) == 3
    for entry, blob in zip(layers, img.layers, strict=True):
        diff = store / "overlay" / entry["id"] / "diff"
        assert os.readlink(diff).startswith("/")  # absolute, as containers/storage wants
        assert Path(os.readlink(diff)) == repo.absolute() / ".layers" / blob.digest[7:9] / \
            blob.digest[7:] / "layerfs"
        assert entry["diff-digest"] == blob.diff_id
        assert entry["compressed-diff-digest"] == blob.digest
    for name in ("overlay-images/images.lock", "overlay-layers/layers.lock"):
        st = (store / name).stat()
        assert st.st_mode & 0o444 == 0o444 and st.st_size == 64


def test_second_image_downloads_only_the_layers_it_does_not_share(registry, lazypod, repo):
    base = layer(busybox_entries())
    first = image([base, layer([Entry("first", data=b"1")])], label="first")
    second_top = layer([Entry("second", data=b"2")])
    second = image([base, second_top], label="second")
    first_name = registry.push("test/shared", "first", first)
    second_name = registry.push("test/shared", "second", second)

    lazypod.convert(first_name, repo)
    mark = registry.mark()
    lazypod.convert(second_name, repo)

    fetched = registry.blob_gets(since=mark)
    assert sorted(fetched) == sorted([second_top.digest, second.config_digest])


def test_rerunning_a_finished_conversion_downloads_no_blob(
    registry, busybox_image, lazypod, repo
):
    name, _ = busybox_image
    lazypod.convert(name, repo)
    mark = registry.mark()
    lazypod.convert(name, repo)
    assert registry.blob_gets(since=mark) == []


def test_flat_tree_equals_the_container_tree(registry, lazypod, podman_factory, repo):
    img = image(edge_case_layers(), label="flat")
    name = registry.push("test/edge", "flat", img)
    lazypod.convert(name, repo)

    public = repo / registry.host / "test/edge:flat"
    assert public.is_symlink() and not os.readlink(public).startswith("/")
    flat = public.resolve()
    assert flat == (repo / ".flat" / img.config_digest[7:9] / img.config_digest[7:]).resolve()
    assert (flat / ".singularity.d/runscript").stat().st_mode & 0o111
    env = (flat / ".singularity.d/env/10-docker2singularity.sh").read_text()
    assert "export PATH=/usr/local/sbin:" in env

    pulled = podman_factory("pulled")
    pulled("pull", "--tls-verify=false", name)
    container = pulled.text("create", "--network=none", name, "/bin/busybox", "true").strip()
    expected = snapshot(Path(pulled.text("mount", container).strip()))
    pulled("umount", container)

    # Apptainer's metadata and the mount points it expects come on top of the image.
    added = {".singularity.d", "singularity", "proc", "sys", "dev", "cvmfs", "etc/hosts",
             "etc/resolv.conf", "home", "var/tmp"} - set(expected)
    flat_tree = {path: entry for path, entry in snapshot(flat).items()
                 if path.split("/")[0] not in added and path not in added}
    assert flat_tree == expected
    hl_a, hl_b = (os.stat(flat / f"usr/local/bin/hl-{x}") for x in "ab")
    assert hl_a.st_ino == hl_b.st_ino


def test_podman_save_rebuilds_the_original_layers_byte_for_byte(
    registry, lazypod, podman_factory, repo, tmp_path
):
    img = image(edge_case_layers(), label="save")
    name = registry.push("test/edge", "save", img)
    lazypod.convert(name, repo)
    podman = podman_factory(storage_opts=store_opts(repo))

    saved = tmp_path / "saved"  # OCI: takes zstd layers too (docker-archive does not)
    podman("save", "--format", "oci-dir", "-o", str(saved), name)

    blobs = saved / "blobs/sha256"
    index = json.loads((saved / "index.json").read_text())
    manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_text())
    tars = [(blobs / layer["digest"][7:]).read_bytes() for layer in manifest["layers"]]
    tars = [gzip.decompress(t) if t[:2] == b"\x1f\x8b" else t for t in tars]
    assert ["sha256:" + hashlib.sha256(t).hexdigest() for t in tars] == \
        [blob.diff_id for blob in img.layers]
