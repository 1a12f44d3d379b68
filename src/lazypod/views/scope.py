"""Which images a run renders views for.

A run's cost must grow with what changed, not with the size of the repository: a
run renders the views of the images the last complete run did not render, and
leaves the others as they are. The podman store's `images.json` tells which those
are: a run writes it after every other view of its images (opaque completions,
flat trees and their links, origins, the store's layer directories), so an image
it names with the image's current ID had all of them in place. An image that a
killed run put into `.metadata` without its views is not named there, and the next
run renders it.

A run without a podman store (DUCC's `--skip-podman`) asks the public links
instead, which it writes last (`scope_by_links`); one with neither store nor flat
trees renders everything (origins and opaque completions: little).

A full scope checks (and repairs) every view of every image: `views --full`,
`convert -f`/`-g`, a store lazypod cannot read, a repository seen at another public
root, and the first run of a lazypod whose views
differ from those of the version that wrote the store (`VIEWS_FORMAT`, recorded in
the store's `lazypod-views`, or `.metadata/.lazypod-views`, after a full run: a new
version migrates every image).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..backend import TreeWriter
from ..fsutil import read_or_none
from ..layout import METADATA
from ..repository import ImageRecord, RepositoryState
from .store_files import StoreFiles

__all__ = ["VIEWS_FORMAT", "Scope", "link_target", "mark_rendered", "scope_by_links",
           "scope_for"]

# Raise it when views change for images already rendered (a new file, a new layout).
VIEWS_FORMAT = b"lazypod views 1\n"
_MARK = "lazypod-views"


@dataclass(frozen=True)
class Scope:
    settled: frozenset[str] = frozenset()  # public names whose views are all in place
    full: bool = True

    def renders(self, image: ImageRecord) -> bool:
        return self.full or image.public_name not in self.settled


FULL = Scope()


def scope_for(state: RepositoryState, store_root: Path, old: StoreFiles, public_root: str,
              *, full: bool) -> Scope:
    """`old`: the store's records as the run found them (`read_store(store_root)`, read
    once for this and for rendering the store)."""
    if full:
        return FULL
    if read_or_none(store_root / _MARK) != VIEWS_FORMAT:
        return FULL
    if old.problems or not old.images:
        return FULL
    for layer_id in old.layers:  # a store written for another public root: relink all
        try:
            target = os.readlink(store_root / "overlay" / layer_id / "diff")
        except OSError:
            return FULL
        if not target.startswith(f"{public_root.rstrip('/')}/"):
            return FULL
        break
    # By name, ID and manifest: an image pushed again with the same config and other
    # layer blobs (recompressed) has the same ID and must be rendered again.
    known = {(name, image_id, entry.digest) for image_id, entry in old.images.items()
             for name in entry.names}
    settled = frozenset(
        image.public_name for image in state.images
        if image.has_config and image.public_name not in state.touched
        and (image.podman_name, image.image_id, image.manifest_digest) in known)
    return Scope(settled, full=False)


def link_target(state: RepositoryState, image: ImageRecord) -> str:
    """Where the public link `<registry>/<repository>:<tag>` points: its flat tree."""
    assert image.config is not None
    return "../" * image.link.count("/") + state.layout.flat_rel(image.config.digest)


def scope_by_links(state: RepositoryState, *, full: bool) -> Scope:
    """For runs without a podman store (DUCC's `--skip-podman`): the public links,
    written after every other view of their images, tell the same (a link that
    points at the image's flat tree); the format is recorded in `.metadata`."""
    root = state.layout.root
    if full or read_or_none(root / METADATA / ("." + _MARK)) != VIEWS_FORMAT:
        return FULL
    settled = set()
    for image in state.images:
        if image.config is None or image.public_name in state.touched:
            continue
        try:
            if os.readlink(root / image.link) == link_target(state, image):
                settled.add(image.public_name)
        except OSError:
            continue
    return Scope(frozenset(settled), full=False)


def mark_rendered(writer: TreeWriter, prefix: str) -> None:
    """After a full run: the views of the images are of this version's format (in a
    podman store, or in `.metadata` for a repository without one)."""
    name = _MARK if prefix != METADATA else "." + _MARK  # hidden where DUCC reads
    writer.write_file(f"{prefix}/{name}", VIEWS_FORMAT)
