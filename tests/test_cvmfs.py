"""The cvmfs backend against the strict stand-in cvmfs_server; podman then runs the
images from the published tree, as a client would."""

from __future__ import annotations

import json
import os
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.cvmfs import make_repo
from support.images import Entry, busybox_entries, edge_case_layers, image, layer
from support.podman import snapshot

pytestmark = [pytest.mark.podman, pytest.mark.registry]

MAX_PUBLISHES = 5


@pytest.fixture()
def cvmfs(lazypod) -> Iterator[object]:
    repo = make_repo()
    lazypod.env.update(repo.env)
    yield repo
    repo.destroy()


def convert(lazypod, cvmfs, *names: str, check: bool = True, extra: tuple[str, ...] = ()):
    hosts = sorted({n.split("/", 1)[0] for n in names})
    recipe = cvmfs.base / "recipe.yaml"
    recipe.write_text("version: 1\nuser: test\ncvmfs_repo: " + cvmfs.name + "\ninput:\n"
                      + "".join(f"  - 'http://{n}'\n" for n in names))
    args = ["convert", *extra]
    for host in hosts:
        args += ["--insecure-registry", host]
    return lazypod(*args, "--public-root", str(cvmfs.client_view), str(recipe), check=check)


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
    for path in ("var/lib/replaced", "var/lib/gone"):  # see test_end_to_end: rootful overlay
        assert from_cvmfs[path][-1] == (("user.overlay.opaque", b"y"),)
        from_cvmfs[path] = (*from_cvmfs[path][:-1], ())
    assert from_cvmfs == expected  # hardlink identity aside: CVMFS breaks hardlinks

    # The layers hold real overlay whiteouts, and no directory was left to 65534.
    upper = cvmfs.client_view / ".layers" / img.layers[1].digest[7:9] / img.layers[1].digest[7:]
    gone = os.lstat(upper / "layerfs/var/lib/gone")
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
    opaque = upper / "layerfs/var/lib/replaced"
    assert os.getxattr(opaque, "trusted.overlay.opaque") == b"y"
    for dirpath, dirnames, _ in os.walk(cvmfs.client_view):
        for d in dirnames:
            assert os.lstat(os.path.join(dirpath, d)).st_uid != 65534, d
    assert (upper / ".cvmfscatalog").exists() and not (upper / "layerfs/.cvmfscatalog").exists()
    assert (cvmfs.client_view / ".layers" / img.layers[1].digest[7:9] / ".cvmfscatalog").exists()
    flat = cvmfs.client_view / registry.host / "test/edge:cvmfs"
    assert (flat / ".singularity.d/runscript").exists() and (flat / "opt/keep").exists()


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
    assert counts["transaction"] <= 3, counts

    podman = podman_factory("family", storage_opts=[
        f"additionalimagestore={cvmfs.client_view}/.podmanStore"])
    for i, name in enumerate(names):
        out = podman.text("run", "--rm", "--network=none", name, "/bin/cat", f"/image-{i}")
        assert out == f"bound{count} {i}\n"

    before = cvmfs.counts()["publish"]
    convert(lazypod, cvmfs, *names)  # nothing new: nothing to publish
    assert cvmfs.counts()["publish"] == before


@pytest.mark.parametrize("failing_ingest", [1, 2], ids=["layers", "flat"])
@pytest.mark.parametrize("leaves_transaction", [False, True], ids=["closed", "left-open"])
def test_failure_in_the_middle_then_a_rerun_completes(
    registry, lazypod, podman_factory, cvmfs, failing_ingest, leaves_transaction
):
    names = shared_base_images(registry, 2, f"fail{failing_ingest}{leaves_transaction}")
    cvmfs.inject(ingest=failing_ingest, ingest_leaves_transaction=leaves_transaction)
    store = cvmfs.client_view / ".podmanStore/overlay-images/images.json"

    proc = convert(lazypod, cvmfs, *names, check=False)

    assert proc.returncode == 1
    assert "injected failure" in proc.stderr
    assert not cvmfs.state()["transaction"]
    if failing_ingest == 1:  # the images were never published
        assert not store.exists()
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
    cvmfs.inject(publish_sleep=3)  # the run waits on its first publish, transaction open
    proc = start_convert(lazypod, cvmfs, names[0])
    deadline = time.monotonic() + 60
    while not cvmfs.state()["transaction"] and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)  # well inside `cvmfs_server publish`
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)

    assert proc.returncode == 1
    assert "SIGTERM" in stderr and "waiting for cvmfs_server to finish" in stderr
    assert time.monotonic() - started > 1.5  # cvmfs_server was not killed half-way
    assert not cvmfs.state()["transaction"]
    assert cvmfs.counts()["publish"] == 1 and cvmfs.counts()["abort"] == 0


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
