"""OCI image layouts as image sources: `oci:DIR[:REF]` and `oci-archive:FILE[:REF]`.

A layout is what skopeo, buildah and `podman save --format oci-dir` write:
`oci-layout`, `index.json` (descriptors, named by their
`org.opencontainers.image.ref.name` annotation) and `blobs/<algorithm>/<hex>`. An
archive is a tar of one (`podman save --format oci-archive`). REF picks the entry
whose ref name is REF; without REF the index's only entry. Several entries that
differ by platform (a multi-platform image written without a nested index) and
nested indexes are resolved by platform, as for a registry.

An archive is never extracted: its member table is read once (names are lookup
keys, never paths; a name that is absolute or climbs with `..` refuses the whole
archive, as does a member that reaches past the end of the file) and blobs are read
in place, by offset. Every blob, manifests and configs included, is verified
against its descriptor's digest and size as it is read.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..digest import Digest, Readable, VerifyingReader
from ..errors import IntegrityError, InvalidReference, LazypodError, SourceError
from ..manifest import (
    OCI_INDEX,
    Descriptor,
    ImageConfig,
    ImageManifest,
    ManifestIndex,
    Platform,
    parse_manifest,
)
from ..reference import ImageReference, local_reference
from .base import MAX_CONFIG_SIZE, MAX_MANIFEST_SIZE, expand_tags

__all__ = ["LayoutSource", "OciLayout"]

REF_NAME = "org.opencontainers.image.ref.name"
_MAX_INDEX = 4 << 20
_MAX_NESTING = 4  # indexes inside indexes


class _Content(Protocol):
    """Where a layout's files are: a directory, or members of an archive."""

    def open(self, name: str) -> tuple[Readable, int] | None:
        """The file `name` (`index.json`, `blobs/sha256/<hex>`) and its size; None
        when the layout has no such file."""
        ...

    def close(self) -> None: ...


