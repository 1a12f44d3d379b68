"""`lazypod webhook`: the real command on a loopback port, notifications of both
formats (tests/data/webhook, shaped as Harbor and docker-registry send them), the
real registry, and the systemd units that run it and `loop`."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import httpx
import pytest

from conftest import LAZYPOD, Lazypod
from lazypod.webhook import parse_notification
from support.images import Entry, Image, busybox_entries, image, layer
from support.registry import Registry, free_port

pytestmark = [pytest.mark.registry]

DATA = Path(__file__).parent / "data" / "webhook"
UNITS = Path(__file__).parent.parent / "contrib" / "systemd"
SECRET = "Bearer lazypod-test-4f9a1c"


def payload(name: str, **values: str) -> bytes:
    """A fixture with its {{PLACEHOLDERS}} filled in."""
    text = (DATA / name).read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    assert "{{" not in text, f"{name}: a placeholder is left"
    return text.encode()


def harbor(name: str, host: str, repository: str, tag: str = "1", digest: str = "sha256:" + "0"
           * 64) -> bytes:
    namespace, _, short = repository.rpartition("/")
    return payload(name, HOST=host, NAMESPACE=namespace, NAME=short, TAG=tag, DIGEST=digest)


def distribution(name: str, host: str, repository: str, img: Image, tag: str = "1") -> bytes:
    return payload(name, HOST=host, REPOSITORY=repository, TAG=tag, DIGEST=img.manifest_digest,
                   LAYER_DIGEST=img.layers[0].digest, CONFIG_DIGEST=img.config_digest)


class Hook:
    """One `lazypod --log-format json webhook` process, its HTTP side and its log."""

    def __init__(self, lazypod: Lazypod, repo: Path, workdir: Path, *extra: str,
                 port: int | None = None, auth: str = "file",
                 env: dict[str, str] | None = None, argv: list[str] | None = None) -> None:
        """`auth`: the secret SECRET from a file, from the environment (`env`), or
        "none" (--no-auth); `argv`: a command line of one's own instead."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"webhook-{self.port}.log"
        if argv is None:
            secret_file = workdir / "webhook.secret"
            secret_file.write_text(SECRET + "\n")
            secret_file.chmod(0o600)
            flags = {"file": ["--secret-file", str(secret_file)], "env": [],
                     "none": ["--no-auth"]}[auth]
            argv = [LAZYPOD, "--log-format", "json", "webhook", str(repo), "--listen",
                    f"127.0.0.1:{self.port}", *flags, "--retry-delay", "0.2", "--retry-for",
                    "0", *extra]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(argv, env=env or lazypod.env, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"{self.url}/healthz", timeout=1)
                return
            except httpx.TransportError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.proc.kill()
                    raise AssertionError(f"the webhook did not start:\n{self.text()}") from None
                time.sleep(0.05)

    def post(self, body: bytes, *, secret: str | None = SECRET, **kw: Any) -> httpx.Response:
        headers = {"Content-Type": "application/json"}
        if secret is not None:
            headers["Authorization"] = secret
        return httpx.post(f"{self.url}/", content=body, headers=headers, timeout=10, **kw)

    def health(self) -> dict[str, Any]:
        resp = httpx.get(f"{self.url}/healthz", timeout=5)
        assert resp.status_code == 200
        return dict(resp.json())

    def wait(self, *, done: int = 0, dropped: int = 0, timeout: float = 120) -> dict[str, Any]:
        """Until `done` jobs succeeded and `dropped` were given up, and nothing is left."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            health = self.health()
            if health["done"] >= done and health["dropped"] >= dropped and \
                    not health["queued"] and not health["running"]:
                return health
            time.sleep(0.05)
        raise AssertionError(f"the webhook is not done: {self.health()}\n{self.text()}")

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(predicate(record) for record in self.logs()):
                return
            time.sleep(0.02)
        raise AssertionError(f"no such log record:\n{self.text()}")

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def logs(self) -> list[dict[str, Any]]:
        records = []
        for line in self.text().splitlines():
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
        return records

    def outcomes(self, outcome: str) -> list[dict[str, Any]]:
        return [r for r in self.logs() if r.get("outcome") == outcome]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


@pytest.fixture()
def hooks(lazypod: Lazypod, tmp_path: Path) -> Iterator[Callable[..., Hook]]:
    started: list[Hook] = []

    def start(repo: Path, *extra: str, **kw: Any) -> Hook:
        hook = Hook(lazypod, repo, tmp_path / "webhook", *extra, **kw)
        started.append(hook)
        return hook

    yield start
    for hook in started:
        if hook.proc.poll() is None:
            hook.proc.kill()
            hook.proc.wait()


@contextlib.contextmanager
def repository_lock(repo: Path) -> Iterator[None]:
    """Hold the repository's lock as a converting lazypod (a `loop` run) holds it."""
    repo.mkdir(parents=True, exist_ok=True)
    fd = os.open(repo / ".lazypod.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.pwrite(fd, b"4242\n", 0)
        yield
    finally:
        os.close(fd)


def names_in(lazypod: Lazypod, repo: Path) -> list[str]:
    out = lazypod("ls", "--json", str(repo)).stdout
    return [json.loads(line)["name"] for line in out.splitlines()]


def layer_dirs(repo: Path, img: Image) -> list[Path]:
    return [repo / ".layers" / blob.digest[7:9] / blob.digest[7:] for blob in img.layers]


def unique_image(label: str) -> Image:
    return image([layer(busybox_entries()), layer([Entry("hook", data=f"{label}\n".encode())])],
                 label=label)


# -- both formats, end to end ---------------------------------------------------------

def test_harbor_push_is_converted_and_harbor_delete_removes_the_image_and_its_layers(
    registry, lazypod, repo, hooks
):
    img = unique_image("harbor")
    name = registry.push("hook/harbor", "1", img)
    hook = hooks(repo, "--insecure-registry", registry.host)

    resp = hook.post(harbor("harbor_push.json", registry.host, "hook/harbor",
                            digest=img.manifest_digest))
    assert resp.status_code == 202
    assert resp.json() == {"queued": [{"action": "push", "image": name, "state": "queued"}],
                           "ignored": []}
    hook.wait(done=1)

    assert names_in(lazypod, repo) == [name]
    stored = repo / ".metadata" / registry.host / "hook/harbor:1"
    assert (stored / "manifest.json").read_bytes() == img.manifest
    assert all(d.is_dir() for d in layer_dirs(repo, img))
    assert (repo / registry.host / "hook/harbor:1").is_symlink()
    lazypod("check", str(repo))

    resp = hook.post(harbor("harbor_delete.json", registry.host, "hook/harbor",
                            digest=img.manifest_digest))
    assert resp.status_code == 202
    assert resp.json()["queued"] == [{"action": "delete", "image": name, "state": "queued"}]
    hook.wait(done=3)  # the delete, then the garbage collection it asks for

    assert names_in(lazypod, repo) == []
    assert not stored.exists()
    assert not (repo / registry.host / "hook/harbor:1").is_symlink()
    assert not any(d.exists() for d in layer_dirs(repo, img))
    lazypod("check", str(repo))
    assert [(r["action"], r["image"]) for r in hook.outcomes("done")] == [
        ("push", name), ("delete", name), ("collect", None)]
    collected = hook.outcomes("done")[-1]["message"]
    assert "removed 2 layers" in collected


def test_distribution_envelope_converts_the_tagged_manifest_and_ignores_blobs_and_pulls(
    registry, lazypod, repo, hooks
):
    img = unique_image("distribution")
    name = registry.push("hook/dist", "1", img)
    hook = hooks(repo, "--insecure-registry", registry.host)

    resp = hook.post(distribution("distribution_push.json", registry.host, "hook/dist", img))
    assert resp.status_code == 202
    body = resp.json()
    assert body["queued"] == [{"action": "push", "image": name, "state": "queued"}]
    assert len(body["ignored"]) == 3  # the config and layer pushes, the pull
    assert any(i.startswith("pull of hook/dist") for i in body["ignored"])
    hook.wait(done=1)
    assert names_in(lazypod, repo) == [name]
    lazypod("check", str(repo))

    # docker-registry's own shape of a manifest delete: by digest, then per tag.
    resp = hook.post(distribution("distribution_delete.json", registry.host, "hook/dist", img))
    assert resp.status_code == 202
    assert [q["image"] for q in resp.json()["queued"]] == [
        f"{registry.host}/hook/dist@{img.manifest_digest}", name]
    hook.wait(done=4)
    assert names_in(lazypod, repo) == []
    assert not any(d.exists() for d in layer_dirs(repo, img))
    lazypod("check", str(repo))
    done = hook.outcomes("done")
    assert f"removed {name}" in done[1]["message"]
    assert "nothing to remove" in done[2]["message"]


def test_a_registry_configured_to_notify_gets_its_pushes_converted_and_deletes_removed(
    tmp_path, lazypod, repo, hooks
):
    port = free_port()
    (tmp_path / "notifying").mkdir()
    notifying = Registry(tmp_path / "notifying", notifications=(
        "  endpoints:\n"
        "    - name: lazypod\n"
        f"      url: http://127.0.0.1:{port}/\n"
        "      headers:\n"
        f"        Authorization: [{SECRET}]\n"
        "      timeout: 5s\n"
        "      threshold: 3\n"
        "      backoff: 1s\n"))
    try:
        hook = hooks(repo, "--insecure-registry", notifying.host, port=port)
        img = unique_image("notified")
        name = notifying.push("hook/notified", "1", img)
        hook.wait(done=1)
        assert names_in(lazypod, repo) == [name]
        assert (repo / ".metadata" / notifying.host / "hook/notified:1" /
                "manifest.json").read_bytes() == img.manifest
        lazypod("check", str(repo))

        with httpx.Client(base_url=f"http://{notifying.host}") as client:
            deleted = client.delete(f"/v2/hook/notified/manifests/{img.manifest_digest}")
        assert deleted.status_code == 202
        hook.wait(done=4)  # the digest's delete, the tag's, the collection
        assert names_in(lazypod, repo) == []
        assert not any(d.exists() for d in layer_dirs(repo, img))
        lazypod("check", str(repo))
        # Blob pushes and the pulls of the conversion itself were notified too: ignored.
        jobs = [(r["action"], r["image"]) for r in hook.outcomes("queued")]
        assert jobs == [("push", name), ("delete", f"{notifying.host}/hook/notified@"
                                                   f"{img.manifest_digest}"), ("delete", name)]
    finally:
        notifying.stop()


def test_what_each_notification_asks_for():
    """Pure parsing: no process, no registry."""
    host, digest = "harbor.example.org", "sha256:" + "ab" * 32
    img = unique_image("parsed")

    def jobs(body: bytes, **aliases: str) -> list[tuple[str, str]]:
        return [(a, t.name) for a, t in parse_notification(body, aliases).jobs]

    assert jobs(harbor("harbor_push.json", host, "library/busybox")) == [
        ("push", f"{host}/library/busybox:1")]
    assert jobs(harbor("harbor_delete.json", host, "library/busybox", tag="v2")) == [
        ("delete", f"{host}/library/busybox:v2")]
    assert jobs(harbor("harbor_cloudevents_push_by_digest.json", host, "a/b",
                       digest=digest)) == [("push", f"{host}/a/b@{digest}")]
    replication = parse_notification(harbor("harbor_replication.json", host, "a/b"))
    assert replication.jobs == [] and replication.ignored == ["Harbor event REPLICATION"]
    assert jobs(distribution("distribution_push.json", "reg:5000", "a/b", img)) == [
        ("push", "reg:5000/a/b:1")]
    assert jobs(distribution("distribution_delete.json", "reg:5000", "a/b", img)) == [
        ("delete", f"reg:5000/a/b@{img.manifest_digest}"), ("delete", "reg:5000/a/b:1")]
    # Aliases fold host names whatever their case; Docker Hub's names are podman's.
    pushed = distribution("distribution_push.json", "REG-0.internal:5000", "a/b", img)
    assert jobs(pushed, **{"reg-0.internal:5000": "registry.example.org"}) == [
        ("push", "registry.example.org/a/b:1")]
    assert jobs(harbor("harbor_push.json", "docker.io", "library/busybox")) == [
        ("push", "docker.io/library/busybox:1")]
    # distribution 3's repository delete names every image of the repository.
    repo_delete = {"events": [{"action": "delete", "target": {"repository": "a/b"},
                               "request": {"host": "reg:5000"}}]}
    assert jobs(json.dumps(repo_delete).encode()) == [("delete", "reg:5000/a/b")]
    # A plain-HTTP scheme in the payload does not reach the reference.
    http = parse_notification(json.dumps({"type": "PUSH_ARTIFACT", "event_data": {
        "resources": [{"resource_url": "http://reg:5000/a/b:1"}]}}).encode())
    assert http.jobs[0][1].reference().scheme is None


# -- the secret ------------------------------------------------------------------------

def test_a_wrong_or_missing_secret_is_refused_and_queues_nothing(registry, repo, hooks):
    hook = hooks(repo, "--insecure-registry", registry.host)
    body = harbor("harbor_push.json", registry.host, "hook/unauthorised")
    for secret in (None, "", "wrong", SECRET + "x", SECRET.lower(), SECRET[:-1],
                   SECRET.replace(" ", "  ")):
        resp = hook.post(body, secret=secret)
        assert resp.status_code == 401, secret
        assert "Authorization" in resp.json()["error"]
    time.sleep(0.3)
    assert hook.health() == {"status": "ok", "queued": 0, "running": False, "done": 0,
                             "dropped": 0}
    assert not repo.exists()
    assert len([r for r in hook.logs() if "wrong or missing Authorization" in r["message"]]) == 7
    # The right one is accepted (a pull: nothing to do).
    pull = {"events": [{"action": "pull", "target": {"repository": "hook/x"}}]}
    assert hook.post(json.dumps(pull).encode()).status_code == 202


def test_the_webhook_refuses_to_start_without_a_secret(lazypod, repo, tmp_path):
    env = {k: v for k, v in lazypod.env.items() if k != "LAZYPOD_WEBHOOK_SECRET"}
    listen = f"127.0.0.1:{free_port()}"
    empty = tmp_path / "empty.secret"
    empty.write_text("\n")
    for extra in ([], ["--secret-file", str(empty)],
                  ["--secret-file", str(tmp_path / "missing.secret")]):
        proc = subprocess.run([LAZYPOD, "webhook", str(repo), "--listen", listen, *extra],
                              env=env, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 1, proc.stderr
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("lazypod: error: "), proc.stderr
        assert "secret" in lines[0]
    assert not repo.exists()


def test_the_secret_from_the_environment_and_no_auth(lazypod, repo, hooks):
    pull = json.dumps({"events": [{"action": "pull", "target": {"repository": "a/b"}}]}).encode()
    without = {k: v for k, v in lazypod.env.items() if k != "LAZYPOD_WEBHOOK_SECRET"}

    from_env = hooks(repo, auth="env", env={**without, "LAZYPOD_WEBHOOK_SECRET": SECRET})
    assert from_env.post(pull).status_code == 202
    assert from_env.post(pull, secret=None).status_code == 401
    assert from_env.stop() == 0

    anyone = hooks(repo, auth="none", env=without)
    assert any("--no-auth" in r["message"] and r["level"] == "WARNING" for r in anyone.logs())
    assert anyone.post(pull, secret=None).status_code == 202
    assert anyone.stop() == 0

    both = subprocess.run([LAZYPOD, "webhook", str(repo), "--no-auth"], capture_output=True,
                          text=True, timeout=30, env={**without, "LAZYPOD_WEBHOOK_SECRET": "x"})
    assert both.returncode == 2 and "choose one" in both.stderr


# -- the queue ------------------------------------------------------------------------

def test_pushes_of_an_image_waiting_for_a_busy_repository_are_converted_once(
    registry, lazypod, repo, hooks
):
    img = unique_image("coalesced")
    name = registry.push("hook/coalesced", "1", img)
    body = harbor("harbor_push.json", registry.host, "hook/coalesced")
    with repository_lock(repo):  # a `loop` run is publishing
        hook = hooks(repo, "--insecure-registry", registry.host, "--retry-delay", "2")
        assert hook.post(body).json()["queued"][0]["state"] == "queued"
        hook.wait_for(lambda r: r.get("outcome") == "busy")
        assert hook.health()["queued"] == 1  # waiting at the head of the queue
        states = [hook.post(body).json()["queued"][0]["state"] for _ in range(9)]
        assert states == ["already waiting"] * 9
        assert hook.health()["queued"] == 1
        mark = registry.mark()
    hook.wait(done=1)

    assert sorted(registry.blob_gets(since=mark)) == sorted(
        [img.config_digest, *(b.digest for b in img.layers)])
    assert [(r["action"], r["image"]) for r in hook.outcomes("done")] == [("push", name)]
    assert "converted" in hook.outcomes("done")[0]["message"]
    assert hook.outcomes("retry") == [] and hook.outcomes("dropped") == []
    assert names_in(lazypod, repo) == [name]
    lazypod("check", str(repo))


def test_the_newest_action_for_a_waiting_image_wins(registry, lazypod, repo, hooks):
    img = unique_image("flipflop")
    name = registry.push("hook/flipflop", "1", img)
    push = harbor("harbor_push.json", registry.host, "hook/flipflop")
    delete = harbor("harbor_delete.json", registry.host, "hook/flipflop")
    with repository_lock(repo):
        hook = hooks(repo, "--insecure-registry", registry.host, "--retry-delay", "2")
        assert hook.post(push).json()["queued"][0]["state"] == "queued"
        hook.wait_for(lambda r: r.get("outcome") == "busy")
        said = [hook.post(body).json()["queued"][0]["state"] for body in (delete, push, delete)]
        assert said == ["replaced push", "replaced delete", "replaced push"]
        assert hook.health()["queued"] == 1
        mark = registry.mark()
    hook.wait(done=1)
    assert [(r["action"], r["image"]) for r in hook.outcomes("done")] == [("delete", name)]
    assert registry.blob_gets(since=mark) == []
    assert not (repo / ".metadata").exists()


def test_a_full_queue_answers_503_and_sigterm_drops_what_waits(registry, repo, hooks):
    def push(repository: str) -> httpx.Response:
        return hook.post(harbor("harbor_push.json", registry.host, repository))

    with repository_lock(repo):
        hook = hooks(repo, "--insecure-registry", registry.host, "--queue-size", "2",
                     "--retry-delay", "2")
        assert push("hook/first").status_code == 202
        hook.wait_for(lambda r: r.get("outcome") == "busy")
        assert push("hook/second").status_code == 202
        full = push("hook/third")
        assert full.status_code == 503
        assert int(full.headers["Retry-After"]) > 0
        again = push("hook/first")  # already waiting: needs no room
        assert again.status_code == 202
        assert again.json()["queued"][0]["state"] == "already waiting"
        assert hook.health()["queued"] == 2

        assert hook.stop() == 0
    stopping = [r for r in hook.logs() if r["message"].startswith("stopping")]
    assert len(stopping) == 1
    assert "2 waiting jobs dropped" in stopping[0]["message"]
    assert f"push {registry.host}/hook/second:1" in stopping[0]["message"]
    assert sorted(os.listdir(repo)) == [".lazypod.lock"]


def test_a_failing_job_is_tried_attempts_times_then_dropped(registry, repo, hooks):
    hook = hooks(repo, "--insecure-registry", registry.host, "--attempts", "3")
    missing = f"{registry.host}/hook/missing:1"
    assert hook.post(harbor("harbor_push.json", registry.host, "hook/missing")).status_code == 202
    hook.wait(dropped=1)
    retries = hook.outcomes("retry")
    assert [r["attempt"] for r in retries] == [1, 2]
    dropped = hook.outcomes("dropped")
    assert len(dropped) == 1 and dropped[0]["level"] == "ERROR"
    assert dropped[0]["image"] == missing and dropped[0]["attempt"] == 3
    assert "not found in registry" in dropped[0]["error"]
    assert hook.health()["done"] == 0
    assert not (repo / ".metadata").exists()
    # It goes on taking notifications.
    assert hook.post(harbor("harbor_replication.json", registry.host, "hook/x")).json() == {
        "queued": [], "ignored": ["Harbor event REPLICATION"]}


# -- what is refused ----------------------------------------------------------------------

def test_allow_refuses_images_outside_with_403(registry, lazypod, repo, hooks):
    img = unique_image("allowed")
    name = registry.push("hook/allowed/inner", "1", img)
    hook = hooks(repo, "--insecure-registry", registry.host,
                 "--allow", f"{registry.host}/hook/allowed")
    for host, repository in ((registry.host, "hook/other"), ("evil.example.org", "hook/allowed"),
                             (registry.host, "hook/allowedx"), (registry.host, "other/hook")):
        resp = hook.post(harbor("harbor_push.json", host, repository))
        assert resp.status_code == 403, (host, repository)
        assert resp.json()["images"] == [f"{host}/{repository}:1"]
    mixed = json.loads(distribution("distribution_push.json", registry.host, "hook/other", img))
    inside = json.loads(distribution("distribution_push.json", registry.host,
                                     "hook/allowed/inner", img))
    mixed["events"] += inside["events"]
    assert hook.post(json.dumps(mixed).encode()).status_code == 403
    time.sleep(0.3)
    assert hook.health()["queued"] == 0 and hook.health()["done"] == 0

    resp = hook.post(harbor("harbor_push.json", registry.host, "hook/allowed/inner"))
    assert resp.status_code == 202
    hook.wait(done=1)
    assert names_in(lazypod, repo) == [name]


def test_registry_alias_names_the_registry_as_clients_see_it(registry, lazypod, repo, hooks):
    img = unique_image("aliased")
    name = registry.push("hook/aliased", "1", img)
    hook = hooks(repo, "--insecure-registry", registry.host, "--allow", registry.host,
                 "--registry-alias", f"registry-0.internal:5000={registry.host}")
    body = distribution("distribution_push.json", "registry-0.internal:5000", "hook/aliased", img)
    resp = hook.post(body)
    assert resp.status_code == 202
    assert resp.json()["queued"][0]["image"] == name
    hook.wait(done=1)
    assert names_in(lazypod, repo) == [name]


def test_malformed_requests(registry, repo, hooks):
    hook = hooks(repo)
    for body in (b"{not json", b"[]", b'{"foo": 1}', b'{"type": "PUSH_ARTIFACT", '
                 b'"event_data": {}}', b'{"events": [{"action": "push"}]}',
                 harbor("harbor_push.json", registry.host, "hook/UPPER")):
        resp = hook.post(body)
        assert resp.status_code == 400, body
        assert resp.json()["error"]
    resp = httpx.get(f"{hook.url}/", timeout=5)
    assert resp.status_code == 405 and resp.headers["Allow"] == "POST"
    assert httpx.put(f"{hook.url}/", content=b"{}", timeout=5).status_code == 405
    assert httpx.delete(f"{hook.url}/", timeout=5).status_code == 405
    assert httpx.post(f"{hook.url}/other", content=b"{}", headers={"Authorization": SECRET},
                      timeout=5).status_code == 404
    # Over 1 MiB: refused on its Content-Length, before the body is read.
    with socket.create_connection(("127.0.0.1", hook.port), timeout=10) as conn:
        conn.sendall(f"POST / HTTP/1.1\r\nHost: x\r\nAuthorization: {SECRET}\r\n"
                     f"Content-Length: {(1 << 20) + 1}\r\n\r\n{{".encode())
        answer = conn.recv(4096).decode()
    assert answer.startswith("HTTP/1.1 413 ")
    big = b'{"events": [], "pad": "' + b"x" * (1 << 20) + b'"}'
    with contextlib.suppress(httpx.TransportError):  # it may close before all is sent
        assert hook.post(big).status_code == 413
    assert hook.health() == {"status": "ok", "queued": 0, "running": False, "done": 0,
                             "dropped": 0}


# -- stopping -------------------------------------------------------------------------

def test_sigterm_when_idle_exits_0(repo, hooks):
    hook = hooks(repo)
    started = time.monotonic()
    assert hook.stop() == 0
    assert time.monotonic() - started < 5
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{hook.url}/healthz", timeout=2)


def test_sigterm_during_a_conversion_abandons_it_cleanly_and_exits_0(
    registry, proxy, lazypod, repo, hooks
):
    big = layer([Entry(f"data/{i}", data=os.urandom(64 * 1024)) for i in range(64)])
    img = image([layer(busybox_entries()), big], label="hook-killed")
    registry.push("hook/killed", "1", img)
    proxy.faults.slow[big.digest] = 0.05  # about 3 s for the big layer
    hook = hooks(repo, "--insecure-registry", proxy.host)
    assert hook.post(harbor("harbor_push.json", proxy.host, "hook/killed")).status_code == 202
    deadline = time.monotonic() + 30
    while not any((repo / ".lazypod-staging").glob("*/*layer-*/layerfs/data/*")):
        assert time.monotonic() < deadline, hook.text()
        time.sleep(0.02)
    assert hook.stop() == 0
    stopping = [r for r in hook.logs() if r["message"].startswith("stopping")]
    assert f"push {proxy.host}/hook/killed:1 abandoned" in stopping[0]["message"]
    assert not (repo / ".lazypod-staging").exists()
    assert not repo.exists() or not (repo / ".metadata").exists()


# -- the systemd units --------------------------------------------------------------------

UNIT_KEYS = {
    "Unit": {"Description", "Wants", "After"},
    "Service": {"Type", "EnvironmentFile", "ExecStart", "Restart", "RestartSec", "KillMode",
                "KillSignal", "TimeoutStopSec", "UMask", "Nice", "LockPersonality",
                "RestrictRealtime", "SystemCallArchitectures"},
    "Install": {"WantedBy"},
}
# Each would give the service its own mount namespace (cvmfs_server's remounts would
# not reach the host), or forbid the setuid helper and setuid files a publisher needs.
FORBIDDEN = {"ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateMounts", "PrivateDevices",
             "ReadWritePaths", "ReadOnlyPaths", "InaccessiblePaths", "NoNewPrivileges",
             "RestrictSUIDSGID", "ProtectClock", "DeviceAllow", "DynamicUser", "PrivateUsers",
             "ProtectKernelModules", "ProtectKernelTunables", "ProtectControlGroups"}


def parse_unit(path: Path) -> dict[str, dict[str, str]]:
    """systemd's unit syntax: [Section], Key=Value, # and ; comments, \\ continuations."""
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    pending = ""
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        header = re.fullmatch(r"\[([A-Za-z]+)\]", line)
        if header:
            current = sections.setdefault(header[1], {})
            continue
        match = re.fullmatch(r"([A-Za-z]+)=(.*)", line)
        assert match and current is not None, f"{path.name}:{number}: not Key=Value: {raw!r}"
        key, value = match.groups()
        assert key not in current, f"{path.name}:{number}: {key} twice"
        current[key] = value
    assert not pending, f"{path.name}: ends in a continuation"
    return sections


def parse_env(path: Path) -> dict[str, str]:
    env = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), raw
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key] = value
    return env


