"""Which images a run renders (views/scope.py): the ones the last complete run did
not, as the podman store (or, without one, the public links) says; every image when
the store cannot tell."""

from __future__ import annotations

import json
import os
from pathlib import Path

from helpers import HOST, FakeRegistry, convert

from lazypod import ConvertOptions, Layout
from lazypod.repository import RepositoryState
from lazypod.views import ViewOptions
from lazypod.views.scope import Scope, scope_by_links, scope_for
from lazypod.views.store_files import read_store
from support.images import Entry, image, layer

BASE = layer([Entry("etc/", "dir"), Entry("etc/os-release", data=b"ID=test\n")])


def two_images(root: Path, *, store: bool = True) -> tuple[str, str]:
    registry = FakeRegistry()
    a = registry.push("library/a", "1", image([BASE, layer([Entry("a", data=b"a")])]))
    b = registry.push("library/b", "1", image([BASE, layer([Entry("b", data=b"b")])]))
    options = ConvertOptions(workers=2, views=ViewOptions(podman_store=store))
    convert(registry, root, a, b, options=options)
    return a, b


def store_scope(root: Path):
    state = RepositoryState.load(Layout(root))
    store = root / ".podmanStore"
    return state, scope_for(state, store, read_store(store), str(root), full=False)


def test_a_complete_repository_renders_nothing_again(tmp_path: Path) -> None:
    two_images(tmp_path)
    state, scope = store_scope(tmp_path)
    assert not scope.full
    assert not any(scope.renders(image) for image in state.images)


def test_an_image_the_store_does_not_name_is_rendered(tmp_path: Path) -> None:
    """What a run killed after writing `.metadata` leaves."""
    _, b = two_images(tmp_path)
    images_json = tmp_path / ".podmanStore/overlay-images/images.json"
    entries = [e for e in json.loads(images_json.read_text()) if b not in e["names"]]
    images_json.write_text(json.dumps(entries))
    state, scope = store_scope(tmp_path)
    assert [image.public_name for image in state.images if scope.renders(image)] == [b]


def test_an_image_pushed_again_under_the_same_id_is_rendered(tmp_path: Path) -> None:
    """Same config, other manifest (e.g. recompressed layers): the store's record names
    the old manifest."""
    a, _ = two_images(tmp_path)
    images_json = tmp_path / ".podmanStore/overlay-images/images.json"
    entries = json.loads(images_json.read_text())
    for entry in entries:
        if a in entry["names"]:
            entry["digest"] = "sha256:" + "0" * 64
    images_json.write_text(json.dumps(entries))
    state, scope = store_scope(tmp_path)
    assert [image.public_name for image in state.images if scope.renders(image)] == [a]


def test_what_a_run_put_is_rendered(tmp_path: Path) -> None:
    a, _ = two_images(tmp_path)
    state = RepositoryState.load(Layout(tmp_path))
    state.put_image(state.images[0])
    store = tmp_path / ".podmanStore"
    scope = scope_for(state, store, read_store(store), str(tmp_path), full=False)
    assert [image.public_name for image in state.images if scope.renders(image)] == [a]


def test_every_image_when_the_store_cannot_tell(tmp_path: Path) -> None:
    two_images(tmp_path)
    state = RepositoryState.load(Layout(tmp_path))
    store = tmp_path / ".podmanStore"

    def scope(public_root: str = str(tmp_path), *, full: bool = False) -> Scope:
        return scope_for(state, store, read_store(store), public_root, full=full)

    assert scope(full=True).full  # -f, -g, views --full
    assert scope("/elsewhere").full  # another public root
    (store / "lazypod-views").write_bytes(b"lazypod views 0\n")  # an older version's
    assert scope().full
    (store / "lazypod-views").unlink()
    assert scope().full
    (store / "overlay-images/images.json").write_text("{garbage")
    assert scope().full


def test_without_a_store_the_public_links_tell(tmp_path: Path) -> None:
    a, b = two_images(tmp_path, store=False)
    assert not (tmp_path / ".podmanStore").exists()
    state = RepositoryState.load(Layout(tmp_path))
    scope = scope_by_links(state, full=False)
    assert not scope.full and not any(scope.renders(image) for image in state.images)
    os.unlink(tmp_path / b)  # a run killed before its links
    os.unlink(tmp_path / a)  # a link that is not the image's
    os.symlink("../../../.flat/00/" + "0" * 64, tmp_path / a)
    scope = scope_by_links(RepositoryState.load(Layout(tmp_path)), full=False)
    assert sorted(i.public_name for i in state.images if scope.renders(i)) == sorted([a, b])
    (tmp_path / ".metadata/.lazypod-views").unlink()
    assert scope_by_links(state, full=False).full
    assert a.startswith(HOST)
