"""Removing images and collecting what no image uses any more.

`remove_images` drops images from `.metadata` (and their public links);
`collect_garbage` deletes what nothing reaches: layers no manifest lists, flat trees
no image config names, leftovers of interrupted runs. Reachability, not bookkeeping,
decides (as DUCC's current garbage collection does), so a repository written by
several tools is collected correctly. Both go through a backend run: one atomic
rename at a time on the `dir` backend, one transaction on `cvmfs`; the views are
rendered again at the end, so podman never sees an image whose layers are gone.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

from .backend import Backend
from .errors import LazypodError
from .fsutil import listdir
from .layout import FLAT, METADATA
from .reference import ImageReference
from .repository import RepositoryState
from .views import ViewOptions, render_views

__all__ = ["GarbageReport", "collect_garbage", "remove_images"]

log = logging.getLogger(__name__)


def remove_images(backend: Backend, references: list[ImageReference],
                  options: ViewOptions | None = None) -> list[str]:
    """Remove images (metadata and public link); their layers wait for the collector."""
    removed: list[str] = []
    with backend.run() as run:
        state = RepositoryState.load(run.layout)
        for ref in references:
            image = state.image(ref.public_name)
            if image is None:
                raise LazypodError(f"{ref.public_name} is not in {run.layout.root}: "
                                   "`lazypod ls` lists what is")
            run.remove(f"{METADATA}/{image.public_name}")
            link = run.layout.root / image.public_name
            if link.is_symlink():
                run.remove(image.public_name)
            removed.append(image.public_name)
        run.flush()
        render_views(RepositoryState.load(run.layout), run, options or ViewOptions())
        run.commit()
    return removed


@dataclass
class GarbageReport:
    layers: list[str] = field(default_factory=list)
    flats: list[str] = field(default_factory=list)
    kept_in_grace: int = 0
    dry_run: bool = False


def collect_garbage(backend: Backend, *, dry_run: bool = False, grace_seconds: float = 0,
                    options: ViewOptions | None = None) -> GarbageReport:
    report = GarbageReport(dry_run=dry_run)
    with backend.run() as run:
        state = RepositoryState.load(run.layout)
        used_layers = {blob.digest for image in state.images for blob in image.manifest.layers}
        used_flats = {state.layout.flat_rel(image.config.digest)
                      for image in state.images if image.config is not None}
        now = time.time()
        for digest in state.layers:
            if digest in used_layers:
                continue
            rel = state.layout.layer_rel(digest)
            if now - _mtime(run.layout.root / rel) < grace_seconds:
                report.kept_in_grace += 1
                continue
            report.layers.append(rel)
        for rel in _flat_dirs(run.layout.root):
            if rel not in used_flats:
                report.flats.append(rel)
        if not dry_run:
            for rel in report.layers + report.flats:
                log.info("removing %s", rel)
                run.remove(rel)
            run.flush()
            if report.layers or report.flats:
                render_views(RepositoryState.load(run.layout), run, options or ViewOptions())
            run.commit()
    return report


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
