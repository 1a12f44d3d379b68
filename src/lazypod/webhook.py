"""Registry notifications turned into conversions and removals, one job at a time.

A registry tells `lazypod webhook` what was pushed or deleted; this module reads
what it says, queues a job per image and runs the jobs strictly one after the
other against the repository:

    HTTP threads --offer--> JobQueue --take--> Webhook.run (one thread)
                                                push:    Converter, as convert-single-image
                                                delete:  remove_images, then a collection
                                                collect: collect_garbage

Understood: Harbor's webhooks (its default payload, `type` PUSH_ARTIFACT or
DELETE_ARTIFACT, and its CloudEvents payload), and the distribution registry's
notification envelopes (`{"events": [...]}`), of which only manifest pushes with a
tag and deletes matter: blob pushes, pulls, mounts and pushes by digest alone (the
platform manifests of a multi-platform push, followed by the tagged index) are
ignored. A registry's name comes from the notification (distribution:
`request.host`), folded by `aliases`; the scheme it names is not trusted: plain HTTP
only for registries the user declared insecure.

The queue coalesces by image: a notification for an image already waiting changes
nothing, or replaces the waiting action when it is the other one (the newest wins).
The job being run is not waiting, so a push during its conversion queues it again
(the tag may have moved after it was resolved). A busy repository (another lazypod
holds its lock) pauses the whole queue, with back-off, and is no failure; other
failures are tried again after a delay, `attempts` times in all, then dropped with
an error line. Garbage is collected once after the removals queued before it.
"""

from __future__ import annotations

import collections
import contextlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal, cast

from .backend import Backend
from .convert import Converter, ConvertOptions, ImageResult
from .digest import Digest
from .errors import LazypodError, NotificationError, RepositoryBusy
from .maintenance import GarbageReport, collect_garbage, remove_images
from .manifest import ACCEPTED_MANIFEST_TYPES
from .notify import Notifier, NullNotifier
from .reference import ImageReference, parse_reference
from .registry import RegistryClient
from .repository import RepositoryState

__all__ = ["MAX_BODY", "JobQueue", "Notification", "NotificationError", "RepositoryPublisher",
           "Target", "Webhook", "WebhookServer", "is_allowed", "parse_notification"]

log = logging.getLogger(__name__)

Action = Literal["push", "delete", "collect"]
MAX_BODY = 1 << 20  # bytes: a notification is a few KiB; more is not one
_HARBOR_TYPES: dict[str, Action] = {
    "PUSH_ARTIFACT": "push", "DELETE_ARTIFACT": "delete",  # Harbor's default payload
    "harbor.artifact.pushed": "push", "harbor.artifact.deleted": "delete",  # CloudEvents
}
_COLLECT_KEY = "\0collect"  # never an image name


@dataclass(frozen=True)
class Target:
    """What a notification names: one image (by tag or digest), or, for a delete
    without either (distribution's repository delete), every image of a repository."""

    registry: str
    repository: str
    tag: str | None = None
    digest: Digest | None = None

    @property
    def name(self) -> str:
        base = f"{self.registry}/{self.repository}"
        if self.tag is not None:
            return f"{base}:{self.tag}"
        return f"{base}@{self.digest}" if self.digest is not None else base

    def reference(self) -> ImageReference:
        return ImageReference(self.registry, self.repository, self.tag, self.digest)


