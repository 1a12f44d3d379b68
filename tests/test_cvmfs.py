"""The cvmfs backend against the strict stand-in cvmfs_server; podman then runs the
images from the published tree, as a client would."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.cvmfs import make_repo, real_server
from support.debian import debian_image
from support.images import Entry, busybox_entries, edge_case_layers, image, layer
from support.podman import snapshot

pytestmark = [pytest.mark.podman, pytest.mark.registry]

MAX_PUBLISHES = 2  # one ingest, one transaction


@pytest.fixture()
def cvmfs(lazypod) -> Iterator[object]:
    repo = make_repo()
    lazypod.env.update(repo.env)
    yield repo
    repo.destroy()


def convert(lazypod, cvmfs, *names: str, check: bool = True, extra: tuple[str, ...] = ()):
    return lazypod(*convert_args(cvmfs, *names, extra=extra), check=check)


def convert_args(cvmfs, *names: str, extra: tuple[str, ...] = ()) -> list[str]:
    hosts = sorted({n.split("/", 1)[0] for n in names})
    recipe = cvmfs.base / "recipe.yaml"
    recipe.write_text("version: 1\nuser: test\ncvmfs_repo: " + cvmfs.name + "\ninput:\n"
                      + "".join(f"  - 'http://{n}'\n" for n in names))
    args = ["convert", *extra]
    for host in hosts:
        args += ["--insecure-registry", host]
    return [*args, "--public-root", str(cvmfs.client_view), str(recipe)]


def run_tree(podman_factory, cvmfs, name: str, label: str) -> dict[str, tuple[object, ...]]:
    podman = podman_factory(label, storage_opts=[
        f"additionalimagestore={cvmfs.client_view}/.podmanStore"])
    container = podman.text("create", "--network=none", name, "/bin/busybox", "true").strip()
    tree = snapshot(Path(podman.text("mount", container).strip()), hardlinks=False)
    podman("umount", container)
    return tree


def pulled_tree(podman_factory, name: str) -> dict[str, tuple[object, ...]]:
    podman = podman_factory("pulled")
    podman("pull", "--tls-verify=false", name)
    container = podman.text("create", "--network=none", name, "/bin/busybox", "true").strip()
    tree = snapshot(Path(podman.text("mount", container).strip()), hardlinks=False)
    podman("umount", container)
    return tree


def test_edge_case_image_runs_from_the_published_repository(
    registry, lazypod, podman_factory, cvmfs
):
    img = image(edge_case_layers(), label="cvmfs-edge")
    name = registry.push("test/edge", "cvmfs", img)

    proc = convert(lazypod, cvmfs, name)
    assert "cvmfs: " in proc.stderr
    assert not cvmfs.state()["transaction"]

    mark = registry.mark()
    from_cvmfs = run_tree(podman_factory, cvmfs, name, "from-cvmfs")
    assert registry.requests(since=mark) == []
    expected = pulled_tree(podman_factory, name)
    assert from_cvmfs == expected  # hardlink identity aside: CVMFS breaks hardlinks

    # The layers hold real overlay whiteouts, and no directory was left to 65534.
    upper = cvmfs.client_view / ".layers" / img.layers[1].digest[7:9] / img.layers[1].digest[7:]
    gone = os.lstat(upper / "layerfs/var/lib/gone")
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
    # The opaque directory: no marker, explicit whiteouts of what the base layer holds.
    opaque = upper / "layerfs/var/lib/replaced"
    assert os.listxattr(opaque) == []
    for hidden in ("old-a", "sub"):
        st = os.lstat(opaque / hidden)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, hidden
    for dirpath, dirnames, _ in os.walk(cvmfs.client_view):
        for d in dirnames:
            assert os.lstat(os.path.join(dirpath, d)).st_uid != 65534, d
    assert (upper / ".cvmfscatalog").exists() and not (upper / "layerfs/.cvmfscatalog").exists()
    assert (cvmfs.client_view / ".layers" / img.layers[1].digest[7:9] / ".cvmfscatalog").exists()
    flat = cvmfs.client_view / registry.host / "test/edge:cvmfs"
    assert (flat / ".singularity.d/runscript").exists() and (flat / "opt/keep").exists()


def test_debian_image_runs_from_the_published_repository(
    registry, lazypod, podman_factory, cvmfs
):
    """A real-world shape through the cvmfs backend, flat tree included."""
    img = debian_image("cvmfs-debian")
    name = registry.push("test/debian", "cvmfs", img)

    convert(lazypod, cvmfs, name)
    assert not cvmfs.state()["transaction"]

    from_cvmfs = run_tree(podman_factory, cvmfs, name, "debian-cvmfs")
    expected = pulled_tree(podman_factory, name)
    assert from_cvmfs == expected
    assert from_cvmfs["bin"][-2] == "usr/bin" and from_cvmfs["var/run"][-2] == "/run"
    assert from_cvmfs["dev/fd"][-2] == "/proc/self/fd"
    assert "usr/bin/tac" not in from_cvmfs and "etc/motd" not in from_cvmfs
    assert [p for p in from_cvmfs if p.startswith("usr/share/doc/")] == \
        ["usr/share/doc/README.lazypod"]
    assert len(from_cvmfs) > 3000
    flat = cvmfs.client_view / registry.host / "test/debian:cvmfs"
    assert (flat / "etc/lazypod-marker").read_text() == "debian test image\n"
    assert os.readlink(flat / "var/run") == "/run" and not (flat / "usr/bin/tac").exists()


def test_symlinks_in_a_layer_are_never_followed(registry, lazypod, podman_factory, cvmfs,
                                                tmp_path):
    """A layer's `var/run -> /run` or `dev/fd -> /proc/self/fd`, or a hostile link to a
    host directory, is an entry: nothing of the publisher's host reaches the repository."""
    secret_dir = tmp_path / "host-secrets"
    secret_dir.mkdir()
    secret = b"the publisher's signing key " + os.urandom(16).hex().encode()
    (secret_dir / "key").write_bytes(secret)
    img = image([layer([
        *busybox_entries(),
        Entry("usr/", "dir"), Entry("usr/bin/", "dir"),
        Entry("usr/bin/tool", data=b"#!/bin/sh\n", mode=0o755),
        Entry("sbin", "symlink", target="usr/bin"),
        Entry("var/", "dir"), Entry("var/run", "symlink", target=str(secret_dir)),
        Entry("dev/", "dir"), Entry("dev/fd", "symlink", target="/proc/self/fd"),
        Entry("etc/hostdir", "symlink", target="/etc"),
    ])], label="symlinks")
    name = registry.push("test/symlinks", "1", img)

    convert(lazypod, cvmfs, name)

    members = [m for tar in cvmfs.ingests() for m in tar]
    assert members, "no ingest was recorded"
    digests = {m["sha256"] for m in members}
    assert hashlib.sha256(secret).hexdigest() not in digests
    for link in ("var/run", "dev/fd", "etc/hostdir", "sbin"):
        listed = [m for m in members if m["name"].endswith("/" + link)]
        assert listed and all(m["type"] == "2" for m in listed), (link, listed)
        assert not [m for m in members if f"/{link}/" in m["name"]], link
    assert not [m for m in members if "/etc/hostdir/" in m["linkname"]
                or "/var/run/" in m["linkname"]]
    assert from_view_equals_pull(podman_factory, cvmfs, name)