class _Directory:
    def __init__(self, root: Path, label: str) -> None:
        if not root.is_dir():
            why = "not a directory" if root.exists() else "no such directory"
            raise SourceError(f"{label}: {why}")
        self._root = root
        self._label = label

    def open(self, name: str) -> tuple[Readable, int] | None:
        """Opened component by component without following symlinks: a layout's files
        are its own, never a way to some other file of this machine."""
        *directories, last = name.split("/")
        try:
            dirfd = os.open(self._root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise SourceError(f"{self._label}: cannot read it: {exc.strerror}") from None
        try:
            for part in directories:
                inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW |
                                os.O_CLOEXEC, dir_fd=dirfd)
                os.close(dirfd)
                dirfd = inner
            # Non-blocking: a FIFO planted as a blob must not hang the run.
            fd = os.open(last, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=dirfd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise SourceError(f"{self._label}: {name} (or a directory above it) is a "
                                  "symbolic link or not a directory: refused") from None
            raise SourceError(f"{self._label}: cannot read {name}: {exc.strerror}") from None
        finally:
            os.close(dirfd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise SourceError(f"{self._label}: {name} is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), st.st_size

    def close(self) -> None:
        pass


class _Archive:
    """The members of a tar archive, read in place."""

    def __init__(self, path: Path, label: str) -> None:
        self._label = label
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SourceError(f"{label}: no such file") from None
        except OSError as exc:
            raise SourceError(f"{label}: cannot read it: {exc.strerror}") from None
        self._fd = fd
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise SourceError(f"{label}: not a regular file")
            os.set_blocking(fd, True)
            self._members = self._scan(st.st_size)
        except BaseException:
            os.close(fd)
            raise

    def _scan(self, size: int) -> dict[str, tuple[int, int] | str]:
        """name -> (offset, size) of a regular file, or the kind of another member."""
        members: dict[str, tuple[int, int] | str] = {}
        label = self._label
        with os.fdopen(os.dup(self._fd), "rb") as file:
            try:
                with tarfile.open(fileobj=file, mode="r:") as tar:
                    for info in tar:
                        name = _member_name(info.name, label)
                        if info.isdir() or not name:
                            continue
                        if name in members:
                            raise SourceError(f"{label}: the archive holds {name!r} twice")
                        if not info.isreg():
                            members[name] = "a link" if info.islnk() or info.issym() else \
                                "not a regular file"
                            continue
                        if info.offset_data + info.size > size:
                            raise SourceError(f"{label}: the archive is truncated (inside "
                                              f"{name})")
                        members[name] = (info.offset_data, info.size)
                    end = tar.offset
            except tarfile.TarError as exc:
                raise SourceError(f"{label}: not a tar archive, or a damaged one ({exc})") \
                    from None
        # tarfile ends quietly at a header it cannot read: only the end-of-archive
        # blocks show that nothing was cut off.
        trailer = os.pread(self._fd, 1024, end)
        if len(trailer) < 512 or trailer.strip(b"\0"):
            raise SourceError(f"{label}: the archive is truncated or damaged after its "
                              "last complete member")
        return members

    def open(self, name: str) -> tuple[Readable, int] | None:
        member = self._members.get(name)
        if member is None:
            return None
        if isinstance(member, str):
            raise SourceError(f"{self._label}: {name} in the archive is {member}")
        offset, size = member
        return _SliceReader(self._fd, offset, size), size

    def close(self) -> None:
        os.close(self._fd)


def _member_name(unsafe_name: str, label: str) -> str:
    """A member's name as a lookup key (`./index.json` is `index.json`); names that
    would land outside the archive's directory refuse the archive."""
    parts = [p for p in unsafe_name.split("/") if p not in ("", ".")]
    if unsafe_name.startswith("/") or ".." in parts or "\0" in unsafe_name:
        raise SourceError(f"{label}: the archive holds a member named {unsafe_name!r}, "
                          "outside the layout: refused")
    return "/".join(parts)


class _SliceReader:
    """`size` bytes at `offset` of a file, read with pread (threads share the file)."""

    def __init__(self, fd: int, offset: int, size: int) -> None:
        self._fd = fd
        self._offset = offset
        self._left = size

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            return b"".join(iter(lambda: self.read(1 << 24), b""))
        want = min(n, self._left)
        if want <= 0:
            return b""
        data = os.pread(self._fd, want, self._offset)
        self._offset += len(data)
        self._left -= len(data) if data else self._left  # a file cut short ends here
        return data


class _LayoutBlobReader(VerifyingReader):
    """A VerifyingReader whose messages blame the layout, not a registry."""

    def __init__(self, raw: Readable, desc: Descriptor, what: str, label: str) -> None:
        super().__init__(raw, desc.digest, desc.size, what=what)
        self._label = label

    def read(self, n: int = -1) -> bytes:
        try:
            return super().read(n)
        except IntegrityError as exc:
            message = str(exc).replace("the registry served corrupt content",
                                       f"{self._label} is damaged")
            raise IntegrityError(message if self._label in message else
                                 f"{message} (in {self._label})") from None


@dataclass(frozen=True)
class _Entry:
    descriptor: Descriptor
    ref_name: str | None


class OciLayout:
    """One layout: its index, and its blobs, verified as they are read."""

    def __init__(self, content: _Content, label: str) -> None:
        self._content = content
        self.label = label
        try:
            if self._read_file("oci-layout", 1 << 16) is None:
                raise SourceError(f"{label}: not an OCI image layout (no oci-layout file; "
                                  "skopeo, buildah and podman save --format oci-dir or "
                                  "oci-archive write one)")
            raw = self._read_file("index.json", _MAX_INDEX)
            if raw is None:
                raise SourceError(f"{label}: not an OCI image layout (no index.json)")
            self._index_raw = raw
            self._entries = _parse_index(raw, label)
        except BaseException:
            content.close()
            raise

    @classmethod
    def directory(cls, path: Path, label: str) -> OciLayout:
        return cls(_Directory(path, label), label)

    @classmethod
    def archive(cls, path: Path, label: str) -> OciLayout:
        return cls(_Archive(path, label), label)

    def close(self) -> None:
        self._content.close()

    def _read_file(self, name: str, limit: int) -> bytes | None:
        opened = self._content.open(name)
        if opened is None:
            return None
        reader, size = opened
        if size > limit:
            raise SourceError(f"{self.label}: {name} is {size} bytes: too big")
        try:
            return reader.read(size)
        finally:
            if hasattr(reader, "close"):
                reader.close()

    # -- the index -----------------------------------------------------------

    @property
    def ref_names(self) -> list[str]:
        return [e.ref_name for e in self._entries if e.ref_name is not None]

    @property
    def only_ref_name(self) -> str | None:
        """The ref name of the index's only entry (None: several, none, or unnamed)."""
        return self._entries[0].ref_name if len(self._entries) == 1 else None

    def _candidates(self, ref_name: str | None) -> list[_Entry]:
        if ref_name is None:
            if not self._entries:
                raise SourceError(f"{self.label}: the layout holds no image")
            return self._entries
        found = [e for e in self._entries if e.ref_name == ref_name]
        if not found:
            names = ", ".join(repr(n) for n in self.ref_names) or "none has a name"
            raise SourceError(f"{self.label}: no image named {ref_name!r} in the layout "
                              f"(its images: {names})")
        return found

    def top_digest(self, ref_name: str | None) -> Digest | None:
        entries = self._candidates(ref_name)
        return entries[0].descriptor.digest if len(entries) == 1 else None

    def resolve(self, ref_name: str | None, platform: Platform | None,
                how_to_name: str) -> tuple[ManifestIndex | None, ImageManifest]:
        """The manifest `ref_name` names (platform chosen), verified."""
        entries = self._candidates(ref_name)
        index: ManifestIndex | None = None
        if len(entries) == 1:
            desc = entries[0].descriptor
        elif all(e.descriptor.platform is not None for e in entries):
            # Entries of one image for several platforms, straight in index.json.
            flat = ManifestIndex(self._index_raw, Digest.of(self._index_raw), OCI_INDEX,
                                 tuple(e.descriptor for e in entries))
            desc = flat.select(platform or Platform.host())
        else:
            names = ", ".join(repr(n) for n in self.ref_names) or "none has a name"
            raise SourceError(f"{self.label}: the layout holds {len(entries)} images"
                              f"{'' if ref_name is None else f' named {ref_name!r}'}: "
                              f"{how_to_name} (its images: {names})")
        found = self._manifest(desc)
        depth = 0
        while isinstance(found, ManifestIndex):
            depth += 1
            if depth > _MAX_NESTING:
                raise SourceError(f"{self.label}: indexes nested more than {_MAX_NESTING} "
                                  "deep")
            index = found
            found = self._manifest(found.select(platform or Platform.host()))
        return index, found

    def _manifest(self, desc: Descriptor) -> ImageManifest | ManifestIndex:
        raw = self.read_blob(desc, MAX_MANIFEST_SIZE, "manifest")
        return parse_manifest(raw, desc.media_type or None, desc.digest)

    def config(self, manifest: ImageManifest) -> ImageConfig:
        raw = self.read_blob(manifest.config, MAX_CONFIG_SIZE, "image config")
        return ImageConfig.parse(raw, manifest.config.digest)

    # -- blobs ---------------------------------------------------------------

    def read_blob(self, desc: Descriptor, limit: int, what: str) -> bytes:
        if desc.size > limit:
            raise SourceError(f"{self.label}: {what} {desc.digest} is {desc.size} bytes: "
                              "too big")
        with self.open_blob(desc, what) as blob:
            data = blob.read(desc.size + 1)
            blob.drain()
        return data

    @contextlib.contextmanager
    def open_blob(self, desc: Descriptor, what: str = "blob") -> Iterator[VerifyingReader]:
        name = f"blobs/{desc.digest.algorithm}/{desc.digest.hex}"
        opened = self._content.open(name)
        if opened is None:
            raise SourceError(f"{self.label}: {what} {desc.digest} is missing from the "
                              "layout (blobs/ is incomplete)")
        reader, _ = opened
        try:
            yield _LayoutBlobReader(reader, desc, what, self.label)
        finally:
            if hasattr(reader, "close"):
                reader.close()


def _parse_index(raw: bytes, label: str) -> list[_Entry]:
    try:
        obj = json.loads(raw)
    except ValueError:
        raise SourceError(f"{label}: index.json is not valid JSON") from None
    manifests = obj.get("manifests") if isinstance(obj, dict) else None
    if not isinstance(manifests, list):
        raise SourceError(f"{label}: index.json has no list of manifests")
    entries = []
    for item in manifests:
        if not isinstance(item, dict):
            raise SourceError(f"{label}: index.json lists something that is not a descriptor")
        annotations = item.get("annotations")
        name = annotations.get(REF_NAME) if isinstance(annotations, dict) else None
        try:
            desc = Descriptor.from_json(item, f"{label} index.json")
        except LazypodError as exc:  # a digest that is no digest names no file either
            raise SourceError(f"{label}: index.json: {exc}") from None
        entries.append(_Entry(desc, str(name) if name else None))
    return entries


class LayoutSource:
    """The `ImageSource` of `oci:` and `oci-archive:` references (one reader per
    layout, kept for the run: a layout does not change while it is read)."""

    def __init__(self) -> None:
        self._layouts: dict[tuple[str, str], OciLayout] = {}
        self._lock = threading.Lock()

    def layout(self, ref: ImageReference) -> OciLayout:
        location = ref.source
        assert location is not None and location.transport in ("oci", "oci-archive")
        key = (location.transport, location.path)
        with self._lock:
            layout = self._layouts.get(key)
            if layout is None:
                label = f"{location.transport}:{location.path}"
                opener = OciLayout.directory if location.transport == "oci" else \
                    OciLayout.archive
                layout = self._layouts[key] = opener(Path(location.path), label)
            return layout

    def close(self) -> None:
        with self._lock:
            for layout in self._layouts.values():
                layout.close()
            self._layouts.clear()

    def expand(self, ref: ImageReference) -> list[ImageReference]:
        if ref.has_wildcard:
            return expand_tags(self, ref)
        assert ref.source is not None
        if ref.source.ref is None:
            name = self.layout(ref).only_ref_name
            if name is not None:
                try:
                    return [local_reference(ref.source.transport, ref.source.path, name,
                                            allow_wildcard=False)]
                except InvalidReference:
                    pass  # an annotation that names no image: the layout's own name
        return [ref]

    def list_tags(self, ref: ImageReference) -> list[str]:
        return self.layout(ref).ref_names

    def head_digest(self, ref: ImageReference) -> Digest | None:
        assert ref.source is not None
        return self.layout(ref).top_digest(ref.source.ref)

    def resolve_manifest(self, ref: ImageReference, platform: Platform | None = None
                         ) -> tuple[ManifestIndex | None, ImageManifest]:
        assert ref.source is not None
        location = ref.source
        return self.layout(ref).resolve(
            location.ref, platform,
            f"name one as {location.transport}:{location.path}:REF")

    def get_config(self, ref: ImageReference, manifest: ImageManifest) -> ImageConfig:
        return self.layout(ref).config(manifest)

    def open_blob(self, ref: ImageReference, desc: Descriptor,
                  what: str = "blob") -> contextlib.AbstractContextManager[VerifyingReader]:
        return self.layout(ref).open_blob(desc, what)