@dataclass
class Notification:
    """What one request asks for, in order, and what it carried that does not matter."""

    jobs: list[tuple[Action, Target]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def parse_notification(body: bytes, aliases: Mapping[str, str] | None = None) -> Notification:
    """The jobs a Harbor or distribution notification asks for; NotificationError when
    the body is neither."""
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise NotificationError(f"the body is not JSON: {exc}") from None
    folded = {k.lower(): v for k, v in (aliases or {}).items()}
    found = Notification()
    if isinstance(obj, dict) and isinstance(obj.get("type"), str) and \
            isinstance(obj.get("event_data", obj.get("data")), dict):
        _harbor(obj, folded, found)
    elif isinstance(obj, dict) and isinstance(obj.get("events"), list):
        for event in obj["events"]:
            _distribution(event, folded, found)
    else:
        raise NotificationError("neither a Harbor webhook (type, event_data) nor a "
                                "distribution notification (events)")
    return found


def _harbor(obj: dict[str, Any], aliases: Mapping[str, str], found: Notification) -> None:
    action = _HARBOR_TYPES.get(obj["type"])
    if action is None:
        found.ignored.append(f"Harbor event {obj['type']}")
        return
    data = obj["event_data"] if isinstance(obj.get("event_data"), dict) else obj["data"]
    resources = data.get("resources")
    if not isinstance(resources, list):
        raise NotificationError(f"Harbor {obj['type']} without event_data.resources")
    for resource in resources:
        url = resource.get("resource_url") if isinstance(resource, dict) else None
        if not isinstance(url, str) or not url:
            raise NotificationError(f"Harbor {obj['type']}: a resource without resource_url")
        ref = _parse(url.split("://", 1)[-1])
        found.jobs.append((action, _target(ref, aliases)))


def _distribution(event: Any, aliases: Mapping[str, str], found: Notification) -> None:
    if not isinstance(event, dict) or not isinstance(event.get("target"), dict):
        raise NotificationError("a distribution event without a target")
    action, target = event.get("action"), event["target"]
    repository = target.get("repository")
    what = f"{action} of {repository}"
    if action not in ("push", "delete"):
        found.ignored.append(what)  # pull, mount
        return
    if action == "push" and target.get("mediaType") not in ACCEPTED_MANIFEST_TYPES:
        found.ignored.append(f"{what} ({target.get('mediaType')} {target.get('digest')})")
        return
    if action == "push" and not target.get("tag"):
        found.ignored.append(f"{what}@{target.get('digest')} (no tag)")
        return
    request = event.get("request")
    host = request.get("host") if isinstance(request, dict) else None
    if not isinstance(host, str) or not host or not isinstance(repository, str):
        raise NotificationError(f"a distribution {action} event without request.host or "
                                "target.repository")
    tag, digest = target.get("tag"), target.get("digest")
    if tag:
        ref = _parse(f"{host}/{repository}:{tag}")
    elif digest:
        ref = _parse(f"{host}/{repository}@{digest}")
    else:  # distribution 3's repository delete
        ref = replace(_parse(f"{host}/{repository}"), tag=None)
    found.jobs.append((action, _target(ref, aliases)))


def _parse(text: str) -> ImageReference:
    try:  # the first component is the registry, whatever it looks like (as DUCC reads it)
        return parse_reference(f"https://{text}")
    except LazypodError as exc:
        raise NotificationError(str(exc)) from None


def _target(ref: ImageReference, aliases: Mapping[str, str]) -> Target:
    registry = aliases.get(ref.registry.lower(), ref.registry)
    return Target(registry, ref.repository, ref.tag, None if ref.tag else ref.digest)


def is_allowed(target: Target, allow: Sequence[tuple[str, str]]) -> bool:
    """Whether `target` is under one of `allow`'s (registry, repository prefix);
    a prefix matches whole path components. An empty `allow` allows everything."""
    if not allow:
        return True
    for registry, prefix in allow:
        if target.registry.lower() != registry.lower():
            continue
        if not prefix or target.repository == prefix or \
                target.repository.startswith(f"{prefix}/"):
            return True
    return False


@dataclass
class Job:
    action: Action
    target: Target | None  # None: the garbage collection
    attempts: int = 0  # failed tries so far
    not_before: float = 0.0  # monotonic time of its next try

    @property
    def key(self) -> str:
        return self.target.name if self.target is not None else _COLLECT_KEY

    def __str__(self) -> str:
        return f"{self.action} {self.target.name}" if self.target else "garbage collection"


class JobQueue:
    """Jobs waiting, coalesced by image, bounded; safe to share between threads."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._cond = threading.Condition()
        self._paused_until = 0.0
        self.running: Job | None = None
        self.done = 0
        self.dropped = 0

    def __len__(self) -> int:
        with self._cond:
            return len(self._jobs)

    def offer(self, jobs: Sequence[tuple[Action, Target]]) -> list[dict[str, str]] | None:
        """Queue a request's jobs, all or none: None when they do not fit. Says, for
        each image, whether it was queued, already waiting, or replaced an action."""
        with self._cond:
            new = {target.name for _, target in jobs} - self._jobs.keys()
            if len(self._jobs) + len(new) > self.limit:
                return None
            said = []
            for action, target in jobs:
                waiting = self._jobs.get(target.name)
                entry = {"action": action, "image": target.name, "state": "queued"}
                if waiting is not None and waiting.action == action:
                    entry["state"] = "already waiting"
                elif waiting is not None:  # keeps its place in the queue
                    entry["state"] = f"replaced {waiting.action}"
                    self._jobs[target.name] = Job(action, target)
                else:
                    self._jobs[target.name] = Job(action, target)
                said.append(entry)
            self._cond.notify_all()
            return said

    def take(self, timeout: float) -> Job | None:
        """The first job due, now the running one; None if there is none within
        `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                now = time.monotonic()
                if now >= self._paused_until:
                    for key, job in self._jobs.items():
                        if job.not_before <= now:
                            del self._jobs[key]
                            self.running = job
                            return job
                if now >= deadline:
                    return None
                due = [job.not_before for job in self._jobs.values()]
                wake = max(min(due), self._paused_until) if due else deadline
                self._cond.wait(max(0.01, min(wake, deadline) - now))

    def finish(self, job: Job, *, dropped: bool = False) -> None:
        with self._cond:
            self.running = None
            if dropped:
                self.dropped += 1
            else:
                self.done += 1

    def put_back(self, job: Job, *, pause: float = 0.0, delay: float = 0.0) -> bool:
        """Queue a job again: at the front with the whole queue paused (`pause`: the
        repository is busy), or at the end not before `delay`. False when a newer
        notification for the same image came meanwhile: that one stands instead."""
        with self._cond:
            self.running = None
            if pause:
                self._paused_until = time.monotonic() + pause
            if job.key in self._jobs:
                return False
            job.not_before = time.monotonic() + delay
            self._jobs[job.key] = job
            if pause:
                self._jobs.move_to_end(job.key, last=False)
            self._cond.notify_all()
            return True

    def schedule_collection(self) -> None:
        """A garbage collection after every removal queued so far."""
        with self._cond:
            self._jobs.pop(_COLLECT_KEY, None)
            self._jobs[_COLLECT_KEY] = Job("collect", None)
            self._cond.notify_all()

    def status(self) -> dict[str, Any]:
        with self._cond:
            return {"status": "ok", "queued": len(self._jobs),
                    "running": self.running is not None, "done": self.done,
                    "dropped": self.dropped}

    def drain(self) -> list[Job]:
        with self._cond:
            jobs = list(self._jobs.values())
            self._jobs.clear()
            return jobs


class RepositoryPublisher:
    """What the jobs do to the repository: a conversion as convert-single-image does
    it, a removal as `lazypod rm`, a collection as `lazypod gc`. `backend(create)`
    and `registry()` are called per job, as `loop` makes them per run."""

    def __init__(self, backend: Callable[[bool], Backend], registry: Callable[[], RegistryClient],
                 options: ConvertOptions, *, grace_seconds: float = 0.0, force: bool = False,
                 notifier: Notifier | None = None) -> None:
        self._backend = backend
        self._registry = registry
        self._options = options
        self._grace = grace_seconds
        self._force = force
        self._notifier = notifier or NullNotifier()

    def convert(self, ref: ImageReference) -> ImageResult:
        with self._registry() as registry:
            report = Converter(self._backend(True), registry, self._options,
                               notifier=self._notifier).convert([ref])
        for problem in report.problems:
            log.warning("%s", problem)
        result = report.images[0]
        if not result.ok:
            raise LazypodError(result.error)
        return result

    def remove(self, target: Target) -> list[str]:
        """Remove what `target` names; [] when the repository has none of it."""
        backend = self._backend(False)
        if not backend.layout.root.is_dir():
            return []
        refs = _matching(RepositoryState.load(backend.layout), target)
        return remove_images(backend, refs) if refs else []

    def collect(self) -> GarbageReport:
        return collect_garbage(self._backend(False), grace_seconds=self._grace,
                               force=self._force)


def _matching(state: RepositoryState, target: Target) -> list[ImageReference]:
    """The images a delete names: the image by tag or digest, and for a digest every
    tag of that repository whose manifest (or index) it is; for a repository, all."""
    refs: list[ImageReference] = []
    if target.tag is not None or target.digest is not None:
        ref = target.reference()
        found = state.find(ref)
        if found is not None:
            refs.append(found.reference)
        elif ref.public_name in state.unreadable:
            refs.append(ref)
    if target.tag is None:
        probe = ImageReference(target.registry, target.repository, "latest")
        for image in state.images:
            ref = image.reference
            if (ref.podman_registry, ref.repository) != \
                    (probe.podman_registry, probe.repository) or ref in refs:
                continue
            digests = {image.manifest.digest, image.index.digest if image.index else None}
            if target.digest is None or target.digest in digests:
                refs.append(ref)
    return refs


class Webhook:
    """Runs the queue's jobs, one at a time, in the calling thread (`run`)."""

    def __init__(self, queue: JobQueue, publisher: RepositoryPublisher, *, attempts: int = 3,
                 retry_delay: float = 10.0, collect_after_delete: bool = True) -> None:
        self.queue = queue
        self._publisher = publisher
        self._attempts = attempts
        self._retry_delay = retry_delay
        self._collect = collect_after_delete
        self._busy_waits = 0
        self._stop = threading.Event()

    def stop(self) -> None:
        """Let `run` return after the job it is running (from another thread)."""
        self._stop.set()

    def run(self) -> None:
        while not self._stop.is_set():
            job = self.queue.take(timeout=0.5)
            if job is not None:
                self._run(job)

    def _run(self, job: Job) -> None:
        fields = {"action": job.action, "image": job.target.name if job.target else None,
                  "attempt": job.attempts + 1}
        try:
            outcome = self._execute(job)
        except RepositoryBusy as exc:  # not the job's failure: the queue waits
            wait = min(60.0, self._retry_delay * 2 ** min(self._busy_waits, 10))
            self._busy_waits += 1
            requeued = self.queue.put_back(job, pause=wait)
            log.info("%s: %s; waiting %.1fs%s", job, exc, wait,
                     "" if requeued else " (a newer notification for it is waiting)",
                     extra={**fields, "outcome": "busy"})
            return
        except (LazypodError, OSError) as exc:
            self._busy_waits = 0
            job.attempts += 1
            why = str(exc) if isinstance(exc, LazypodError) else f"{exc.strerror or exc}"
            if job.attempts >= self._attempts:
                log.error("%s failed %d times, dropped: %s", job, job.attempts, why,
                          extra={**fields, "outcome": "dropped", "error": why})
                self.queue.finish(job, dropped=True)
                return
            delay = min(600.0, self._retry_delay * 2 ** (job.attempts - 1))
            requeued = self.queue.put_back(job, delay=delay)
            log.warning("%s failed: %s; %s", job, why,
                        f"trying again in {delay:.1f}s (attempt {job.attempts + 1} of "
                        f"{self._attempts})" if requeued else "a newer notification for it "
                        "is waiting", extra={**fields, "outcome": "retry", "error": why})
            return
        self._busy_waits = 0
        log.info("%s: %s", job, outcome, extra={**fields, "outcome": "done"})
        self.queue.finish(job)

    def _execute(self, job: Job) -> str:
        if job.action == "collect":
            report = self._publisher.collect()
            return (f"removed {len(report.layers)} layers and {len(report.flats)} flat trees "
                    f"({report.kept_in_grace} kept in the grace period)")
        assert job.target is not None
        if job.action == "push":
            ref = job.target.reference()
            result = self._publisher.convert(ref)
            if result.up_to_date:
                return f"up to date ({result.manifest_digest})"
            return (f"converted {result.manifest_digest}: {result.layers} layers, "
                    f"{result.fetched_layers} fetched ({result.fetched_bytes / 1e6:.1f} MB)")
        removed = self._publisher.remove(job.target)
        if not removed:
            return "not in the repository: nothing to remove"
        if self._collect:
            self.queue.schedule_collection()
        return f"removed {', '.join(removed)}"


class WebhookServer(ThreadingHTTPServer):
    """The HTTP side: checks the secret and the allow list, parses, offers to the
    queue. Requests are answered at once; the work is the worker's."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], queue: JobQueue, *, secret: bytes | None,
                 allow: Sequence[tuple[str, str]] = (),
                 aliases: Mapping[str, str] | None = None) -> None:
        self.queue = queue
        self.secret = secret
        self.allow = list(allow)
        self.aliases = dict(aliases or {})
        super().__init__(address, _Handler)

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """Serve in a background thread while the block runs."""
        thread = threading.Thread(target=self.serve_forever, name="webhook-http", daemon=True)
        thread.start()
        try:
            yield
        finally:
            self.shutdown()
            self.server_close()
            thread.join(5)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "lazypod-webhook"
    timeout = 30  # a client that stops sending loses its connection

    @property
    def hook(self) -> WebhookServer:
        return cast(WebhookServer, self.server)

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._answer(200, self.hook.queue.status())
        elif self.path == "/":
            self._not_post()
        else:
            self._answer(404, {"error": "POST notifications to /; GET /healthz"})

    def do_POST(self) -> None:
        if self.path != "/":
            self._answer(404, {"error": "POST notifications to /"}, close=True)
            return
        secret = self.hook.secret
        given = self.headers.get("Authorization", "").encode("latin-1", "replace")
        if secret is not None and not hmac.compare_digest(given, secret):
            log.warning("refused a notification from %s: wrong or missing Authorization",
                        self.client_address[0])
            self._answer(401, {"error": "wrong or missing Authorization header"}, close=True)
            return
        length = self.headers.get("Content-Length", "")
        if not length.isdigit():
            self._answer(411, {"error": "Content-Length required"}, close=True)
            return
        if int(length) > MAX_BODY:
            self._answer(413, {"error": f"body over {MAX_BODY} bytes"}, close=True)
            return
        self._notified(self.rfile.read(int(length)))

    def _notified(self, body: bytes) -> None:
        try:
            notification = parse_notification(body, self.hook.aliases)
        except NotificationError as exc:
            self._answer(400, {"error": str(exc)})
            return
        refused = [t.name for _, t in notification.jobs if not is_allowed(t, self.hook.allow)]
        if refused:
            log.warning("refused a notification from %s: not allowed: %s",
                        self.client_address[0], ", ".join(refused))
            self._answer(403, {"error": "not allowed (--allow)", "images": refused})
            return
        said = self.hook.queue.offer(notification.jobs)
        if said is None:
            log.warning("queue full (%d jobs): a notification is refused with 503",
                        self.hook.queue.limit)
            self._answer(503, {"error": "the queue is full"}, headers={"Retry-After": "30"})
            return
        for entry in said:
            log.info("%s %s: %s", entry["action"], entry["image"], entry["state"],
                     extra={**entry, "outcome": "queued"})
        self._answer(202, {"queued": said, "ignored": notification.ignored})

    def _not_post(self) -> None:
        self._answer(405, {"error": "POST notifications to /; GET /healthz"},
                     headers={"Allow": "POST"}, close=True)

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _not_post

    def _answer(self, status: int, body: dict[str, Any], *, close: bool = False,
                headers: Mapping[str, str] | None = None) -> None:
        data = json.dumps(body).encode() + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if close:  # the body, if any, was not read: the connection cannot be reused
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: %s %s", self.client_address[0], format % args)
