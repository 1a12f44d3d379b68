"""What a repository holds: its images, their sizes, and which views have them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .layout import PODMAN_LAYERS, PODMAN_STORE
from .repository import RepositoryState
from .views.store_files import read_store

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
    store_names = read_store(root / PODMAN_STORE).names()
    rows = []
    for image in state.images:
        layers = [b for b in image.manifest.layers if not b.is_foreign]
        records = [state.layer(b.digest) for b in layers]
        complete = all(r is not None and r.complete for r in records)
        sizes = [r.diff_size if r is not None else None for r in records]
        problem = ""
        if not complete:
            problem = "a layer is missing or damaged: convert it again"
        elif image.podman_name not in store_names and (root / PODMAN_STORE).exists():
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
            in_store=image.podman_name in store_names,
            in_layer_store=bool(layers) and all(
                (root / PODMAN_LAYERS / f"sha256:{b.digest.hex}" / "diff").is_symlink()
                for b in layers),
            flat=image.config is not None
            and (state.layout.flat_dir(image.config.digest) / ".singularity.d").is_dir(),
            problem=problem,
        ))
    for name, why in sorted(state.unreadable.items()):
        rows.append(ImageRow(name=name, podman_name="", manifest_digest="", layers=0,
                             compressed_size=0, size=None, complete=False, in_store=False,
                             in_layer_store=False, flat=False,
                             problem=f"metadata unreadable: {why}"))
    return rows
