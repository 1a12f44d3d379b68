"""A rerun of `lazypod views` (and the publisher's views) leaves the images it
rendered before as they are without building their records (`views.podman_store`,
`_settled`), and ends with the same store a run from scratch writes."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import FakeRegistry, convert

from lazypod import record_cache
from lazypod.backend.directory import DirectoryBackend
from lazypod.client_views import build_client_views
from lazypod.maintenance import remove_images
from lazypod.reference import parse_reference
from support.images import Entry, Image, image, layer

BASE = layer([Entry("etc/", "dir"), Entry("etc/os-release", data=b"ID=test\n")])
FILES = ("store/overlay-images/images.json", "store/overlay-layers/layers.json")
STORE_IMAGES = ".podmanStore/overlay-images/images.json"  # the publisher's


pytestmark = pytest.mark.usefixtures("private_cache")  # (conftest.py)


def app(n: int, *, opaque: bool = False) -> Image:
    top = [Entry(f"app{n}", data=f"app {n}".encode())]
    if opaque:  # an opaque directory: its layer stays out of the layer store
        top = [Entry("etc/", "dir"), Entry("etc/.wh..wh..opq"), *top]
    return image([BASE, layer(top)])


class Builds:
    """Counts the records built from the record cache (`CachedImage.build`)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        build = record_cache.CachedImage.build

        def counted(cached: record_cache.CachedImage) -> Any:
            self.count += 1
            return build(cached)

        monkeypatch.setattr(record_cache.CachedImage, "build", counted)


def views(root: Path, into: Path, **options: Any) -> Any:
    time.sleep(0.02)  # past the clock tick of the repository's last write
    return build_client_views(root, into, registry=None, **options)


def store(into: Path) -> list[Any]:
    return [json.loads((into / name).read_bytes()) for name in FILES]


def from_scratch(root: Path, into: Path) -> list[Any]:
    shutil.rmtree(into, ignore_errors=True)
    views(root, into)
    return store(into)


def test_a_rerun_builds_only_what_changed_and_writes_what_a_full_run_writes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = FakeRegistry()
    images = {n: app(n, opaque=n == 2) for n in range(6)}
    names = [registry.push(f"library/app{n}", "1", img) for n, img in images.items()]
    root, into = tmp_path / "repo", tmp_path / "views"
    convert(registry, root, *names)
    views(root, into)

    # New images, and a second name for an image the views have (its entry changes).
    added = [registry.push("library/new", "1", app(10)),
             registry.push("library/alias", "1", images[1])]
    convert(registry, root, *added)
    builds = Builds(monkeypatch)
    report = views(root, into)
    assert report.store.images == 7 and not report.warnings
    # The alias's image ID (two names now) is made anew; the others stand as they were.
    assert builds.count <= 2
    rerun = store(into)
    assert rerun == from_scratch(root, tmp_path / "scratch")
    [entry] = [e for e in rerun[0] if e["id"] == images[1].config_digest.split(":")[1]]
    assert entry["names"] == sorted([names[1], added[1]])
    assert sorted((into / "layers").iterdir()) != []


def test_a_rerun_with_nothing_new_builds_no_record(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    registry = FakeRegistry()
    names = [registry.push(f"library/app{n}", "1", app(n, opaque=n == 0)) for n in range(4)]
    root, into = tmp_path / "repo", tmp_path / "views"
    convert(registry, root, *names)
    views(root, into)
    before = [(into / name).read_bytes() for name in FILES]
    layer_store = sorted(p.name for p in (into / "layers").iterdir())
    builds = Builds(monkeypatch)
    views(root, into)
    assert builds.count == 0
    assert [(into / name).read_bytes() for name in FILES] == before
    assert sorted(p.name for p in (into / "layers").iterdir()) == layer_store


def test_a_name_removed_from_a_shared_image_is_dropped_from_its_entry(tmp_path: Path) -> None:
    registry = FakeRegistry()
    img = app(1)
    names = [registry.push("library/a", "1", img), registry.push("library/b", "1", img),
             registry.push("library/c", "1", app(2))]
    root, into = tmp_path / "repo", tmp_path / "views"
    convert(registry, root, *names)
    views(root, into)
    remove_images(DirectoryBackend(root), [parse_reference(names[1])])
    views(root, into)
    rerun = store(into)
    assert rerun == from_scratch(root, tmp_path / "scratch")
    assert sorted(n for e in rerun[0] for n in e["names"]) == sorted([names[0], names[2]])


def test_a_broken_layer_record_under_a_rendered_image_is_seen(tmp_path: Path) -> None:
    # The image's own files are unchanged, a layer record it needs is damaged: a rerun
    # does not take the old entry as it is, but does what a full run does.
    registry = FakeRegistry()
    own = app(1)
    names = [registry.push("library/a", "1", own), registry.push("library/b", "1", app(2))]
    root, into = tmp_path / "repo", tmp_path / "views"
    convert(registry, root, *names)
    views(root, into)
    top = own.layers[-1].digest.split(":")[1]
    (root / f".layers/{top[:2]}/{top}/.metadata/layers.json").write_text("[{")

    # Client views: the diff ID comes from the image's config (the layer's entry,
    # made when its record was whole, is kept as it is).
    report = views(root, into)
    assert report.diff_ids_from_configs == 1 and not report.store.kept
    ids = [[(e["id"], e.get("names"), e.get("parent")) for e in f] for f in store(into)]
    assert ids == [[(e["id"], e.get("names"), e.get("parent")) for e in f]
                   for f in from_scratch(root, tmp_path / "scratch")]

    # The publisher: the image keeps its last good entry, with a warning.
    ids = {e["id"] for e in json.loads((root / STORE_IMAGES).read_bytes())}
    time.sleep(0.02)
    run = convert(registry, root, registry.push("library/c", "1", app(3)))
    assert run.views is not None and run.views.store is not None
    assert run.views.store.kept == [names[0]]
    assert any(names[0] in problem for problem in run.problems)
    assert ids < {e["id"] for e in json.loads((root / STORE_IMAGES).read_bytes())}
