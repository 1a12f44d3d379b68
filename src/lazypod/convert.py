"""The conversion pipeline: references -> source -> unpacked layers -> metadata -> views.

Images come from an `ImageSource` (a registry, an OCI layout or archive, podman's
storage: `lazypod.sources`), of which the pipeline knows nothing else. One run
converts any number of images through one backend run, with the work of different
images overlapping: images are resolved several at a time (the source's
`head_digest`, a registry's HEAD request, tells which are already in the
repository: those cost nothing more), and the layers of every image are fetched by
one pool of workers, each layer once however many images share it. An image is
committed when all its layers are unpacked and verified (compressed digest at end
of stream, diff ID against the config): its new layers become pending in the
backend and its metadata is written after them. An image that fails leaves nothing
of itself behind; the others are still published, and the run reports failure. The
`dir` backend settles every `checkpoint_seconds` (an interrupted run keeps what was
settled); views are rendered once, at the end, from the run's in-memory repository
state.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .backend import Backend, PublishRun
from .digest import Digest
from .errors import LazypodError
from .fetch import FetchedLayer, ImageFetcher
from .fsutil import read_or_none
from .layout import METADATA
from .manifest import Descriptor, Platform
from .notify import Notifier, NullNotifier
from .progress import NullProgress, ProgressReporter
from .reference import ImageReference
from .repository import ImageNames, ImageRecord, RepositoryState, image_names
from .sources.base import ImageSource, ResolvedImage
from .views import ViewOptions, ViewsReport, render_views

__all__ = ["ConvertOptions", "Converter", "ImageResult", "Rejected", "RunReport",
           "expand_wildcards"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConvertOptions:
    platform: Platform | None = None
    views: ViewOptions = field(default_factory=ViewOptions)
    workers: int = 4  # layers fetched and unpacked at once
    resolvers: int = 24  # images resolved (manifests checked) at once
    layer_attempts: int = 3  # a layer whose connection breaks off
    attempts: int = 1  # an image that fails (DUCC's --attempts)
    convert_again: bool = False  # even images the repository holds as they are
    overwrite_layers: bool = False  # fetch and unpack layers the repository has
    skip_layers: bool = False  # images whose layers are missing are skipped
    checkpoint_seconds: float = 30.0


@dataclass
class ImageResult:
    reference: ImageReference
    error: str | None = None
    request: str = ""  # the wishlist entry it came from (a wildcard, or itself)
    manifest_digest: Digest | None = None
    layers: int = 0
    fetched_layers: int = 0
    fetched_bytes: int = 0
    up_to_date: bool = False
    skipped: str | None = None  # why nothing was done, when that is not a failure
    attempts: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Rejected:
    """A wishlist entry that never became an image: it does not parse, or its
    wildcard's tags could not be listed."""

    request: str
    error: str


@dataclass
class RunReport:
    images: list[ImageResult] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    views: ViewsReport | None = None
    publishes: int = 0
    backend: str = ""
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)  # in the repository, left unrepaired

    @property
    def ok(self) -> bool:
        return all(image.ok for image in self.images) and not self.problems and \
            not self.rejected

    @property
    def publishes_label(self) -> str:
        return f"cvmfs: {self.publishes} publishes" if self.backend == "cvmfs" else ""


