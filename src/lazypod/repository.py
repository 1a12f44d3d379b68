"""The repository as one in-memory model, read from `.layers` and `.metadata` only.

Every view (podman image store, layer store, flat trees, links) is rendered from a
`RepositoryState`, never from what a conversion happened to hold in memory; that
is what lets a client build views for a repository it did not write.
"""

from __future__ import annotations

import bisect
import contextlib
import fnmatch
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .digest import Digest
from .errors import LazypodError
from .fsutil import listdir
from .layout import LAYER_RECORD, LAYERS, METADATA, Layout
from .manifest import ImageConfig, ImageManifest, ManifestIndex, parse_manifest
from .record_cache import CachedImage, Interned, Key, RecordCache, paused_gc, stat_key
from .reference import ImageReference, parse_reference

__all__ = [
    "LAYER_RECORD",
    "TAR_SPLIT",
    "WHITEOUTS",
    "ImageNames",
    "ImageRecord",
    "LayerRecord",
    "LayerWhiteouts",
    "RepositoryState",
    "image_names",
    "layer_record_json",
    "reencode_ducc_manifest",
]

log = logging.getLogger(__name__)

TAR_SPLIT = "tar-split.json.gz"
WHITEOUTS = "whiteouts.json"


@dataclass(frozen=True)
class LayerWhiteouts:
    """What a layer deletes from the layers below it, kept in `.metadata/whiteouts.json`
    because a CVMFS publisher's own view of the repository hides overlay whiteouts."""

    whiteouts: tuple[bytes, ...] = ()
    opaque_dirs: tuple[bytes, ...] = ()

    def to_json(self) -> bytes:
        obj = {"whiteouts": [os.fsdecode(p) for p in self.whiteouts],
               "opaque": [os.fsdecode(p) for p in self.opaque_dirs]}
        return json.dumps(obj, indent=1).encode() + b"\n"

    @classmethod
    def read(cls, layer_dir: Path) -> LayerWhiteouts | None:
        try:
            obj = json.loads((layer_dir / METADATA / WHITEOUTS).read_bytes())
        except (OSError, ValueError):
            return None
        return cls(tuple(os.fsencode(p) for p in obj.get("whiteouts", [])),
                   tuple(os.fsencode(p) for p in obj.get("opaque", [])))


@dataclass(frozen=True, slots=True)
class LayerRecord:
    """One directory `.layers/<h2>/<h>`; `digest` is the compressed blob's digest."""

    digest: Digest
    diff_id: Digest | None = None
    diff_size: int | None = None
    created: str | None = None
    uidset: tuple[int, ...] = ()
    gidset: tuple[int, ...] = ()
    has_tar_split: bool = False
    has_whiteouts: bool = False  # .metadata/whiteouts.json (lazypod's layers have one)
    complete: bool = True  # False: a directory without layers.json (DUCC's oldest layers)
    damaged: str | None = None  # why layers.json cannot be used (then not complete)


def layer_record_json(record: LayerRecord) -> bytes:
    """DUCC's layers.json: a list with one object (uidset/gidset are our addition)."""
    assert record.diff_id is not None and record.diff_size is not None
    obj: dict[str, Any] = {
        "id": record.diff_id.hex,
        "created": record.created,
        "compressed-diff-digest": str(record.digest),
        "diff-digest": str(record.diff_id),
        "diff-size": record.diff_size,
    }
    if record.uidset:
        obj["uidset"] = list(record.uidset)
    if record.gidset:
        obj["gidset"] = list(record.gidset)
    return json.dumps([obj], indent=1).encode() + b"\n"


@dataclass(frozen=True)
class ImageNames:
    """Where an image lives in the layout: `.metadata/<metadata>` and the public link
    `<link>`. lazypod names both `registry/repository:tag`, or
    `registry/repository@sha256:...` for an image pinned by digest alone; DUCC names
    the latter `registry/repository` (metadata) and `registry/repository:sha256:...`
    (link), and an image DUCC named its way keeps its names (`image_names`)."""

    metadata: str
    link: str


