"""The podman *additional image store* view (`.podmanStore`), in containers/storage's
own overlay layout, rendered from a RepositoryState.

Layer IDs are computed as containers/image computes them when it pulls (the base
layer's ID is its diff ID; layer n's is sha256("<ID n-1>+<diff ID n>")), so a
plain `podman pull` of another image finds every layer it shares with the store
and downloads only the rest. `overlay/<id>/diff` is an absolute symlink to the
layer's `layerfs`: no layer content is ever copied.

Update order keeps readers whole: new layer directories and big-data files
first, then layers.json holding every old and new layer, then images.json, then
layers.json without the layers no image uses any more (each replaced by rename,
under the stores' lock files), then fresh lock tokens so long-running podman
processes reload, and only then removal of what no image uses any more. A kill
anywhere leaves a store podman loads.

An image the repository lists but that cannot be rendered now (its metadata or a
layer record cannot be read) keeps the entry it had in the store, with its layers,
if it had one: a damaged file never makes an image disappear from every client.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..backend import TreeWriter
from ..digest import Digest
from ..errors import LazypodError
from ..fsutil import listdir, read_or_none, write_new
from ..layout import LAYERFS, METADATA, PODMAN_STORE
from ..manifest import Compression, Descriptor, Document
from ..reference import parse_reference
from ..repository import TAR_SPLIT, ImageRecord, LayerRecord, RepositoryState
from .scope import FULL, Scope
from .store_files import (
    IMAGES_JSON,
    IMAGES_LOCK,
    LAYERS_JSON,
    LAYERS_LOCK,
    StoreEntry,
    StoreFiles,
    content_digest,
    dump_entries,
    read_store,
)

__all__ = ["StoreImage", "StoreLayer", "StoreModel", "build_store_model", "render_image_store",
           "store_refusal"]

_PLAIN_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789."


@dataclass(frozen=True)
class StoreLayer:
    id: str
    parent: str | None
    record: LayerRecord
    blob: Descriptor
    lower_ids: tuple[str, ...]  # IDs of all lower layers, nearest first

    @property
    def link(self) -> str:
        return link_name(self.id)

    @property
    def lowers(self) -> tuple[str, ...]:
        """Link names of all lower layers, nearest first (for the `lower` file)."""
        return tuple(link_name(lid) for lid in self.lower_ids)

    def entry(self, created: str) -> dict[str, Any]:
        assert self.record.diff_id is not None
        obj: dict[str, Any] = {"id": self.id}
        if self.parent:
            obj["parent"] = self.parent
        obj["created"] = self.record.created or created
        obj["compressed-diff-digest"] = str(self.blob.digest)
        obj["compressed-size"] = self.blob.size
        obj["diff-digest"] = str(self.record.diff_id)
        if self.record.diff_size is not None:  # unknown for DUCC's oldest layers
            obj["diff-size"] = self.record.diff_size
        code = Compression.STORAGE_CODE.get(self.blob.compression, 0)
        if code:
            obj["compression"] = code
        if self.record.uidset:
            obj["uidset"] = list(self.record.uidset)
        if self.record.gidset:
            obj["gidset"] = list(self.record.gidset)
        return obj


@dataclass
class StoreImage:
    id: str
    top_layer: str | None
    created: str
    names: list[str] = field(default_factory=list)
    # Manifests and config by key; their bytes are read only when written.
    big_data: dict[str, Document] = field(default_factory=dict)
    digest: str = ""

    def entry(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"id": self.id, "digest": self.digest, "names": self.names}
        if self.top_layer:
            obj["layer"] = self.top_layer
        keys = list(self.big_data)
        obj["big-data-names"] = keys
        obj["big-data-sizes"] = {k: v.size for k, v in self.big_data.items()}
        # containers/storage's digests are sha256: a document's own when it has one
        obj["big-data-digests"] = {
            k: str(v.digest if v.digest.algorithm == "sha256" else Digest.of(v.raw))
            for k, v in self.big_data.items()}
        obj["created"] = self.created
        return obj


@dataclass
class StoreModel:
    """The store's images and layers, in the order the repository's images come (each
    image's layers bottom first, a layer where it first appears): made from records,
    or the old store's entry where the scope leaves the image as it is (`_settled`)."""

    layers: dict[str, StoreLayer | StoreEntry] = field(default_factory=dict)
    images: dict[str, StoreImage | StoreEntry] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    skipped_names: set[str] = field(default_factory=set)  # podman names of skipped images
    # What the scope renders: IDs of images and layers whose directories are checked.
    rendered_images: set[str] = field(default_factory=set)
    rendered_layers: set[str] = field(default_factory=set)


def chain_ids(diff_ids: list[Digest]) -> list[str]:
    """Layer IDs as containers/image assigns them on pull."""
    ids: list[str] = []
    for diff_id in diff_ids:
        if not ids:
            ids.append(diff_id.hex)
        else:
            ids.append(hashlib.sha256(f"{ids[-1]}+{diff_id.hex}".encode()).hexdigest())
    return ids


def link_name(layer_id: str) -> str:
    """A stable 26-character name for `overlay/l/` (podman draws a random one)."""
    digest = hashlib.sha256(b"lazypod-link:" + layer_id.encode()).digest()
    return base64.b32encode(digest).decode()[:26]


def big_data_file_name(key: str) -> str:
    """containers/storage's file name for a big-data key."""
    if key and not key.strip(_PLAIN_CHARS):
        return key
    return "=" + base64.b64encode(key.encode()).decode()


def build_store_model(state: RepositoryState, warn: Callable[[str], None],
                      scope: Scope = FULL, old: StoreFiles | None = None) -> StoreModel:
    """`old`: the store as read; the images of each ID that `_settled` finds in it keep
    their entries, and their records are not built."""
    model = StoreModel()
    owners: dict[str, str] = {}
    kept = _settled(state, scope, old) if old is not None else {}
    for image in state.images:
        found = kept.get(image.image_id or "")
        if found is not None:
            assert old is not None
            _add_settled(model, old, image, *found, owners)
            continue
        why = _add_image(model, state, image, owners, scope.renders(image))
        if why:
            model.skipped.append(f"{image.public_name}: {why}")
            model.skipped_names.add(image.podman_name)
            if scope.renders(image):
                warn(f"podman store: skipping {image.public_name}: {why}")
    for public_name in state.unreadable:
        try:
            model.skipped_names.add(parse_reference(public_name).podman_name)
        except LazypodError:
            continue
    return model


def store_refusal(state: RepositoryState, image: ImageRecord,
                  owners: dict[str, str]) -> str | None:
    """Why the image cannot be in a podman store (None: it can); `owners`: podman
    names already given, to the public name that has each."""
    found = _store_records(state, image, owners)
    return found if isinstance(found, str) else None


def _store_records(state: RepositoryState, image: ImageRecord,
                   owners: dict[str, str]) -> str | list[LayerRecord]:
    """The records of the image's layers, bottom first, or why it cannot be in a store."""
    config = image.config
    if config is None:
        return "no config.json next to its manifest (run `lazypod views` with registry access)"
    if any(layer.is_foreign for layer in image.manifest.layers):
        return "it has foreign (non-distributable) layers, which are not in the repository"
    if len(config.diff_ids) != len(image.manifest.layers):
        return "its config and manifest disagree on the number of layers"
    if image.podman_name in owners:
        return f"podman name {image.podman_name} is already taken by {owners[image.podman_name]}"
    records: list[LayerRecord] = []
    for blob, diff_id in zip(image.manifest.layers, config.diff_ids, strict=True):
        record = state.layer(blob.digest)
        if record is None or not record.complete:
            return f"layer {blob.digest.short} is missing from .layers"
        if record.diff_id != diff_id:
            return f"layer {blob.digest.short} has diff ID {record.diff_id}, config says {diff_id}"
        records.append(record)
    return records


def _settled(state: RepositoryState, scope: Scope, old: StoreFiles
             ) -> dict[str, tuple[StoreEntry, list[str]]]:
    """The old entries that stand, with their layer chains (top first), by image ID:
    those of the IDs whose images the scope all leaves as they are, when the entry
    names exactly these images, with the manifest of the first, and their layer
    records still hold what the store says (complete, the config's diff IDs). Answered
    from what identifies each image (`ImageRecord.image_id`...), without building
    records."""
    if scope.full:
        return {}
    names: dict[str, list[str]] = {}
    first: dict[str, tuple[str, int]] = {}  # the first image's manifest, its layer count
    rejected: set[str] = set()
    seen: set[str] = set()
    held = state.diff_ids_by_blob()
    for image in state.images:
        image_id = image.image_id
        if image_id is None:
            continue
        name = image.podman_name
        if scope.renders(image) or name in seen or not _layers_hold(held, image):
            rejected.add(image_id)  # rendered, a name given twice, or a record changed
        seen.add(name)
        names.setdefault(image_id, []).append(name)
        first.setdefault(image_id, (image.manifest_digest, len(image.layer_digests)))
    found: dict[str, tuple[StoreEntry, list[str]]] = {}
    for image_id, given in names.items():
        entry = old.images.get(image_id)
        if image_id in rejected or entry is None or entry.digest != first[image_id][0] \
                or list(entry.names) != sorted(given):
            continue
        chain = old.chain(entry.layer)
        if chain is not None and len(chain) == first[image_id][1]:
            found[image_id] = (entry, chain)
    return found


def _layers_hold(held: dict[str, str], image: ImageRecord) -> bool:
    """Whether each of the image's layers has a complete record with the config's diff
    ID (`held`: `RepositoryState.diff_ids_by_blob`)."""
    return [held.get(blob) for blob in image.layer_digests] == image.diff_ids


def _add_settled(model: StoreModel, old: StoreFiles, image: ImageRecord, entry: StoreEntry,
                 chain: list[str], owners: dict[str, str]) -> None:
    """An image whose ID's old entry stands (`_settled`): that entry and its layers'."""
    for layer_id in reversed(chain):
        if layer_id not in model.layers:
            model.layers[layer_id] = old.layers[layer_id]
    owners[image.podman_name] = image.public_name
    assert image.image_id is not None
    model.images.setdefault(image.image_id, entry)


def _add_image(
    model: StoreModel, state: RepositoryState, image: ImageRecord, owners: dict[str, str],
    rendered: bool = True,
) -> str | None:
    records = _store_records(state, image, owners)
    if isinstance(records, str):
        return records
    config = image.config
    assert config is not None
    ids = chain_ids(list(config.diff_ids))
    for i, (layer_id, record, blob) in enumerate(
        zip(ids, records, image.manifest.layers, strict=True)
    ):
        if not isinstance(model.layers.get(layer_id), StoreLayer):  # absent, or an entry
            model.layers[layer_id] = StoreLayer(
                id=layer_id,
                parent=ids[i - 1] if i else None,
                record=record,
                blob=blob,
                lower_ids=tuple(reversed(ids[:i])),
            )
    owners[image.podman_name] = image.public_name
    if rendered:
        model.rendered_images.add(config.digest.hex)
        model.rendered_layers.update(ids)
    store_image = model.images.get(config.digest.hex)
    assert not isinstance(store_image, StoreEntry)  # `_settled` takes all of an ID or none
    if store_image is None:
        store_image = model.images[config.digest.hex] = StoreImage(
            id=config.digest.hex,
            top_layer=ids[-1] if ids else None,
            created=config.created or "1970-01-01T00:00:00Z",
            digest=str(image.manifest.digest),
        )
        store_image.big_data[str(config.digest)] = config
        store_image.big_data["manifest"] = image.manifest
    store_image.names.append(image.podman_name)
    if image.index is not None:
        store_image.big_data[f"manifest-{image.index.digest}"] = image.index
    store_image.big_data[f"manifest-{image.manifest.digest}"] = image.manifest
    return None


def lock_token() -> bytes:
    """A fresh containers/storage "last write" token: ns time, counter, pid, random."""
    head = struct.pack("<QQI", time.time_ns(), 1, os.getpid() & 0xFFFFFFFF)
    return head + secrets.token_bytes(44)


@dataclass
class StoreReport:
    images: int
    layers: int
    added_layers: int
    removed_layers: int
    skipped: list[str]
    kept: list[str] = field(default_factory=list)  # names whose last good entry was kept


def render_image_store(
    state: RepositoryState,
    writer: TreeWriter,
    warn: Callable[[str], None],
    *,
    prefix: str = PODMAN_STORE,
    layers_root: str | None = None,
    scope: Scope = FULL,
    old: StoreFiles | None = None,
) -> StoreReport:
    """Bring `<prefix>` (under the writer's root) in line with `state`: its records
    for every image, the directories of the images and layers `scope` renders and of
    any the records did not hold yet.

    `layers_root` is the absolute path at which podman will find the repository's
    `.layers` (default: the writer's public root), for stores built elsewhere; `old`:
    the store's records, when the caller has read them already.
    """
    root = writer.layout.root / prefix
    public = layers_root or writer.public_root
    old = read_store(root) if old is None else old
    model = build_store_model(state, warn, scope, old)
    for problem in old.problems:
        warn(f"podman store: {problem}: rewriting it")
    kept_images, kept_layers = _carry_over(model, old, root)
    created = _now()

    for skeleton in ("overlay/l", "overlay-images", "overlay-layers"):
        writer.make_dir(f"{prefix}/{skeleton}")
    added = 0
    for layer in model.layers.values():
        if isinstance(layer, StoreEntry) or (not scope.full and layer.id in old.layers
                                             and layer.id not in model.rendered_layers):
            continue
        target = f"{public}/{state.layout.layer_rel(layer.record.digest)}/{LAYERFS}"
        added += _ensure_layer_dir(writer, root, prefix, layer, target)
        writer.symlink(f"{prefix}/overlay/l/{layer.link}", f"../{layer.id}/diff")
        if layer.record.has_tar_split:
            writer.symlink(
                f"{prefix}/overlay-layers/{layer.id}.tar-split.gz",
                f"{public}/{state.layout.layer_rel(layer.record.digest)}/{METADATA}/{TAR_SPLIT}",
            )
    for image in model.images.values():
        if isinstance(image, StoreEntry):
            continue
        image.names.sort()
        if scope.full or image.id not in old.images or image.id in model.rendered_images:
            _ensure_big_data(writer, root, prefix, image)

    # A layer the scope leaves as it is keeps its record as read; the others are made
    # anew, with the time the layer was first published.
    layer_entries: dict[str, dict[str, Any] | StoreEntry] = {}
    for lid, layer in model.layers.items():
        entry = old.layers.get(lid)
        if isinstance(layer, StoreEntry):
            layer_entries[lid] = layer
            continue
        if entry is not None and not scope.full and lid not in model.rendered_layers:
            layer_entries[lid] = entry
            continue
        layer_entries[lid] = made = layer.entry(created)
        if entry is not None and entry.created is not None:
            made["created"] = entry.created
    layer_entries.update(kept_layers)
    image_entries = [_entry(image, old, model, scope) for image in model.images.values()]
    image_entries += list(kept_images.values())
    stale_layers = set(old.layers) - set(layer_entries)

    images_json = dump_entries(image_entries)
    del image_entries
    layers_json = dump_entries(list(layer_entries.values()))
    # What the files held when read (their digests: not a second copy of 10 MB).
    current = (old.digests.get(IMAGES_JSON), old.digests.get(LAYERS_JSON))
    if current != (content_digest(images_json), content_digest(layers_json)):
        with writer.lock_files([f"{prefix}/{LAYERS_LOCK}", f"{prefix}/{IMAGES_LOCK}"]):
            # Layers before the images that name them, and until the images that
            # used them are gone, the layers that go: every state podman reads is whole.
            union = dump_entries([*layer_entries.values(),
                                  *(old.layers[i] for i in sorted(stale_layers))]) \
                if stale_layers else layers_json
            if stale_layers or content_digest(union) != current[1]:
                writer.write_file(f"{prefix}/{LAYERS_JSON}", union)
            del union
            writer.write_file(f"{prefix}/{IMAGES_JSON}", images_json)
            if stale_layers:
                writer.write_file(f"{prefix}/{LAYERS_JSON}", layers_json)
            # podman reloads a store only when a lock's token changes.
            writer.touch_lock(f"{prefix}/{LAYERS_LOCK}", lock_token())
            writer.touch_lock(f"{prefix}/{IMAGES_LOCK}", lock_token())

    wanted_images = set(model.images) | set(kept_images)
    for image_id in set(old.images) - wanted_images:
        writer.remove(f"{prefix}/overlay-images/{image_id}")
    if scope.full:
        _remove_stale_layers(writer, root, prefix, set(model.layers) | set(kept_layers))
    else:
        for layer_id in sorted(stale_layers):
            _remove_layer(writer, root, prefix, layer_id)
    kept = sorted(name for entry in kept_images.values() for name in entry["names"])
    for name in kept:
        warn(f"podman store: kept the last good entry of {name}")
    return StoreReport(len(model.images) + len(kept_images), len(layer_entries), added,
                       len(stale_layers), model.skipped, kept)


def _entry(image: StoreImage | StoreEntry, old: StoreFiles, model: StoreModel, scope: Scope
           ) -> dict[str, Any] | StoreEntry:
    """The image's record: the one the store has when the scope leaves the image as it
    is (the same names and manifest), else made anew (its big-data digests hashed)."""
    if isinstance(image, StoreEntry):
        return image
    if not scope.full and image.id not in model.rendered_images:
        entry = old.images.get(image.id)
        if entry is not None and list(entry.names) == image.names and \
                entry.digest == image.digest:
            return entry
    return image.entry()


def _carry_over(model: StoreModel, old: StoreFiles, root: Path
                ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """The old entries of images that cannot be rendered now, with their layers, as
    long as everything they need is still there."""
    taken = {name for image in model.images.values() for name in image.names}
    images: dict[str, dict[str, Any]] = {}
    layers: dict[str, dict[str, Any]] = {}
    for image_id, entry in old.images.items():
        names = [n for n in entry.names if n in model.skipped_names and n not in taken]
        if not names or image_id in model.images:
            continue
        chain = old.chain(entry.layer)
        if chain is None or not all(
                (root / "overlay" / lid / "diff").resolve().is_dir() for lid in chain):
            continue
        images[image_id] = {**entry.decoded(), "names": names}
        for lid in chain:
            if lid not in model.layers:
                layers[lid] = old.layers[lid].decoded()
    return images, layers


def _ensure_layer_dir(
    writer: TreeWriter, root: Path, prefix: str, layer: StoreLayer, target: str
) -> int:
    directory = root / "overlay" / layer.id
    lower = ":".join(f"l/{name}" for name in layer.lowers)
    try:
        current_ok = (
            os.readlink(directory / "diff") == target
            and (directory / "link").read_text() == layer.link
            and (not lower or (directory / "lower").read_text() == lower)
        )
    except OSError:
        current_ok = False
    if current_ok:
        return 0

    def fill(path: Path) -> None:
        os.symlink(target, path / "diff")
        write_new(path / "link", layer.link.encode())
        if lower:
            write_new(path / "lower", lower.encode())

    writer.replace_dir(f"{prefix}/overlay/{layer.id}", fill)
    return 1


def _ensure_big_data(writer: TreeWriter, root: Path, prefix: str, image: StoreImage) -> None:
    directory = root / "overlay-images" / image.id
    files = {big_data_file_name(k): v.raw for k, v in image.big_data.items()}
    try:
        present = set(os.listdir(directory))
        current_ok = present == set(files) and all(
            (directory / name).read_bytes() == data for name, data in files.items()
        )
    except OSError:
        current_ok = False
    if current_ok:
        return

    def fill(path: Path) -> None:
        for name, data in files.items():
            write_new(path / name, data)

    writer.replace_dir(f"{prefix}/overlay-images/{image.id}", fill)


def _remove_stale_layers(writer: TreeWriter, root: Path, prefix: str, wanted: set[str]) -> None:
    wanted_links = {link_name(lid) for lid in wanted}
    for lid in wanted:  # a kept layer's link name is whatever its directory says
        linked = read_or_none(root / "overlay" / lid / "link")
        if linked:
            wanted_links.add(linked.decode(errors="replace").strip())
    for name in listdir(root / "overlay"):
        if name != "l" and name not in wanted:
            writer.remove(f"{prefix}/overlay/{name}")
    for name in listdir(root / "overlay" / "l"):
        if name not in wanted_links:
            writer.remove(f"{prefix}/overlay/l/{name}")
    for name in listdir(root / "overlay-layers"):
        layer_id = name.removesuffix(".tar-split.gz")
        if name.endswith(".tar-split.gz") and layer_id not in wanted:
            writer.remove(f"{prefix}/overlay-layers/{name}")


def _remove_layer(writer: TreeWriter, root: Path, prefix: str, layer_id: str) -> None:
    """One layer that no image uses any more: its directory, link and tar-split."""
    linked = read_or_none(root / "overlay" / layer_id / "link")
    if linked:
        name = linked.decode(errors="replace").strip()
        if name and "/" not in name and name not in (".", ".."):
            writer.remove(f"{prefix}/overlay/l/{name}")
    writer.remove(f"{prefix}/overlay/{layer_id}")
    writer.remove(f"{prefix}/overlay-layers/{layer_id}.tar-split.gz")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
