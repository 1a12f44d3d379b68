"""Opaque directories as every overlay reads them, with no marker a container can see.

An opaque directory of a layer carries no marker: it holds an explicit whiteout (a
0/0 character device) of every name the layers below it hold, in every chain this
repository publishes the layer under, recursively into directories that exist on
both sides. Kernel overlay, rootful and rootless, and fuse-overlayfs all read
whiteouts, and no container sees them, so nothing reaches an image built on top.
(A `user.*` marker would reach it; `trusted.overlay.opaque` would not, but kernel
overlay lists the whiteouts of a directory so marked as entries, and rootless
overlays cannot read it.) A layer's `.metadata/opaque-chains.json` lists the
chains (podman layer IDs) it was completed for, so each chain is done once; a new
chain that brings new names below adds their whiteouts; whiteouts of names a chain
does not have change nothing for it. A chain the repository does not publish is
not covered: the layer store leaves such layers out (`layer_store`).

Layers written before this design carried `trusted.overlay.opaque` and
`user.overlay.opaque`; a normal run completes them, then removes the markers.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..backend import TreeWriter
from ..digest import Digest
from ..errors import LazypodError
from ..layout import LAYERFS, METADATA
from ..overlay import OPAQUE_XATTRS
from ..repository import LayerWhiteouts, RepositoryState
from ..securepath import LayerDir
from .flat_tree import FlatTree, LayerScan, LayerScans, Node, merge_layers
from .podman_store import chain_ids
from .scope import FULL, Scope

__all__ = ["OPAQUE_CHAINS", "OpaqueReport", "missing_whiteouts", "render_opaque"]

log = logging.getLogger(__name__)

OPAQUE_CHAINS = "opaque-chains.json"


@dataclass
class OpaqueReport:
    layers: int = 0  # layers with opaque directories completed for a new chain
    whiteouts: int = 0
    migrated: int = 0  # directories whose markers (older lazypod versions) were removed


@dataclass
class _LayerState:
    whiteouts: LayerWhiteouts | None
    chains: set[str]
    new_chains: set[str] = field(default_factory=set)
    checked_legacy: bool = False


def render_opaque(state: RepositoryState, writer: TreeWriter,
                  warn: Callable[[str], None], scope: Scope = FULL) -> OpaqueReport:
    """Complete every layer with opaque directories for every chain it is used in (the
    chains of the images `scope` renders: the others were completed when they were)."""
    report = OpaqueReport()
    layers: dict[Digest, _LayerState] = {}
    scans = LayerScans(writer.layer_dir, ())
    added: dict[Digest, set[bytes]] = {}
    for image in state.images:
        if not scope.renders(image):
            continue
        if image.config is None or len(image.config.diff_ids) != len(image.manifest.layers):
            continue
        blobs = image.manifest.layers
        if any(blob.is_foreign for blob in blobs):
            continue
        records = [state.layer(blob.digest) for blob in blobs]
        if any(record is None or not record.complete for record in records):
            continue
        ids = chain_ids(list(image.config.diff_ids))
        digests = [blob.digest for blob in blobs]
        for k, digest in enumerate(digests):
            layer = layers.get(digest)
            if layer is None:
                layer = layers[digest] = _LayerState(
                    LayerWhiteouts.read(writer.layer_dir(digest)),
                    _read_chains(writer.layer_dir(digest)))
            if layer.whiteouts is None or not layer.whiteouts.opaque_dirs:
                continue
            if not layer.checked_legacy:
                layer.checked_legacy = True
                report.migrated += _migrate(state, writer, digest, layer.whiteouts)
            if ids[k] in layer.chains or ids[k] in layer.new_chains:
                continue
            layer.new_chains.add(ids[k])
            if k == 0:
                continue  # nothing below a base layer
            lower = merge_layers([scans.get(d) for d in digests[:k]], FlatTree({}, {}))
            needed = missing_whiteouts(lower, scans.get(digest), layer.whiteouts.opaque_dirs)
            fresh = needed - added.setdefault(digest, set())
            if fresh:
                added[digest] |= fresh
    for digest, paths in added.items():
        if paths:
            writer.add_whiteouts(digest, sorted(paths))
            report.whiteouts += len(paths)
            log.info("layer %s: %d whiteouts below its opaque directories", digest.short,
                     len(paths))
    for digest, layer in layers.items():
        if layer.new_chains:
            report.layers += 1
            chains = sorted(layer.chains | layer.new_chains)
            writer.write_file(f"{state.layout.layer_rel(digest)}/{METADATA}/{OPAQUE_CHAINS}",
                              json.dumps({"chains": chains}, indent=1).encode() + b"\n")
    return report


def missing_whiteouts(lower: FlatTree, upper: LayerScan, opaque_dirs: tuple[bytes, ...]
                      ) -> set[bytes]:
    """Whiteouts the upper layer needs so that, without its opaque markers, each opaque
    directory hides what `lower` (the merged layers below) holds there."""
    present: dict[bytes, Node] = {node.path: node for node in upper.entries}
    hidden = set(upper.whiteouts)
    opaque = set(opaque_dirs)
    needed: set[bytes] = set()

    def complete(path: bytes, below: Node) -> None:
        for name, child in (below.children or {}).items():
            rel = path + b"/" + name if path else name
            if rel in hidden:
                continue
            mine = present.get(rel)
            if mine is None:
                needed.add(rel)
            elif mine.is_dir and child.children is not None and rel not in opaque:
                complete(rel, child)  # two directories merge: hide what only lies below

    for directory in opaque_dirs:
        below = lower.lookup(directory)
        if below is not None and below.children is not None:
            complete(directory, below)
    return needed


def _read_chains(layer_dir: Path) -> set[str]:
    path = layer_dir / METADATA / OPAQUE_CHAINS
    try:
        data = json.loads(path.read_bytes())
        return {str(c) for c in data.get("chains", [])} if isinstance(data, dict) else set()
    except (OSError, ValueError):
        return set()


def _migrate(state: RepositoryState, writer: TreeWriter, digest: Digest,
             whiteouts: LayerWhiteouts) -> int:
    """Remove the opaque markers older lazypod versions wrote (after the whiteouts:
    the backend orders it so)."""
    fixed = 0
    try:
        layer = LayerDir(writer.layer_dir(digest) / LAYERFS)
    except OSError:
        return 0
    try:
        for directory in whiteouts.opaque_dirs:
            try:
                if directory:
                    parent, name = layer.parent(tuple(directory.split(b"/")), create=False)
                    names = os.listxattr(layer.proc_path(parent, name), follow_symlinks=False)
                else:
                    names = os.listxattr(layer.fd_path)
            except (OSError, LazypodError):
                continue  # gone, or replaced by a later member of the layer
            if any(name in OPAQUE_XATTRS for name in names):
                writer.unmark_opaque(digest, directory)
                fixed += 1
    finally:
        layer.close()
    return fixed
