"""What one image and one layer cost: resolving an image against what the repository
already has, and fetching, verifying and unpacking one layer into staging.

Both run in worker threads (`convert` orchestrates them): nothing here changes the
repository except through a staged layer, which stays invisible until committed.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from .backend import PublishRun, StagedLayer
from .compression import MeasuringReader, open_decompressed
from .digest import Digest
from .errors import (
    AuthenticationFailed,
    ImageNotFound,
    IntegrityError,
    LazypodError,
    RegistryError,
    RegistryUnreachable,
)
from .fsutil import read_or_none
from .manifest import (
    Descriptor,
    ImageConfig,
    ImageManifest,
    ManifestIndex,
    Platform,
    parse_manifest,
)
from .progress import CountingReader, ProgressReporter
from .reference import ImageReference
from .repository import LayerRecord, LayerWhiteouts
from .sources.base import ImageSource, ResolvedImage, checked_image
from .tarstream import TarReader
from .unpack import TarSplitWriter, unpack_layer

__all__ = ["FetchedLayer", "ImageFetcher"]

log = logging.getLogger(__name__)


@dataclass
class FetchedLayer:
    """A layer unpacked into staging and verified, not yet committed."""

    staged: StagedLayer
    record: LayerRecord
    whiteouts: LayerWhiteouts
    compressed_size: int


class ImageFetcher:
    """Resolves images and fetches layers for one run (thread-safe)."""

    def __init__(self, source: ImageSource, progress: ProgressReporter, *,
                 platform: Platform | None, layer_attempts: int) -> None:
        self._source = source
        self._progress = progress
        self._platform = platform
        self._layer_attempts = layer_attempts
        self._configs: dict[Digest, ImageConfig] = {}
        self._lock = threading.Lock()

    # -- images --------------------------------------------------------------

    def resolve(self, run: PublishRun, ref: ImageReference, name: str, *,
                shortcut: bool = True) -> tuple[ResolvedImage, bool]:
        """(the image as its source has it now, whether the repository already holds
        exactly that under `.metadata/<name>`). When it does (the source's
        `head_digest` tells: a registry's HEAD request), nothing else is fetched
        (unless `shortcut` is off); a config the repository or this run already has
        is never fetched again."""
        local = _stored_image(run, ref, self._platform, name) if shortcut else None
        if local is not None:
            try:
                current = self._source.head_digest(ref)
            except (ImageNotFound, AuthenticationFailed):
                raise
            except RegistryError:  # a registry that does not answer HEAD: ask with GET
                current = None
            if current is not None and current == local.top_digest:
                return local.image, True
        index, manifest = self._source.resolve_manifest(ref, self._platform)
        with self._lock:
            config = self._configs.get(manifest.config.digest)
        if config is None:
            raw = read_or_none(run.layout.image_dir(name) / "config.json")
            if raw is not None and Digest.of(raw, manifest.config.digest.algorithm) == \
                    manifest.config.digest:
                config = ImageConfig.parse(raw, manifest.config.digest)
            else:
                config = self._source.get_config(ref, manifest)
            with self._lock:  # tags that share a config fetch it once
                self._configs[manifest.config.digest] = config
        image = checked_image(ref, manifest, config, index)
        return image, shortcut and _is_stored(run, image, name)

    # -- layers --------------------------------------------------------------

    def fetch_layer(self, run: PublishRun, ref: ImageReference, desc: Descriptor,
                    diff_id: Digest) -> FetchedLayer:
        """Fetch, verify and unpack one layer into staging; a connection that breaks
        off is tried again (`layer_attempts` in all)."""
        what = f"layer {desc.digest.short} of {ref}"
        attempt = 0
        while True:
            attempt += 1
            staged = run.stage_layer(desc.digest)
            task = self._progress.start(desc.digest.short, desc.size)
            try:
                record, whiteouts = self._unpack(ref, desc, diff_id, staged, task, what)
                staged.seal(record, whiteouts)
                return FetchedLayer(staged, record, whiteouts, desc.size)
            except RegistryUnreachable as exc:
                staged.abort()
                if attempt >= self._layer_attempts:
                    raise
                log.warning("%s: %s; fetching it again (attempt %d of %d)", what, exc,
                            attempt + 1, self._layer_attempts)
            except LazypodError as exc:
                staged.abort()
                if what not in str(exc):  # say which image and layer, once
                    raise type(exc)(f"{what}: {exc}") from None
                raise
            except BaseException:
                staged.abort()
                raise
            finally:
                self._progress.finish(task)

    def _unpack(self, ref: ImageReference, desc: Descriptor, diff_id: Digest,
                staged: StagedLayer, task: int, what: str) -> tuple[LayerRecord, LayerWhiteouts]:
        started = time.monotonic()
        with self._source.open_blob(ref, desc, what="layer") as blob:
            counted = CountingReader(blob, self._progress, task)
            tar = MeasuringReader(open_decompressed(counted, desc.compression, what))
            stats = unpack_layer(
                TarReader(tar),
                staged.sink,
                TarSplitWriter(staged.tar_split),
                warn=lambda message: log.warning("%s: %s", what, message),
            )
            tar.drain()
            blob.drain()  # the compressed digest is checked at end of stream
        if tar.digest != diff_id:
            raise IntegrityError(
                f"{what}: uncompressed content has digest {tar.digest}, but the image config "
                f"says {diff_id}: the source served a corrupt layer"
            )
        log.debug("%s: %d entries, %.1f MB unpacked in %.2fs", what, stats.entries,
                  tar.size / 1e6, time.monotonic() - started)
        record = LayerRecord(
            digest=desc.digest,
            diff_id=tar.digest,
            diff_size=tar.size,
            created=_rfc3339_now(),
            uidset=tuple(sorted(stats.uids)),
            gidset=tuple(sorted(stats.gids)),
            has_tar_split=True,
            has_whiteouts=True,  # the staged layer writes both (`LocalLayer.seal`)
        )
        whiteouts = LayerWhiteouts(tuple(b"/".join(p) for p in stats.whiteouts),
                                   tuple(b"/".join(p) for p in stats.opaque_dirs))
        return record, whiteouts


@dataclass(frozen=True)
class _StoredImage:
    image: ResolvedImage
    top_digest: Digest  # of index.json when the tag is multi-platform, else manifest.json


def _stored_image(run: PublishRun, ref: ImageReference, platform: Platform | None,
                  name: str) -> _StoredImage | None:
    """The image as a previous run stored it, if every part is there and sound (and,
    for a multi-platform tag, the stored platform is the one asked for)."""
    directory = run.layout.image_dir(name)
    raw_manifest = read_or_none(directory / "manifest.json")
    raw_config = read_or_none(directory / "config.json")
    if raw_manifest is None or raw_config is None:
        return None
    raw_index = read_or_none(directory / "index.json")
    try:
        manifest = parse_manifest(raw_manifest, None, Digest.of(raw_manifest))
        if not isinstance(manifest, ImageManifest):
            return None
        if Digest.of(raw_config, manifest.config.digest.algorithm) != manifest.config.digest:
            return None
        config = ImageConfig.parse(raw_config, manifest.config.digest)
        index = None
        if raw_index is not None:
            parsed = parse_manifest(raw_index, None, Digest.of(raw_index))
            if not isinstance(parsed, ManifestIndex):
                return None
            if parsed.select(platform or Platform.host()).digest != manifest.digest:
                return None
            index = parsed
        image = checked_image(ref, manifest, config, index)
    except LazypodError:
        return None
    if not _is_stored(run, image, name):
        return None
    return _StoredImage(image, index.digest if index is not None else manifest.digest)


def _is_stored(run: PublishRun, image: ResolvedImage, name: str) -> bool:
    """Every part of the image is in the repository, byte for byte."""
    directory = run.layout.image_dir(name)
    if read_or_none(directory / "manifest.json") != image.manifest.raw or \
            read_or_none(directory / "config.json") != image.config.raw or \
            read_or_none(directory / "index.json") != (image.index.raw if image.index else None):
        return False
    return all(desc.is_foreign or run.has_layer(desc.digest) for desc in image.manifest.layers)


def _rfc3339_now() -> str:
    now = time.time_ns()
    seconds, nanos = divmod(now, 10**9)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{nanos:09d}Z"