def image_names(layout: Layout, ref: ImageReference) -> ImageNames:
    """The names of `ref` in this repository: DUCC's for a digest-only image DUCC
    already published (its link exists, and its metadata folder is absent or holds
    that same image), lazypod's otherwise."""
    if ref.tag is None and ref.digest is not None:
        base = f"{ref.registry}/{ref.repository}"
        link = f"{base}:{ref.digest}"
        target = _link_target(layout.root / link)
        if target is not None:
            held = _stored_config_hex(layout.image_dir(base) / "manifest.json")
            if held is None or target.endswith(f"/{held}"):
                return ImageNames(base, link)
    return ImageNames(ref.public_name, ref.public_name)


def _link_target(path: Path) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _stored_config_hex(manifest: Path) -> str | None:
    """The config digest (hex) a stored manifest names, in either key casing; None
    when there is no manifest (or no readable one: then nothing is overwritten
    that could be told apart)."""
    try:
        obj = json.loads(manifest.read_bytes())
        config = obj.get("config") or obj.get("Config") or {}
        digest = config.get("digest") or config.get("Digest")
        return str(digest).split(":", 1)[1]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError, IndexError):
        return "?"  # something is there that is not this image's: do not reuse it


class ImageRecord:
    """One directory `.metadata/<name>` holding manifest.json (and config.json).

    A record the record cache gave (`from_cache`) builds its manifest, config and index
    when one of them is first asked for; what tells which image it is (`image_id`,
    `manifest_digest`, `layer_digests`, `diff_ids`, `has_config`) it answers from the
    cache entry, so that a run that leaves most images as they are builds few
    records."""

    __slots__ = ("_cached", "_config", "_from_cache", "_index", "_manifest", "link_name",
                 "public_name", "reference")

    def __init__(self, public_name: str, reference: ImageReference, manifest: ImageManifest,
                 config: ImageConfig | None, index: ManifestIndex | None = None,
                 link_name: str | None = None) -> None:
        self.public_name = public_name  # the metadata folder's name
        self.reference = reference
        self._manifest: ImageManifest | None = manifest
        self._config = config
        self._index = index
        self.link_name = link_name  # the public link, when not `public_name`
        self._cached: CachedImage | None = None  # the cache's entry, until built
        self._from_cache = False

    @classmethod
    def from_cache(cls, public_name: str, reference: ImageReference,
                   cached: CachedImage) -> ImageRecord:
        record = cls.__new__(cls)
        record.public_name, record.reference, record.link_name = public_name, reference, None
        record._manifest = record._config = record._index = None
        record._cached, record._from_cache = cached, True
        return record

    def _built(self) -> ImageManifest:
        cached, manifest = self._cached, self._manifest
        if manifest is None and cached is None:  # another thread built it just now
            manifest = self._manifest
        if manifest is None:
            assert cached is not None
            try:
                manifest, config, index = cached.build()
            except (ValueError, TypeError, KeyError, IndexError, AttributeError,
                    LazypodError):  # a damaged cache entry: the files themselves
                manifest, _raw, config, index = _parse_image_files(
                    cached.directory, self.public_name)
            # The manifest last (and the entry dropped after it): another thread that
            # sees it sees the others.
            self._config, self._index = config, index
            self._manifest = manifest
            self._cached = None  # (its text is the cache's; the records now answer)
        return manifest

    @property
    def manifest(self) -> ImageManifest:
        return self._manifest if self._manifest is not None else self._built()

    @property
    def config(self) -> ImageConfig | None:
        if self._manifest is None:
            self._built()
        return self._config

    @property
    def index(self) -> ManifestIndex | None:
        if self._manifest is None:
            self._built()
        return self._index

    @property
    def from_record_cache(self) -> bool:
        """Whether the record came from the record cache (not parsed from its files)."""
        return self._from_cache

    # What identifies the image: from the cache's entry while the record is not built.

    @property
    def has_config(self) -> bool:
        cached = self._cached
        return cached.has_config if cached is not None else self.config is not None

    @property
    def image_id(self) -> str | None:
        """The ID podman gives the image (its config digest's hex), when it has a config."""
        cached = self._cached
        if cached is not None:
            return cached.image_id
        return self.config.digest.hex if self.config is not None else None

    @property
    def manifest_digest(self) -> str:
        cached = self._cached
        return cached.manifest_digest if cached is not None else str(self.manifest.digest)

    @property
    def layer_digests(self) -> list[str]:
        """The digests of the manifest's layer blobs, bottom first."""
        cached = self._cached
        if cached is not None:
            return cached.layer_digests
        return [str(blob.digest) for blob in self.manifest.layers]

    @property
    def diff_ids(self) -> list[str]:
        """The config's diff IDs, bottom first (none without a config)."""
        cached = self._cached
        if cached is not None:
            return cached.diff_ids
        return [str(d) for d in self.config.diff_ids] if self.config is not None else []

    def with_config(self, config: ImageConfig) -> ImageRecord:
        return ImageRecord(self.public_name, self.reference, self.manifest, config,
                           self.index, self.link_name)

    def __repr__(self) -> str:
        return f"ImageRecord({self.public_name!r}, {self.reference!r})"

    @property
    def podman_name(self) -> str:
        return self.reference.podman_name

    @property
    def record_files(self) -> int:
        """How many of its folder's files hold its records (manifest, config, index)."""
        cached = self._cached
        if cached is not None:
            return 1 + cached.has_config + cached.has_index
        return 1 + (self.config is not None) + (self.index is not None)

    @property
    def link(self) -> str:
        return self.link_name or self.public_name


