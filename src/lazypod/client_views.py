"""Podman views for a repository lazypod did not write (or cannot write): built by any
user into a local directory, pointing into the read-only repository by symlink.

    lazypod views /cvmfs/unpacked.cern.ch --into ~/.local/share/lazypod/unpacked

What a DUCC-written repository may lack, and where it comes from here:

* image configs (`config.json`): from a local cache in the views directory, else
  from the image's registry (one small, verified request), else the image is
  skipped with a warning that says why;
* layer records (`layers.json`, missing for DUCC's oldest layers): the diff IDs come
  from the image configs. A diff ID cannot be recomputed from unpacked files (the
  original tar bytes are gone), so nothing is hashed; the size is left unknown;
* overlay whiteouts: DUCC ingested layers as tarballs, so they hold AUFS `.wh.`
  files, which kernel overlayfs ignores. Layers without lazypod's `whiteouts.json`
  are scanned for `.wh.` names until one has them (answers are cached); then the
  views must be used with fuse-overlayfs as podman's mount program, which honours
  AUFS whiteouts as they are: nothing is copied, no layer is added, and layer IDs
  stay those podman computes, so lazy pulls keep working.

Reruns are incremental: only what changed is written, each change atomically.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .backend.directory import DirectoryBackend, DirectoryRun
from .digest import Digest
from .errors import LazypodError
from .layout import METADATA, Layout
from .manifest import ImageConfig
from .overlay import AUFS_PREFIX
from .record_cache import paused_gc
from .repository import LayerRecord, RepositoryState
from .views.layer_store import LayerStoreReport, render_layer_store
from .views.podman_store import StoreReport, render_image_store
from .views.scope import mark_rendered, scope_for
from .views.store_files import read_store

if TYPE_CHECKING:
    from .registry import RegistryClient

__all__ = ["ClientViewsReport", "build_client_views"]

log = logging.getLogger(__name__)

IMAGE_STORE = "store"
LAYER_STORE = "layers"
_CONFIG_CACHE = "configs"
_AUFS_CACHE = "aufs-scan.json"


@dataclass
class ClientViewsReport:
    images: int = 0
    configs_local: int = 0
    configs_fetched: int = 0
    configs_cached: int = 0
    diff_ids_from_records: int = 0
    diff_ids_from_configs: int = 0
    layers_scanned: int = 0
    aufs_layers: list[str] = field(default_factory=list)
    records: int = 0  # metadata records (manifests, configs, indexes, layer records)
    records_parsed: int = 0  # of those, read from their files (not the record cache)
    store: StoreReport | None = None
    layer_store: LayerStoreReport | None = None
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    selected: int | None = None  # images `select` kept, when given

    @property
    def needs_fuse_overlayfs(self) -> bool:
        return bool(self.aufs_layers)


def build_client_views(
    repository: Path,
    into: Path,
    *,
    registry: RegistryClient | None,
    public_root: str | None = None,
    layer_store: bool = True,
    select: Sequence[str] = (),
    full: bool = False,
) -> ClientViewsReport:
    """Render an image store (`<into>/store`) and a layer store (`<into>/layers`);
    with `select` (shell patterns), of the images whose repository name
    (`registry/repository:tag`) or podman name one of them matches. A rerun checks
    the entries of the images it rendered before only when `full` (`views.scope`)."""
    with paused_gc():  # tens of thousands of records and entries, and no cycles
        return _build(repository, into, registry, public_root, layer_store, select, full)


def _build(repository: Path, into: Path, registry: RegistryClient | None,
           public_root: str | None, layer_store: bool, select: Sequence[str],
           full: bool) -> ClientViewsReport:
    started = time.monotonic()
    report = ClientViewsReport()

    def warn(message: str) -> None:
        report.warnings.append(message)
        log.warning("%s", message)

    layout = Layout(repository)
    if not (repository / METADATA).is_dir():
        raise LazypodError(f"{repository} has no .metadata: not a lazypod or DUCC repository")
    state = RepositoryState.load(layout)
    if select:
        state.select(select)
        report.selected = len(state.images)
    for problem in state.problems:
        warn(problem)
    report.records = _count_records(state)
    report.records_parsed = state.parsed
    backend = DirectoryBackend(into, public_root=str(into.absolute()))
    with backend.run() as writer:
        _complete_configs(state, writer, registry, report, warn)
        _complete_layer_records(state, report)
        _scan_for_aufs(state, writer, report)
        layers_root = public_root or str(repository.absolute())
        old_store = read_store(into / IMAGE_STORE)
        scope = scope_for(state, into / IMAGE_STORE, old_store, layers_root, full=full)
        report.store = render_image_store(state, writer, warn, prefix=IMAGE_STORE,
                                          layers_root=layers_root, scope=scope,
                                          old=old_store)
        if layer_store:
            report.layer_store = render_layer_store(state, writer, warn, prefix=LAYER_STORE,
                                                    layers_root=layers_root, scope=scope)
        if scope.full and not report.store.kept:
            mark_rendered(writer, IMAGE_STORE)
        writer.commit()
    report.images = report.store.images
    report.seconds = time.monotonic() - started
    return report


def _count_records(state: RepositoryState) -> int:
    per_image = sum(image.record_files for image in state.images)
    return per_image + sum(1 for record in state.layers.values() if record.complete)


def _complete_configs(
    state: RepositoryState,
    writer: DirectoryRun,
    registry: RegistryClient | None,
    report: ClientViewsReport,
    warn: Callable[[str], None],
) -> None:
    cache = writer.layout.root / _CONFIG_CACHE
    for image in list(state.images):
        if image.has_config:
            report.configs_local += 1
            continue
        digest = image.manifest.config.digest
        raw = _read_verified(cache / f"{digest.hex}.json", digest)
        if raw is not None:
            report.configs_cached += 1
        elif registry is None:
            warn(f"{image.public_name}: no config.json in the repository and registry "
                 "access is off (--offline): skipped")
            continue
        else:
            try:
                from .registry import MAX_CONFIG_SIZE  # the HTTP stack: only when used

                raw = registry.get_blob_bytes(image.reference, image.manifest.config,
                                              MAX_CONFIG_SIZE, "image config")
            except LazypodError as exc:
                warn(f"{image.public_name}: no config.json in the repository and the "
                     f"registry did not give it ({exc}): skipped")
                continue
            writer.write_file(f"{_CONFIG_CACHE}/{digest.hex}.json", raw)
            report.configs_fetched += 1
        state.replace_image(image.with_config(ImageConfig.parse(raw, digest)))


def _read_verified(path: Path, digest: Digest) -> bytes | None:
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    return raw if Digest.of(raw, digest.algorithm) == digest else None


def _complete_layer_records(state: RepositoryState, report: ClientViewsReport) -> None:
    """Layers without a usable layers.json (DUCC's oldest) get their diff ID from the
    configs; only then are the images' records looked at."""
    missing = {digest for digest, record in state.layers.items() if not record.complete}
    report.diff_ids_from_records = len(state.layers) - len(missing)
    if not missing:
        return
    for image in state.images:
        if image.config is None:
            continue
        for blob, diff_id in zip(image.manifest.layers, image.config.diff_ids, strict=False):
            if blob.digest in missing and state.layout.layerfs(blob.digest).is_dir():
                state.layers[blob.digest] = LayerRecord(blob.digest, diff_id=diff_id)
                missing.discard(blob.digest)
                report.diff_ids_from_configs += 1


def _scan_for_aufs(state: RepositoryState, writer: DirectoryRun, report: ClientViewsReport) -> None:
    """Does any layer hold AUFS `.wh.` files? (lazypod's own never do: they have a
    whiteouts.json.) One such layer decides the configuration, so the scan stops at the
    first; answers are cached, and the layers known to have them are checked first."""
    cache_path = writer.layout.root / _AUFS_CACHE
    try:
        cache: dict[str, bool] = json.loads(cache_path.read_bytes())
    except (OSError, ValueError):
        cache = {}
    candidates = [digest for digest, record in state.layers.items() if record.complete
                  and not record.has_whiteouts]
    candidates.sort(key=lambda d: not cache.get(d.hex, False))
    changed = False
    for digest in candidates:
        if digest.hex not in cache:
            cache[digest.hex] = _has_aufs_whiteouts(state.layout.layerfs(digest))
            report.layers_scanned += 1
            changed = True
        if cache[digest.hex]:
            report.aufs_layers.append(digest.hex)
            break
    if changed:
        writer.write_file(_AUFS_CACHE, json.dumps(cache, indent=1).encode())


def _has_aufs_whiteouts(layerfs: Path) -> bool:
    for _dirpath, dirnames, filenames in os.walk(layerfs):
        if any(os.fsencode(name).startswith(AUFS_PREFIX) for name in filenames + dirnames):
            return True
    return False