def from_view_equals_pull(podman_factory, cvmfs, name: str) -> bool:
    return run_tree(podman_factory, cvmfs, name, "view") == pulled_tree(podman_factory, name)


def shared_base_images(registry, count: int, tag: str) -> list[str]:
    base = layer(busybox_entries())
    names = []
    for i in range(count):
        top = layer([Entry(f"image-{i}", data=f"{tag} {i}\n".encode())])
        names.append(registry.push("test/family", f"{tag}-{i}", image([base, top],
                                                                          label=f"{tag}{i}")))
    return names


@pytest.mark.parametrize("count", [1, 5])
def test_publishes_per_run_are_bounded(registry, lazypod, podman_factory, cvmfs, count):
    names = shared_base_images(registry, count, f"bound{count}")
    convert(lazypod, cvmfs, *names)
    counts = cvmfs.counts()
    assert counts["publish"] <= MAX_PUBLISHES, counts
    assert counts["transaction"] == 1 and counts["ingest"] == 1, counts

    podman = podman_factory("family", storage_opts=[
        f"additionalimagestore={cvmfs.client_view}/.podmanStore"])
    for i, name in enumerate(names):
        out = podman.text("run", "--rm", "--network=none", name, "/bin/cat", f"/image-{i}")
        assert out == f"bound{count} {i}\n"

    before = cvmfs.counts()["publish"]
    convert(lazypod, cvmfs, *names)  # nothing new: nothing to publish
    assert cvmfs.counts()["publish"] == before


