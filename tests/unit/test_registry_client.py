"""The registry client against an in-memory registry (`httpx.MockTransport`): the
bearer-token challenge flow and HTTP basic, tokens shared per repository scope,
retries of transient failures, tag-list pagination, HEAD digests, verification of
what the registry sends, and credentials that never reach a message or a log."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
from pathlib import Path

import httpx
import pytest
from helpers import HOST, REALM, FakeRegistry, Fault, basic, convert, respond, sha256, status_once

from lazypod import (
    AuthenticationFailed,
    Digest,
    ImageNotFound,
    IntegrityError,
    RegistryError,
    RegistryUnreachable,
    parse_reference,
)
from support.images import Entry, Image, image, layer

USER, PASSWORD = "alice", "s3cret-Pa55"
SECRETS = (PASSWORD, base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())


def small_image(text: bytes = b"hello") -> Image:
    return image([layer([Entry("etc/", "dir"), Entry("etc/greeting", data=text)])])


def auth_file(tmp_path: Path, user: str = USER, password: str = PASSWORD) -> Path:
    path = tmp_path / "auth.json"
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {HOST: {"auth": token}}}))
    return path


def fetch_everything(registry: FakeRegistry, name: str, **client_kwargs: object) -> bytes:
    """Manifest, config and the first layer, as a conversion asks for them."""
    with registry.client(**client_kwargs) as client:
        ref = parse_reference(name)
        resolved = client.resolve(ref)
        with client.open_blob(ref, resolved.manifest.layers[0]) as reader:
            return reader.read(-1) + reader.read(1)


# -- bearer tokens ------------------------------------------------------------------------

def test_bearer_challenge_token_and_retry() -> None:
    registry = FakeRegistry(auth="bearer")
    img = small_image()
    name = registry.push("library/app", "1", img)
    assert fetch_everything(registry, name) == img.layers[0].data
    [token_request] = registry.token_requests
    assert str(token_request.url.copy_with(query=None)) == REALM
    assert dict(token_request.url.params) == {"scope": "repository:library/app:pull",
                                              "service": HOST}
    assert "Authorization" not in token_request.headers  # anonymous: no login given
    first, second = registry.requests[:2]
    assert "Authorization" not in first.headers  # answered 401 with the challenge
    assert second.url == first.url and second.headers["Authorization"] == "Bearer token-0"
    assert all(r.url.scheme == "https" for r in registry.requests)


def test_a_token_is_asked_once_per_repository_scope() -> None:
    registry = FakeRegistry(auth="bearer")
    one = registry.push("library/one", "1", small_image(b"1"))
    two = registry.push("library/two", "1", small_image(b"2"))
    with registry.client() as client:
        for name in (one, two, one, two):
            ref = parse_reference(name)
            resolved = client.resolve(ref)
            with client.open_blob(ref, resolved.manifest.layers[0]) as reader:
                reader.drain()
    scopes = [r.url.params["scope"] for r in registry.token_requests]
    assert scopes == ["repository:library/one:pull", "repository:library/two:pull"]
    # Only the first request of each repository went without a token.
    assert sum("Authorization" not in r.headers for r in registry.requests) == 2


def test_an_expired_token_is_renewed() -> None:
    registry = FakeRegistry(auth="bearer")
    name = registry.push("library/app", "1", small_image())
    with registry.client() as client:
        ref = parse_reference(name)
        client.resolve(ref)
        registry.issued.clear()  # the registry forgets every token it gave
        client.resolve(ref)
    assert len(registry.token_requests) == 2


def test_bearer_with_a_login(tmp_path: Path) -> None:
    registry = FakeRegistry(auth="bearer", users={USER: PASSWORD})
    img = small_image()
    name = registry.push("private/app", "1", img)
    assert fetch_everything(registry, name, auth_files=[auth_file(tmp_path)]) == \
        img.layers[0].data
    assert registry.token_requests[0].headers["Authorization"] == basic(USER, PASSWORD)


def test_a_token_service_refusing_anonymous_access_asks_for_a_login() -> None:
    registry = FakeRegistry(auth="bearer", users={USER: PASSWORD})
    name = registry.push("private/app", "1", small_image())
    with pytest.raises(AuthenticationFailed, match=f"podman login {HOST}"):
        fetch_everything(registry, name)


# -- basic auth ---------------------------------------------------------------------------

def test_basic_auth(tmp_path: Path) -> None:
    registry = FakeRegistry(auth="basic", users={USER: PASSWORD})
    img = small_image()
    name = registry.push("private/app", "1", img)
    assert fetch_everything(registry, name, auth_files=[auth_file(tmp_path)]) == \
        img.layers[0].data
    assert registry.token_requests == []
    authorised = [r.headers.get("Authorization") for r in registry.requests]
    assert authorised[0] is None and set(authorised[1:]) == {basic(USER, PASSWORD)}


def test_basic_auth_without_a_login_says_how_to_log_in() -> None:
    registry = FakeRegistry(auth="basic", users={USER: PASSWORD})
    name = registry.push("private/app", "1", small_image())
    with pytest.raises(AuthenticationFailed, match=f"podman login {HOST}"):
        fetch_everything(registry, name)


@pytest.mark.parametrize("flow", ["basic", "bearer"])
def test_rejected_credentials_never_reach_messages_or_logs(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, flow: str) -> None:
    caplog.set_level(logging.DEBUG)
    registry = FakeRegistry(auth=flow, users={"bob": "other"})
    name = registry.push("private/app", "1", small_image())
    path = auth_file(tmp_path)
    with pytest.raises(AuthenticationFailed) as caught:
        fetch_everything(registry, name, auth_files=[path])
    message = str(caught.value)
    assert str(path) in message  # says which credentials were refused
    for secret in SECRETS:
        assert secret not in message
        assert secret not in repr(caught.value)
        assert secret not in caplog.text


def test_credentials_are_not_in_logs_of_a_successful_run(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    registry = FakeRegistry(auth="bearer", users={USER: PASSWORD})
    name = registry.push("private/app", "1", small_image())
    registry.faults.append(status_once(503, path_part="/manifests/"))  # a logged retry
    fetch_everything(registry, name, auth_files=[auth_file(tmp_path)])
    assert "retrying" in caplog.text
    for secret in (*SECRETS, "token-0"):
        assert secret not in caplog.text


# -- retries ------------------------------------------------------------------------------

@pytest.mark.parametrize("status", [500, 502, 503, 504, 429])
def test_transient_statuses_are_retried(status: int) -> None:
    registry = FakeRegistry()
    img = small_image()
    name = registry.push("library/app", "1", img)
    registry.faults.append(status_once(status, path_part="/manifests/", times=2))
    for blob in (img.config, img.layers[0]):
        registry.faults.append(status_once(status, path_part=blob.digest, times=2))
    assert fetch_everything(registry, name) == img.layers[0].data
    assert len(registry.paths()) == 3 * 3  # manifest, config, layer: each on the third try


def test_retry_after_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    registry = FakeRegistry()
    name = registry.push("library/app", "1", small_image())
    registry.faults.append(status_once(429, path_part="/manifests/", times=2,
                                       headers={"Retry-After": "7"}))
    fetch_everything(registry, name, retry_for=60.0)
    assert len(slept) == 2 and all(s >= 7 for s in slept)


def test_backoff_grows_exponentially(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    registry = FakeRegistry()
    name = registry.push("library/app", "1", small_image())
    registry.faults.append(status_once(503, path_part="/manifests/", times=4))
    fetch_everything(registry, name, backoff=0.5)
    assert slept == [0.5, 1.0, 2.0, 4.0]


def test_retries_stop_when_the_budget_is_spent() -> None:
    registry = FakeRegistry()
    name = registry.push("library/app", "1", small_image())
    registry.faults.append(status_once(500, times=10**6))
    started = time.monotonic()
    with pytest.raises(RegistryError, match="HTTP 500") as caught:
        fetch_everything(registry, name, backoff=0.01, retry_for=0.2)
    assert time.monotonic() - started < 2
    assert "tried for" in str(caught.value)
    assert 3 <= len(registry.requests) <= 8


def test_not_found_is_not_retried() -> None:
    registry = FakeRegistry()
    registry.push("library/app", "1", small_image())
    with pytest.raises(ImageNotFound):
        fetch_everything(registry, f"{HOST}/library/app:missing")
    assert len(registry.requests) == 1


def test_a_connection_that_fails_is_retried() -> None:
    registry = FakeRegistry()
    img = small_image()
    name = registry.push("library/app", "1", img)
    left = [2]

    def refuse(request: httpx.Request) -> httpx.Response | None:
        if left[0]:
            left[0] -= 1
            raise httpx.ConnectError("connection refused", request=request)
        return None

    registry.faults.append(refuse)
    assert fetch_everything(registry, name) == img.layers[0].data


def test_a_registry_that_never_answers_is_unreachable() -> None:
    registry = FakeRegistry()
    name = registry.push("library/app", "1", small_image())

    def refuse(request: httpx.Request) -> httpx.Response | None:
        raise httpx.ConnectError("connection refused", request=request)

    registry.faults.append(refuse)
    with pytest.raises(RegistryUnreachable, match=HOST):
        fetch_everything(registry, name, backoff=0.01, retry_for=0.1)


def test_a_small_body_that_breaks_off_is_fetched_again() -> None:
    registry = FakeRegistry()
    img = small_image()
    name = registry.push("library/app", "1", img)
    left = [1]

    def drop(request: httpx.Request) -> httpx.Response | None:
        if left[0] and img.config.digest in request.url.path:
            left[0] -= 1
            return respond(200, img.config.data, drop_after=10)
        return None

    registry.faults.append(drop)
    with registry.client() as client:
        resolved = client.resolve(parse_reference(name))
    assert resolved.config.raw == img.config.data
    assert len([p for p in registry.blob_gets() if img.config.digest in p]) == 2


def test_a_layer_stream_that_breaks_off_fails_and_the_conversion_fetches_it_again(
        tmp_path: Path) -> None:
    registry = FakeRegistry()
    img = small_image()
    name = registry.push("library/app", "1", img)
    blob = img.layers[0]

    def drop(request: httpx.Request) -> httpx.Response | None:
        if blob.digest in request.url.path:
            return respond(200, blob.data, drop_after=len(blob.data) // 2)
        return None

    registry.faults.append(drop)
    with registry.client() as client:
        ref = parse_reference(name)
        resolved = client.resolve(ref)
        # A body is never switched mid-stream: the reader says the connection dropped.
        with pytest.raises(RegistryUnreachable, match="dropped"), \
                client.open_blob(ref, resolved.manifest.layers[0]) as reader:
            reader.drain()
    registry.faults = [_once(drop)]
    convert(registry, tmp_path / "repo", name)
    assert (tmp_path / "repo" / f"{HOST}/library/app:1/etc/greeting").read_bytes() == b"hello"
    assert len([p for p in registry.blob_gets() if blob.digest in p]) == 3


def _once(fault: Fault) -> Fault:
    """`fault`, until it has answered once."""
    done = [False]

    def wrapper(request: httpx.Request) -> httpx.Response | None:
        if done[0]:
            return None
        answer = fault(request)
        if answer is not None:
            done[0] = True
        return answer

    return wrapper


# -- tags, HEAD, verification -------------------------------------------------------------

@pytest.mark.parametrize("page", [0, 1, 2, 3])
def test_tag_lists_follow_link_headers(page: int) -> None:
    registry = FakeRegistry(tag_page=page)
    tags = ["1.0", "1.1", "2.0", "latest", "rc"]
    for tag in tags:
        registry.push("library/app", tag, small_image(tag.encode()))
    with registry.client() as client:
        assert client.list_tags(parse_reference(f"{HOST}/library/app")) == tags
    pages = -(-len(tags) // page) if page else 1
    assert len(registry.paths()) == pages


def test_a_next_link_may_be_an_absolute_url() -> None:
    registry = FakeRegistry()
    answers = {
        "": (["a", "b"], f'<https://{HOST}/v2/library/app/tags/list?n=2&last=b>; rel="next"'),
        "b": (["c"], None),
    }

    def pages(request: httpx.Request) -> httpx.Response | None:
        tags, link = answers[request.url.params.get("last", "")]
        return respond(200, json.dumps({"tags": tags}).encode(), {"Link": link} if link else {})

    registry.faults.append(pages)
    with registry.client() as client:
        assert client.list_tags(parse_reference(f"{HOST}/library/app")) == ["a", "b", "c"]


def test_head_gives_the_manifest_digest_without_a_get() -> None:
    registry = FakeRegistry()
    img = small_image()
    name = registry.push("library/app", "1", img)
    with registry.client() as client:
        found = client.head_digest(parse_reference(name))
    assert found == Digest("sha256", hashlib.sha256(img.manifest).hexdigest())
    assert [r.method for r in registry.requests] == ["HEAD"]
    accept = registry.requests[0].headers["Accept"]
    assert "application/vnd.oci.image.index.v1+json" in accept
    assert "application/vnd.docker.distribution.manifest.v2+json" in accept


def test_head_without_a_digest_header_gives_none() -> None:
    registry = FakeRegistry(send_digest_header=False)
    name = registry.push("library/app", "1", small_image())
    with registry.client() as client:
        assert client.head_digest(parse_reference(name)) is None


def test_a_manifest_fetched_by_digest_must_have_that_digest() -> None:
    registry = FakeRegistry()
    img = small_image()
    registry.push("library/app", "1", img)
    repo = registry.repos["library/app"]
    raw, media = repo.manifests[img.manifest_digest]
    repo.manifests[img.manifest_digest] = (raw.replace(b'"schemaVersion": 2',
                                                       b'"schemaVersion":2'), media)
    with pytest.raises(IntegrityError, match="does not match its digest"):
        fetch_everything(registry, f"{HOST}/library/app@{img.manifest_digest}")


def test_a_corrupt_config_is_refused() -> None:
    registry = FakeRegistry()
    img = small_image()
    name = registry.push("library/app", "1", img)
    blobs = registry.repos["library/app"].blobs
    blobs[img.config.digest] = blobs[img.config.digest].replace(b"amd64", b"arm64")
    with pytest.raises(IntegrityError):
        fetch_everything(registry, name)


def test_a_corrupt_layer_fails_at_end_of_stream() -> None:
    registry = FakeRegistry()
    img = small_image()
    name = registry.push("library/app", "1", img)
    blob = img.layers[0]
    registry.repos["library/app"].blobs[blob.digest] = bytes(len(blob.data))
    with pytest.raises(IntegrityError, match=blob.digest):
        fetch_everything(registry, name)
    assert sha256(bytes(len(blob.data))) != blob.digest


def test_a_blob_redirected_to_another_host_gets_no_credentials(tmp_path: Path) -> None:
    # Registries send blobs from object stores (S3, GCS) through a redirect: the
    # registry's Authorization must not go along to that other host.
    registry = FakeRegistry(auth="bearer", users={USER: PASSWORD})
    img = small_image()
    name = registry.push("private/app", "1", img)
    blob = img.layers[0]
    storage: list[httpx.Request] = []
    serve = registry.handle

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.host == "storage.test":
            storage.append(request)
            return respond(200, blob.data)
        response = serve(request)
        if blob.digest in request.url.path and response.status_code == 200:
            return httpx.Response(307, headers={
                "Location": f"https://storage.test/{blob.digest}?signature=abc"})
        return response

    registry.handle = handle  # type: ignore[method-assign]
    assert fetch_everything(registry, name, auth_files=[auth_file(tmp_path)]) == blob.data
    [request] = storage
    assert "Authorization" not in request.headers
    assert request.url.params["signature"] == "abc"


def test_an_insecure_registry_without_tls_is_spoken_to_over_http() -> None:
    registry = FakeRegistry()
    img = small_image()
    name = registry.push("library/app", "1", img)
    serve = registry.handle

    def plain_http_only(request: httpx.Request) -> httpx.Response:
        if request.url.scheme == "https":
            raise httpx.ConnectError("wrong version number", request=request)
        return serve(request)

    registry.handle = plain_http_only  # type: ignore[method-assign]
    assert fetch_everything(registry, name, insecure=[HOST]) == img.layers[0].data
    assert {r.url.scheme for r in registry.requests} == {"http"}
    # A registry not declared insecure is never spoken to over plain HTTP.
    registry.requests.clear()
    with pytest.raises(RegistryUnreachable, match=f"--insecure-registry {HOST}"):
        fetch_everything(registry, name)
    assert registry.requests == []


def test_a_wildcard_converts_every_matching_tag_across_pages(tmp_path: Path) -> None:
    registry = FakeRegistry(tag_page=2)
    for tag in ("1.0", "1.1", "1.2", "2.0", "latest"):
        registry.push("library/app", tag, small_image(tag.encode()))
    report = convert(registry, tmp_path / "repo", f"{HOST}/library/app:1.*")
    assert sorted(str(i.reference) for i in report.images) == [
        f"{HOST}/library/app:1.0", f"{HOST}/library/app:1.1", f"{HOST}/library/app:1.2"]
    assert (tmp_path / f"repo/{HOST}/library/app:1.2/etc/greeting").read_bytes() == b"1.2"
    assert not (tmp_path / f"repo/{HOST}/library/app:2.0").exists()


def test_a_malformed_tag_list_is_an_error() -> None:
    registry = FakeRegistry()
    registry.faults.append(lambda request: respond(200, b"<html>not json</html>"))
    with registry.client() as client, pytest.raises(RegistryError, match="malformed tag list"):
        client.list_tags(parse_reference(f"{HOST}/library/app"))


def test_a_ducc_login_is_used_and_never_shown(caplog: pytest.LogCaptureFixture) -> None:
    from lazypod.ducc_env import ducc_registries
    from lazypod.routes import Routes

    caplog.set_level(logging.DEBUG)
    env = {"DUCC_AUTH_REGISTRIES": "lab", "DUCC_lab_IDENT": HOST,
           "DUCC_lab_USER": USER, "DUCC_lab_PASS": PASSWORD}
    registry = FakeRegistry(auth="bearer", users={USER: PASSWORD})
    img = small_image()
    name = registry.push("private/app", "1", img)
    routes = Routes(ducc_registries(env))
    assert fetch_everything(registry, name, routes=routes) == img.layers[0].data
    assert registry.token_requests[0].headers["Authorization"] == basic(USER, PASSWORD)

    registry.users = {USER: "changed"}
    registry.issued.clear()
    with pytest.raises(AuthenticationFailed) as caught:
        fetch_everything(registry, name, routes=Routes(ducc_registries(env)))
    assert "$DUCC_lab_USER and $DUCC_lab_PASS" in str(caught.value)
    for secret in SECRETS:
        assert secret not in str(caught.value) and secret not in caplog.text


def test_the_token_may_come_as_access_token() -> None:
    registry = FakeRegistry(auth="bearer")
    img = small_image()
    name = registry.push("library/app", "1", img)
    serve = registry.handle

    def oauth_style(request: httpx.Request) -> httpx.Response:
        response = serve(request)
        if request.url.host == "auth.test":
            token = json.loads(response.read())["token"]
            return httpx.Response(200, json={"access_token": token, "expires_in": 300})
        return response

    registry.handle = oauth_style  # type: ignore[method-assign]
    assert fetch_everything(registry, name) == img.layers[0].data
