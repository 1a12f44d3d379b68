"""Removing images and collecting what no image uses any more.

`remove_images` takes images out of the views first (podman store, links), then
out of `.metadata`: a run killed in between leaves an image podman no longer
offers, which `rm` removes again. `collect_garbage` deletes what nothing reaches:
layers no manifest lists, flat trees no image config names. Reachability, not
bookkeeping, decides (as DUCC's current garbage collection does), so a repository
written by several tools is collected correctly; it refuses to run while an
image's metadata cannot be read (its layers would look unused). The views are
rendered first, so podman never sees an image whose layers are gone.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

from .backend import Backend
from .errors import LazypodError, RepositoryError
from .fsutil import listdir
from .layout import FLAT, METADATA, Layout
from .reference import ImageReference
from .repository import RepositoryState
from .views import ViewOptions, render_views
from .views.store_files import store_names

__all__ = ["GarbageReport", "collect_garbage", "remove_images"]

log = logging.getLogger(__name__)


def remove_images(backend: Backend, references: list[ImageReference],
                  options: ViewOptions | None = None) -> list[str]:
    """Remove images: their podman store entries and public links, then metadata.
    Their layers wait for the collector."""
    removed: list[str] = []
    with backend.run() as run:
        state = RepositoryState.load(run.layout)
        offered = store_names(run.layout)
        links: list[str] = []
        for ref in references:
            found = state.find(ref)
            name = found.public_name if found is not None else ref.public_name
            known = found is not None or name in state.unreadable or \
                (run.layout.image_dir(name)).exists() or ref.podman_name in offered
            if not known:
                raise LazypodError(f"{ref.public_name} is not in {run.layout.root}: "
                                   "`lazypod ls` lists what is")
            state.drop_image(name)
            removed.append(name)
            links.append(found.link if found is not None else name)
        render_views(state, run, options or ViewOptions())
        for name, link in zip(removed, links, strict=True):
            if (run.layout.root / link).is_symlink():
                run.remove(link)
            run.remove(f"{METADATA}/{name}")
        run.commit()
    return removed


@dataclass
class GarbageReport:
    layers: list[str] = field(default_factory=list)
    flats: list[str] = field(default_factory=list)
    kept_in_grace: int = 0
    dry_run: bool = False


def collect_garbage(backend: Backend, *, dry_run: bool = False, grace_seconds: float = 0,
                    force: bool = False, options: ViewOptions | None = None) -> GarbageReport:
    """Remove layers and flat trees that no image reaches. `dry_run` only says what
    (and writes nothing, not even a lock); `force` collects even while some image's
    metadata is unreadable (its layers are then taken as unused)."""
    report = GarbageReport(dry_run=dry_run)
    if dry_run:
        if not backend.layout.root.is_dir():
            raise RepositoryError(f"{backend.layout.root} does not exist")
        state = RepositoryState.load(backend.layout)
        _refuse_unreadable(state, force)  # the dry run says what the run would do
        _unreachable(state, report, grace_seconds)
        return report
    with backend.run() as run:
        state = RepositoryState.load(run.layout)
        _refuse_unreadable(state, force)
        render_views(state, run, options or ViewOptions())
        _unreachable(state, report, grace_seconds)
        for rel in report.layers + report.flats:
            log.info("removing %s", rel)
            run.remove(rel)
        run.commit()
    return report


def _refuse_unreadable(state: RepositoryState, force: bool) -> None:
    if state.unreadable and not force:
        names = ", ".join(sorted(state.unreadable)[:3])
        raise RepositoryError(
            f"cannot tell which layers are unused while the metadata of "
            f"{len(state.unreadable)} image(s) cannot be read ({names}): repair them "
            "(convert them again) or remove them (`lazypod rm`), or give --force")


def _unreachable(state: RepositoryState, report: GarbageReport, grace_seconds: float) -> None:
    layout: Layout = state.layout
    used_layers = {blob.digest for image in state.images for blob in image.manifest.layers}
    used_flats = {layout.flat_rel(image.config.digest)
                  for image in state.images if image.config is not None}
    now = time.time()
    for digest in state.layers:
        if digest in used_layers:
            continue
        rel = layout.layer_rel(digest)
        if now - _mtime(layout.root / rel) < grace_seconds:
            report.kept_in_grace += 1
            continue
        report.layers.append(rel)
    for rel in _flat_dirs(layout.root):
        if rel in used_flats:
            continue
        # A flat tree's root carries the image's own time; .singularity.d is made
        # when the tree is.
        if now - _mtime(layout.root / rel / ".singularity.d") < grace_seconds:
            report.kept_in_grace += 1
            continue
        report.flats.append(rel)


def _mtime(path: os.PathLike[str]) -> float:
    try:
        return os.lstat(path).st_mtime
    except OSError:
        return 0.0


def _flat_dirs(root: os.PathLike[str]) -> list[str]:
    found = []
    base = os.path.join(root, FLAT)
    for prefix in listdir(base):
        if len(prefix) != 2:
            continue
        for name in listdir(os.path.join(base, prefix)):
            if len(name) == 64:
                found.append(f"{FLAT}/{prefix}/{name}")
    return found