@dataclass
class RepositoryState:
    """Images and layers as `.metadata` and `.layers` hold them. `unreadable` names
    images whose metadata cannot be read (public name -> why): views keep what they
    last had for them, and garbage collection does not run. A run changes its state
    in memory as it changes the repository (`put_image`, `drop_image`, `put_layer`)
    and renders views from it, never reading back what it wrote."""

    layout: Layout
    images: list[ImageRecord] = field(default_factory=list)
    layers: dict[Digest, LayerRecord] = field(default_factory=dict)
    unreadable: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # other problems found by a run
    # What this run put or dropped: images (public names) and the layers they use.
    touched: set[str] = field(default_factory=set)
    touched_layers: set[Digest] = field(default_factory=set)
    # `images` by public name (a run looks up and puts 10,000s of images: a list scan
    # each was quadratic); made when first needed, kept by the methods that change
    # `images` (change the list through them).
    _by_name: dict[str, ImageRecord] | None = field(default=None, repr=False,
                                                    compare=False)
    # Record files the load parsed (the others' records came from the record cache).
    parsed: int = field(default=0, compare=False)

    @classmethod
    def load(cls, layout: Layout, cache: RecordCache | None = None) -> RepositoryState:
        """Read every record, through this user's record cache (`record_cache`): only
        the records whose files changed since the last command are parsed. A caller
        that passes its `cache` saves it."""
        state = cls(layout)
        with paused_gc():
            own = cache is None
            cache = RecordCache(layout.root) if cache is None else cache
            state.layers = dict(_scan_layers(layout.root / LAYERS, cache))
            for rel in _scan_image_dirs(layout.root / METADATA):
                try:
                    image = _load_image(layout, rel, cache)
                    if image is not None:
                        state.images.append(image)
                except (LazypodError, OSError, ValueError, TypeError, KeyError,
                        AttributeError) as exc:
                    state.unreadable[rel] = str(exc) or exc.__class__.__name__
            state.images.sort(key=lambda image: image.public_name)
            state.parsed = len(state.layers) - cache.hits["layers"] + sum(
                i.record_files for i in state.images if not i.from_record_cache)
            if own:
                cache.save()
        return state

    @property
    def problems(self) -> list[str]:
        """What is wrong with the repository now, each with what to do about it."""
        found = [f"layer {digest.short}: {record.damaged}; converting an image that uses it "
                 "repairs it" for digest, record in self.layers.items() if record.damaged]
        found += [f"image {name}: {why}; convert it again, or remove it with `lazypod rm`"
                  for name, why in self.unreadable.items()]
        return found + self.notes

    def layer(self, digest: Digest) -> LayerRecord | None:
        return self.layers.get(digest)

    def diff_ids_by_blob(self) -> dict[str, str]:
        """The diff ID of each layer with a complete record, both as text, by the
        layer's blob digest: what tells whether an image's layers are in place from
        `ImageRecord.layer_digests` and `diff_ids`, without building its records."""
        return {str(digest): str(record.diff_id) for digest, record in self.layers.items()
                if record.complete and record.diff_id is not None}

    def put_layer(self, record: LayerRecord) -> None:
        self.layers[record.digest] = record
        self.touched_layers.add(record.digest)

    def _index(self) -> dict[str, ImageRecord]:
        if self._by_name is None:
            self._by_name = {image.public_name: image for image in self.images}
        return self._by_name

    def _position(self, public_name: str) -> int:
        return bisect.bisect_left(self.images, public_name, key=lambda i: i.public_name)

    def put_image(self, image: ImageRecord) -> None:
        self.drop_image(image.public_name)
        self.images.insert(self._position(image.public_name), image)
        self._index()[image.public_name] = image
        self.touched_layers.update(b.digest for b in image.manifest.layers)

    def replace_image(self, image: ImageRecord) -> None:
        """Put a fuller record of an image (e.g. its config fetched) in place of the
        one read, without counting it as changed by this run."""
        at = self._position(image.public_name)
        assert self.images[at].public_name == image.public_name
        self.images[at] = self._index()[image.public_name] = image

    def drop_image(self, public_name: str) -> None:
        old = self._index().pop(public_name, None)
        if old is not None:
            self.touched_layers.update(b.digest for b in old.manifest.layers)
            del self.images[self._position(public_name)]
        self.unreadable.pop(public_name, None)
        self.touched.add(public_name)

    def select(self, patterns: Sequence[str]) -> None:
        """Keep only the images (and unreadable folders) that a shell pattern matches,
        by repository name (`registry/repository:tag`) or podman name."""
        def wanted(*names: str) -> bool:
            return any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)

        self.images = [i for i in self.images
                       if wanted(i.public_name, i.link, i.podman_name)]
        self._by_name = None
        self.unreadable = {n: why for n, why in self.unreadable.items() if wanted(n)}

    def image(self, public_name: str) -> ImageRecord | None:
        return self._index().get(public_name)

    def find(self, ref: ImageReference) -> ImageRecord | None:
        """The image `ref` names, whichever tool named it in the layout."""
        names = image_names(self.layout, ref)
        return self.image(names.metadata) or next(
            (i for i in self.images if i.podman_name == ref.podman_name), None)


