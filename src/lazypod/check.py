"""Checking a repository's integrity.

Shallow (seconds): every image's manifest, config and layers are there and agree;
every layer record is complete; the podman stores' records, links and lock files are
sound; public links resolve. Deep (`--deep`, reads every byte): each layer's original
tarball is rebuilt from its tar-split and its files, exactly as `podman save` would
rebuild it, and must hash to the layer's diff ID; every file must match the CRC-64
the tar-split recorded for it.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fastcrc

from .errors import LazypodError
from .layout import PODMAN_LAYERS, PODMAN_STORE, STAGING, Layout
from .repository import TAR_SPLIT, LayerRecord, RepositoryState
from .securepath import LayerDir, clean_member_name, display
from .views.podman_store import IMAGES_JSON, IMAGES_LOCK, LAYERS_JSON, LAYERS_LOCK

__all__ = ["CheckReport", "check_repository", "verify_layer"]


@dataclass
class CheckReport:
    images: int = 0
    layers: int = 0
    verified_layers: int = 0
    verified_bytes: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def check_repository(
    root: Path, *, deep: bool = False, public_root: str | None = None,
    on_layer: Callable[[str], None] | None = None,
) -> CheckReport:
    layout = Layout(root)
    state = RepositoryState.load(layout)
    report = CheckReport(images=len(state.images), layers=len(state.layers))
    report.errors += state.problems
    public = (public_root or str(root.absolute())).rstrip("/")

    for image in state.images:
        name = image.public_name
        if image.config is None:
            report.warnings.append(f"{name}: no config.json (views need the registry for it)")
        for index, blob in enumerate(image.manifest.layers):
            record = state.layer(blob.digest)
            if blob.is_foreign:
                continue
            if record is None:
                report.errors.append(f"{name}: layer {blob.digest.short} is missing")
            elif not record.complete:
                report.errors.append(f"{name}: layer {blob.digest.short} is incomplete "
                                     "(no layers.json): convert the image again")
            elif image.config is not None and index < len(image.config.diff_ids) and \
                    record.diff_id != image.config.diff_ids[index]:
                report.errors.append(f"{name}: layer {blob.digest.short} has diff ID "
                                     f"{record.diff_id}, the config says "
                                     f"{image.config.diff_ids[index]}")
        link = root / name
        if link.is_symlink() and not link.resolve().is_dir():
            report.errors.append(f"{name}: public link {os.readlink(link)} is dangling")

    for digest, record in state.layers.items():
        if not record.complete:
            continue
        if not state.layout.layerfs(digest).is_dir():
            report.errors.append(f"layer {digest.short}: no layerfs directory")
        elif deep:
            if on_layer:
                on_layer(digest.short)
            problem = verify_layer(state.layout.layer_dir(digest), record)
            if problem:
                report.errors.append(f"layer {digest.short}: {problem}")
            else:
                report.verified_layers += 1
                report.verified_bytes += record.diff_size or 0

    _check_store(root, public, report)
    _check_layer_store(root, public, report)
    if (root / STAGING).exists():
        report.warnings.append(f"{STAGING} exists: a run is going on, or one was killed "
                               "(the next run cleans it up)")
    return report


def _local(target: str, public: str, root: Path) -> Path:
    """Where a link into the repository, written for clients, points on this machine."""
    if target.startswith(public + "/"):
        return root / target[len(public) + 1 :]
    return Path(target)


def _check_store(root: Path, public: str, report: CheckReport) -> None:
    store = root / PODMAN_STORE
    if not store.exists():
        return
    for lock in (IMAGES_LOCK, LAYERS_LOCK):
        path = store / lock
        if not path.is_file():
            report.errors.append(f"{PODMAN_STORE}/{lock} is missing: podman refuses the store")
        elif path.stat().st_mode & 0o444 != 0o444:
            report.errors.append(f"{PODMAN_STORE}/{lock} is not world-readable: rootless "
                                 "podman cannot open it")
    try:
        images = json.loads((store / IMAGES_JSON).read_bytes())
        layers = {entry["id"]: entry for entry in json.loads((store / LAYERS_JSON).read_bytes())}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        report.errors.append(f"{PODMAN_STORE}: unreadable images.json or layers.json ({exc})")
        return
    names: set[str] = set()
    for entry in images:
        for name in entry.get("names", []):
            if name in names:
                report.errors.append(f"{PODMAN_STORE}: name {name} on two images (podman "
                                     "refuses such a store)")
            names.add(name)
        layer_id = entry.get("layer")
        while layer_id:
            layer = layers.get(layer_id)
            if layer is None:
                report.errors.append(f"{PODMAN_STORE}: image {entry['id'][:12]} needs layer "
                                     f"{layer_id[:12]}, which layers.json lacks")
                break
            layer_id = layer.get("parent")
    for layer_id in layers:
        diff = store / "overlay" / layer_id / "diff"
        try:
            target = os.readlink(diff)
        except OSError:
            report.errors.append(f"{PODMAN_STORE}: layer {layer_id[:12]} has no diff link")
            continue
        if not target.startswith("/"):
            report.errors.append(f"{PODMAN_STORE}: layer {layer_id[:12]} diff link is "
                                 "relative (containers/storage wants it absolute)")
        elif not _local(target, public, root).is_dir():
            report.errors.append(f"{PODMAN_STORE}: layer {layer_id[:12]} diff link {target} "
                                 "leads nowhere")


def _check_layer_store(root: Path, public: str, report: CheckReport) -> None:
    store = root / PODMAN_LAYERS
    if not store.is_dir():
        return
    for name in sorted(os.listdir(store)):
        entry = store / name
        try:
            target = os.readlink(entry / "diff")
        except OSError:
            report.errors.append(f"{PODMAN_LAYERS}/{name}: no diff link")
            continue
        if not _local(target, public, root).is_dir() or not (entry / "info").is_file() or \
                not (entry / "blob").exists():
            report.errors.append(f"{PODMAN_LAYERS}/{name}: diff, info or blob missing")


def verify_layer(layer_dir: Path, record: LayerRecord) -> str | None:
    """Rebuild the layer's tarball from its tar-split; None if it hashes to the diff ID."""
    split = layer_dir / ".metadata" / TAR_SPLIT
    if not split.is_file():
        return "no tar-split (written by another tool): cannot verify the bytes"
    assert record.diff_id is not None
    digest = hashlib.new(record.diff_id.algorithm)
    size = 0
    files = LayerDir(layer_dir / "layerfs")
    try:
        with gzip.open(split, "rb") as lines:
            for line in lines:
                entry = json.loads(line)
                if entry.get("type") == 2:
                    data = base64.b64decode(entry["payload"])
                    digest.update(data)
                    size += len(data)
                elif entry.get("size"):
                    unsafe = entry["name"].encode() if "name" in entry else \
                        base64.b64decode(entry["name_raw"])
                    problem, crc, n = _hash_file(files, unsafe, digest)
                    if problem:
                        return problem
                    size += n
                    expected = base64.b64decode(entry["payload"])
                    if crc.to_bytes(8, "big") != expected or n != entry["size"]:
                        return f"file {display(unsafe)!r} does not match what the layer held"
    except (OSError, ValueError, KeyError) as exc:
        return f"unreadable tar-split ({exc})"
    finally:
        files.close()
    if digest.hexdigest() != record.diff_id.hex:
        return f"rebuilt tarball hashes to {digest.hexdigest()[:12]}, not {record.diff_id.short}"
    if record.diff_size is not None and size != record.diff_size:
        return f"rebuilt tarball has {size} bytes, not {record.diff_size}"
    return None


def _hash_file(files: LayerDir, unsafe: bytes, digest: Any) -> tuple[str | None, int, int]:
    try:
        parent, name = files.parent(clean_member_name(unsafe), create=False)
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    except (OSError, LazypodError) as exc:
        return f"file {display(unsafe)!r} is missing ({exc})", 0, 0
    crc = 0
    n = 0
    with contextlib.closing(os.fdopen(fd, "rb")) as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            crc = fastcrc.crc64.go_iso(chunk, crc)
            n += len(chunk)
    return None, crc, n
