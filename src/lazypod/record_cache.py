"""A per-user cache of the repository's parsed records, validated by `stat`.

Reading a repository means reading its records: at 10,000 images that is some
30,000 small JSON files (`manifest.json`, `config.json` per image, `layers.json` per
layer), parsed one by one, most of a second before a command does anything. The
records change seldom and only by files being replaced, so a command keeps what it
parsed, each entry with the `stat` of the files it came from (size, mtime and
ctime, in nanoseconds), and the next command re-parses only the entries whose files
differ. This is git's index, for the same reason.

- Nothing is trusted that a `stat` does not confirm: a file replaced, rewritten in
  place, truncated, removed or added changes its entry's key, and the entry is
  parsed again; a directory not in the cache is read. A file changed less than
  `RACY_SECONDS` before it was read is not cached (its next change could fall in the
  same clock tick and keep its key).
- Inode numbers are not in the key: CernVM-FS gives every file a new one after a
  publication, and the cache would never hit on a client.
- Raw documents are not cached: a record rebuilt from the cache reads its raw bytes
  from the repository when a view writes them (`StoredBytes`), and checks them
  against their digest.
- The cache lives in `$LAZYPOD_CACHE_DIR`, else `$XDG_CACHE_HOME/lazypod`, else
  `~/.cache/lazypod`, one file per repository path; `LAZYPOD_CACHE_DIR=off` turns it
  off. A directory or file owned by another user, or writable by others, is not used.
  A damaged or foreign cache file is ignored and rewritten.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .digest import Digest
from .manifest import Descriptor, ImageConfig, ImageManifest, ManifestIndex, Platform, StoredBytes
from .reference import ImageReference

__all__ = ["CachedImage", "Interned", "RecordCache", "cache_dir", "paused_gc", "stat_key"]

log = logging.getLogger(__name__)

FORMAT = "lazypod record cache 8"
RACY_SECONDS = 2.0
KEEP_FILES = 64  # caches of this many repositories; the least recently written go

Key = str  # "size,mtime,ctime" (ns), or "-" for no such file
_DECODER = json.JSONDecoder()


def stat_key(path: str) -> Key:
    try:
        st = os.stat(path)
    except OSError:  # gone, or not to be asked: whoever reads it next says why
        return "-"
    return f"{st.st_size},{st.st_mtime_ns},{st.st_ctime_ns}"


def _ctime(key: Key) -> int:
    return int(key.rsplit(",", 1)[1]) if key != "-" else 0


def cache_dir() -> Path | None:
    """Where this user's caches are, or None when off or unsafe to use."""
    configured = os.environ.get("LAZYPOD_CACHE_DIR")
    if configured is not None:
        if configured.strip().lower() in ("", "off", "0", "no"):
            return None
        return Path(configured)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "lazypod"
    home = os.environ.get("HOME")
    return Path(home) / ".cache" / "lazypod" if home and os.path.isabs(home) else None


def _owned(path: Path) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022