def read_layer_record(layer_dir: Path | str, digest: Digest) -> LayerRecord:
    """The layer's record; a missing one means incomplete, an unusable one damaged
    (never an exception: whatever a file holds, the caller gets an answer)."""
    meta = os.path.join(layer_dir, METADATA)  # strings: a repository has 10,000s of these
    try:
        raw = _read(os.path.join(meta, LAYER_RECORD))
    except FileNotFoundError:
        return LayerRecord(digest, complete=False)
    except OSError as exc:
        return LayerRecord(digest, complete=False, damaged=f"unreadable ({exc.strerror})")
    try:
        data = json.loads(raw)
        entry = data[0] if isinstance(data, list) and data else data
        if not isinstance(entry, dict):
            raise ValueError("not a list of objects")
        diff_text = entry.get("diff-digest") or (
            f"sha256:{entry['id']}" if entry.get("id") else None)
        if not diff_text:
            raise ValueError("no diff digest")
        diff_size = entry.get("diff-size")
        created = entry.get("created")
        return LayerRecord(
            digest=digest,
            diff_id=Digest.parse(str(diff_text)),
            diff_size=int(diff_size) if diff_size is not None and int(diff_size) >= 0 else None,
            created=str(created) if created is not None else None,
            uidset=tuple(int(u) for u in entry.get("uidset") or ()),
            gidset=tuple(int(g) for g in entry.get("gidset") or ()),
            has_tar_split=os.path.exists(os.path.join(meta, TAR_SPLIT)),
            has_whiteouts=os.path.exists(os.path.join(meta, WHITEOUTS)),
        )
    except (ValueError, KeyError, TypeError, LazypodError) as exc:
        return LayerRecord(digest, complete=False, damaged=f"{LAYER_RECORD} is damaged ({exc})")