class Converter:
    def __init__(
        self,
        backend: Backend,
        source: ImageSource,
        options: ConvertOptions | None = None,
        progress: ProgressReporter | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self._backend = backend
        self._source = source
        self._options = options or ConvertOptions()
        self._progress = progress or NullProgress()
        self._notifier = notifier or NullNotifier()

    def convert(self, requests: Iterable[ImageReference],
                rejected: Iterable[Rejected] = ()) -> RunReport:
        """Convert what `requests` name (wildcards expanded here: an entry whose tags
        cannot be listed fails alone). `rejected`: entries set aside before (a
        wishlist's malformed lines), reported with the rest."""
        report = RunReport(rejected=list(rejected))
        seen: set[ImageReference] = set()
        named: dict[str, ImageReference] = {}  # public name -> the image published so
        for ref in requests:
            try:
                expanded = expand_wildcards(self._source, ref)
            except LazypodError as exc:
                report.rejected.append(Rejected(str(ref), str(exc)))
                continue
            for tagged in expanded:  # an image a wishlist names twice is converted once
                if tagged in seen:
                    continue
                first = named.setdefault(tagged.public_name, tagged)
                if first.source != tagged.source:  # two sources, one name (app/ twice)
                    report.rejected.append(Rejected(str(tagged), (
                        f"{tagged} would be published as {tagged.public_name}, as {first} "
                        "is: give one of them another name (REF)")))
                    continue
                seen.add(tagged)
                report.images.append(ImageResult(tagged, request=str(ref)))
        for entry in report.rejected:
            self._notifier.emit("end_image_conversion", image_request=entry.request,
                                status="error", error=entry.error)
        started = time.monotonic()
        with self._backend.run() as run:
            state = RepositoryState.load(run.layout)
            pipeline = _Pipeline(self._options, run, state, report,
                                 ImageFetcher(self._source, self._progress,
                                              platform=self._options.platform,
                                              layer_attempts=self._options.layer_attempts),
                                 self._progress, self._notifier)
            pipeline.run()
            run.write_back()  # while the views are rendered
            converted = [image for image in report.images if image.ok and not image.skipped]
            if converted:
                views = self._options.views
                podman = [self._notifier.start("start_podman_ingestion",
                                               image=image.reference.public_name)
                          for image in converted] if views.podman_store else []
                report.views = render_views(state, run, views)
                for ident, image in zip(podman, converted, strict=False):
                    self._notifier.end("end_podman_ingestion", ident, with_status=False,
                                       image=image.reference.public_name)
            run.commit()
            report.publishes = run.publishes
            report.backend = self._backend.name
            report.problems = list(state.problems)
            pipeline.notify_published(converted)
        report.seconds = time.monotonic() - started
        return report


@dataclass
class _Job:
    """An image whose layers are being fetched."""

    index: int
    image: ResolvedImage
    names: ImageNames
    layers: list[Future[FetchedLayer]]
    started: float


class _Pipeline:
    # Images resolved or waiting for their layers at a time: bounds memory and
    # keeps every worker busy.
    WINDOW = 64

    def __init__(self, options: ConvertOptions, run: PublishRun, state: RepositoryState,
                 report: RunReport, fetcher: ImageFetcher, progress: ProgressReporter,
                 notifier: Notifier) -> None:
        self._options = options
        self._run = run
        self._state = state
        self._report = report
        self._fetcher = fetcher
        self._progress = progress
        self._notifier = notifier
        self._layers: dict[Digest, Future[FetchedLayer]] = {}
        self._committed: dict[Digest, str] = {}  # -> the image that brought it
        self._names: dict[int, ImageNames] = {}
        self._notes: dict[int, str] = {}  # image -> its start_image_conversion id
        self._done = 0
        self._bytes = 0
        self._started = time.monotonic()
        self._last_note = self._last_checkpoint = self._started

    def run(self) -> None:
        options = self._options
        todo = collections.deque(range(len(self._report.images)))
        self._todo = todo
        resolving: dict[Future[tuple[ResolvedImage, bool]], tuple[int, float]] = {}
        jobs: list[_Job] = []
        with ThreadPoolExecutor(options.resolvers, "resolve") as resolvers, \
                ThreadPoolExecutor(options.workers, "layer") as workers:
            try:
                while todo or resolving or jobs:
                    while todo and len(resolving) + len(jobs) < self.WINDOW:
                        index = todo.popleft()
                        future = resolvers.submit(self._resolve, index)
                        resolving[future] = (index, time.monotonic())
                    waiting: list[Future[Any]] = [
                        *resolving, *(f for job in jobs for f in job.layers if not f.done())]
                    concurrent.futures.wait(waiting, timeout=5.0,
                                            return_when=concurrent.futures.FIRST_COMPLETED)
                    for resolved in [f for f in resolving if f.done()]:
                        index, started = resolving.pop(resolved)
                        job = self._resolved(index, started, resolved, workers)
                        if job is not None:
                            jobs.append(job)
                    for job in [j for j in jobs if all(f.done() for f in j.layers)]:
                        jobs.remove(job)
                        self._finish(job)
                    self._note_progress()
                    if self._run.checkpoints and \
                            time.monotonic() - self._last_checkpoint > options.checkpoint_seconds:
                        self._run.settle()
                        self._last_checkpoint = time.monotonic()
            except BaseException:
                for layer in self._layers.values():
                    layer.cancel()
                raise
            finally:
                self._abort_uncommitted()

    def _resolve(self, index: int) -> tuple[ResolvedImage, bool]:
        """In a resolver thread: the image's names in the layout, and the image."""
        result = self._report.images[index]
        ref = result.reference
        names = self._names.get(index)
        if names is None:
            names = self._names[index] = image_names(self._run.layout, ref)
            self._notes[index] = self._notifier.start(
                "start_image_conversion", image=names.metadata,
                image_request=result.request or str(ref))
        options = self._options
        return self._fetcher.resolve(self._run, ref, names.metadata, shortcut=not (
            options.convert_again or options.overwrite_layers))

    def _resolved(self, index: int, started: float,
                  future: Future[tuple[ResolvedImage, bool]],
                  workers: ThreadPoolExecutor) -> _Job | None:
        result = self._report.images[index]
        try:
            image, stored = future.result()
        except LazypodError as exc:
            self._failed(index, started, exc)
            return None
        result.manifest_digest = image.manifest.digest
        result.layers = len(image.manifest.layers)
        if stored:
            result.up_to_date = True
            self._count(index, started)
            return None
        names = self._names[index]
        futures = []
        for desc, diff_id in zip(image.manifest.layers, image.config.diff_ids, strict=True):
            if desc.is_foreign:
                log.warning("%s: skipping foreign layer %s", image.reference, desc.digest.short)
                continue
            layer = self._layers.get(desc.digest)
            if layer is None and desc.digest not in self._committed and \
                    (self._options.overwrite_layers or not self._run.has_layer(desc.digest)):
                if self._options.skip_layers:
                    result.skipped = (f"layer {desc.digest.short} is not in the repository "
                                      "and --skip-layers was given")
                    self._count(index, started)
                    return None
                layer = self._layers[desc.digest] = workers.submit(
                    self._fetch_layer, names.metadata, image.reference, desc, diff_id)
            if layer is not None and layer not in futures:
                futures.append(layer)
        return _Job(index, image, names, futures, started)

    def _fetch_layer(self, name: str, ref: ImageReference, desc: Descriptor,
                     diff_id: Digest) -> FetchedLayer:
        """In a layer worker: one layer, between DUCC's notification lines."""
        ident = self._notifier.start("start_layer_conversion", image=name,
                                     layer=desc.digest.hex)
        try:
            fetched = self._fetcher.fetch_layer(self._run, ref, desc, diff_id)
        except BaseException as exc:
            self._notifier.end("end_layer_conversion", ident, error=str(exc) or repr(exc),
                               image=name, layer=desc.digest.hex, size_bytes=0)
            raise
        self._notifier.end("end_layer_conversion", ident, image=name, layer=desc.digest.hex,
                           size_bytes=fetched.record.diff_size or 0)
        return fetched

    def _finish(self, job: _Job) -> None:
        """Commit the image: its new layers, then its metadata; or fail it whole."""
        result = self._report.images[job.index]
        fetched: list[FetchedLayer] = []
        for future in job.layers:
            error = future.exception()
            if error is not None:
                if not isinstance(error, LazypodError):
                    raise error
                self._failed(job.index, job.started, error)
                return
            fetched.append(future.result())
        image, names = job.image, job.names
        for layer in fetched:
            digest = layer.record.digest
            if digest not in self._committed:
                layer.staged.commit()
                self._state.put_layer(layer.record)
                self._committed[digest] = names.metadata
                self._layers.pop(digest, None)  # `_committed` answers for it from now on
                result.fetched_layers += 1
                result.fetched_bytes += layer.compressed_size
                self._bytes += layer.compressed_size
        _write_metadata(self._run, job.image, names.metadata)
        self._state.put_image(ImageRecord(
            names.metadata, image.reference, image.manifest, image.config, image.index,
            names.link if names.link != names.metadata else None))
        self._count(job.index, job.started)
        log.info("converted %s (%s): %d layers, %d fetched, %.1f MB", image.reference,
                 image.manifest.digest.short, result.layers, result.fetched_layers,
                 result.fetched_bytes / 1e6)

    def _failed(self, index: int, started: float, error: LazypodError) -> None:
        """An image failed: tried again while it has attempts left (its failed layers
        are fetched anew), else reported."""
        result = self._report.images[index]
        result.attempts += 1
        if result.attempts < self._options.attempts:
            log.warning("%s: %s; trying it again (attempt %d of %d)", result.reference,
                        error, result.attempts + 1, self._options.attempts)
            for digest, future in list(self._layers.items()):
                if future.done() and future.exception() is not None:
                    del self._layers[digest]
            self._todo.append(index)
            return
        result.error = str(error)
        self._count(index, started)

    def _count(self, index: int, started: float) -> None:
        result = self._report.images[index]
        result.seconds = time.monotonic() - started
        self._done += 1
        name = self._names[index].metadata if index in self._names else str(result.reference)
        self._notifier.end("end_image_conversion", self._notes.pop(index, ""),
                           error=result.error, image=name)

    def notify_published(self, converted: list[ImageResult]) -> None:
        """After the run's commit: DUCC's lines for what is now in the repository."""
        for digest, name in self._committed.items():
            self._notifier.emit("publish_layer", image=name, layer_digest=digest.hex)
        if not self._options.views.flat:
            return
        position = {id(result): i for i, result in enumerate(self._report.images)}
        for result in converted:
            names = self._names.get(position[id(result)])
            image = self._state.image(names.metadata) if names else None
            if image is None or image.config is None:
                continue
            flat = self._state.layout.flat_rel(image.config.digest)
            if (self._state.layout.root / image.link).is_symlink():
                self._notifier.emit("publish_flat_image", public_path=image.link,
                                    private_path=flat,
                                    image_request=result.request or str(result.reference))

    def _note_progress(self) -> None:
        """A line every 10 s on long runs (for logs; the terminal has bars)."""
        now = time.monotonic()
        if now - self._last_note < 10.0:
            return
        self._last_note = now
        total = len(self._report.images)
        rate = self._done / max(now - self._started, 1e-9)
        log.info("progress: %d of %d images (%.1f/s), %.1f MB fetched", self._done, total,
                 rate, self._bytes / 1e6)

    def _abort_uncommitted(self) -> None:
        """Layers whose every image failed leave nothing behind."""
        for digest, future in self._layers.items():
            if digest in self._committed or not future.done() or future.cancelled():
                continue
            if future.exception() is None:
                future.result().staged.abort()


def _write_metadata(run: PublishRun, image: ResolvedImage, name: str) -> None:
    """config.json, index.json, then manifest.json (what readers look for) into
    `.metadata/<name>`; files that already hold the right bytes are left alone, so a
    rerun writes nothing."""
    base = f"{METADATA}/{name}"
    wanted = {"config.json": image.config.raw,
              "index.json": image.index.raw if image.index else None,
              "manifest.json": image.manifest.raw}
    for name, data in wanted.items():
        current = read_or_none(run.layout.root / base / name)
        if data is None and current is not None:
            run.remove(f"{base}/{name}")
        elif data is not None and current != data:
            run.write_file(f"{base}/{name}", data)


def expand_wildcards(source: ImageSource, ref: ImageReference) -> list[ImageReference]:
    """The images `ref` stands for, under the names they are published as: a tag with
    `*` stands for every matching tag of the repository (or ref name of the layout);
    a layout's only image is named after its ref name annotation."""
    return source.expand(ref)