@pytest.mark.parametrize("fault", [
    {"ingest": 1}, {"ingest": 1, "ingest_leaves_transaction": True}, {"publish": 1}],
    ids=["ingest", "ingest-leaves-transaction", "publish"])
def test_failure_in_the_middle_then_a_rerun_completes(
    registry, lazypod, podman_factory, cvmfs, fault
):
    names = shared_base_images(registry, 2, f"fail{len(fault)}{'publish' in fault}")
    cvmfs.inject(**fault)
    store = cvmfs.client_view / ".podmanStore/overlay-images/images.json"

    proc = convert(lazypod, cvmfs, *names, check=False)

    assert proc.returncode == 1
    assert "injected failure" in proc.stderr
    assert not cvmfs.state()["transaction"]
    assert not store.exists()  # no image was published: records and stores come last
    cvmfs.inject()

    convert(lazypod, cvmfs, *names)
    images = json.loads(store.read_text())
    assert sorted(n for i in images for n in i["names"]) == sorted(names)
    podman = podman_factory("rerun", storage_opts=[
        f"additionalimagestore={cvmfs.client_view}/.podmanStore"])
    podman("run", "--rm", "--network=none", names[1], "/bin/cat", "/image-1")


def test_an_open_transaction_is_reported_and_aborted_with_force(registry, lazypod, cvmfs):
    names = shared_base_images(registry, 1, "open")
    cvmfs.server("transaction", cvmfs.name, check=True)

    proc = convert(lazypod, cvmfs, *names, check=False)
    assert proc.returncode == 1
    assert "already open" in proc.stderr and "--force" in proc.stderr
    assert cvmfs.state()["transaction"]  # not ours to abort without --force

    convert(lazypod, cvmfs, *names, extra=("--force",))
    assert not cvmfs.state()["transaction"]


def start_convert(lazypod, cvmfs, name: str):
    recipe = cvmfs.base / "sigterm.yaml"
    recipe.write_text(f"version: 1\ninput:\n  - 'http://{name}'\n")
    return lazypod.popen("convert", "--backend", "cvmfs", "--insecure-registry",
                         name.split("/")[0], "--public-root", str(cvmfs.client_view),
                         str(recipe), cvmfs.name)


def test_sigterm_during_an_ingest_publishes_nothing_of_it(registry, lazypod, cvmfs):
    names = shared_base_images(registry, 1, "sigterm-ingest")
    cvmfs.inject(ingest_sleep=3)  # the server opens the tar, then reads nothing for 3 s
    proc = start_convert(lazypod, cvmfs, names[0])
    deadline = time.monotonic() + 60
    while not cvmfs.ingest_started() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)  # lazypod is blocked writing the tar
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)

    assert proc.returncode == 1
    assert "SIGTERM" in stderr
    assert not cvmfs.state()["transaction"]
    assert cvmfs.counts()["ingest"] == 0  # the ingest failed: nothing of it was published
    layers = cvmfs.client_view / ".layers"
    assert not any(layers.glob("*/*/layerfs/bin/busybox"))
    cvmfs.inject()
    convert(lazypod, cvmfs, *names)
    assert any(layers.glob("*/*/layerfs/bin/busybox"))


