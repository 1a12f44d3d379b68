"""Integrity under damage and faults: whatever a file holds, whatever kills a run, one
line and a non-zero exit, nothing an image had is lost, and the next run repairs.

After each fault: `lazypod check` agrees with podman (every image `ls` lists as
complete runs from the store) and the next run completes the work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from support.images import Entry, busybox_entries, image, layer

pytestmark = [pytest.mark.podman, pytest.mark.registry]


def family(registry, tag: str, count: int = 2) -> tuple[list[str], object]:
    base = layer([*busybox_entries(), Entry("etc/base", data=tag.encode())])
    names = [registry.push("integrity/app", f"{tag}-{i}", image(
        [base, layer([Entry(f"app-{i}", data=f"{tag} {i}".encode())])], label=f"{tag}{i}"))
        for i in range(count)]
    return names, base


def layer_record(repo: Path, blob) -> Path:
    return repo / ".layers" / blob.digest[7:9] / blob.digest[7:] / ".metadata/layers.json"


def store_names(repo: Path) -> set[str]:
    images = json.loads((repo / ".podmanStore/overlay-images/images.json").read_text())
    return {n for entry in images for n in entry["names"]}


def one_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.startswith("lazypod: error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def runs(podman_factory, repo: Path, names, label: str = "runs") -> None:
    """Every image `ls` lists as complete runs from the store, as podman sees it."""
    podman = podman_factory(label, storage_opts=[f"additionalimagestore={repo}/.podmanStore"])
    for name in names:
        podman("run", "--rm", "--network=none", name, "/bin/cat", "/etc/base")


def complete_images(lazypod, repo: Path) -> list[str]:
    rows = [json.loads(line) for line in lazypod("ls", "--json", str(repo)).stdout.splitlines()]
    return [row["podman_name"] for row in rows if row["complete"]]


# -- damaged files ----------------------------------------------------------------------

def test_a_damaged_layer_record_drops_no_image_and_converting_again_repairs_it(
    registry, lazypod, podman_factory, repo
):
    names, base = family(registry, "damaged-record")
    for name in names:
        lazypod.convert(name, repo)
    layer_record(repo, base).write_text("{garbage")

    other = registry.push("integrity/other", "1", image([layer(busybox_entries())],
                                                        label="other"))
    proc = lazypod.convert(other, repo, check=False)
    assert proc.returncode == 1
    assert "layers.json is damaged" in one_error(proc) or "layers.json is damaged" in \
        proc.stderr
    assert set(names) <= store_names(repo)  # kept: no image vanished from the clients
    runs(podman_factory, repo, names)
    check = lazypod("check", str(repo), check=False)
    assert check.returncode == 1 and "layers.json is damaged" in check.stdout

    lazypod.convert(names[0], repo)  # converting again repairs it
    json.loads(layer_record(repo, base).read_text())
    assert lazypod("check", str(repo)).returncode == 0
    runs(podman_factory, repo, names, "after-repair")


def test_a_damaged_manifest_keeps_the_image_until_it_is_removed(
    registry, lazypod, podman_factory, repo
):
    names, _ = family(registry, "damaged-manifest")
    for name in names:
        lazypod.convert(name, repo)
    victim = repo / ".metadata" / names[0] / "manifest.json"
    victim.write_text('{"schemaVersion": 2, "layers": [')
    other = registry.push("integrity/other", "2", image([layer(busybox_entries())],
                                                        label="other2"))
    proc = lazypod.convert(other, repo, check=False)
    assert proc.returncode == 1 and names[0] in proc.stderr
    assert set(names) <= store_names(repo)
    runs(podman_factory, repo, names)

    lazypod("rm", str(repo), names[0])
    assert names[0] not in store_names(repo) and not victim.parent.exists()
    assert lazypod("check", str(repo)).returncode == 0


@pytest.mark.parametrize("content", ["null", "5", "[1,2]", '[{"id":5}]', "{", ""])
@pytest.mark.parametrize("store_file", ["overlay-images/images.json",
                                        "overlay-layers/layers.json"])
def test_store_files_of_any_shape_give_one_line_and_are_rewritten(
    registry, lazypod, podman_factory, repo, store_file, content
):
    names, _ = family(registry, f"shape-{len(content)}-{'images' in store_file}", count=1)
    lazypod.convert(names[0], repo)
    (repo / ".podmanStore" / store_file).write_text(content)

    for command in (("ls",), ("check",)):
        proc = lazypod(*command, str(repo), check=False)
        assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert lazypod("check", str(repo), check=False).returncode == 1

    lazypod.convert(names[0], repo)  # rewrites the store
    assert lazypod("check", str(repo)).returncode == 0
    runs(podman_factory, repo, names)


def test_an_invalid_digest_in_a_layer_record_gives_one_line(registry, lazypod, repo):
    names, base = family(registry, "bad-digest", count=1)
    lazypod.convert(names[0], repo)
    record = json.loads(layer_record(repo, base).read_text())
    record[0]["diff-digest"] = "sha256:zz"
    layer_record(repo, base).write_text(json.dumps(record))
    for command in ("ls", "check"):
        proc = lazypod(command, str(repo), check=False)
        assert "Traceback" not in proc.stderr, proc.stderr
    assert "invalid digest" in lazypod("check", str(repo), check=False).stdout


def test_a_recipe_that_is_not_utf8(lazypod, repo, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(b"version: 1\ninput:\n  - 'caf\xe9/image:1'\n")
    proc = lazypod("convert", str(recipe), str(repo), check=False)
    assert proc.returncode == 1 and "not UTF-8" in one_error(proc)
    assert not repo.exists()


def test_garbage_collection_refuses_while_an_image_is_unreadable(registry, lazypod, repo):
    names, _ = family(registry, "gc-unreadable")
    for name in names:
        lazypod.convert(name, repo)
    manifest = repo / ".metadata" / names[0] / "manifest.json"
    manifest.write_text("truncated")
    before = sorted(p.name for p in (repo / ".layers").rglob("layerfs"))
    proc = lazypod("garbage-collection", str(repo), check=False)
    assert proc.returncode == 1 and "cannot be read" in one_error(proc)
    assert sorted(p.name for p in (repo / ".layers").rglob("layerfs")) == before


def test_maintenance_on_a_mistyped_path_creates_nothing(lazypod, tmp_path):
    missing = tmp_path / "no-such-repository"
    for command in (("rm", str(missing), "docker.io/library/x:1"),
                    ("garbage-collection", str(missing)),
                    ("garbage-collection", "--dry-run", str(missing))):
        proc = lazypod(*command, check=False)
        assert proc.returncode == 1 and "does not exist" in one_error(proc)
        assert not missing.exists()


def test_an_empty_repository_argument_is_refused(lazypod, tmp_path):
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    for command in (("convert-single-image", "x:1", ""), ("rm", "", "x:1"),
                    ("garbage-collection", "")):
        proc = lazypod(*command, check=False, cwd=workdir)
        assert proc.returncode == 1 and "empty string" in one_error(proc)
    assert os.listdir(workdir) == []


def test_a_failed_first_conversion_creates_nothing(registry, lazypod, repo):
    proc = lazypod.convert(f"{registry.host}/integrity/missing:1", repo, check=False)
    assert proc.returncode == 1
    assert not repo.exists()


# -- kills at every point where a run changes the repository ---------------------------

def kill_points(lazypod, *args: str) -> int:
    counter = Path(lazypod.env["HOME"]) / "points"
    lazypod.env["LAZYPOD_COUNT_POINTS"] = str(counter)
    try:
        lazypod(*args)
    finally:
        del lazypod.env["LAZYPOD_COUNT_POINTS"]
    return int(counter.read_text())


def killed_at(lazypod, point: int, *args: str) -> None:
    lazypod.env["LAZYPOD_KILL_AT"] = str(point)
    try:
        proc = lazypod(*args, check=False)
    finally:
        del lazypod.env["LAZYPOD_KILL_AT"]
    assert proc.returncode == -9, proc.stderr


def agrees_with_podman(lazypod, podman_factory, repo: Path, label: str) -> None:
    """Every image `ls` lists as complete is in the store and runs."""
    complete = complete_images(lazypod, repo)
    assert set(complete) <= store_names(repo)
    if complete:
        runs(podman_factory, repo, complete, label)


@pytest.mark.parametrize("operation", ["convert", "rm", "garbage-collection"])
def test_a_kill_at_any_point_is_completed_by_the_next_run(
    registry, lazypod, podman_factory, tmp_path, operation
):
    names, _ = family(registry, f"kill-{operation}", count=2)
    template = tmp_path / "template"
    lazypod.convert(names[0], template)
    if operation != "convert":
        lazypod.convert(names[1], template)
    args = {"convert": ("convert-single-image", "--insecure-registry", registry.host,
                        names[1]),
            "rm": ("rm",), "garbage-collection": ("garbage-collection",)}[operation]

    def command(repo: Path) -> tuple[str, ...]:
        if operation == "convert":
            return (*args, str(repo))
        if operation == "rm":
            return ("rm", str(repo), names[1])
        return ("garbage-collection", str(repo))

    def prepared(k: int) -> Path:
        repo = tmp_path / f"repo-{k}"
        shutil.copytree(template, repo, symlinks=True)
        if operation == "garbage-collection":
            lazypod("rm", str(repo), names[1])
        return repo

    reference = prepared(0)
    points = kill_points(lazypod, *command(reference))
    assert points >= 2  # a test that kills nowhere would prove nothing
    for k in range(1, points + 1):
        repo = prepared(k)
        killed_at(lazypod, k, *command(repo))
        agrees_with_podman(lazypod, podman_factory, repo, f"killed-{k}")
        lazypod(*command(repo), check=operation != "rm")  # rm again: idempotent
        assert lazypod("check", str(repo)).returncode == 0, k
        expected = {"convert": set(names), "rm": {names[0]},
                    "garbage-collection": {names[0]}}[operation]
        assert store_names(repo) == expected, k
        runs(podman_factory, repo, sorted(expected), f"rerun-{k}")
        shutil.rmtree(repo)


# -- flat trees on the publisher's disk --------------------------------------------------

def test_a_flat_tree_run_with_an_overlay_leaves_the_repository_as_it_is(
    registry, lazypod, podman_factory, repo
):
    names, base = family(registry, "flat-rootfs", count=1)
    lazypod.convert(names[0], repo)
    flat = (repo / names[0]).resolve()
    layer_file = repo / ".layers" / base.digest[7:9] / base.digest[7:] / "layerfs/etc/base"
    before = layer_file.read_bytes()
    podman = podman_factory("rootfs")
    podman("run", "--rm", "--network=none", "--rootfs", f"{flat}:O", "/bin/busybox", "sh", "-c",
           "echo changed > /etc/base")
    assert layer_file.read_bytes() == before
    assert (flat / "etc/base").read_bytes() == before


def test_flat_trees_are_reflink_copies_where_the_file_system_makes_them(
    registry, lazypod, tmp_path
):
    if shutil.which("mkfs.xfs") is None:
        pytest.fail("mkfs.xfs is missing: scripts/setup.sh installs xfsprogs")
    disk = tmp_path / "xfs.img"
    with disk.open("wb") as f:
        f.truncate(400 << 20)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(disk)], check=True)
    mount = tmp_path / "xfs"
    mount.mkdir()
    subprocess.run(["mount", "-o", "loop", str(disk), str(mount)], check=True)
    try:
        names, base = family(registry, "reflink", count=1)
        repo = mount / "repo"
        lazypod.convert(names[0], repo)
        flat = (repo / names[0]).resolve()
        layer_file = repo / ".layers" / base.digest[7:9] / base.digest[7:] / "layerfs/bin/busybox"
        copy = flat / "bin/busybox"
        assert copy.read_bytes() == layer_file.read_bytes()
        assert os.stat(copy).st_ino != os.stat(layer_file).st_ino
        assert os.stat(copy).st_mode == os.stat(layer_file).st_mode
    finally:
        subprocess.run(["umount", str(mount)], check=False)
