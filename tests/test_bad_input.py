"""Bad input gets one clear line, a non-zero exit, and a repository exactly as before."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from conftest import tree_of
from support.images import Entry, busybox_entries, image, layer
from support.registry import free_port

pytestmark = [pytest.mark.registry]


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("lazypod: error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture()
def populated_repo(registry, busybox_image, lazypod, repo) -> Path:
    """A repository that already holds an image, so "unchanged" means something."""
    lazypod.convert(busybox_image[0], repo)
    return repo


def test_malformed_reference_names_the_bad_part(lazypod, repo):
    proc = lazypod("convert-single-image", "Docker.io/Library/Ubuntu:22.04", str(repo),
                   check=False)
    assert proc.returncode == 1
    assert "bad repository component 'Library'" in error_line(proc)
    assert "lowercase" in error_line(proc)
    assert not repo.exists()


def test_unknown_image_fails_cleanly_and_changes_nothing(registry, lazypod, populated_repo):
    before = tree_of(populated_repo)
    proc = lazypod.convert(f"{registry.host}/no/such-image:1", populated_repo, check=False)
    assert proc.returncode == 1
    assert "not found in registry" in error_line(proc)
    assert tree_of(populated_repo) == before


def test_unreachable_registry(lazypod, populated_repo):
    before = tree_of(populated_repo)
    proc = lazypod.convert(f"127.0.0.1:{free_port()}/some/image:1", populated_repo, check=False)
    assert proc.returncode == 1
    assert "is unreachable" in error_line(proc)
    assert tree_of(populated_repo) == before


def test_plain_http_registry_needs_to_be_declared_insecure(registry, busybox_image, lazypod, repo):
    proc = lazypod("convert-single-image", busybox_image[0], str(repo), check=False)
    assert proc.returncode == 1
    assert f"--insecure-registry {registry.host}" in error_line(proc)


def test_blob_not_matching_its_digest_is_rejected(registry, proxy, lazypod, populated_repo):
    top = layer([Entry("payload", data=os.urandom(4096))])
    img = image([layer(busybox_entries()), top], label="corrupt")
    registry.push("test/corrupt", "1", img)
    proxy.faults.corrupt.add(top.digest)
    before = tree_of(populated_repo)

    proc = lazypod.convert(f"{proxy.host}/test/corrupt:1", populated_repo, check=False)

    assert proc.returncode == 1
    assert "does not match its digest" in error_line(proc) or "does not decompress" in \
        error_line(proc)
    assert tree_of(populated_repo) == before


def test_truncated_blob_is_rejected(registry, proxy, lazypod, populated_repo):
    top = layer([Entry("payload", data=os.urandom(200_000))])
    img = image([layer(busybox_entries()), top], label="truncated")
    registry.push("test/truncated", "1", img)
    proxy.faults.truncate.add(top.digest)
    before = tree_of(populated_repo)

    proc = lazypod.convert(f"{proxy.host}/test/truncated:1", populated_repo, check=False)

    assert proc.returncode == 1
    assert top.digest[7:19] in error_line(proc)
    assert tree_of(populated_repo) == before


def test_a_dropped_connection_is_retried(registry, proxy, lazypod, repo):
    top = layer([Entry("payload", data=os.urandom(300_000))])
    img = image([layer(busybox_entries()), top], label="flaky")
    registry.push("test/flaky", "1", img)
    proxy.faults.drop_once.add(top.digest)

    lazypod.convert(f"{proxy.host}/test/flaky:1", repo)

    assert (repo / ".layers" / top.digest[7:9] / top.digest[7:] / "layerfs/payload").exists()


@pytest.mark.parametrize(
    ("entries", "member"),
    [
        ([Entry("../escaped", data=b"x")], "../escaped"),
        ([Entry("a/../../escaped", data=b"x")], "a/../../escaped"),
        ([Entry("/escaped-absolute", data=b"x")], "/escaped-absolute"),
        ([Entry("escape", "symlink", target="{outside}"),
          Entry("escape/pwned", data=b"x")], "escape/pwned"),
        ([Entry("etc-passwd", "hardlink", target="../../../../etc/passwd")], "etc-passwd"),
        ([Entry("etc-passwd", "hardlink", target="/etc/passwd")], "etc-passwd"),
        ([Entry("dir", "symlink", target="{outside}"), Entry("x", "hardlink",
          target="dir/victim")], "x"),
    ],
    ids=["dotdot", "dotdot-inside", "absolute", "symlinked-parent", "hardlink-dotdot",
         "hardlink-absolute", "hardlink-through-symlink"],
)
def test_hostile_layer_is_rejected_and_nothing_lands_outside(
    registry, lazypod, populated_repo, tmp_path, entries, member
):
    outside = tmp_path / f"outside-{uuid.uuid4().hex[:8]}"
    outside.mkdir()
    (outside / "victim").write_text("victim")
    for entry in entries:
        if isinstance(entry.target, str):
            entry.target = entry.target.replace("{outside}", str(outside))
    hostile = image([layer(busybox_entries()), layer(entries)], label=member)
    tag = uuid.uuid4().hex[:8]
    registry.push("test/hostile", tag, hostile)
    before = tree_of(populated_repo)
    outside_before = tree_of(outside)
    parent_before = sorted(os.listdir(populated_repo.parent))

    proc = lazypod.convert(f"{registry.host}/test/hostile:{tag}", populated_repo, check=False)

    assert proc.returncode == 1
    line = error_line(proc)
    assert f"'{member}'" in line and "refusing the layer" in line
    assert tree_of(populated_repo) == before
    assert tree_of(outside) == outside_before
    assert sorted(os.listdir(populated_repo.parent)) == parent_before
    assert not Path("/escaped-absolute").exists()


def test_conversion_killed_mid_layer_is_completed_by_the_next_run(
    registry, proxy, lazypod, repo, tmp_path
):
    big = layer([Entry(f"data/{i}", data=os.urandom(64 * 1024)) for i in range(64)])
    img = image([layer(busybox_entries()), big], label="killed")
    registry.push("test/killed", "1", img)
    proxy.faults.slow[big.digest] = 0.05  # about 3 s for the big layer
    name = f"{proxy.host}/test/killed:1"

    proc = lazypod.popen("convert-single-image", "--insecure-registry", proxy.host, name,
                         str(repo))
    staging = repo / ".lazypod-staging"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if any(staging.glob("*/*layer-*/layerfs/data/*")):
            break
        time.sleep(0.02)
    else:
        proc.kill()
        pytest.fail(f"the conversion never started writing the layer: {proc.communicate()}")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)  # reaps it and closes its pipes

    # Only temporary files are left; no layer and no image became visible.
    assert not (repo / ".layers" / big.digest[7:9] / big.digest[7:]).exists()
    assert not (repo / ".metadata").exists() or not any((repo / ".metadata").rglob("manifest.json"))

    proxy.faults.slow.clear()
    lazypod.convert(name, repo)
    assert not staging.exists()

    clean = tmp_path / "clean"
    lazypod.convert(name, clean)
    assert _content(repo) == _content(clean)


def _content(root: Path) -> dict[str, object]:
    """Everything but times that record when a run happened, and links that name the
    repository's own absolute path."""
    tree = tree_of(root)
    return {path: (mode, uid, size, content) for path, (mode, uid, size, content) in tree.items()
            if not path.endswith(("layers.json", ".lock", "images.json"))
            and ".podmanStore/overlay/" not in path and ".podmanStore/overlay-layers/" not in path
            and not (path.startswith(".podmanLayers/") and path.endswith("/diff"))}


def test_full_disk_fails_cleanly(registry, lazypod, tmp_path):
    repo = tmp_path / "small"
    repo.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(repo)], check=True)
    try:
        big = layer([Entry("big", data=os.urandom(3 * 1024 * 1024))])
        img = image([big], label="full-disk")
        registry.push("test/full", "1", img)
        before = tree_of(repo)

        proc = lazypod.convert(f"{registry.host}/test/full:1", repo, check=False)

        assert proc.returncode == 1
        assert "no space left on device" in error_line(proc)
        assert {p for p in tree_of(repo) if p != ".lazypod.lock"} == set(before)
    finally:
        subprocess.run(["umount", str(repo)], check=True)