def _read(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def _scan_layers(layers_root: Path, cache: RecordCache) -> Iterator[tuple[Digest, LayerRecord]]:
    for prefix in listdir(layers_root):
        if len(prefix) != 2:
            continue
        parent = os.path.join(layers_root, prefix)
        for name in listdir(parent):
            if len(name) != 64 or not name.startswith(prefix):
                continue
            digest = Digest("sha256", name)
            layer_dir = f"{parent}/{name}"
            meta = f"{layer_dir}/{METADATA}/"
            # The record's content, and which files the folder holds (a file added,
            # removed or replaced changes the folder's times).
            keys = [stat_key(meta + LAYER_RECORD), stat_key(meta)]
            record = _cached_layer(cache, digest, keys)
            if record is None:
                record = read_layer_record(layer_dir, digest)
                if record.complete:
                    cache.put_layer(name, keys, _layer_data(record))
            yield digest, record


def _cached_layer(cache: RecordCache, digest: Digest, keys: list[Key]) -> LayerRecord | None:
    data = cache.layer(digest.hex, keys)
    try:
        return None if data is None else _layer_from(digest, data, cache.interned)
    except (ValueError, TypeError, LazypodError):
        return None


def _layer_data(record: LayerRecord) -> list[Any]:
    return [str(record.diff_id), record.diff_size, record.created, list(record.uidset),
            list(record.gidset), record.has_tar_split, record.has_whiteouts]


def _layer_from(digest: Digest, data: list[Any], interned: Interned) -> LayerRecord:
    diff_id, diff_size, created, uidset, gidset, tar_split, whiteouts = data
    return LayerRecord(digest, interned.digest(diff_id),
                       None if diff_size is None else int(diff_size), created,
                       tuple(int(u) for u in uidset), tuple(int(g) for g in gidset),
                       bool(tar_split), bool(whiteouts))


def _scan_image_dirs(metadata_root: Path) -> Iterator[str]:
    """Folders that may be images, by name relative to `.metadata`: those holding a
    manifest.json and, below the registry level, those named with a tag or digest
    (`repo:tag`, `repo@sha256:..`): such a folder is an image (if it has a manifest,
    which `_load_image` looks for) and holds no other, so it is not listed."""
    top = os.fspath(metadata_root)
    pending = [""]
    while pending:
        rel = pending.pop()
        try:
            with os.scandir(f"{top}/{rel}" if rel else top) as entries:
                children = [(e.name, e.is_file(follow_symlinks=False))
                            if not e.is_dir(follow_symlinks=False) else (e.name, None)
                            for e in entries]
        except OSError:
            continue
        if any(name == "manifest.json" and kind for name, kind in children) and rel:
            yield rel
        for name, kind in children:
            if kind is not None or (not rel and name.startswith(".")):
                continue
            child = f"{rel}/{name}" if rel else name
            if rel and (":" in name or "@" in name):
                yield child
            else:
                pending.append(child)


_IMAGE_FILES = ("manifest.json", "config.json", "index.json")


def _load_image(layout: Layout, rel: str, cache: RecordCache) -> ImageRecord | None:
    """The image in the folder, or None if it holds no manifest.json (not an image)."""
    directory = f"{layout.root}/{METADATA}/{rel}"
    # Named `registry/repository:tag` or `...@digest`, the folder's name is the
    # reference (DUCC's digest-only folders take theirs from links: not cached).
    named = ":" in rel.rsplit("/", 1)[-1] or "@" in rel
    keys: list[Key] = [stat_key(f"{directory}/{f}") for f in _IMAGE_FILES]
    if keys[0] == "-" and not os.path.isfile(f"{directory}/manifest.json"):
        return None  # (an unreadable one is an error the caller reports)
    if named:
        hit = cache.image(rel, directory, keys)
        if hit is not None:
            return ImageRecord.from_cache(rel, *hit)
    manifest, raw, config, index = _parse_image_files(directory, rel)
    reference, link = _reference_for(layout, rel, manifest)
    if named and (config is not None or keys[1] == "-") and \
            (index is not None or keys[2] == "-"):
        cache.put_image(rel, keys, reference, manifest, config, index,
                        manifest.digest if manifest.raw is raw else Digest.of(raw))
    return ImageRecord(rel, reference, manifest, config, index, link)


def _parse_image_files(directory: str, rel: str
                       ) -> tuple[ImageManifest, bytes, ImageConfig | None, ManifestIndex | None]:
    """An image folder's manifest (and the bytes read for it), config and index."""
    raw = _read(os.path.join(directory, "manifest.json"))
    manifest = _parse_stored_manifest(raw)
    config: ImageConfig | None = None
    with contextlib.suppress(FileNotFoundError):
        config_raw = _read(os.path.join(directory, "config.json"))
        config_digest = Digest.of(config_raw, manifest.config.digest.algorithm)
        if config_digest == manifest.config.digest:
            config = ImageConfig.parse(config_raw, config_digest)
        else:
            log.warning("%s: config.json does not match the manifest's config; ignoring it", rel)
    index: ManifestIndex | None = None
    with contextlib.suppress(FileNotFoundError):
        index_raw = _read(os.path.join(directory, "index.json"))
        parsed = parse_manifest(index_raw, None, Digest.of(index_raw))
        if isinstance(parsed, ManifestIndex):
            index = parsed
    return manifest, raw, config, index


def _decode_stored_manifest(raw: bytes) -> tuple[Any, bytes]:
    """A stored manifest, decoded, and the bytes lazypod reads for it: as fetched, or
    for one DUCC stored with Go field names (no json tags) lazypod's re-encoding, whose
    digest is not the registry's."""
    obj = json.loads(raw)
    if isinstance(obj, dict) and ("Layers" in obj or "Config" in obj):
        obj = _lower_keys(obj)
        raw = json.dumps(obj, separators=(",", ":")).encode()
    return obj, raw


def reencode_ducc_manifest(raw: bytes) -> bytes:
    """The bytes lazypod reads for a stored manifest (`_decode_stored_manifest`)."""
    return _decode_stored_manifest(raw)[1]


def _parse_stored_manifest(raw: bytes) -> ImageManifest:
    obj, raw = _decode_stored_manifest(raw)
    parsed = parse_manifest(raw, None, Digest.of(raw), decoded=obj)
    if not isinstance(parsed, ImageManifest):
        raise ValueError("manifest.json holds an index, not an image manifest")
    return parsed


def _lower_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {k[:1].lower() + k[1:]: _lower_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_lower_keys(v) for v in value]
    return value


def _reference_for(layout: Layout, rel: str,
                   manifest: ImageManifest) -> tuple[ImageReference, str | None]:
    """The reference a metadata folder stands for, and its link when that is not
    named like the folder. DUCC names a digest-only image's folder by its repository
    alone and its link `repository:sha256:...`: the link pointing at this image's
    flat tree gives the digest (DUCC's manifest.json is re-encoded, its own digest
    is not the registry's)."""
    last = rel.rsplit("/", 1)[-1]
    if ":" in last or "@" in rel:
        return parse_reference(rel), None
    flat = f"/{manifest.config.digest.hex}"
    parent = (layout.root / rel).parent
    for name in sorted(listdir(parent)):
        if name.startswith(f"{last}:sha256:") and \
                (_link_target(parent / name) or "").endswith(flat):
            digest = name[len(last) + 1:]
            return parse_reference(f"{rel}@{digest}"), f"{rel.rsplit('/', 1)[0]}/{name}"
    return parse_reference(f"{rel}@{manifest.digest}"), None
