"""Views: everything derived from `.layers` + `.metadata`, rendered from one
RepositoryState by separate writers (origin records, podman image store, flat
trees and public links)."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..backend import TreeWriter
from ..digest import Digest
from ..layout import METADATA, PODMAN_STORE
from ..repository import RepositoryState
from .layer_store import LayerStoreReport, render_layer_store
from .podman_store import StoreReport, render_image_store
from .scope import FULL, Scope, mark_rendered, scope_by_links, scope_for
from .store_files import read_store

if TYPE_CHECKING:  # (flat trees and opaque completions: loaded by the publisher only)
    from .flat import FlatReport
    from .opaque import OpaqueReport

__all__ = ["ViewOptions", "ViewsReport", "render_origins", "render_views"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ViewOptions:
    podman_store: bool = True
    flat: bool = True
    full: bool = False  # check and repair every image's views, not only new ones (scope)


@dataclass
class ViewsReport:
    store: StoreReport | None = None
    layer_store: LayerStoreReport | None = None
    flat: FlatReport | None = None
    opaque: OpaqueReport | None = None
    warnings: list[str] = field(default_factory=list)


def render_views(state: RepositoryState, writer: TreeWriter, options: ViewOptions) -> ViewsReport:
    from .flat import render_flat, write_links
    from .opaque import render_opaque

    report = ViewsReport()

    def warn(message: str) -> None:
        report.warnings.append(message)
        log.warning("%s", message)

    for problem in state.problems:
        warn(problem)
    store_root = writer.layout.root / PODMAN_STORE
    old_store = read_store(store_root) if options.podman_store else None
    if old_store is not None:
        scope = scope_for(state, store_root, old_store, writer.public_root,
                          full=options.full)
    else:
        scope = scope_by_links(state, full=options.full or not options.flat)
    # Layer content first (opaque completions, flat trees: the cvmfs backend ingests
    # them together), then origins, then what readers find images by: the public
    # links, and the podman store last, as `scope` expects.
    report.opaque = render_opaque(state, writer, warn, scope)
    if options.flat:
        report.flat = render_flat(state, writer, warn, scope)
    writer.settle()
    render_origins(state, writer, scope)
    if report.flat is not None:
        write_links(writer, report.flat)
    if options.podman_store:
        report.store = render_image_store(state, writer, warn, scope=scope, old=old_store)
        report.layer_store = render_layer_store(state, writer, warn, scope=scope)
        if scope.full and not report.store.kept:
            mark_rendered(writer, PODMAN_STORE)
    elif scope.full and not state.unreadable:
        mark_rendered(writer, METADATA)
    if report.store is not None:
        for name in report.store.kept:
            state.notes.append(f"{name}: could not be rendered now; the podman store keeps "
                                  "its last good entry")
    return report


def render_origins(state: RepositoryState, writer: TreeWriter, scope: Scope = FULL) -> None:
    """`.layers/.../.metadata/origin.json`: the images that use each layer (in an
    incremental scope, of the layers this run's images use or used)."""
    users: dict[Digest, set[str]] = defaultdict(set)
    due: set[Digest] = set(state.touched_layers)
    for image in state.images:
        rendered = scope.renders(image)
        for layer in image.manifest.layers:
            users[layer.digest].add(image.public_name)
            if rendered:
                due.add(layer.digest)
    for digest, record in state.layers.items():
        if not record.complete or not (scope.full or digest in due):
            continue
        data = json.dumps({"origin": sorted(users.get(digest, ()))}, indent=1).encode() + b"\n"
        rel = f"{state.layout.layer_rel(digest)}/{METADATA}/origin.json"
        try:
            if (state.layout.root / rel).read_bytes() == data:
                continue
        except OSError:
            pass
        writer.write_file(rel, data)
