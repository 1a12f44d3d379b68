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
import dataclasses
import gzip
import hashlib
import json
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fastcrc

from .errors import LazypodError
from .layout import LAYERFS, METADATA, PODMAN_LAYERS, PODMAN_STORE, STAGING, Layout
from .record_cache import RecordCache, paused_gc
from .repository import TAR_SPLIT, LayerRecord, RepositoryState
from .securepath import LayerDir, clean_member_name, display
from .views.podman_store import big_data_file_name, store_refusal
from .views.store_files import IMAGES_LOCK, LAYERS_LOCK, read_store

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
    on_layer: Callable[[str], None] | None = None, parallel: bool = True,
) -> CheckReport:
    """`parallel`: the podman stores' probes (some 80,000 `stat`s and `readlink`s at
    10,000 images) run in a forked process while this one reads the records, as git's
    preload-index runs its `lstat`s in parallel; the report is the same either way."""
    with paused_gc():  # tens of thousands of records and entries, and no cycles
        return _check(root, deep, public_root, on_layer, parallel)


def _check(root: Path, deep: bool, public_root: str | None,
           on_layer: Callable[[str], None] | None, parallel: bool) -> CheckReport:
    layout = Layout(root)
    cache = RecordCache(root)
    public = (public_root or str(root.absolute())).rstrip("/")
    stores = _Parallel(lambda: _probe_stores(root, public, cache, deep), parallel)
    try:
        return _check_records(root, layout, cache, stores, deep, on_layer)
    finally:
        stores.cancel()


def _check_records(root: Path, layout: Layout, cache: RecordCache, stores: _Parallel,
                   deep: bool, on_layer: Callable[[str], None] | None) -> CheckReport:
    state = RepositoryState.load(layout, cache)
    report = CheckReport(images=len(state.images) + len(state.unreadable),
                         layers=len(state.layers))
    report.errors += state.problems
    dirs = _Dirs()

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
            elif record.damaged:
                pass  # reported with the layer
            elif not record.complete:
                report.errors.append(f"{name}: layer {blob.digest.short} is incomplete "
                                     "(no layers.json): convert the image again")
            elif image.config is not None and index < len(image.config.diff_ids) and \
                    record.diff_id != image.config.diff_ids[index]:
                report.errors.append(f"{name}: layer {blob.digest.short} has diff ID "
                                     f"{record.diff_id}, the config says "
                                     f"{image.config.diff_ids[index]}")
        link = f"{root}/{image.link}"
        if not dirs.isdir(link) and os.path.islink(link):
            report.errors.append(f"{name}: public link {os.readlink(link)} is dangling")

    for digest, record in state.layers.items():
        if not record.complete:
            continue
        if not dirs.isdir(f"{root}/{state.layout.layer_rel(digest)}/{LAYERFS}"):
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

    found = stores.result()
    report.errors += found.head
    if found.present:
        report.errors += _missing_from_store(state, set(found.names))
    report.errors += found.body + found.layer_store
    cache.adopt("digests", found.digests)
    cache.save()
    _check_mount(root, report)
    if (root / STAGING).exists():
        report.warnings.append(f"{STAGING} exists: a run is going on, or one was killed "
                               "(the next run cleans it up)")
    return report


def _local(target: str, public: str, root: Path) -> str:
    """Where a link into the repository, written for clients, points on this machine."""
    if target.startswith(public + "/"):
        return f"{root}/{target[len(public) + 1 :]}"
    return target


class _Dirs:
    """Which paths are directories: each layer's `layerfs` is the target of a layer
    check, a store link and a layer store link, and is asked for once."""

    def __init__(self) -> None:
        self._known: dict[str, bool] = {}

    def isdir(self, path: str) -> bool:
        found = self._known.get(path)
        if found is None:
            found = self._known[path] = os.path.isdir(path)
        return found


