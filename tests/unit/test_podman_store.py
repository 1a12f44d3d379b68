"""The podman additional image store (`.podmanStore`) and layer store (`.podmanLayers`)
as containers/storage reads them, rendered from repositories converted in-process.

Layer IDs must be the IDs a `podman pull` gives the same layers, or podman downloads
them again. containers/image (storage/storage_dest.go, `commitLayer`) names the
base layer by its diff ID's hex and every other layer
`sha256(<parent layer ID> + "+" + <diff ID hex>)`: not the OCI image spec's ChainID,
which joins full digests with a space. The tests compute both from the definitions.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Any

import pytest
from helpers import HOST, FakeRegistry, convert

from support.images import Blob, Entry, Image, image, layer

STORE = ".podmanStore"


def podman_layer_ids(diff_ids: list[str]) -> list[str]:
    """containers/image's layer IDs for `diff_ids` ("sha256:<hex>"), base first."""
    ids: list[str] = []
    for diff_id in diff_ids:
        hexpart = diff_id.split(":", 1)[1]
        ids.append(hashlib.sha256(f"{ids[-1]}+{hexpart}".encode()).hexdigest()
                   if ids else hexpart)
    return ids


def oci_chain_ids(diff_ids: list[str]) -> list[str]:
    """The OCI image spec's ChainIDs (config.md, "Layer ChainID")."""
    chain: list[str] = []
    for diff_id in diff_ids:
        chain.append("sha256:" + hashlib.sha256(f"{chain[-1]} {diff_id}".encode()).hexdigest()
                     if chain else diff_id)
    return chain


def read_json(path: Path) -> Any:
    return json.loads(path.read_bytes())


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Image]]:
    base = layer([Entry("etc/", "dir"), Entry("etc/os-release", data=b"ID=test\n")])
    middle = layer([Entry("usr/", "dir"), Entry("usr/tool", data=b"tool", mode=0o755)],
                   compression="zstd")
    top = layer([Entry("app", data=b"app")], compression="none")
    other = layer([Entry("other", data=b"other")])
    registry = FakeRegistry()
    images = {"app": image([base, middle, top]), "other": image([base, other])}
    names = [registry.push("library/app", "1", images["app"]),
             registry.push("library/app", "latest", images["app"]),
             registry.push("library/other", "2", images["other"])]
    root = tmp_path_factory.mktemp("store") / "repo"
    convert(registry, root, *names)
    return root, images


def diff_ids(img: Image) -> list[str]:
    return [b.diff_id for b in img.layers]


def test_layer_ids_are_podmans(repo: tuple[Path, dict[str, Image]]) -> None:
    root, images = repo
    layers = {entry["id"]: entry for entry in read_json(root / STORE /
                                                         "overlay-layers/layers.json")}
    app_ids = podman_layer_ids(diff_ids(images["app"]))
    other_ids = podman_layer_ids(diff_ids(images["other"]))
    assert app_ids[0] == other_ids[0]  # the shared base layer is one layer
    assert set(layers) == set(app_ids) | set(other_ids)
    assert len(layers) == 4
    # They are not OCI ChainIDs (only the base layer's agree).
    chain = oci_chain_ids(diff_ids(images["app"]))
    assert chain[0] == f"sha256:{app_ids[0]}" and chain[1] != f"sha256:{app_ids[1]}"
    for ids in (app_ids, other_ids):
        assert "parent" not in layers[ids[0]]
        for parent, child in itertools.pairwise(ids):
            assert layers[child]["parent"] == parent


def test_layer_records(repo: tuple[Path, dict[str, Image]]) -> None:
    root, images = repo
    layers = {entry["id"]: entry for entry in read_json(root / STORE /
                                                         "overlay-layers/layers.json")}
    img = images["app"]
    # containers/storage's compression codes (pkg/archive): none 0, gzip 2, zstd 4.
    for layer_id, blob, code in zip(podman_layer_ids(diff_ids(img)), img.layers, (2, 4, None),
                                    strict=True):
        entry = layers[layer_id]
        assert entry["compressed-diff-digest"] == blob.digest
        assert entry["compressed-size"] == len(blob.data)
        assert entry["diff-digest"] == blob.diff_id
        assert entry["diff-size"] == _tar_size(blob)
        assert entry.get("compression") == code


def _tar_size(blob: Blob) -> int:
    import gzip

    import zstandard
    if blob.media_type.endswith("gzip"):
        return len(gzip.decompress(blob.data))
    if blob.media_type.endswith("zstd"):
        return len(zstandard.ZstdDecompressor().decompressobj().decompress(blob.data))
    return len(blob.data)