def expand(command: str, env: dict[str, str]) -> list[str]:
    """ExecStart's expansion: ${VAR} is one word, a word that is $VAR alone is split at
    whitespace (and vanishes when empty)."""
    words: list[str] = []
    for word in shlex.split(command):
        alone = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if alone:
            words += env[alone[1]].split()
            continue
        assert not re.search(r"\$(?!\{)", word), f"unbraced variable inside a word: {word}"
        words.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env[m[1]], word))
    return words


def sample_env(tmp_path: Path) -> dict[str, str]:
    """The sample settings, with paths that exist here."""
    env = parse_env(UNITS / "lazypod.env")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("version: 1\nuser: u\ncvmfs_repo: unpacked.example.org\n"
                      "input:\n  - 'https://registry.example.org/a/b:1'\n")
    secret = tmp_path / "webhook.secret"
    secret.write_text(SECRET + "\n")
    env.update(LAZYPOD_RECIPE=str(recipe), LAZYPOD_REPOSITORY=str(tmp_path / "repo"),
               LAZYPOD_WEBHOOK_SECRET_FILE=str(secret), LAZYPOD_CACHE_DIR=str(tmp_path / "cache"),
               LAZYPOD_WEBHOOK_LISTEN=f"127.0.0.1:{free_port()}")
    return env


