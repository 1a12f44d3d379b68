"""The conversion pipeline: references -> registry -> unpacked layers -> metadata -> views.

One run converts any number of images through one backend run. Per image, all
missing layers are fetched concurrently into staging and verified (compressed
digest at end of stream, diff ID against the config) before any of them is
committed; then the image's metadata is written. Views are rendered once, at
the end, from the repository state on disk. An image that fails leaves nothing
of itself behind; the others are still published, and the run reports failure.
"""

from __future__ import annotations

import concurrent.futures
import fnmatch
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from .backend import Backend, PublishRun, StagedLayer
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
from .layout import METADATA
from .manifest import (
    Descriptor,
    ImageConfig,
    ImageManifest,
    ManifestIndex,
    Platform,
    parse_manifest,
)
from .progress import CountingReader, NullProgress, ProgressReporter
from .reference import ImageReference
from .registry import RegistryClient, ResolvedImage, checked_image
from .repository import LayerRecord, LayerWhiteouts, RepositoryState
from .tarstream import TarReader
from .unpack import TarSplitWriter, unpack_layer
from .views import ViewOptions, ViewsReport, render_views

__all__ = ["ConvertOptions", "Converter", "ImageResult", "RunReport", "expand_wildcards"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConvertOptions:
    platform: Platform | None = None
    views: ViewOptions = field(default_factory=ViewOptions)
    workers: int = 4
    layer_attempts: int = 3


@dataclass
class ImageResult:
    reference: ImageReference
    error: str | None = None
    manifest_digest: Digest | None = None
    layers: int = 0
    fetched_layers: int = 0
    fetched_bytes: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class RunReport:
    images: list[ImageResult] = field(default_factory=list)
    views: ViewsReport | None = None
    publishes: int = 0
    backend: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(image.ok for image in self.images)

    @property
    def publishes_label(self) -> str:
        return f"cvmfs: {self.publishes} publishes" if self.backend == "cvmfs" else ""


class Converter:
    def __init__(
        self,
        backend: Backend,
        registry: RegistryClient,
        options: ConvertOptions | None = None,
        progress: ProgressReporter | None = None,
    ) -> None:
        self._backend = backend
        self._registry = registry
        self._options = options or ConvertOptions()
        self._progress = progress or NullProgress()
        self._configs: dict[Digest, ImageConfig] = {}

    def convert(self, references: Iterable[ImageReference]) -> RunReport:
        report = RunReport()
        started = time.monotonic()
        with self._backend.run() as run:
            for ref in references:
                report.images.append(self._convert_one(run, ref))
            run.flush()
            if any(image.ok for image in report.images):
                state = RepositoryState.load(run.layout)
                report.views = render_views(state, run, self._options.views)
            run.commit()
            report.publishes = run.publishes
            report.backend = self._backend.name
        report.seconds = time.monotonic() - started
        return report

    def _convert_one(self, run: PublishRun, ref: ImageReference) -> ImageResult:
        result = ImageResult(ref)
        started = time.monotonic()
        try:
            image = self._resolve(run, ref)
            result.manifest_digest = image.manifest.digest
            result.layers = len(image.manifest.layers)
            self._fetch_layers(run, image, result)
            self._write_metadata(run, image)
            log.info("converted %s (%s): %d layers, %d fetched, %.1f MB", ref,
                     image.manifest.digest.short, result.layers, result.fetched_layers,
                     result.fetched_bytes / 1e6)
        except LazypodError as exc:
            result.error = str(exc)  # reported by the caller, once
        result.seconds = time.monotonic() - started
        return result

    def _resolve(self, run: PublishRun, ref: ImageReference) -> ResolvedImage:
        """The image as the registry has it now. When the repository already holds
        that very manifest (a HEAD request tells), nothing else is fetched; a config the
        repository holds is never fetched again."""
        local = _stored_image(run, ref, self._options.platform)
        if local is not None:
            try:
                current = self._registry.head_digest(ref)
            except (ImageNotFound, AuthenticationFailed):
                raise
            except RegistryError:  # a registry that does not answer HEAD: ask with GET
                current = None
            if current is not None and current == local.top_digest:
                return local.image
        index, manifest = self._registry.resolve_manifest(ref, self._options.platform)
        config = self._configs.get(manifest.config.digest)
        if config is None:
            raw = read_or_none(run.layout.image_dir(ref.public_name) / "config.json")
            if raw is not None and Digest.of(raw, manifest.config.digest.algorithm) == \
                    manifest.config.digest:
                config = ImageConfig.parse(raw, manifest.config.digest)
            else:
                config = self._registry.get_config(ref, manifest)
            self._configs[manifest.config.digest] = config  # tags sharing it fetch it once
        return checked_image(ref, manifest, config, index)

    def _fetch_layers(self, run: PublishRun, image: ResolvedImage, result: ImageResult) -> None:
        wanted: dict[Digest, tuple[Descriptor, Digest]] = {}
        for desc, diff_id in zip(image.manifest.layers, image.config.diff_ids, strict=True):
            if desc.is_foreign:
                log.warning("%s: skipping foreign layer %s", image.reference, desc.digest.short)
            elif desc.digest not in wanted and not run.has_layer(desc.digest):
                wanted[desc.digest] = (desc, diff_id)
        if not wanted:
            return
        staged: list[tuple[StagedLayer, LayerRecord, LayerWhiteouts]] = []
        workers = max(1, min(self._options.workers, len(wanted)))
        with concurrent.futures.ThreadPoolExecutor(workers, "layer") as pool:
            futures = [pool.submit(self._fetch_layer, run, image, desc, diff_id)
                       for desc, diff_id in wanted.values()]
            try:
                for future in concurrent.futures.as_completed(futures):
                    layer, record, whiteouts = future.result()
                    staged.append((layer, record, whiteouts))
                    result.fetched_layers += 1
                    result.fetched_bytes += wanted[record.digest][0].size
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                for future in futures:
                    if future.done() and not future.cancelled() and future.exception() is None:
                        future.result()[0].abort()
                raise
        # Every layer verified: only now do they become part of the repository.
        for layer, record, whiteouts in staged:
            layer.commit(record, whiteouts)

    def _fetch_layer(
        self, run: PublishRun, image: ResolvedImage, desc: Descriptor, diff_id: Digest
    ) -> tuple[StagedLayer, LayerRecord, LayerWhiteouts]:
        what = f"layer {desc.digest.short} of {image.reference}"
        attempt = 0
        while True:
            attempt += 1
            staged = run.stage_layer(desc.digest)
            task = self._progress.start(f"{desc.digest.short}", desc.size)
            try:
                return staged, *self._unpack(image, desc, diff_id, staged, task, what)
            except RegistryUnreachable as exc:
                staged.abort()
                if attempt >= self._options.layer_attempts:
                    raise
                log.warning("%s: %s; fetching it again (attempt %d of %d)", what, exc,
                            attempt + 1, self._options.layer_attempts)
            except BaseException:
                staged.abort()
                raise
            finally:
                self._progress.finish(task)

    def _unpack(
        self,
        image: ResolvedImage,
        desc: Descriptor,
        diff_id: Digest,
        staged: StagedLayer,
        task: int,
        what: str,
    ) -> tuple[LayerRecord, LayerWhiteouts]:
        started = time.monotonic()
        with self._registry.open_blob(image.reference, desc, what="layer") as blob:
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
                f"says {diff_id}: the registry served a corrupt layer"
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
        )
        whiteouts = LayerWhiteouts(tuple(b"/".join(p) for p in stats.whiteouts),
                                   tuple(b"/".join(p) for p in stats.opaque_dirs))
        return record, whiteouts

    def _write_metadata(self, run: PublishRun, image: ResolvedImage) -> None:
        """config.json, index.json, then manifest.json (what readers look for); files
        that already hold the right bytes are left alone, so a rerun writes nothing."""
        base = f"{METADATA}/{image.reference.public_name}"
        wanted = {"config.json": image.config.raw,
                  "index.json": image.index.raw if image.index else None,
                  "manifest.json": image.manifest.raw}
        for name, data in wanted.items():
            current = read_or_none(run.layout.root / base / name)
            if data is None and current is not None:
                run.remove(f"{base}/{name}")
            elif data is not None and current != data:
                run.write_file(f"{base}/{name}", data)


@dataclass(frozen=True)
class _StoredImage:
    image: ResolvedImage
    top_digest: Digest  # of index.json when the tag is multi-platform, else manifest.json


def _stored_image(run: PublishRun, ref: ImageReference,
                  platform: Platform | None) -> _StoredImage | None:
    """The image as a previous run stored it, if every part is there and sound (and,
    for a multi-platform tag, the stored platform is the one asked for)."""
    directory = run.layout.image_dir(ref.public_name)
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
    if not all(desc.is_foreign or run.has_layer(desc.digest) for desc in manifest.layers):
        return None
    return _StoredImage(image, index.digest if index is not None else manifest.digest)


def expand_wildcards(registry: RegistryClient, ref: ImageReference) -> list[ImageReference]:
    """A reference whose tag has `*` stands for every matching tag of the repository."""
    if not ref.has_wildcard:
        return [ref]
    assert ref.tag is not None
    tags = sorted(t for t in registry.list_tags(ref) if fnmatch.fnmatchcase(t, ref.tag))
    return [ref.with_tag(tag) for tag in tags]


def _rfc3339_now() -> str:
    now = time.time_ns()
    seconds, nanos = divmod(now, 10**9)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{nanos:09d}Z"