def test_image_records(repo: tuple[Path, dict[str, Image]]) -> None:
    root, images = repo
    entries = {entry["id"]: entry for entry in read_json(root / STORE /
                                                          "overlay-images/images.json")}
    img = images["app"]
    image_id = img.config_digest.split(":", 1)[1]  # podman's image ID: the config digest
    entry = entries[image_id]
    assert entry["names"] == [f"{HOST}/library/app:1", f"{HOST}/library/app:latest"]
    assert entry["layer"] == podman_layer_ids(diff_ids(img))[-1]
    assert entry["digest"] == img.manifest_digest
    big_data = {img.config_digest: img.config.data, "manifest": img.manifest,
                f"manifest-{img.manifest_digest}": img.manifest}
    assert set(entry["big-data-names"]) == set(big_data)
    for key, data in big_data.items():
        assert entry["big-data-sizes"][key] == len(data)
        assert entry["big-data-digests"][key] == "sha256:" + hashlib.sha256(data).hexdigest()
        # containers/storage names a key's file by the key when it is plain, else
        # "=" and the key in base64.
        file_name = key if key == "manifest" else "=" + base64.b64encode(key.encode()).decode()
        assert (root / STORE / "overlay-images" / image_id / file_name).read_bytes() == data
    assert len(entries) == 2


def test_layer_directories_point_at_the_repositorys_layers(
        repo: tuple[Path, dict[str, Image]]) -> None:
    root, images = repo
    img = images["app"]
    ids = podman_layer_ids(diff_ids(img))
    overlay = root / STORE / "overlay"
    links = [(overlay / layer_id / "link").read_text() for layer_id in ids]
    assert len(set(links)) == 3 and all(len(link) == 26 for link in links)
    for i, (layer_id, blob) in enumerate(zip(ids, img.layers, strict=True)):
        diff = overlay / layer_id / "diff"
        hexpart = blob.digest.split(":", 1)[1]
        assert os.readlink(diff) == f"{root.absolute()}/.layers/{hexpart[:2]}/{hexpart}/layerfs"
        assert os.readlink(overlay / "l" / links[i]) == f"../{layer_id}/diff"
        lower = overlay / layer_id / "lower"
        if i == 0:
            assert not lower.exists()
        else:  # the lower layers, nearest first, as overlay's lowerdir lists them
            assert lower.read_text() == ":".join(f"l/{links[j]}" for j in reversed(range(i)))
    assert (overlay / ids[-1] / "diff" / "app").read_bytes() == b"app"


def test_a_run_with_nothing_new_rewrites_nothing(
        repo: tuple[Path, dict[str, Image]], tmp_path: Path) -> None:
    root, images = repo
    before = {name: (root / STORE / name).read_bytes()
              for name in ("overlay-images/images.json", "overlay-layers/layers.json")}
    registry = FakeRegistry()
    name = registry.push("library/app", "1", images["app"])
    report = convert(registry, root, name)
    assert report.images[0].up_to_date
    for file_name, data in before.items():
        assert (root / STORE / file_name).read_bytes() == data
    assert registry.blob_gets() == []


def test_layer_store(repo: tuple[Path, dict[str, Image]]) -> None:
    root, images = repo
    store = root / ".podmanLayers"
    blobs = {b.digest: b for img in images.values() for b in img.layers}
    assert set(os.listdir(store)) == set(blobs)
    for digest, blob in blobs.items():
        hexpart = digest.split(":", 1)[1]
        assert os.readlink(store / digest / "diff") == \
            f"{root.absolute()}/.layers/{hexpart[:2]}/{hexpart}/layerfs"
        info = read_json(store / digest / "info")
        assert info["compressed-diff-digest"] == digest
        assert info["diff-digest"] == blob.diff_id
        assert info["diff-size"] == _tar_size(blob)
        assert (store / digest / "blob").read_bytes() == b""


def test_layers_with_opaque_directories_stay_out_of_the_layer_store(tmp_path: Path) -> None:
    registry = FakeRegistry()
    base = layer([Entry("d/", "dir"), Entry("d/old", data=b"old")])
    upper = layer([Entry("d/", "dir"), Entry("d/.wh..wh..opq"), Entry("d/new", data=b"new")])
    img = image([base, upper])
    name = registry.push("library/opaque", "1", img)
    root = tmp_path / "repo"
    convert(registry, root, name)
    assert os.listdir(root / ".podmanLayers") == [base.digest]
    # The image store has both: the chain the repository publishes is complete.
    layers = read_json(root / STORE / "overlay-layers/layers.json")
    assert [e["id"] for e in layers] == podman_layer_ids(diff_ids(img))