def units() -> dict[str, dict[str, dict[str, str]]]:
    return {path.name: parse_unit(path) for path in sorted(UNITS.glob("*.service"))}


def test_the_units_say_what_a_publisher_needs():
    found = units()
    assert set(found) == {"lazypod-loop.service", "lazypod-webhook.service"}
    env = parse_env(UNITS / "lazypod.env")
    for name, unit in found.items():
        for section, keys in unit.items():
            assert set(keys) <= UNIT_KEYS[section], (name, set(keys) - UNIT_KEYS[section])
            assert not set(keys) & FORBIDDEN, (name, set(keys) & FORBIDDEN)
        service = unit["Service"]
        assert service["EnvironmentFile"] == "/etc/lazypod/lazypod.env"
        assert service["Restart"] == "on-failure"
        assert service["KillMode"] == "mixed" and service["KillSignal"] == "SIGTERM"
        assert re.fullmatch(r"\d+min", service["TimeoutStopSec"])
        assert int(service["TimeoutStopSec"][:-3]) >= 10
        assert unit["Install"]["WantedBy"] == "multi-user.target"
        words = shlex.split(service["ExecStart"])
        assert words[:3] == ["/usr/local/bin/lazypod", "--log-format", "json"]
        for variable in re.findall(r"\$\{?([A-Za-z_]+)", service["ExecStart"]):
            assert variable in env, (name, variable)


