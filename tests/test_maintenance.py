"""Operating a repository: ls, check, rm, garbage-collection, loop."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from support.images import Entry, busybox_entries, image, layer

pytestmark = [pytest.mark.registry]


def two_images(registry, tag: str):
    base = layer([*busybox_entries(), Entry("etc/base", data=tag.encode())])
    tops = [layer([Entry(f"only-{i}", data=f"{tag}{i}".encode())]) for i in range(2)]
    names = [registry.push("ops/app", f"{tag}-{i}", image([base, top], label=f"{tag}{i}"))
             for i, top in enumerate(tops)]
    return names, base, tops


def layer_dir(repo: Path, blob) -> Path:
    return repo / ".layers" / blob.digest[7:9] / blob.digest[7:]


def test_ls_lists_images_and_their_views(registry, lazypod, repo):
    names, _, _ = two_images(registry, "ls")
    for name in names:
        lazypod.convert(name, repo)
    rows = [json.loads(line) for line in lazypod("ls", "--json", str(repo)).stdout.splitlines()]
    assert [r["name"] for r in rows] == sorted(names)
    assert all(r["in_store"] and r["in_layer_store"] and r["flat"] and r["complete"]
               for r in rows)
    assert all(r["layers"] == 2 and r["size"] > 0 for r in rows)


def test_check_passes_then_finds_tampering(registry, lazypod, repo):
    names, base, _ = two_images(registry, "check")
    lazypod.convert(names[0], repo)
    proc = lazypod("check", "--deep", str(repo))
    assert "2 layers" in proc.stderr and "verified byte for byte: 0 errors" in proc.stderr

    victim = layer_dir(repo, base) / "layerfs/etc/base"
    victim.write_bytes(b"tampered")
    proc = lazypod("check", "--deep", str(repo), check=False)
    assert proc.returncode == 1
    assert "file 'etc/base' does not match" in proc.stdout

    (repo / ".podmanStore/overlay-layers/layers.lock").unlink()
    proc = lazypod("check", str(repo), check=False)
    assert proc.returncode == 1 and "layers.lock is missing" in proc.stdout


@pytest.mark.podman
def test_rm_then_garbage_collection_keeps_what_is_shared(
    registry, lazypod, podman_factory, repo
):
    names, base, tops = two_images(registry, "gc")
    for name in names:
        lazypod.convert(name, repo)

    lazypod("rm", str(repo), names[0])
    assert not (repo / names[0]).exists()  # the public link
    dry = lazypod("garbage-collection", "--dry-run", str(repo))
    assert "would remove 1 layers and 1 flat trees" in dry.stderr
    assert layer_dir(repo, tops[0]).exists()

    lazypod("garbage-collection", str(repo))
    assert not layer_dir(repo, tops[0]).exists()
    assert layer_dir(repo, base).exists() and layer_dir(repo, tops[1]).exists()
    assert not (repo / ".podmanLayers" / f"sha256:{tops[0].digest[7:]}").exists()
    images = json.loads((repo / ".podmanStore/overlay-images/images.json").read_text())
    assert [n for i in images for n in i["names"]] == [names[1]]
    assert lazypod("check", str(repo)).returncode == 0

    podman = podman_factory(storage_opts=[f"additionalimagestore={repo}/.podmanStore"])
    assert podman.text("run", "--rm", "--network=none", names[1], "/bin/cat",
                       "/only-1") == "gc1"


def test_rm_of_an_unknown_image_says_so(lazypod, repo):
    repo.mkdir()
    proc = lazypod("rm", str(repo), "docker.io/library/nothing:1", check=False)
    assert proc.returncode == 1 and "`lazypod ls` lists what is" in proc.stderr


def test_loop_picks_up_new_tags(registry, lazypod, repo, tmp_path):
    first = registry.push("ops/looped", "v1", image([layer(busybox_entries())], label="v1"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"version: 1\ninput:\n  - 'http://{registry.host}/ops/looped:v*'\n")
    proc = lazypod.popen("--log-format", "json", "loop", "--interval", "1", "--max-runs", "3",
                         str(recipe), str(repo))
    deadline_file = repo / ".metadata" / registry.host / "ops/looped:v1" / "manifest.json"
    deadline = time.monotonic() + 30
    while not deadline_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    second = registry.push("ops/looped", "v2", image(
        [layer([*busybox_entries(), Entry("v2", data=b"2")])], label="v2"))
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    images = json.loads((repo / ".podmanStore/overlay-images/images.json").read_text())
    assert sorted(n for i in images for n in i["names"]) == sorted([first, second])
    logs = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    done = [entry for entry in logs if entry["message"].startswith("loop run")]
    assert len(done) == 3 and all(entry["level"] == "INFO" for entry in done)
    assert os.path.isdir(repo / ".layers")


def test_sigterm_stops_the_loop_cleanly(registry, lazypod, repo, tmp_path):
    """How systemd stops `loop`: exit 0, between runs or in one (the run under way is
    abandoned as a failed run is: the repository stays as the last run left it)."""
    name = registry.push("ops/stopped", "v1", image([layer(busybox_entries())], label="stop"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"version: 1\ninput:\n  - 'http://{name}'\n")
    proc = lazypod.popen("--log-format", "json", "loop", "--interval", "30", str(recipe),
                         str(repo))
    deadline = time.monotonic() + 30
    while not (repo / ".podmanStore").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # the first run is done: the loop sleeps until the next
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert "stopped by SIGTERM" in stderr and "failed" not in stderr
    assert lazypod("check", str(repo)).returncode == 0