def test_one_image_under_several_repositories_is_one_entry(tmp_path: Path) -> None:
    registry = FakeRegistry()
    img = image([layer([Entry("x", data=b"x")])])
    names = [registry.push("library/a", "1", img), registry.push("team/b", "2", img)]
    root = tmp_path / "repo"
    convert(registry, root, *names)
    [entry] = read_json(root / STORE / "overlay-images/images.json")
    assert entry["names"] == sorted(names)
    assert entry["id"] == img.config_digest.split(":", 1)[1]


def test_an_image_whose_metadata_breaks_keeps_its_last_good_entry(tmp_path: Path) -> None:
    # A damaged manifest.json must not make an image vanish from every client's podman.
    registry = FakeRegistry()
    shared = layer([Entry("etc/", "dir"), Entry("etc/os", data=b"os")])
    a = image([shared, layer([Entry("a", data=b"a")])])
    b = image([shared, layer([Entry("b", data=b"b")])])
    c = image([layer([Entry("c", data=b"c")])])
    names = [registry.push("library/a", "1", a), registry.push("library/b", "1", b)]
    root = tmp_path / "repo"
    convert(registry, root, *names)
    before = {e["id"]: e for e in read_json(root / STORE / "overlay-images/images.json")}
    b_id = b.config_digest.split(":", 1)[1]

    (root / f".metadata/{HOST}/library/b:1/manifest.json").write_text("{")
    report = convert(registry, root, registry.push("library/c", "1", c))
    assert report.views is not None and report.views.store is not None
    assert report.views.store.kept == [f"{HOST}/library/b:1"]
    assert any(f"{HOST}/library/b:1" in problem for problem in report.problems)
    after = {e["id"]: e for e in read_json(root / STORE / "overlay-images/images.json")}
    assert after[b_id] == before[b_id]
    assert set(after) == {*before, c.config_digest.split(":", 1)[1]}
    layers = {e["id"] for e in read_json(root / STORE / "overlay-layers/layers.json")}
    assert set(podman_layer_ids(diff_ids(b))) <= layers
    assert (root / STORE / "overlay" / podman_layer_ids(diff_ids(b))[-1] / "diff/b").is_file()


def test_a_layer_repeated_in_one_image_gets_an_id_per_position(tmp_path: Path) -> None:
    # The same blob twice in one image (reproducible builds make identical layers):
    # containers/image gives each position its own ID, parented by the one below.
    registry = FakeRegistry()
    repeated = layer([Entry("marker", data=b"same bytes")])
    middle = layer([Entry("marker", data=b"middle")])
    img = image([repeated, middle, repeated])
    root = tmp_path / "repo"
    convert(registry, root, registry.push("library/repeat", "1", img))
    ids = podman_layer_ids(diff_ids(img))
    assert len(set(ids)) == 3
    layers = {e["id"]: e for e in read_json(root / STORE / "overlay-layers/layers.json")}
    assert set(layers) == set(ids)
    assert layers[ids[2]]["parent"] == ids[1] and layers[ids[1]]["parent"] == ids[0]
    assert (root / f"{HOST}/library/repeat:1/marker").read_bytes() == b"same bytes"


def test_store_records_are_read_one_by_one_and_written_back_as_they_were() -> None:
    """Records are kept as their text (`StoreEntry`): a store written back unchanged is
    the same bytes, and damaged files are refused whole, with what is wrong."""
    import json as _json
    import tempfile
    from pathlib import Path as _Path

    from lazypod.views.store_files import IMAGES_JSON, dump_entries, read_store

    entries = [{"id": "a" * 64, "names": ["x:1"], "digest": "sha256:" + "1" * 64,
                "layer": "b" * 64, "big-data-names": ["manifest"], "created": "2024"},
               {"id": "c" * 64, "names": [], "digest": "sha256:" + "2" * 64}]
    with tempfile.TemporaryDirectory() as tmp:
        root = _Path(tmp)
        (root / "overlay-images").mkdir()
        path = root / IMAGES_JSON
        compact = _json.dumps(entries, separators=(",", ":")).encode()
        path.write_bytes(compact)
        store = read_store(root)
        assert not store.problems
        assert dump_entries(list(store.images.values())) == compact
        assert store.images["a" * 64].decoded() == entries[0]
        assert store.images["a" * 64].names == ("x:1",) and store.names() == {"x:1"}
        path.write_text(_json.dumps(entries, indent=2))  # another layout: same records
        assert [e.decoded() for e in read_store(root).images.values()] == entries
        for damaged, problem in ((compact[:-5], "is not JSON"), (b'{"a": 1}', "not a list"),
                                 (compact + b"x", "is not JSON"), (b"\xff[", "is not JSON"),
                                 (b'[{"id": 5}, 3]', "2 malformed")):
            path.write_bytes(damaged)
            found = read_store(root)
            assert any(problem in p for p in found.problems), (damaged, found.problems)
            assert not found.images
