"""Client side: views for repositories lazypod did not write (DUCC's, read-only, AUFS
whiteouts), and pulls that take every layer the repository has from it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import LAZYPOD
from support.ducc import write_ducc_repository
from support.images import Entry, busybox_entries, image, layer
from support.podman import ROOTLESS_USER, snapshot, snapshot_in_container
from support.users import user_lazypod

pytestmark = [pytest.mark.podman, pytest.mark.registry]


def podman_major() -> int:
    out = subprocess.run(["podman", "--version"], capture_output=True, text=True).stdout
    return int(re.search(r"(\d+)\.", out).group(1))  # type: ignore[union-attr]


def aufs_image() -> object:
    base = layer([
        *busybox_entries(),
        Entry("opt/", "dir"), Entry("opt/remove-me", data=b"gone later\n"),
        Entry("opt/keep", data=b"kept\n"),
        Entry("var/", "dir"), Entry("var/lib/", "dir"), Entry("var/lib/replaced/", "dir"),
        Entry("var/lib/replaced/old", data=b"old\n"),
    ])
    middle = layer([
        Entry("opt/", "dir"), Entry("opt/.wh.remove-me"),
        Entry("var/lib/replaced/", "dir"), Entry("var/lib/replaced/.wh..wh..opq"),
        Entry("var/lib/replaced/new", data=b"new\n"),
    ])
    top = layer([Entry("etc/motd", data=b"from the top layer\n")])
    return image([base, middle, top], label="ducc")


@pytest.fixture()
def user_dir() -> Iterator[Path]:
    """A directory the unprivileged user owns (pytest's tmp is 0700 root)."""
    path = Path(tempfile.mkdtemp(prefix="lazypod-user-", dir="/tmp"))
    os.chmod(path, 0o755)
    uid = int(subprocess.run(["id", "-u", ROOTLESS_USER], capture_output=True,
                             text=True).stdout)
    os.chown(path, uid, uid)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_views_for_a_read_only_ducc_repository(registry, podman_factory, user_dir):
    img = aufs_image()
    name = registry.push("ducc/aufs", "1", img)
    repo = Path(tempfile.mkdtemp(prefix="lazypod-ducc-", dir="/tmp"))
    os.chmod(repo, 0o755)
    try:
        write_ducc_repository(repo, f"{registry.host}/ducc/aufs:1", img, records_for={0})
        into = user_dir / "views"

        # Built by a user who cannot write to the repository; the config comes from
        # the registry, AUFS whiteouts are detected.
        command = user_lazypod(LAZYPOD, user_dir / "lazypod")
        proc = subprocess.run(
            ["runuser", "-u", ROOTLESS_USER, "--", "env", f"HOME={user_dir}", *command,
             "views", str(repo), "--into", str(into), "--insecure-registry", registry.host,
             "--rootless", "--storage-opts"],
            capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr
        assert "1 fetched" in proc.stderr and "(found: fuse-overlayfs needed)" in proc.stderr
        assert "1 from layer records, 2 from configs, 0 computed" in proc.stderr
        opts = proc.stdout.split()[1::2]
        assert "overlay.mount_program=/usr/bin/fuse-overlayfs" in opts
        assert not (repo / ".podmanStore").exists()

        from_views = podman_factory("ducc-views", user=ROOTLESS_USER, storage_opts=opts)
        pulled = podman_factory("ducc-pulled", user=ROOTLESS_USER, storage_opts=[
            o for o in opts if "additional" not in o])
        pulled("pull", "--tls-verify=false", name)

        mark = registry.mark()
        tree = snapshot_in_container(from_views, name)
        assert registry.requests(since=mark) == []
        assert "./opt/remove-me" not in tree and "./opt/.wh.remove-me" not in tree
        assert "./var/lib/replaced/old" not in tree and "./var/lib/replaced/new" in tree
        assert not any(".wh." in path for path in tree)
        expected = snapshot_in_container(pulled, name)
        # The root directory's mode is podman's convention (0555 for layers it unpacks);
        # DUCC's layers keep the tar's "./" entry, and the repository is read-only.
        del tree["."], expected["."]
        assert tree == expected
    finally:
        shutil.rmtree(repo, ignore_errors=True)


def test_views_rerun_adds_new_images_and_leaves_the_others(registry, lazypod, repo, tmp_path):
    first = registry.push("client/rerun", "1", image([layer(busybox_entries())], label="r1"))
    lazypod.convert(first, repo)
    into = tmp_path / "views"
    lazypod("views", str(repo), "--into", str(into), "--offline")
    store = into / "store"
    before = {p: p.lstat().st_ino for p in store.rglob("*") if "overlay" in p.parts}

    second = registry.push("client/rerun", "2", image(
        [layer(busybox_entries()), layer([Entry("second", data=b"2")])], label="r2"))
    lazypod.convert(second, repo)
    lazypod("views", str(repo), "--into", str(into), "--offline")

    names = {n for entry in json.loads((store / "overlay-images/images.json").read_text())
             for n in entry["names"]}
    assert names == {first, second}
    for path, inode in before.items():
        assert path.lstat().st_ino == inode, path  # untouched


def test_views_full_repairs_what_a_rerun_leaves(registry, lazypod, podman_factory, repo,
                                                 tmp_path):
    """A rerun renders only images new to the views (its cost grows with what changed);
    `--full` checks every image's entries and repairs a damaged one."""
    first = registry.push("client/full", "1", image([layer(busybox_entries())], label="f1"))
    lazypod.convert(first, repo)
    into = tmp_path / "views"
    lazypod("views", str(repo), "--into", str(into), "--offline")
    (big,) = list((into / "store/overlay-images").glob("*/manifest"))
    big.unlink()

    second = registry.push("client/full", "2", image(
        [layer(busybox_entries()), layer([Entry("second", data=b"2")])], label="f2"))
    lazypod.convert(second, repo)
    lazypod("views", str(repo), "--into", str(into), "--offline")
    assert not big.exists()  # the first image was rendered before: left as it was
    podman = podman_factory("full", storage_opts=[f"additionalimagestore={into}/store"])
    assert podman.text("run", "--rm", "--network=none", second, "/bin/cat", "/second") == "2"

    lazypod("views", str(repo), "--into", str(into), "--offline", "--full")
    assert big.exists()
    assert podman.text("run", "--rm", "--network=none", first, "/bin/busybox", "true") == ""


def test_views_of_a_selection(registry, lazypod, podman_factory, repo, tmp_path):
    """`views --select` renders a subset (podman 4 lists a store in time that grows with
    the square of its size); a rerun with another selection updates the views to it."""
    names = {}
    for tag in ("app-1", "app-2", "tool"):
        names[tag] = registry.push("client/sel", tag, image(
            [layer(busybox_entries()), layer([Entry("which", data=tag.encode())])],
            label=f"sel-{tag}"))
        lazypod.convert(names[tag], repo)
    into = tmp_path / "views"
    patterns = tmp_path / "patterns"
    patterns.write_text("# the applications\n*/client/sel:app-*\n")
    out = lazypod("views", str(repo), "--into", str(into), "--offline",
                  "--select-file", str(patterns)).stderr
    assert "2 images match the selection" in out

    podman = podman_factory("selected", storage_opts=[f"additionalimagestore={into}/store"])
    listed = podman.text("images", "--format", "{{.Repository}}:{{.Tag}}").split()
    assert sorted(listed) == sorted([names["app-1"], names["app-2"]])
    assert podman.text("run", "--rm", "--network=none", names["app-2"],
                       "/bin/cat", "/which") == "app-2"

    lazypod("views", str(repo), "--into", str(into), "--offline", "--select", "*:tool")
    listed = podman.text("images", "--format", "{{.Repository}}:{{.Tag}}").split()
    assert listed == [names["tool"]]
    assert lazypod("views", str(repo), "--into", str(into), "--select-file", "/dev/null",
                   check=False).returncode == 2


def lazy_pull_setup(registry, lazypod, repo, tag: str) -> tuple[str, object]:
    base = layer([*busybox_entries(), Entry("etc/base", data=tag.encode())])
    x = image([base, layer([Entry("x", data=b"x")])], label=f"x{tag}")
    new_layer = layer([Entry("y", data=b"y only")])
    y = image([base, x.layers[1], new_layer], label=f"y{tag}")
    lazypod.convert(registry.push("client/x", tag, x), repo)
    return registry.push("client/y", tag, y), y


def test_pull_through_the_image_store_downloads_only_what_is_missing(
    registry, lazypod, podman_factory, repo
):
    name, y = lazy_pull_setup(registry, lazypod, repo, "store")
    podman = podman_factory("lazy", storage_opts=[f"additionalimagestore={repo}/.podmanStore"])

    mark = registry.mark()
    podman("pull", "--tls-verify=false", name)
    blobs = registry.blob_gets(since=mark)
    assert sorted(blobs) == sorted([y.config_digest, y.layers[2].digest])

    container = podman.text("create", "--network=none", name, "/bin/busybox", "true").strip()
    tree = snapshot(Path(podman.text("mount", container).strip()))
    normal = podman_factory("normal")
    normal("pull", "--tls-verify=false", name)
    container = normal.text("create", "--network=none", name, "/bin/busybox", "true").strip()
    assert tree == snapshot(Path(normal.text("mount", container).strip()))


def test_pull_through_the_layer_store(registry, lazypod, podman_factory, repo):
    name, y = lazy_pull_setup(registry, lazypod, repo, "layers")
    lazypod.convert(name, repo)  # now every layer of y is in the repository
    podman = podman_factory("als", storage_opts=[
        f"overlay.additionallayerstore={repo}/.podmanLayers"])

    mark = registry.mark()
    podman("pull", "--tls-verify=false", name)
    blobs = registry.blob_gets(since=mark)
    if podman_major() < 5:
        assert blobs == [y.config_digest]  # manifest and config only
    else:  # podman 5.1+ asks the layer store only for zstd:chunked/eStargz layers
        assert sorted(blobs) == sorted([y.config_digest, *(b.digest for b in y.layers)])
    out = podman.text("run", "--rm", "--network=none", name, "/bin/cat", "/y")
    assert out == "y only"


@pytest.mark.rootless
def test_rootless_pull_through_the_layer_store_runs(
    registry, lazypod, podman_factory, user_dir
):
    repo = user_dir / "repo"  # reachable by the user (pytest's tmp is not)
    name, y = lazy_pull_setup(registry, lazypod, repo, "rootless-als")
    lazypod.convert(name, repo)
    printed = lazypod("podman-config", "--rootless", "--storage-opts", str(repo)).stdout.split()
    opts = [o for o in printed[1::2] if "imagestore" not in o]  # the layer store alone
    podman = podman_factory("rootless-als", user=ROOTLESS_USER, storage_opts=opts)

    mark = registry.mark()
    podman("pull", "--tls-verify=false", name)
    if podman_major() < 5:
        assert registry.blob_gets(since=mark) == [y.config_digest]
    out = podman.text("run", "--rm", "--network=none", name, "/bin/busybox", "sh", "-c",
                      "cat /y && echo written > /etc/new-file && cat /etc/new-file")
    assert out == "y onlywritten\n"