def test_sigterm_during_a_publish_lets_it_finish(registry, lazypod, cvmfs):
    names = shared_base_images(registry, 1, "sigterm-publish")
    cvmfs.inject(publish_sleep=3)  # the run waits on its publish, transaction open
    proc = start_convert(lazypod, cvmfs, names[0])
    deadline = time.monotonic() + 60
    while not cvmfs.publish_started() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # inside `cvmfs_server publish`
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)

    assert proc.returncode == 1
    assert "SIGTERM" in stderr and "waiting for cvmfs_server to finish" in stderr
    assert time.monotonic() - started > 1.5  # cvmfs_server was not killed half-way
    assert not cvmfs.state()["transaction"]
    # The ingest, then the transaction's publish: finished, nothing aborted.
    assert cvmfs.counts()["publish"] == 2 and cvmfs.counts()["abort"] == 0


def test_server_conf_without_xattrs_is_refused(registry, lazypod, tmp_path):
    repo = make_repo("noxattrs.test.ch", include_xattrs=False)
    try:
        lazypod.env.update(repo.env)
        names = shared_base_images(registry, 1, "noxattr")
        proc = convert(lazypod, repo, *names, check=False)
        assert proc.returncode == 1
        assert "CVMFS_INCLUDE_XATTRS=true" in proc.stderr and "add that line" in proc.stderr
        assert repo.counts()["transaction"] == 0
    finally:
        repo.destroy()


def test_layers_written_before_are_migrated_by_a_normal_run(
    registry, lazypod, podman_factory, cvmfs
):
    img = image(edge_case_layers(), label="cvmfs-migrate")
    name = registry.push("test/edge", "cvmfs-migrate", img)
    convert(lazypod, cvmfs, name)
    digest = img.layers[1].digest[7:]
    rel = f".layers/{digest[:2]}/{digest}"
    # The layer as older lazypod versions published it: both markers, no whiteouts
    # below the opaque directory, no record of completed chains.
    for hidden in ("old-a", "sub"):
        cvmfs.server("ingest", "--delete", f"{rel}/layerfs/var/lib/replaced/{hidden}",
                     cvmfs.name, check=True)
    cvmfs.server("transaction", cvmfs.name, check=True)
    opaque = cvmfs.server_view / rel / "layerfs/var/lib/replaced"
    for key in ("trusted.overlay.opaque", "user.overlay.opaque"):
        os.setxattr(opaque, key, b"y")
    (cvmfs.server_view / rel / ".metadata/opaque-chains.json").unlink()
    (cvmfs.server_view / ".podmanStore/lazypod-views").unlink()  # older versions: none
    cvmfs.server("publish", cvmfs.name, check=True)
    client = cvmfs.client_view / rel / "layerfs/var/lib/replaced"
    assert sorted(os.listxattr(client)) == ["trusted.overlay.opaque", "user.overlay.opaque"]

    other = shared_base_images(registry, 1, "migrate-other")
    convert(lazypod, cvmfs, *other)  # a normal run, about another image

    assert os.listxattr(client) == []
    assert sorted(os.listdir(client)) == ["new", "old-a", "sub"]
    assert os.lstat(client / "old-a").st_rdev == 0
    assert (cvmfs.client_view / rel / ".metadata/opaque-chains.json").exists()
    assert run_tree(podman_factory, cvmfs, name, "migrated") == \
        pulled_tree(podman_factory, name)


