"""What a repository holds: its images, their sizes, and which views have them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .layout import PODMAN_LAYERS, PODMAN_STORE
from .repository import RepositoryState

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

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def line(self) -> str:
        size = f"{self.size / 1e6:.1f}MB" if self.size is not None else \
            f"{self.compressed_size / 1e6:.1f}MB(gz)"
        views = ",".join(name for name, present in (("store", self.in_store),
                                                     ("layers", self.in_layer_store),
                                                     ("flat", self.flat)) if present)
        state = "" if self.complete else "  INCOMPLETE"
        return (f"{self.name}  {self.manifest_digest[:19]}  {self.layers} layers  {size}  "
                f"views: {views or '-'}{state}")


def list_images(state: RepositoryState) -> list[ImageRow]:
    root = state.layout.root
    try:
        stored = json.loads((root / PODMAN_STORE / "overlay-images/images.json").read_bytes())
        store_names = {n for entry in stored for n in entry.get("names", [])}
    except (OSError, ValueError):
        store_names = set()
    rows = []
    for image in state.images:
        layers = [b for b in image.manifest.layers if not b.is_foreign]
        records = [state.layer(b.digest) for b in layers]
        complete = all(r is not None and r.complete for r in records)
        sizes = [r.diff_size if r is not None else None for r in records]
        rows.append(ImageRow(
            name=image.public_name,
            podman_name=image.podman_name,
            manifest_digest=str(image.manifest.digest),
            layers=len(layers),
            compressed_size=sum(b.size for b in layers),
            size=None if any(s is None for s in sizes) else sum(s or 0 for s in sizes),
            complete=complete,
            in_store=image.podman_name in store_names,
            in_layer_store=bool(layers) and all(
                (root / PODMAN_LAYERS / f"sha256:{b.digest.hex}" / "diff").is_symlink()
                for b in layers),
            flat=image.config is not None
            and (state.layout.flat_dir(image.config.digest) / ".singularity.d").is_dir(),
        ))
    return rows
