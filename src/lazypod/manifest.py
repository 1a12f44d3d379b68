"""Manifests, indexes, image configs and platform selection (OCI and Docker v2.2)."""

from __future__ import annotations

import json
import platform as _platform
from collections.abc import Callable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from .digest import Digest
from .errors import IntegrityError, UnsupportedImage

__all__ = [
    "ACCEPTED_MANIFEST_TYPES",
    "Compression",
    "Descriptor",
    "Document",
    "ImageConfig",
    "ImageManifest",
    "ManifestIndex",
    "Platform",
    "StoredBytes",
    "parse_manifest",
]

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
ACCEPTED_MANIFEST_TYPES = (OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST)

_LAYER_TYPES: dict[str, str] = {
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
}
_FOREIGN_TYPES = frozenset(t for t in _LAYER_TYPES if "foreign" in t or "nondistributable" in t)


class Compression:
    """Layer compressions, with the numbers containers/storage records in layers.json."""

    NONE = "none"
    GZIP = "gzip"
    ZSTD = "zstd"
    STORAGE_CODE: Final = MappingProxyType({"none": 0, "gzip": 2, "zstd": 4})


@dataclass(frozen=True, slots=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise UnsupportedImage(f"invalid platform {text!r}: expected os/arch[/variant]")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    @classmethod
    def host(cls) -> Platform:
        machine = _platform.machine().lower()
        arch, variant = _HOST_ARCH.get(machine, (machine, None))
        return cls("linux", arch, variant)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


_HOST_ARCH: dict[str, tuple[str, str | None]] = {
    "x86_64": ("amd64", None),
    "amd64": ("amd64", None),
    "aarch64": ("arm64", "v8"),
    "arm64": ("arm64", "v8"),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i686": ("386", None),
    "i386": ("386", None),
    "ppc64le": ("ppc64le", None),
    "s390x": ("s390x", None),
    "riscv64": ("riscv64", None),
}
# Variants that an entry without a variant is taken to be (as containerd/podman do).
_DEFAULT_VARIANT = {"arm64": "v8", "arm": "v7"}
# Variants a CPU of a variant also runs, newest first (as containers/image orders them).
_OLDER_VARIANTS = {"arm": {"v8": ("v7", "v6", "v5"), "v7": ("v6", "v5"), "v6": ("v5",)}}


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    platform: Platform | None = None

    @classmethod
    def from_json(cls, obj: Any, what: str) -> Descriptor:
        try:
            plat = obj.get("platform")
            return cls(
                media_type=str(obj.get("mediaType", "")),
                digest=Digest.parse(str(obj["digest"])),
                size=int(obj["size"]),
                platform=(
                    Platform(str(plat["os"]), str(plat["architecture"]), plat.get("variant"))
                    if isinstance(plat, dict)
                    else None
                ),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise UnsupportedImage(f"malformed descriptor in {what}: {exc}") from None

    @property
    def compression(self) -> str:
        try:
            return _LAYER_TYPES[self.media_type]
        except KeyError:
            raise UnsupportedImage(
                f"layer {self.digest} has media type {self.media_type!r}, which is not a "
                "tar layer (gzip, zstd or uncompressed)"
            ) from None

    @property
    def is_foreign(self) -> bool:
        return self.media_type in _FOREIGN_TYPES


@dataclass(frozen=True, slots=True)
class StoredBytes:
    """A document's bytes left in the repository until they are needed: a record
    rebuilt from the record cache (`record_cache`) holds what views and listings use,
    and its raw bytes (tens of MB at 10,000 images) are read only for the few images a
    run writes. `decode` turns the file's bytes into the document's (DUCC's re-encoded
    manifests); the result must still have the document's digest."""

    path: str
    size: int  # of the document's bytes (after `decode`)
    decode: Callable[[bytes], bytes] | None = None

    def read(self, digest: Digest) -> bytes:
        try:
            with open(self.path, "rb") as file:
                data = file.read()
        except OSError as exc:
            raise IntegrityError(f"{self.path}: unreadable ({exc.strerror}); run the "
                                 "command again") from None
        if self.decode is not None:
            data = self.decode(data)
        if Digest.of(data, digest.algorithm) != digest:
            raise IntegrityError(f"{self.path} changed while lazypod was running; run the "
                                 "command again")
        return data


class Document:
    """`raw`: the document's bytes, held or read when first asked for (`StoredBytes`)."""

    __slots__ = ()
    body: bytes | StoredBytes
    digest: Digest

    @property
    def raw(self) -> bytes:
        body = self.body
        return body if isinstance(body, bytes) else body.read(self.digest)

    @property
    def size(self) -> int:
        body = self.body
        return len(body) if isinstance(body, bytes) else body.size


@dataclass(frozen=True, slots=True)
class ImageManifest(Document):
    body: bytes | StoredBytes
    digest: Digest
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True, slots=True)
class ManifestIndex(Document):
    body: bytes | StoredBytes
    digest: Digest
    media_type: str
    manifests: tuple[Descriptor, ...]

    def select(self, wanted: Platform) -> Descriptor:
        """The entry for `wanted`, matching variants the way podman does."""
        candidates = [
            d
            for d in self.manifests
            if d.platform is not None
            and d.platform.os == wanted.os
            and d.platform.architecture == wanted.architecture
        ]
        default = _DEFAULT_VARIANT.get(wanted.architecture)
        want_variant = wanted.variant or default
        # The wanted variant, then the older ones its CPU runs (arm/v7 runs v6 and v5).
        older = _OLDER_VARIANTS.get(wanted.architecture, {}).get(want_variant or "", ())
        for variant in (want_variant, *older):
            for entry in candidates:
                assert entry.platform is not None
                if (entry.platform.variant or default) == variant:
                    return entry
        if candidates and wanted.variant is None:
            return candidates[0]
        offered = ", ".join(sorted({str(d.platform) for d in self.manifests if d.platform}))
        raise UnsupportedImage(
            f"no image for platform {wanted} (offered: {offered or 'none'}); "
            "choose one with --platform"
        )


def parse_manifest(
    raw: bytes, content_type: str | None, digest: Digest, *, decoded: Any = None
) -> ImageManifest | ManifestIndex:
    """Parse raw manifest bytes into an ImageManifest or a ManifestIndex (`decoded`:
    `raw` already decoded by the caller, to spare decoding it twice)."""
    try:
        obj = json.loads(raw) if decoded is None else decoded
    except ValueError as exc:
        raise UnsupportedImage(f"manifest {digest} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise UnsupportedImage(f"manifest {digest} is not a JSON object")
    media_type = str(obj.get("mediaType") or _strip_params(content_type) or "")
    if not media_type:
        media_type = OCI_INDEX if "manifests" in obj else OCI_MANIFEST
    if media_type in DOCKER_SCHEMA1 or obj.get("schemaVersion") == 1:
        raise UnsupportedImage(
            f"manifest {digest} is Docker schema 1, which registries stopped serving; "
            "re-push the image with a current client"
        )
    what = f"manifest {digest}"
    if media_type in (OCI_INDEX, DOCKER_LIST):
        entries = tuple(Descriptor.from_json(m, what) for m in obj.get("manifests") or ())
        return ManifestIndex(raw, digest, media_type, entries)
    if media_type in (OCI_MANIFEST, DOCKER_MANIFEST):
        if "config" not in obj:
            raise UnsupportedImage(f"{what} has no config")
        config = Descriptor.from_json(obj["config"], what)
        layers = tuple(Descriptor.from_json(layer, what) for layer in obj.get("layers") or ())
        return ImageManifest(raw, digest, media_type, config, layers)
    raise UnsupportedImage(f"{what} has unsupported media type {media_type!r}")


def _strip_params(content_type: str | None) -> str | None:
    if content_type is None:
        return None
    return content_type.split(";", 1)[0].strip() or None


@dataclass(frozen=True, slots=True)
class ImageConfig(Document):
    """The parts of an image config lazypod needs (the raw bytes are kept as fetched)."""

    body: bytes | StoredBytes
    digest: Digest
    diff_ids: tuple[Digest, ...]
    created: str | None
    env: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    working_dir: str = ""
    labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: bytes, digest: Digest) -> ImageConfig:
        try:
            obj = json.loads(raw)
            rootfs = obj.get("rootfs") or {}
            diff_ids = tuple(Digest.parse(str(d)) for d in rootfs.get("diff_ids") or ())
            conf = obj.get("config") or {}
            return cls(
                body=raw,
                digest=digest,
                diff_ids=diff_ids,
                created=obj.get("created"),
                env=tuple(conf.get("Env") or ()),
                entrypoint=tuple(conf.get("Entrypoint") or ()),
                cmd=tuple(conf.get("Cmd") or ()),
                working_dir=str(conf.get("WorkingDir") or ""),
                labels=dict(conf.get("Labels") or {}),
            )
        except (ValueError, AttributeError, TypeError) as exc:
            raise UnsupportedImage(f"image config {digest} is malformed: {exc}") from None