def test_a_reader_of_the_repository_is_named_and_nothing_is_left_open(
    registry, lazypod, cvmfs
):
    """cvmfs_server would ask whether to go on (on standard input); lazypod looks first,
    names the process, and leaves no transaction open."""
    names = shared_base_images(registry, 1, "held")
    convert(lazypod, cvmfs, *names)
    more = shared_base_images(registry, 2, "held-more")
    held = next(p for p in cvmfs.server_view.rglob("*") if p.is_file())
    with open(held, "rb"):
        proc = convert(lazypod, cvmfs, *more, check=False)
    assert proc.returncode == 1
    line = [x for x in proc.stderr.splitlines() if x.startswith("lazypod: error:")]
    assert len(line) == 1 and f"pid {os.getpid()}" in line[0] and "hold files" in line[0]
    assert not cvmfs.state()["transaction"]
    convert(lazypod, cvmfs, *more)  # once the reader is gone, the run completes


def test_a_bad_image_in_a_batch_leaves_the_others_published(registry, lazypod, podman_factory,
                                                           cvmfs, tmp_path):
    good = shared_base_images(registry, 2, "batch")
    hostile = registry.push("test/hostile", "cvmfs", image([
        layer(busybox_entries()),
        layer([Entry("escape", "symlink", target=str(tmp_path)),
               Entry("escape/pwned", data=b"x")])], label="hostile-cvmfs"))
    proc = convert(lazypod, cvmfs, good[0], hostile, good[1], check=False)
    assert proc.returncode == 3  # partial: the others are published
    assert "refusing the layer" in proc.stderr and not (tmp_path / "pwned").exists()
    assert not cvmfs.state()["transaction"]
    podman = podman_factory("batch", storage_opts=[
        f"additionalimagestore={cvmfs.client_view}/.podmanStore"])
    for i, name in enumerate(good):
        assert podman.text("run", "--rm", "--network=none", name, "/bin/cat",
                           f"/image-{i}") == f"batch {i}\n"
    assert not any((cvmfs.client_view / ".metadata").rglob("hostile*"))


def test_flat_trees_of_hardlinked_and_chunked_files(registry, lazypod, cvmfs):
    """Two things a real cvmfs_server does to flat trees' hardlink members: one naming
    another hardlink member of the same ingest fails the ingest when the server clones
    them in the other order (`a-b/x` sorts before `a/y`, the walk visits `a/y` first);
    and a member naming a published file that a transaction stored in chunks (large
    files with xattrs) copies the entry without its chunks. The flat files are read
    back through the client, on the real server (the stand-in models neither)."""
    big = os.urandom(20 * 1024 * 1024)
    base = layer([
        *busybox_entries(),
        Entry("a/", "dir"), Entry("a/y", data=b"linked\n"),
        Entry("a-b/", "dir"), Entry("a-b/x", "hardlink", target="a/y"),
        Entry("opt/", "dir"),
        Entry("opt/big", data=big, xattrs={"user.origin": "test"}),
    ])
    first = registry.push("test/chunked", "1", image([base], label="chunked-1"))
    convert(lazypod, cvmfs, first)
    published = next((cvmfs.client_view / ".layers").glob("*/*/layerfs/opt/big"))
    if real_server():  # the transaction that set its xattr stored it in chunks
        assert int(os.getxattr(published, "user.chunks")) > 1
    # A later run: a new flat tree over the published layer.
    second = registry.push("test/chunked", "2", image(
        [base, layer([Entry("second", data=b"2\n")])], label="chunked-2"))
    proc = lazypod("-v", *convert_args(cvmfs, second))
    if real_server():
        assert "opt/big: published in" in proc.stderr, proc.stderr

    for name in (first, second):
        flat = (cvmfs.client_view / name).resolve()
        assert (flat / "a-b/x").read_bytes() == b"linked\n" == (flat / "a/y").read_bytes()
        assert hashlib.sha256((flat / "opt/big").read_bytes()).digest() == \
            hashlib.sha256(big).digest(), name
    assert os.getxattr(published, "user.origin") == b"test"