@pytest.mark.parametrize("unit", ["lazypod-loop.service", "lazypod-webhook.service"])
def test_the_units_command_lines_parse_as_lazypod_commands(unit, tmp_path):
    from lazypod.cli import main
    from lazypod.cli.app import COMMANDS  # commands are loaded when named

    argv = expand(units()[unit]["Service"]["ExecStart"], sample_env(tmp_path))
    assert Path(argv[0]).name == "lazypod"
    at = next(i for i, word in enumerate(argv) if word in COMMANDS)
    name, rest = argv[at], argv[at + 1:]
    assert name == unit.split("-")[1].split(".")[0]
    with main.make_context("lazypod", argv[1:at + 1]) as ctx:
        assert ctx.params["log_format"] == "json"
        command = main.get_command(ctx, name)
        assert command is not None
        sub = command.make_context(name, rest, parent=ctx)
    assert sub.params["repository"] == str(tmp_path / "repo")
    if name == "loop":
        assert sub.params["interval"] == 600 and sub.params["attempts"] == 2
    else:
        assert sub.params["secret_file"] == tmp_path / "webhook.secret"
        assert sub.params["attempts"] == 3 and sub.params["queue_size"] == 1000
    with pytest.raises(click.UsageError):  # the parse has teeth
        command.make_context(name, [*rest, "--no-such-option"], parent=ctx)


