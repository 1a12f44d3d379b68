"""The contract every image source keeps (`ImageSource`), and what it hands out.

In the spirit of containers/image's `ImageSource`: the conversion pipeline asks a
source for what a reference names, its manifest and config, and its blobs, and
knows nothing else about where they come from (a registry, an OCI layout, an
archive, podman's storage).

Contract, for every implementation:

* Methods may be called from several threads at once, in any order; `expand` and
  `head_digest` are cheap and may be skipped.
* Nothing a source returns is unverified: a manifest named by a digest matches it, a
  config matches the manifest's descriptor, and `open_blob`'s reader raises
  `IntegrityError` at end of stream unless the blob has the descriptor's digest and
  size (callers drain it: `VerifyingReader.drain`).
* Failures are `LazypodError`s, one line each, naming the image; a source never
  writes anything outside its own private work directory, and nothing at all into
  the repository.
"""

from __future__ import annotations

import fnmatch
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from ..digest import Digest, VerifyingReader
from ..errors import UnsupportedImage
from ..manifest import Descriptor, ImageConfig, ImageManifest, ManifestIndex, Platform
from ..reference import ImageReference

__all__ = ["MAX_CONFIG_SIZE", "MAX_MANIFEST_SIZE", "ImageSource", "ResolvedImage",
           "checked_image", "expand_tags"]

MAX_MANIFEST_SIZE = 4 << 20
MAX_CONFIG_SIZE = 8 << 20


@dataclass(frozen=True)
class ResolvedImage:
    """One platform's image as its source serves it, manifest and config verified."""

    reference: ImageReference
    manifest: ImageManifest
    config: ImageConfig
    index: ManifestIndex | None = None


class ImageSource(Protocol):
    """Where images are read from."""

    def expand(self, ref: ImageReference) -> list[ImageReference]:
        """The images `ref` stands for, each under the name it is published as: every
        tag a wildcard matches (sorted), or `ref` itself; a layout's only image is
        named after its ref name annotation here."""
        ...

    def list_tags(self, ref: ImageReference) -> list[str]:
        """The tags of `ref`'s repository (a layout: its images' ref names)."""
        ...

    def head_digest(self, ref: ImageReference) -> Digest | None:
        """What `ref` points to now (a manifest or index digest), cheaply; None when
        the source cannot tell without fetching the manifest."""
        ...

    def resolve_manifest(self, ref: ImageReference, platform: Platform | None = None
                         ) -> tuple[ManifestIndex | None, ImageManifest]:
        """The manifest, verified; from a multi-platform image the entry for
        `platform` (default: this machine's), with the index it was chosen from."""
        ...

    def get_config(self, ref: ImageReference, manifest: ImageManifest) -> ImageConfig:
        """The manifest's config, verified against its descriptor."""
        ...

    def open_blob(self, ref: ImageReference, desc: Descriptor,
                  what: str = "blob") -> AbstractContextManager[VerifyingReader]:
        """A reader of the blob that checks its digest and size at end of stream."""
        ...


def checked_image(ref: ImageReference, manifest: ImageManifest, config: ImageConfig,
                  index: ManifestIndex | None) -> ResolvedImage:
    """An image whose config and manifest agree, with layers lazypod can unpack."""
    if len(config.diff_ids) != len(manifest.layers):
        raise UnsupportedImage(
            f"{ref}: the config lists {len(config.diff_ids)} layers but the manifest "
            f"{len(manifest.layers)}"
        )
    for layer in manifest.layers:
        if not layer.is_foreign:
            _ = layer.compression  # raise early on layer types we cannot unpack
    return ResolvedImage(ref, manifest, config, index)


def expand_tags(source: ImageSource, ref: ImageReference) -> list[ImageReference]:
    """`ref`, or for a wildcard every matching tag the source lists (sorted)."""
    if not ref.has_wildcard:
        return [ref]
    pattern = ref.source.ref if ref.source is not None else ref.tag
    assert pattern is not None
    tags = sorted(t for t in source.list_tags(ref) if fnmatch.fnmatchcase(t, pattern))
    return [ref.with_tag(tag) for tag in tags]
