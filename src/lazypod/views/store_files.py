"""Reading a podman image store's files (`images.json`, `layers.json`) whatever they
hold: every reader (rendering, `check`, `ls`, `rm`) gets validated entries and a
description of what was wrong, never an exception.

An entry is kept as its JSON text and the few fields runs look at (`StoreEntry`):
parsed whole, 10,000 images' entries took 50 MB, more than anything else a run holds.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..layout import LAYER_RECORD, PODMAN_STORE, Layout
from ..record_cache import paused_gc

__all__ = ["IMAGES_JSON", "IMAGES_LOCK", "LAYERS_JSON", "LAYERS_LOCK", "StoreEntry",
           "StoreFiles", "content_digest", "dump_entries", "read_store", "store_names"]

IMAGES_JSON = "overlay-images/images.json"
LAYERS_JSON = f"overlay-layers/{LAYER_RECORD}"
IMAGES_LOCK = "overlay-images/images.lock"
LAYERS_LOCK = "overlay-layers/layers.lock"


class StoreEntry:
    """One record of images.json or layers.json: its text as the file holds it, and
    the fields runs read of every record (`decoded()` gives the whole)."""

    __slots__ = ("big_data_digests", "created", "digest", "layer", "names", "parent", "text")

    def __init__(self, text: str, obj: dict[str, Any], *, big_data: bool = False) -> None:
        self.text = text
        digests = obj.get("big-data-digests") if big_data else None
        # Only for `check` (read_store(big_data=True)).
        self.big_data_digests: dict[str, Any] | None = \
            digests if isinstance(digests, dict) else None
        self.names: tuple[str, ...] = tuple(obj.get("names") or ())
        self.digest = obj.get("digest") if isinstance(obj.get("digest"), str) else None
        self.layer: str | None = obj.get("layer")
        parent = obj.get("parent")
        self.parent: str | None = parent if isinstance(parent, str) and parent else None
        created = obj.get("created")
        self.created: str | None = created if isinstance(created, str) else None

    def decoded(self) -> dict[str, Any]:
        obj: dict[str, Any] = json.loads(self.text)
        return obj


def content_digest(data: bytes) -> bytes:
    """What tells a store file's content from another's (`StoreFiles.digests`): a
    writer compares it with what it would write, not the file read a second time."""
    return hashlib.sha256(data).digest()


def dump_entries(entries: list[dict[str, Any] | StoreEntry]) -> bytes:
    """The file's bytes for these records, each record kept as read or made anew."""
    return ("[" + ",".join(e.text if isinstance(e, StoreEntry) else
                           json.dumps(e, separators=(",", ":")) for e in entries)
            + "]").encode()


@dataclass
class StoreFiles:
    """A store's records: entries by ID, in file order, and what could not be used."""

    images: dict[str, StoreEntry] = field(default_factory=dict)
    layers: dict[str, StoreEntry] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    # content_digest() of each file as read (IMAGES_JSON, LAYERS_JSON; absent: not there)
    digests: dict[str, bytes] = field(default_factory=dict)

    def names(self) -> set[str]:
        return {name for entry in self.images.values() for name in entry.names}

    def chain(self, top: str | None) -> list[str] | None:
        """Layer IDs from `top` down to the base, or None if one is missing."""
        found: list[str] = []
        while top:
            entry = self.layers.get(top)
            if entry is None or top in found:
                return None
            found.append(top)
            top = entry.parent
        return found


def read_store(root: Path, *, layers: bool = True, big_data: bool = False) -> StoreFiles:
    """The store under `root` (e.g. `<repository>/.podmanStore`); without its layers'
    records when `layers` is false (for names alone); with each image's big-data
    digests at hand when `big_data`."""
    store = StoreFiles()
    with paused_gc():
        store.images = _entries(root, IMAGES_JSON, store, _image_ok, big_data)
        if layers:
            store.layers = _entries(root, LAYERS_JSON, store, _layer_ok)
    return store


def store_names(layout: Layout) -> set[str]:
    """The image names a repository's podman store offers."""
    return read_store(layout.root / PODMAN_STORE, layers=False).names()


_ID = re.compile(r"[0-9a-f]{64}")  # an ID names a directory: nothing else is one


_SPACE = re.compile(r"[ \t\n\r]*")


def _past_space(text: str, at: int) -> int:
    """Where the JSON whitespace from `at` on ends."""
    return _SPACE.match(text, at).end()  # type: ignore[union-attr]  # `*` always matches


def _records(text: str) -> Iterator[tuple[Any, str]]:
    """The elements of the JSON array `text`, each with its text, decoded one at a
    time (the whole array decoded at once is the memory this module saves)."""
    decoder = json.JSONDecoder()
    at = _past_space(text, 0)
    if text[at:at + 1] != "[":
        raise ValueError("not a list")
    at = _past_space(text, at + 1)
    if text[at:at + 1] == "]":
        return
    while True:
        obj, end = decoder.raw_decode(text, at)
        yield obj, text[at:end]
        at = _past_space(text, end)
        if text[at:at + 1] == ",":
            at = _past_space(text, at + 1)
            continue
        if text[at:at + 1] == "]" and not text[at + 1:].strip():
            return
        raise ValueError("not a list")


def _entries(root: Path, name: str, store: StoreFiles, ok: Any,
             big_data: bool = False) -> dict[str, StoreEntry]:
    path, problems = root / name, store.problems
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        problems.append(f"{path.name} cannot be read ({exc.strerror})")
        return {}
    store.digests[name] = content_digest(raw)
    entries: dict[str, StoreEntry] = {}
    bad = 0
    text = ""
    try:
        text = raw.decode()
        del raw
        for entry, entry_text in _records(text):
            if isinstance(entry, dict) and isinstance(entry.get("id"), str) and \
                    _ID.fullmatch(entry["id"]) and ok(entry):
                entries[entry["id"]] = StoreEntry(entry_text, entry, big_data=big_data)
            else:
                bad += 1
    except ValueError:  # a damaged file: none of its records is used
        problems.append(f"{path.name} is not JSON" if not _is_json(text)
                        else f"{path.name} is not a list of records")
        return {}
    if bad:
        problems.append(f"{path.name} has {bad} malformed record(s)")
    return entries


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _image_ok(entry: dict[str, Any]) -> bool:
    names = entry.get("names", [])
    layer = entry.get("layer")
    return isinstance(names, list) and all(isinstance(n, str) for n in names) and \
        (layer is None or isinstance(layer, str))


def _layer_ok(entry: dict[str, Any]) -> bool:
    parent = entry.get("parent")
    return parent is None or isinstance(parent, str)