_KINDS = ("images", "layers", "digests")


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic garbage collection while records are parsed: they make no cycles, and
    at 10,000 images the collector, run again and again over every object the process
    holds, took a third of the time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class RecordCache:
    """The cache of one repository for one command: `image`/`layer`/`file_digest` give
    an entry whose key still holds, `put_*` record what was parsed; `save` writes it
    back when anything changed. Of each kind a command asks for, the entries it did
    not ask for are dropped (they are gone from the repository); kinds it did not
    ask for are kept as they were.

    The file is a header line (JSON: format, repository), then a section per kind
    (`@kind`) of one line per entry: `name TAB key TAB payload` (payload: JSON; for an
    image, a head of the fields that identify it, TAB, JSON (`CachedImage`); or a
    digest's hex). A section is split into entries when its kind is first asked for
    (`ls` never splits the 30,000 digests `check` keeps), entries are held as their
    text, and a payload is decoded when asked for: a tree of JSON objects for 50,000
    entries took three times the memory of the text."""

    def __init__(self, root: Path) -> None:
        self._root = os.path.realpath(root)
        self._path: Path | None = None
        self._sections: dict[str, str] = {}  # kind -> its lines, not yet split
        self._old: dict[str, dict[str, str]] = {kind: {} for kind in _KINDS}
        self._new: dict[str, dict[str, str]] = {kind: {} for kind in _KINDS}
        self._asked: set[str] = set()
        self._changed = False
        self.hits: dict[str, int] = dict.fromkeys(_KINDS, 0)  # entries found current
        self.interned = Interned()
        self._racy = time.time_ns() - int(RACY_SECONDS * 1e9)
        directory = cache_dir()
        if directory is None:
            return
        name = hashlib.sha256(self._root.encode(errors="surrogateescape")).hexdigest()[:32]
        self._path = directory / f"records-{name}.txt"
        with paused_gc():
            self._read()

    def _header(self) -> str:
        return json.dumps({"format": FORMAT, "root": self._root})

    def _read(self) -> None:
        assert self._path is not None
        if not _owned(self._path.parent) or not _owned(self._path):
            return
        try:
            text = self._path.read_bytes().decode()
        except (OSError, UnicodeDecodeError):
            return
        header, *sections = text.split("\n@")
        if header != self._header():
            return
        for section in sections:
            kind, _, lines = section.partition("\n")
            if kind in _KINDS:
                self._sections[kind] = lines

    def _entries(self, kind: str) -> dict[str, str]:
        """The old entries of a kind, its section split when first asked for."""
        lines = self._sections.pop(kind, None)
        if lines is not None:
            entries = self._old[kind]
            for line in lines.split("\n"):
                name, tab, entry = line.partition("\t")
                if tab:
                    entries[name] = entry
        return self._old[kind]

    def _lookup(self, kind: str, name: str, key: str) -> str | None:
        """The payload of a current entry (its key is `key`), or None."""
        found = self._find(kind, name, key)
        return None if found is None else found[0][found[1]:]

    def _find(self, kind: str, name: str, key: str) -> tuple[str, int] | None:
        """A current entry (its key is `key`) and where its payload starts, or None."""
        if kind not in self._asked:
            self._asked.add(kind)
            self._entries(kind)
        entry = self._old[kind].get(name)
        if entry is not None and entry.startswith(key) and entry[len(key):len(key) + 1] == "\t":
            self._new[kind][name] = entry
            self.hits[kind] += 1
            return entry, len(key) + 1
        self._changed = True
        return None

    def _put(self, kind: str, name: str, keys: list[Key], payload: str) -> None:
        self._changed = True
        if "\t" in name or "\n" in name or "\n" in payload or name.startswith("@"):
            return
        if all(_ctime(k) < self._racy for k in keys):
            self._new[kind][name] = f"{';'.join(keys)}\t{payload}"

    def image(self, rel: str, directory: str, keys: list[Key]
              ) -> tuple[ImageReference, CachedImage] | None:
        found = self._find("images", rel, ";".join(keys))
        if found is None:
            return None
        try:
            cached = CachedImage(*found, directory, self.interned)
            return cached.reference, cached
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            self._new["images"].pop(rel, None)
            return None

    def put_image(self, rel: str, keys: list[Key], reference: ImageReference,
                  manifest: ImageManifest, config: ImageConfig | None,
                  index: ManifestIndex | None, file_digest: Digest) -> None:
        head = CachedImage.head(reference, manifest, config, index)
        if head is not None:
            data = _image_data(manifest, config, index, file_digest)
            self._put("images", rel, keys, f"{head}\t{json.dumps(data, separators=(',', ':'))}")

    def layer(self, hex_digest: str, keys: list[Key]) -> list[Any] | None:
        payload = self._lookup("layers", hex_digest, ";".join(keys))
        try:
            data = None if payload is None else json.loads(payload)
        except ValueError:
            data = None
        return data if isinstance(data, list) else None

    def put_layer(self, hex_digest: str, keys: list[Key], data: list[Any]) -> None:
        self._put("layers", hex_digest, keys, json.dumps(data, separators=(",", ":")))

    def file_digest(self, name: str, path: str, *, fresh: bool = False) -> str | None:
        """The sha256 digest (`sha256:...`) of the file at `path` (`name`: a name for
        it, unique in the repository), or None if it cannot be read; `fresh`: hashed
        whatever the cache says (a deep check)."""
        keys = [stat_key(path)]
        if keys[0] == "-":
            return None
        found = self._lookup("digests", name, keys[0])
        if found is not None and len(found) == 64 and not fresh:
            return f"sha256:{found}"
        try:
            with open(path, "rb") as file:
                digest = hashlib.file_digest(file, "sha256").hexdigest()
        except OSError:
            return None
        self._put("digests", name, keys, digest)
        return f"sha256:{digest}"

    def export(self, kind: str) -> dict[str, str]:
        """The entries of a kind this command has (to hand to another process's cache:
        `adopt`)."""
        return dict(self._new[kind]) if kind in self._asked else {}

    def adopt(self, kind: str, entries: dict[str, str]) -> None:
        """Take the entries of a kind another process asked for (`export`) as this
        one's: a forked helper's work, saved once."""
        if not entries and kind not in self._asked:
            return
        old = self._entries(kind)
        self._asked.add(kind)
        if entries != old or entries != self._new[kind]:
            self._changed = self._changed or entries != old
            self._new[kind] = dict(entries)

    def save(self) -> None:
        """Write the cache back if anything changed; a failure only costs speed."""
        if self._path is None:
            return
        dropped = any(len(self._old[k]) != len(self._new[k]) for k in self._asked)
        if not self._changed and not dropped:
            return
        tmp = self._path.with_name(f".{self._path.name}.{os.getpid()}")
        try:
            self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not _owned(self._path.parent):
                return
            self._write(tmp)
            os.replace(tmp, self._path)
            _prune(self._path.parent)
        except (OSError, UnicodeError) as exc:
            log.debug("record cache %s not written: %s", self._path, exc)
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def _write(self, path: Path) -> None:
        """The cache's text, written entry by entry (joined first, it took as much memory
        again as the entries: 40 MB at 10,000 images)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with open(fd, "w", encoding="utf-8", newline="", buffering=1 << 20) as out:
            os.fchmod(fd, 0o600)
            out.write(self._header())
            for kind in _KINDS:
                out.write(f"\n@{kind}")
                if kind not in self._asked:  # as read
                    if self._sections.get(kind):
                        out.write("\n")
                        out.write(self._sections[kind])
                    continue
                for name, entry in self._new[kind].items():
                    out.write(f"\n{name}\t{entry}")


def _prune(directory: Path) -> None:
    files = sorted(directory.glob("records-*"), key=lambda p: p.stat().st_mtime)
    for old in files[:-KEEP_FILES]:
        with contextlib.suppress(OSError):
            old.unlink()


def _desc(d: Descriptor) -> list[Any]:
    return [d.media_type, str(d.digest), d.size, _platform(d)]


def _layer_desc(d: Descriptor) -> list[Any]:
    """A layer's descriptor without its digest (in the entry's head)."""
    return [d.media_type, d.size, _platform(d)]


def _platform(d: Descriptor) -> list[Any] | None:
    plat = d.platform
    return [plat.os, plat.architecture, plat.variant] if plat else None


class Interned:
    """One object per digest and per layer descriptor while a cache rebuilds records
    (a repository names each shared layer in thousands of images); gone with the
    cache, so that a daemon's loads do not pile them up."""

    def __init__(self) -> None:
        self._digests: dict[str, Digest] = {}
        self._descriptors: dict[tuple[str, str, int], Descriptor] = {}

    def digest(self, text: str) -> Digest:
        """A sha256 digest whose hex is alphanumeric (no path can be made of it) is
        taken as the cache wrote it, without the parser's regular expression."""
        found = self._digests.get(text)
        if found is None:
            if len(text) == 71 and text.startswith("sha256:") and text[7:].isalnum():
                found = Digest("sha256", text[7:])
            else:
                found = Digest.parse(text)
            self._digests[text] = found
        return found

    def descriptor(self, obj: list[Any]) -> Descriptor:
        plat = obj[3]
        if plat:
            return Descriptor(obj[0], self.digest(obj[1]), int(obj[2]),
                              Platform(plat[0], plat[1], plat[2]))
        key = (obj[0], obj[1], obj[2])
        found = self._descriptors.get(key)
        if found is None:
            found = self._descriptors[key] = Descriptor(obj[0], self.digest(obj[1]),
                                                        int(obj[2]))
        return found


