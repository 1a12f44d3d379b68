"""Reading a podman image store's files (`images.json`, `layers.json`) whatever they
hold: every reader (rendering, `check`, `ls`, `rm`) gets validated entries and a
description of what was wrong, never an exception."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..layout import LAYER_RECORD, PODMAN_STORE, Layout
from ..record_cache import paused_gc

__all__ = ["IMAGES_JSON", "IMAGES_LOCK", "LAYERS_JSON", "LAYERS_LOCK", "StoreFiles",
           "read_store", "store_names"]

IMAGES_JSON = "overlay-images/images.json"
LAYERS_JSON = f"overlay-layers/{LAYER_RECORD}"
IMAGES_LOCK = "overlay-images/images.lock"
LAYERS_LOCK = "overlay-layers/layers.lock"


@dataclass
class StoreFiles:
    """A store's records: entries by ID, in file order, and what could not be used."""

    images: dict[str, dict[str, Any]] = field(default_factory=dict)
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def names(self) -> set[str]:
        return {name for entry in self.images.values() for name in entry.get("names", [])}

    def chain(self, top: str | None) -> list[str] | None:
        """Layer IDs from `top` down to the base, or None if one is missing."""
        found: list[str] = []
        while top:
            entry = self.layers.get(top)
            if entry is None or top in found:
                return None
            found.append(top)
            parent = entry.get("parent")
            top = parent if isinstance(parent, str) and parent else None
        return found


def read_store(root: Path, *, layers: bool = True) -> StoreFiles:
    """The store under `root` (e.g. `<repository>/.podmanStore`); without its layers'
    records when `layers` is false (for names alone)."""
    store = StoreFiles()
    with paused_gc():
        store.images = _entries(root / IMAGES_JSON, store.problems, _image_ok)
        if layers:
            store.layers = _entries(root / LAYERS_JSON, store.problems, _layer_ok)
    return store


def store_names(layout: Layout) -> set[str]:
    """The image names a repository's podman store offers."""
    return read_store(layout.root / PODMAN_STORE, layers=False).names()


_ID = re.compile(r"[0-9a-f]{64}")  # an ID names a directory: nothing else is one


def _entries(path: Path, problems: list[str], ok: Any) -> dict[str, dict[str, Any]]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        problems.append(f"{path.name} cannot be read ({exc.strerror})")
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        problems.append(f"{path.name} is not JSON")
        return {}
    if not isinstance(data, list):
        problems.append(f"{path.name} is not a list of records")
        return {}
    entries: dict[str, dict[str, Any]] = {}
    bad = 0
    for entry in data:
        if isinstance(entry, dict) and isinstance(entry.get("id"), str) and \
                _ID.fullmatch(entry["id"]) and ok(entry):
            entries[entry["id"]] = entry
        else:
            bad += 1
    if bad:
        problems.append(f"{path.name} has {bad} malformed record(s)")
    return entries


def _image_ok(entry: dict[str, Any]) -> bool:
    names = entry.get("names", [])
    layer = entry.get("layer")
    return isinstance(names, list) and all(isinstance(n, str) for n in names) and \
        (layer is None or isinstance(layer, str))


def _layer_ok(entry: dict[str, Any]) -> bool:
    parent = entry.get("parent")
    return parent is None or isinstance(parent, str)
