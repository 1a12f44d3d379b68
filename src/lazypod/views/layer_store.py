"""The podman *additional layer store* view (`.podmanLayers`).

    .podmanLayers/sha256:<blob hex>/diff   absolute symlink to the layer's layerfs
    .podmanLayers/sha256:<blob hex>/info   the layer's record, in layers.json form
    .podmanLayers/sha256:<blob hex>/blob   an empty placeholder (see below)

With `--storage-opt overlay.additionallayerstore=<root>/.podmanLayers`, podman 4.x
pulls an image whose layers are all here by fetching only its manifest and config;
podman 5.1 and later ask this store only for layers with a TOC digest
(zstd:chunked, eStargz), so there the image store's layer records are what avoid
downloads. containers/storage wants a `blob` file to exist and reads it only to
push or save such a layer; the repository does not keep compressed blobs, so it
is empty, and a push or save of an image pulled through this store fails on the
digest instead of sending wrong bytes (use the image store for those).

Layers with opaque directories are left out: podman may use a layer of this store
under layers the publisher never saw, and the explicit whiteouts that make its
opaque directories opaque for rootless overlay and fuse-overlayfs (`views.opaque`)
only cover the chains the repository publishes. podman downloads such a layer
instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..backend import TreeWriter
from ..digest import Digest
from ..fsutil import listdir, write_new
from ..layout import LAYERFS, PODMAN_LAYERS
from ..manifest import Compression, Descriptor
from ..repository import ImageRecord, LayerRecord, LayerWhiteouts, RepositoryState
from .scope import FULL, Scope

__all__ = ["LayerStoreReport", "render_layer_store"]


@dataclass
class LayerStoreReport:
    layers: int
    added: int
    removed: int
    left_out_opaque: int = 0


def layer_info(record: LayerRecord, blob: Descriptor) -> bytes:
    assert record.diff_id is not None
    obj: dict[str, Any] = {
        "compressed-diff-digest": str(blob.digest),
        "compressed-size": blob.size,
        "diff-digest": str(record.diff_id),
        "diff-size": record.diff_size if record.diff_size is not None else -1,
    }
    code = Compression.STORAGE_CODE.get(blob.compression, 0)
    if code:
        obj["compression"] = code
    if record.uidset:
        obj["uidset"] = list(record.uidset)
    if record.gidset:
        obj["gidset"] = list(record.gidset)
    return json.dumps(obj, separators=(",", ":")).encode()


def render_layer_store(
    state: RepositoryState,
    writer: TreeWriter,
    warn: Callable[[str], None],
    *,
    prefix: str = PODMAN_LAYERS,
    layers_root: str | None = None,
    scope: Scope = FULL,
) -> LayerStoreReport:
    """Bring `<prefix>` in line with `state`: an entry for every layer of every image
    (but those with opaque directories); entries are checked for the images `scope`
    renders, and made for any layer that has none."""
    public = layers_root or writer.public_root
    root = writer.layout.root / prefix
    present = set() if scope.full else set(listdir(root))
    wanted: set[str] = set()  # entry names (`sha256:<hex>`)
    made: dict[Digest, tuple[LayerRecord, Descriptor]] = {}  # entries checked or made
    opaque: set[str] = set()  # names of the layers left out
    held = state.diff_ids_by_blob() if not scope.full else {}
    for image in state.images:
        rendered = scope.renders(image)
        if not rendered and _entries_stand(state, held, image, present, wanted, opaque):
            continue
        for blob in image.manifest.layers:
            record = state.layer(blob.digest)
            if record is None or not record.complete or blob.is_foreign:
                continue
            name = f"sha256:{blob.digest.hex}"
            if record.diff_id is None or name in wanted or name in opaque:
                continue
            if not rendered and name in present:
                wanted.add(name)
                continue
            if _has_opaque_dirs(state, blob.digest):
                opaque.add(name)
                continue
            wanted.add(name)
            made[blob.digest] = (record, blob)
    writer.make_dir(prefix)
    added = 0
    for digest, (record, blob) in made.items():
        name = f"sha256:{digest.hex}"
        target = f"{public}/{state.layout.layer_rel(digest)}/{LAYERFS}"
        info = layer_info(record, blob)
        directory = root / name
        try:
            ok = (os.readlink(directory / "diff") == target
                  and (directory / "info").read_bytes() == info
                  and (directory / "blob").exists())
        except OSError:
            ok = False
        if ok:
            continue

        def fill(path: Path, target: str = target, info: bytes = info) -> None:
            os.symlink(target, path / "diff")
            write_new(path / "info", info)
            write_new(path / "blob", b"")

        writer.replace_dir(f"{prefix}/{name}", fill)
        added += 1
    removed = 0
    for name in listdir(root):
        if name.startswith("sha256:") and name not in wanted:
            writer.remove(f"{prefix}/{name}")
            removed += 1
    return LayerStoreReport(len(wanted), added, removed, len(opaque))


def _entries_stand(state: RepositoryState, held: dict[str, str], image: ImageRecord,
                   present: set[str], wanted: set[str], opaque: set[str]) -> bool:
    """For an image the scope leaves as it is: when every layer of it that belongs here
    has its entry (or is left out for its opaque directories), take them as they are
    (the image's record is not built)."""
    names = []
    for text in image.layer_digests:  # `held`: RepositoryState.diff_ids_by_blob
        if text not in held or text in opaque:
            continue  # a layer the full look leaves out too
        if not text.startswith("sha256:"):
            return False
        if text not in present:
            if not _has_opaque_dirs(state, Digest("sha256", text[7:])):
                return False  # an entry to make: the full look
            opaque.add(text)
            continue
        names.append(text)
    wanted.update(names)
    return True


def _has_opaque_dirs(state: RepositoryState, digest: Digest) -> bool:
    """Whether the layer has opaque directories (then it stays out of this store)."""
    whiteouts = LayerWhiteouts.read(state.layout.layer_dir(digest))
    return whiteouts is not None and bool(whiteouts.opaque_dirs)
