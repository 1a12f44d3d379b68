"""Images that are not in a registry: what podman itself saves (`podman save
--format oci-archive` / `oci-dir`, and its storage through `containers-storage:`),
converted, then run by podman from the repository with the same tree as podman's own
image; and bad input refused in one line with the repository left as it was."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest

from conftest import tree_of
from support.images import (
    Entry,
    LayoutEntry,
    archive_oci_layout,
    busybox_entries,
    edge_case_layers,
    image,
    layer,
    write_oci_layout,
)
from support.podman import snapshot

pytestmark = [pytest.mark.podman, pytest.mark.registry]


def store_opts(repo: Path) -> list[str]:
    return [f"additionalimagestore={repo}/.podmanStore"]


def container_tree(podman, name: str) -> dict[str, tuple[object, ...]]:
    container = podman.text("create", "--network=none", name, "/bin/busybox", "true").strip()
    mountpoint = Path(podman.text("mount", container).strip())
    try:
        return snapshot(mountpoint)
    finally:
        podman("umount", container)
        podman("rm", container)


@pytest.fixture()
def saved(registry, podman_factory, tmp_path):
    """The edge-case image as podman holds it after a pull: (podman, its name)."""
    name = registry.push("test/sources", "1", image(edge_case_layers(), label="sources"))
    podman = podman_factory("saver")
    podman("pull", "--tls-verify=false", name)
    return podman, name


@pytest.mark.parametrize("fmt", ["oci-archive", "oci-dir"])
def test_an_image_podman_saved_runs_from_the_repository_as_podmans_own(
        saved, fmt, lazypod, podman_factory, repo, tmp_path, registry):
    podman, name = saved
    target = tmp_path / ("image.tar" if fmt == "oci-archive" else "image-dir")
    podman("save", "--format", fmt, "-o", str(target), name)
    transport = "oci-archive" if fmt == "oci-archive" else "oci"

    mark = registry.mark()
    proc = lazypod("convert-single-image", f"{transport}:{target}", str(repo))
    assert registry.requests(since=mark) == []  # the registry is not asked
    assert name in proc.stderr  # published under the name podman saved it as
    manifest = (repo / ".metadata" / name / "manifest.json").read_text()
    assert lazypod("download-manifest", "--raw", f"{transport}:{target}").stdout == manifest
    assert json.loads(manifest)["layers"]

    from_repo = podman_factory("from-repo", storage_opts=store_opts(repo))
    assert from_repo.text("run", "--rm", "--network=none", name, "/bin/cat",
                          "/opt/keep") == "modified in layer 3\n"
    repo_tree = container_tree(from_repo, name)
    own_tree = container_tree(podman, name)
    assert repo_tree == own_tree
    # Spot checks, so that two empty trees cannot pass.
    assert "opt/remove-me" not in repo_tree and "var/lib/gone/y" in repo_tree
    assert repo_tree["usr/local/bin/suid"][0] == "-rwsr-xr-x"
    assert repo_tree["home/user/file"][1:3] == (1000, 1000)
    assert repo_tree["srv/xattr-file"][-1] == (("user.lazypod", b"hello"),)
    # podman's store keeps nothing of its own for it: the layers are the repository's.
    layers = [entry for path in (from_repo.root / "overlay-layers").glob("layers.json")
              for entry in json.loads(path.read_text() or "[]")]
    assert layers == []


def test_containers_storage_is_read_through_podman(saved, lazypod, podman_factory, repo):
    podman, name = saved
    podman("tag", name, "localhost/built-here:2")
    lazypod.env.update(podman.env)  # lazypod's podman sees the test's private storage
    proc = lazypod("convert-single-image", "containers-storage:built-here:2", str(repo))
    assert "localhost/built-here:2" in proc.stderr
    from_repo = podman_factory("from-repo", storage_opts=store_opts(repo))
    repo_tree = container_tree(from_repo, "localhost/built-here:2")
    assert repo_tree == container_tree(podman, "localhost/built-here:2")
    assert "var/lib/gone/y" in repo_tree and "opt/remove-me" not in repo_tree

    missing = lazypod("convert-single-image", "containers-storage:not-there", str(repo),
                      check=False)
    assert missing.returncode == 1
    assert missing.stderr.count("\n") == 1 and "podman could not save it" in missing.stderr


def test_a_recipe_mixes_sources_and_check_image_syntax_names_them(lazypod, repo, tmp_path,
                                                                  busybox_image):
    name, _ = busybox_image
    write_oci_layout(tmp_path / "build", [LayoutEntry(
        image([layer(busybox_entries()), layer([Entry("built", data=b"here\n")])]), "1.0")])
    recipe = tmp_path / "wishlist.yaml"
    recipe.write_text(f"version: 1\ninput:\n  - 'oci:build:1.0'\n  - '{name}'\n")
    lazypod("convert", "--insecure-registry", name.split("/")[0], str(recipe), str(repo))
    assert (repo / "localhost/build:1.0/built").read_text() == "here\n"
    assert (repo / name / "bin/busybox").is_file()

    syntax = lazypod("check-image-syntax", f"oci:{tmp_path}/build:1.0").stdout
    assert "transport:   oci\n" in syntax and "layout name: localhost/build:1.0\n" in syntax
    assert "oci-archive:FILE" in lazypod("check-image-syntax", "--help").stdout


def bad_archive(tmp_path: Path, good: Path, name: str, member: str) -> str:
    info = tarfile.TarInfo(member)
    info.size = 4
    return f"oci-archive:{archive_oci_layout(good, tmp_path / name, [info])}"


def test_bad_input_fails_in_one_line_and_leaves_the_repository_as_before(
        lazypod, repo, tmp_path, busybox_image):
    name, _ = busybox_image
    lazypod.convert(name, repo)
    before = tree_of(repo)
    img = image([layer(busybox_entries()), layer([Entry("x", data=b"x")])], label="bad")
    good = write_oci_layout(tmp_path / "good", [LayoutEntry(img, "1")])
    two = write_oci_layout(tmp_path / "two", [LayoutEntry(img, "1"), LayoutEntry(
        image([layer([Entry("y", data=b"y")])]), "2")])
    corrupt = tmp_path / "corrupt"
    shutil.copytree(good, corrupt)
    config = corrupt / "blobs/sha256" / img.config_digest[7:]
    config.write_bytes(config.read_bytes().replace(b"linux", b"LINUX"))
    archive = archive_oci_layout(good, tmp_path / "good.tar")
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(archive.read_bytes()[:archive.stat().st_size * 2 // 3])
    cases = {
        f"oci:{tmp_path}/missing": "no such directory",
        f"oci:{tmp_path}": "not an OCI image layout",
        f"oci:{good}:nope": "no image named 'nope'",
        f"oci:{two}": "holds 2 images",
        f"oci:{corrupt}:1": "does not match its digest",
        f"oci-archive:{truncated}": "truncated",
        bad_archive(tmp_path, good, "evil.tar", "../../evil"): "member named '../../evil'",
    }
    for text, message in cases.items():
        proc = lazypod("convert-single-image", text, str(repo), check=False)
        assert proc.returncode == 1, (text, proc.stderr)
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("lazypod: error: "), (text, lines)
        assert message in lines[0], (text, lines)
        assert "Traceback" not in proc.stderr
        assert tree_of(repo) == before, text
    assert not (tmp_path.parent / "evil").exists()