@dataclass
class _StoreFindings:
    """What the podman stores hold, found without the repository's records: errors in
    report order (`head`: lock files and unreadable records; `body`: each image and
    layer entry; `layer_store`), the names the store offers, and the record cache's
    digests of the files hashed (kind "digests")."""

    present: bool = False
    names: list[str] = field(default_factory=list)
    head: list[str] = field(default_factory=list)
    body: list[str] = field(default_factory=list)
    layer_store: list[str] = field(default_factory=list)
    digests: dict[str, str] = field(default_factory=dict)


def _probe_stores(root: Path, public: str, cache: RecordCache, deep: bool) -> _StoreFindings:
    found = _StoreFindings()
    dirs = _Dirs()
    _probe_image_store(root, public, cache, deep, dirs, found)
    found.layer_store = _check_layer_store(root, public, dirs)
    found.digests = cache.export("digests")
    return found


class _Parallel:
    """`work` in a forked child, its result back as JSON through a pipe (`result()`
    waits for it); done here and now when forking is not safe (other threads) or not
    wanted, and here again if the child fails. `cancel()` ends a child whose result
    is not wanted (the caller failed)."""

    def __init__(self, work: Callable[[], _StoreFindings], parallel: bool) -> None:
        self._work = work
        self._pid = 0
        self._found: _StoreFindings | None = None
        if not parallel or threading.active_count() > 1:
            self._found = work()
            return
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns, never runs the parent's exit handlers
            status = 1
            try:
                os.close(read_fd)
                with os.fdopen(write_fd, "wb") as out:
                    out.write(json.dumps(dataclasses.asdict(work())).encode())
                status = 0
            finally:
                os._exit(status)
        os.close(write_fd)
        self._pid, self._pipe = pid, os.fdopen(read_fd, "rb")

    def result(self) -> _StoreFindings:
        if self._found is None:
            try:
                data = self._pipe.read()
            finally:
                self._pipe.close()
                _, status = os.waitpid(self._pid, 0)
                self._pid = 0
            self._found = _StoreFindings(**json.loads(data)) if status == 0 else self._work()
        return self._found

    def cancel(self) -> None:
        if self._pid:
            self._pipe.close()
            with contextlib.suppress(OSError):
                os.kill(self._pid, signal.SIGKILL)
            os.waitpid(self._pid, 0)
            self._pid = 0


def _missing_from_store(state: RepositoryState, offered: set[str]) -> list[str]:
    """Every image the store can hold (as rendering decides) that it does not."""
    errors = []
    owners: dict[str, str] = {}
    for image in state.images:
        if store_refusal(state, image, owners) is None:
            owners[image.podman_name] = image.public_name
            if image.podman_name not in offered:
                errors.append(f"{image.podman_name}: in .metadata but not in "
                              f"{PODMAN_STORE} (a run did not finish: convert again to "
                              "complete it)")
    return errors


