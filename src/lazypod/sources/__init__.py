"""Image sources: where the conversion pipeline reads images from.

Every source keeps the `ImageSource` contract (`base`); the pipeline knows no other.
Transports, in skopeo's syntax (`reference` parses them):

    docker://NAME, NAME           a registry            lazypod.registry.RegistryClient
    oci:DIR[:REF]                 an OCI image layout   oci.LayoutSource
    oci-archive:FILE[:REF]        a tar of one          oci.LayoutSource
    containers-storage:NAME       podman's storage      storage.PodmanStorageSource

`Sources` puts them behind one `ImageSource`, choosing by the reference.
`registry_io` holds how the registry client reads answers (bodies, retries).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from ..digest import Digest, VerifyingReader
from ..manifest import Descriptor, ImageConfig, ImageManifest, ManifestIndex, Platform
from ..reference import ImageReference
from .base import ImageSource, ResolvedImage, checked_image, expand_tags
from .oci import LayoutSource, OciLayout
from .storage import PodmanStorageSource

__all__ = ["ImageSource", "LayoutSource", "OciLayout", "PodmanStorageSource",
           "ResolvedImage", "Sources", "checked_image", "expand_tags"]


class Sources:
    """Every transport behind one `ImageSource`: registry references go to
    `registry` (owned by the caller), the others to a layout reader or to podman,
    made when first needed and closed by `close`."""

    def __init__(self, registry: ImageSource, *, work_dir: Path | None = None) -> None:
        self._registry = registry
        self._layouts = LayoutSource()
        self._storage = PodmanStorageSource(work_dir=work_dir)

    def __enter__(self) -> Sources:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._layouts.close()
        self._storage.close()

    def source_of(self, ref: ImageReference) -> ImageSource:
        if ref.source is None:
            return self._registry
        if ref.source.transport == "containers-storage":
            return self._storage
        return self._layouts

    def expand(self, ref: ImageReference) -> list[ImageReference]:
        return self.source_of(ref).expand(ref)

    def list_tags(self, ref: ImageReference) -> list[str]:
        return self.source_of(ref).list_tags(ref)

    def head_digest(self, ref: ImageReference) -> Digest | None:
        return self.source_of(ref).head_digest(ref)

    def resolve_manifest(self, ref: ImageReference, platform: Platform | None = None
                         ) -> tuple[ManifestIndex | None, ImageManifest]:
        return self.source_of(ref).resolve_manifest(ref, platform)

    def get_config(self, ref: ImageReference, manifest: ImageManifest) -> ImageConfig:
        return self.source_of(ref).get_config(ref, manifest)

    def open_blob(self, ref: ImageReference, desc: Descriptor,
                  what: str = "blob") -> contextlib.AbstractContextManager[VerifyingReader]:
        return self.source_of(ref).open_blob(ref, desc, what)
