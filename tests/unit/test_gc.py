"""Removing images and collecting garbage: reachability decides. A layer stays while
any image's manifest lists it, a flat tree while any image's config names it; what
nothing reaches goes (after the grace period), and nothing is collected while an
image's metadata cannot be read."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from helpers import HOST, FakeRegistry, convert

from lazypod import DirectoryBackend, Layout, RepositoryError, parse_reference
from lazypod.digest import Digest
from lazypod.maintenance import collect_garbage, remove_images
from support.images import Entry, Image, image, layer


def layer_rel(blob_digest: str) -> str:
    hexpart = blob_digest.split(":", 1)[1]
    return f".layers/{hexpart[:2]}/{hexpart}"


def flat_rel(img: Image) -> str:
    hexpart = img.config_digest.split(":", 1)[1]
    return f".flat/{hexpart[:2]}/{hexpart}"


def store_layer_ids(root: Path) -> set[str]:
    return {e["id"] for e in json.loads((root / ".podmanStore/overlay-layers/layers.json")
                                         .read_bytes())}


def store_names(root: Path) -> set[str]:
    return {n for e in json.loads((root / ".podmanStore/overlay-images/images.json")
                                  .read_bytes()) for n in e["names"]}


@pytest.fixture()
def repo(tmp_path: Path) -> tuple[Path, dict[str, Image]]:
    base = layer([Entry("etc/", "dir"), Entry("etc/os", data=b"base")])
    images = {
        "a": image([base, layer([Entry("a", data=b"only in a")])]),
        "b": image([base, layer([Entry("b", data=b"only in b")])]),
    }
    registry = FakeRegistry()
    names = [registry.push(f"library/{k}", "1", img) for k, img in images.items()]
    root = tmp_path / "repo"
    convert(registry, root, *names)
    return root, images


def age(root: Path, rel: str, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(root / rel, (then, then), follow_symlinks=False)


def test_nothing_is_garbage_while_every_image_is_there(
        repo: tuple[Path, dict[str, Image]]) -> None:
    root, _ = repo
    report = collect_garbage(DirectoryBackend(root, create=False), dry_run=True)
    assert (report.layers, report.flats) == ([], [])


def test_remove_then_collect(repo: tuple[Path, dict[str, Image]]) -> None:
    root, images = repo
    a, b = images["a"], images["b"]
    backend = DirectoryBackend(root, create=False)
    assert remove_images(backend, [parse_reference(f"{HOST}/library/a:1")]) == \
        [f"{HOST}/library/a:1"]
    # Gone from the views and the metadata at once; its layers wait for the collector.
    assert not (root / f"{HOST}/library/a:1").is_symlink()
    assert not (root / f".metadata/{HOST}/library/a:1").exists()
    assert store_names(root) == {f"{HOST}/library/b:1"}
    assert (root / layer_rel(a.layers[1].digest)).is_dir()

    dry = collect_garbage(backend, dry_run=True)
    assert dry.layers == [layer_rel(a.layers[1].digest)]
    assert dry.flats == [flat_rel(a)]
    assert (root / layer_rel(a.layers[1].digest)).is_dir()  # a dry run removes nothing

    report = collect_garbage(backend)
    assert (report.layers, report.flats) == (dry.layers, dry.flats)
    assert not (root / layer_rel(a.layers[1].digest)).exists()
    assert not (root / flat_rel(a)).exists()
    # What b reaches stays, shared base included, and b still works.
    for blob in b.layers:
        assert (root / layer_rel(blob.digest) / ".metadata/layers.json").is_file()
    assert (root / f"{HOST}/library/b:1/etc/os").read_bytes() == b"base"
    assert (root / f"{HOST}/library/b:1/b").read_bytes() == b"only in b"
    assert a.layers[1].diff_id.split(":")[1] not in store_layer_ids(root)
    assert collect_garbage(backend, dry_run=True).layers == []


def test_removing_an_image_that_is_not_there_is_an_error(
        repo: tuple[Path, dict[str, Image]]) -> None:
    root, _ = repo
    with pytest.raises(Exception, match="not in"):
        remove_images(DirectoryBackend(root, create=False),
                      [parse_reference(f"{HOST}/library/nothing:1")])
    assert store_names(root) == {f"{HOST}/library/a:1", f"{HOST}/library/b:1"}


def test_the_grace_period(repo: tuple[Path, dict[str, Image]]) -> None:
    root, images = repo
    a = images["a"]
    backend = DirectoryBackend(root, create=False)
    remove_images(backend, [parse_reference(f"{HOST}/library/a:1")])
    report = collect_garbage(backend, grace_seconds=3600)
    assert (report.layers, report.flats, report.kept_in_grace) == ([], [], 2)
    assert (root / layer_rel(a.layers[1].digest)).is_dir()
    # A layer's age is its directory's; a flat tree's, its .singularity.d's (the tree's
    # root carries the image's own time).
    age(root, layer_rel(a.layers[1].digest), 7200)
    age(root, f"{flat_rel(a)}/.singularity.d", 7200)
    report = collect_garbage(backend, grace_seconds=3600)
    assert (report.layers, report.flats, report.kept_in_grace) == (
        [layer_rel(a.layers[1].digest)], [flat_rel(a)], 0)


def test_layers_no_manifest_lists_are_garbage_even_without_records(tmp_path: Path) -> None:
    # Layers that a killed run left without layers.json, or another tool's leftovers.
    root = tmp_path / "repo"
    stray = Digest.of(b"stray")
    (root / layer_rel(str(stray)) / "layerfs").mkdir(parents=True)
    report = collect_garbage(DirectoryBackend(root, create=False))
    assert report.layers == [layer_rel(str(stray))]
    assert not (root / layer_rel(str(stray))).exists()


def test_unreadable_metadata_stops_the_collector(repo: tuple[Path, dict[str, Image]]) -> None:
    root, images = repo
    b = images["b"]
    backend = DirectoryBackend(root, create=False)
    remove_images(backend, [parse_reference(f"{HOST}/library/a:1")])
    (root / f".metadata/{HOST}/library/b:1/manifest.json").write_text('{"schemaVersion": 2, "la')
    with pytest.raises(RepositoryError, match=f"{HOST}/library/b:1"):
        collect_garbage(backend)
    for blob in b.layers:
        assert (root / layer_rel(blob.digest)).is_dir()
    # --force takes the unreadable image's layers as unused.
    report = collect_garbage(backend, force=True)
    assert layer_rel(b.layers[1].digest) in report.layers
    assert not (root / layer_rel(b.layers[1].digest)).exists()


def test_a_dry_run_says_what_the_real_run_would_do_with_unreadable_metadata(
        repo: tuple[Path, dict[str, Image]]) -> None:
    root, images = repo
    b = images["b"]
    (root / f".metadata/{HOST}/library/b:1/manifest.json").write_text("{")
    backend = DirectoryBackend(root, create=False)
    with pytest.raises(RepositoryError):
        collect_garbage(backend)
    with pytest.raises(RepositoryError, match="cannot be read"):
        collect_garbage(backend, dry_run=True)
    report = collect_garbage(backend, dry_run=True, force=True)  # as gc --force would
    assert layer_rel(b.layers[1].digest) in report.layers


def test_gc_of_a_missing_repository_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError):
        collect_garbage(DirectoryBackend(tmp_path / "typo", create=False))
    with pytest.raises(RepositoryError):
        collect_garbage(DirectoryBackend(tmp_path / "typo", create=False), dry_run=True)
    assert not (tmp_path / "typo").exists()


def test_a_layout_helper_agrees_with_the_paths_used_here(tmp_path: Path) -> None:
    digest = Digest.of(b"x")
    assert Layout(tmp_path).layer_rel(digest) == layer_rel(str(digest))


def test_a_flat_tree_stays_while_another_name_uses_its_image(tmp_path: Path) -> None:
    img = image([layer([Entry("x", data=b"x")])])
    registry = FakeRegistry()
    names = [registry.push("library/one", "1", img), registry.push("team/two", "2", img)]
    root = tmp_path / "repo"
    convert(registry, root, *names)
    backend = DirectoryBackend(root, create=False)
    remove_images(backend, [parse_reference(names[0])])
    report = collect_garbage(backend, dry_run=True)
    assert (report.layers, report.flats) == ([], [])
    assert (root / f"{HOST}/team/two:2/x").read_bytes() == b"x"