def _probe_image_store(root: Path, public: str, cache: RecordCache, deep: bool, dirs: _Dirs,
                       found: _StoreFindings) -> None:
    """What podman sees: every store entry is one podman accepts."""
    store_root = root / PODMAN_STORE
    if not store_root.exists():
        return
    found.present = True
    for lock in (IMAGES_LOCK, LAYERS_LOCK):
        path = store_root / lock
        if not path.is_file():
            found.head.append(f"{PODMAN_STORE}/{lock} is missing: podman refuses the store")
        elif path.stat().st_mode & 0o444 != 0o444:
            found.head.append(f"{PODMAN_STORE}/{lock} is not world-readable: rootless "
                              "podman cannot open it")
    store = read_store(store_root, big_data=True)
    for problem in store.problems:
        found.head.append(f"{PODMAN_STORE}: {problem} (the next conversion rewrites it)")
    found.names = sorted(store.names())
    names: set[str] = set()
    big_data = f"{store_root}/overlay-images/"
    for image_id, entry in store.images.items():
        for name in entry.names:
            if name in names:
                found.body.append(f"{PODMAN_STORE}: name {name} on two images (podman "
                                  "refuses such a store)")
            names.add(name)
        if store.chain(entry.layer) is None:
            found.body.append(f"{PODMAN_STORE}: image {image_id[:12]} needs a layer that "
                              "layers.json lacks (podman refuses it)")
        if entry.big_data_digests is not None:
            found.body += _check_big_data(big_data, image_id, entry.big_data_digests, cache,
                                          deep)
    for layer_id in store.layers:
        diff = f"{store_root}/overlay/{layer_id}/diff"
        try:
            target = os.readlink(diff)
        except OSError:
            found.body.append(f"{PODMAN_STORE}: layer {layer_id[:12]} has no diff link")
            continue
        if not target.startswith("/"):
            found.body.append(f"{PODMAN_STORE}: layer {layer_id[:12]} diff link is "
                              "relative (containers/storage wants it absolute)")
        elif not dirs.isdir(_local(target, public, root)):
            found.body.append(f"{PODMAN_STORE}: layer {layer_id[:12]} diff link {target} "
                              "leads nowhere")


def _check_big_data(directory: str, image_id: str, digests: dict[str, Any],
                    cache: RecordCache, deep: bool) -> list[str]:
    """Each big-data file (under `directory`/ID) has its digest: hashed once, then
    while its `stat` holds; always with --deep."""
    errors = []
    for key, expected in digests.items():
        name = f"{image_id}/{big_data_file_name(str(key))}"
        if cache.file_digest(name, directory + name, fresh=deep) != expected:
            errors.append(f"{PODMAN_STORE}: image {image_id[:12]}: big data {key} is "
                          "missing or does not match its digest")
    return errors


def _check_mount(root: Path, report: CheckReport) -> None:
    """Setuid files and device nodes of images must not work on the publisher's host."""
    try:
        options = _mount_options(root)
    except OSError:
        return
    missing = [flag for flag in ("nosuid", "nodev") if flag not in options]
    if missing and os.path.realpath(root).split("/")[1:2] != ["cvmfs"]:
        report.warnings.append(f"{root} is on a file system mounted without "
                               f"{','.join(missing)}: images' setuid files and device nodes "
                               "would work on this host (mount it nosuid,nodev)")


def _mount_options(path: Path) -> set[str]:
    best, options = "", set()
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as mounts:
        for line in mounts:
            fields = line.split()
            point = fields[4].replace("\\040", " ")
            if (target == point or target.startswith(point.rstrip("/") + "/")) and \
                    len(point) >= len(best):
                best, options = point, set(fields[5].split(","))
    return options


def _check_layer_store(root: Path, public: str, dirs: _Dirs) -> list[str]:
    errors: list[str] = []
    store = root / PODMAN_LAYERS
    if not store.is_dir():
        return errors
    for name in sorted(os.listdir(store)):
        entry = f"{store}/{name}"
        try:
            target = os.readlink(f"{entry}/diff")
        except OSError:
            errors.append(f"{PODMAN_LAYERS}/{name}: no diff link")
            continue
        if not dirs.isdir(_local(target, public, root)) or \
                not os.path.isfile(f"{entry}/info") or not os.path.exists(f"{entry}/blob"):
            errors.append(f"{PODMAN_LAYERS}/{name}: diff, info or blob missing")
    return errors


def verify_layer(layer_dir: Path, record: LayerRecord) -> str | None:
    """Rebuild the layer's tarball from its tar-split; None if it hashes to the diff ID."""
    split = layer_dir / METADATA / TAR_SPLIT
    if not split.is_file():
        return "no tar-split (written by another tool): cannot verify the bytes"
    assert record.diff_id is not None
    digest = hashlib.new(record.diff_id.algorithm)
    size = 0
    files = LayerDir(layer_dir / LAYERFS)
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
