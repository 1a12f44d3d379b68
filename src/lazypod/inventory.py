"""What a repository holds: its images, their sizes, and which views have them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .fsutil import listdir
from .layout import FLAT, PODMAN_LAYERS, PODMAN_STORE
from .repository import RepositoryState
from .views.store_files import store_names

__all__ = ["ImageRow", "list_images"]


@dataclass(frozen=True)
class ImageRow:
    name: str
    podman_name: str
    manifest_digest: str
    layers: int
    compressed_size: int
    size: int | None  # unpacked, when every layer record says
    complete: bool  # every layer is in .layers, complete
    in_store: bool
    in_layer_store: bool
    flat: bool
    problem: str = ""  # why the image is not complete, when it is not

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def line(self) -> str:
        size = f"{self.size / 1e6:.1f}MB" if self.size is not None else \
            f"{self.compressed_size / 1e6:.1f}MB(gz)"
        views = ",".join(name for name, present in (("store", self.in_store),
                                                     ("layers", self.in_layer_store),
                                                     ("flat", self.flat)) if present)
        state = "" if self.complete else "  INCOMPLETE"
        if self.problem:
            state += f"  ({self.problem})"
        return (f"{self.name}  {self.manifest_digest[:19]}  {self.layers} layers  {size}  "
                f"views: {views or '-'}{state}")


def list_images(state: RepositoryState) -> list[ImageRow]:
    root = state.layout.root
    offered = store_names(state.layout)
    has_store = (root / PODMAN_STORE).exists()
    # One listing per directory, not a stat per image and layer (10,000s of them); a
    # layer store entry is put in place whole (`replace_dir`).
    in_layer_store = set(listdir(root / PODMAN_LAYERS))
    flat_trees = _flat_trees(state)
    rows = []
    for image in state.images:
        layers = [b for b in image.manifest.layers if not b.is_foreign]
        records = [state.layer(b.digest) for b in layers]
        complete = all(r is not None and r.complete for r in records)
        sizes = [r.diff_size if r is not None else None for r in records]
        problem = ""
        if not complete:
            problem = "a layer is missing or damaged: convert it again"
        elif image.podman_name not in offered and has_store:
            complete = False
            problem = "not in the podman store yet: convert again to complete it"
        rows.append(ImageRow(
            name=image.public_name,
            podman_name=image.podman_name,
            manifest_digest=str(image.manifest.digest),
            layers=len(layers),
            compressed_size=sum(b.size for b in layers),
            size=None if any(s is None for s in sizes) else sum(s or 0 for s in sizes),
            complete=complete,
            in_store=image.podman_name in offered,
            in_layer_store=bool(layers) and all(
                f"sha256:{b.digest.hex}" in in_layer_store for b in layers),
            flat=image.config is not None and image.config.digest.hex in flat_trees,
            problem=problem,
        ))
    for name, why in sorted(state.unreadable.items()):
        rows.append(ImageRow(name=name, podman_name="", manifest_digest="", layers=0,
                             compressed_size=0, size=None, complete=False, in_store=False,
                             in_layer_store=False, flat=False,
                             problem=f"metadata unreadable: {why}"))
    return rows


def _flat_trees(state: RepositoryState) -> set[str]:
    """Config digests (hex) with a complete flat tree: `.flat/<c2>/<c>/.singularity.d`
    (written last), looked up one `.flat/<c2>` listing at a time."""
    found: set[str] = set()
    flat_root = os.path.join(state.layout.root, FLAT)
    for prefix in listdir(flat_root):
        parent = os.path.join(flat_root, prefix)
        for name in listdir(parent):
            if os.path.isdir(os.path.join(parent, name, ".singularity.d")):
                found.add(name)
    return found