def _image_data(manifest: ImageManifest, config: ImageConfig | None,
                index: ManifestIndex | None, file_digest: Digest) -> dict[str, Any]:
    """The JSON part of an image's entry: what the head (`CachedImage`) does not say
    (the manifest's digest, its layers' digests and the diff IDs are there)."""
    data: dict[str, Any] = {
        "m": [manifest.media_type, manifest.size, file_digest != manifest.digest,
              _desc(manifest.config), [_layer_desc(d) for d in manifest.layers]],
    }
    if config is not None:
        data["c"] = [config.size, config.created, list(config.env), list(config.entrypoint),
                     list(config.cmd), config.working_dir, config.labels]
    if index is not None:
        data["i"] = [index.media_type, str(index.digest), index.size,
                     [_desc(d) for d in index.manifests]]
    return data


class CachedImage:
    """An image's cache entry: what tells which image it is (reference, digests, ID,
    layers; a run that leaves the image as it is asks for nothing else) is read from
    the entry's head at once, and its records are built from the rest, JSON, when first
    asked for (`build`): a rerun of `views` at 10,000 images builds those of the few
    images it renders.

    The head: registry, repository, tag, digest, manifest digest, image ID, layer blob
    digests, diff IDs, index digest, space-separated (lists comma-separated; `-`:
    none)."""

    __slots__ = ("_at", "_blobs", "_diff_ids", "_directory", "_entry", "_interned",
                 "has_index", "image_id", "manifest_digest", "reference")

    def __init__(self, entry: str, at: int, directory: str, interned: Interned) -> None:
        """`entry[at:]`: the payload (the entry's text is the cache's own: not copied)."""
        tab = entry.find("\t", at)
        head = entry[at:tab].split(" ")
        if tab < 0 or len(head) != 9:
            raise ValueError("not an image entry")
        registry, repository, tag, digest, self.manifest_digest, image_id, \
            self._blobs, self._diff_ids, index = head
        self._entry, self._at, self._directory, self._interned = entry, tab + 1, directory, \
            interned
        self.reference = ImageReference(registry, repository, tag if tag != "-" else None,
                                        interned.digest(digest) if digest != "-" else None)
        # podman's ID for the image (its config digest's hex), when it has a config
        self.image_id: str | None = image_id if image_id != "-" else None
        self.has_index = index != "-"

    @staticmethod
    def head(reference: ImageReference, manifest: ImageManifest, config: ImageConfig | None,
             index: ManifestIndex | None) -> str | None:
        """The head of an entry for these records (None: one that could be misread)."""
        fields = [reference.registry, reference.repository, reference.tag or "-",
                  str(reference.digest) if reference.digest else "-", str(manifest.digest),
                  config.digest.hex if config is not None else "-",
                  ",".join(str(blob.digest) for blob in manifest.layers) or "-",
                  (",".join(str(d) for d in config.diff_ids) or "-") if config is not None
                  else "-",
                  str(index.digest) if index is not None else "-"]
        if any(not field or " " in field or "\t" in field for field in fields):
            return None  # (no such names or digests: not cached rather than misread)
        return " ".join(fields)

    @property
    def directory(self) -> str:
        """The image's folder."""
        return self._directory

    @property
    def layer_digests(self) -> list[str]:
        """The manifest's layer blob digests, bottom first."""
        return self._blobs.split(",") if self._blobs != "-" else []

    @property
    def diff_ids(self) -> list[str]:
        """The config's diff IDs, bottom first (none without a config)."""
        return self._diff_ids.split(",") if self._diff_ids != "-" else []

    @property
    def has_config(self) -> bool:
        return self.image_id is not None

    def build(self) -> tuple[ImageManifest, ImageConfig | None, ManifestIndex | None]:
        data, _end = _DECODER.raw_decode(self._entry, self._at)
        directory, interned = self._directory, self._interned
        from .repository import reencode_ducc_manifest  # the one place that knows that form

        media_type, size, reencoded, config_desc, layers = data["m"]
        body = StoredBytes(f"{directory}/manifest.json", int(size),
                           reencode_ducc_manifest if reencoded else None)
        blobs = self.layer_digests
        if len(blobs) != len(layers):
            raise ValueError("the entry's head and body disagree")
        manifest = ImageManifest(
            body, interned.digest(self.manifest_digest), media_type,
            interned.descriptor(config_desc),
            tuple(interned.descriptor([d[0], blob, d[1], d[2]])
                  for d, blob in zip(layers, blobs, strict=True)))
        config = None
        if "c" in data:
            c = data["c"]
            config = ImageConfig(StoredBytes(f"{directory}/config.json", int(c[0])),
                                 manifest.config.digest,
                                 tuple(interned.digest(d) for d in self.diff_ids),
                                 c[1], tuple(c[2]), tuple(c[3]), tuple(c[4]), str(c[5]),
                                 dict(c[6]))
        index = None
        if "i" in data:
            i = data["i"]
            index = ManifestIndex(StoredBytes(f"{directory}/index.json", int(i[2])),
                                  interned.digest(i[1]), i[0],
                                  tuple(interned.descriptor(d) for d in i[3]))
        return manifest, config, index