def test_the_webhook_unit_command_line_runs(lazypod, tmp_path, hooks):
    env = sample_env(tmp_path)
    argv = expand(units()["lazypod-webhook.service"]["Service"]["ExecStart"], env)
    hook = hooks(Path(env["LAZYPOD_REPOSITORY"]), port=int(env["LAZYPOD_WEBHOOK_LISTEN"]
                                                            .rsplit(":", 1)[1]),
                 argv=[LAZYPOD, *argv[1:]], env={**lazypod.env, **env})
    pull = json.dumps({"events": [{"action": "pull", "target": {"repository": "a/b"}}]})
    assert hook.post(pull.encode()).status_code == 202
    assert hook.post(pull.encode(), secret="wrong").status_code == 401
    assert hook.stop() == 0
    assert all("level" in record for record in hook.logs())  # --log-format json


def test_systemd_analyze_verifies_the_units(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed; the units are still parsed and "
                    "their command lines checked by the tests above")
    for path in UNITS.glob("*.service"):  # verify wants the executable to exist
        text = path.read_text().replace("/usr/local/bin/lazypod", LAZYPOD)
        (tmp_path / path.name).write_text(text)
    proc = subprocess.run([analyze, "verify", *sorted(map(str, tmp_path.glob("*.service")))],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "" and proc.stdout.strip() == "", proc.stderr + proc.stdout
