"""Routes: DUCC's environment and registries.conf mirrors, parsed, chosen and followed
(the registry answers come from httpx.MockTransport: the logic, not the network)."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import pytest

from lazypod import (
    AuthenticationFailed,
    ImageNotFound,
    LazypodError,
    RegistryClient,
    parse_reference,
)
from lazypod.ducc_env import DuccRegistry, ducc_registries
from lazypod.registry_conf import (
    Mirror,
    RegistryConfigError,
    RegistryNamespace,
    read_registries_conf,
)
from lazypod.routes import Routes
from support.images import Entry, image, layer

SECRET = "pa55-Word-never-shown"
H = "b" * 64


# ---- DUCC_AUTH_REGISTRIES -------------------------------------------------------

def test_ducc_entries_in_order_with_logins_or_proxies():
    env = {
        "DUCC_AUTH_REGISTRIES": "GITLAB,,HUB,",
        "DUCC_GITLAB_IDENT": "gitlab-registry.cern.ch",
        "DUCC_GITLAB_USER": "bot", "DUCC_GITLAB_PASS": SECRET,
        "DUCC_HUB_IDENT": "docker.io",
        "DUCC_HUB_PROXY": "harbor.example.org/dockerhub",
        "DUCC_HUB_USER": "ignored", "DUCC_HUB_PASS": "ignored-too",
    }
    gitlab, hub = ducc_registries(env)
    assert (gitlab.name, gitlab.ident, gitlab.proxy) == ("GITLAB", "gitlab-registry.cern.ch", "")
    assert gitlab.credentials is not None
    assert (gitlab.credentials.username, gitlab.credentials.password) == ("bot", SECRET)
    assert SECRET not in repr(gitlab) and SECRET not in str(gitlab)
    assert hub.credentials is None  # a proxy is asked without the login (DUCC's rule)
    assert ducc_registries({}) == ()
    assert ducc_registries({"DUCC_AUTH_REGISTRIES": ","}) == ()


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"DUCC_X_USER": "u", "DUCC_X_PASS": SECRET}, "$DUCC_X_IDENT is not set"),
        ({"DUCC_X_IDENT": "h", "DUCC_X_USER": "u"}, "$DUCC_X_PASS is not set"),
        ({"DUCC_X_IDENT": "h", "DUCC_X_PASS": SECRET}, "$DUCC_X_USER is not set"),
        ({"DUCC_X_IDENT": "h"}, "$DUCC_X_USER and $DUCC_X_PASS are not set"),
        ({"DUCC_X_IDENT": "h", "DUCC_X_PROXY": "https:///"}, "$DUCC_X_PROXY names no host"),
    ],
)
def test_a_missing_ducc_variable_is_named_and_no_value_shown(env, named):
    with pytest.raises(RegistryConfigError) as info:
        ducc_registries({"DUCC_AUTH_REGISTRIES": "X", **env})
    message = str(info.value)
    assert named in message and "\n" not in message
    assert SECRET not in message


def test_ducc_ident_is_a_substring_of_the_registry_or_the_request_url():
    def entry(ident: str) -> DuccRegistry:
        return DuccRegistry("X", ident)

    redis = parse_reference("https://registry.hub.docker.com/library/redis:4")
    assert entry("registry.hub.docker.com").matches(redis)
    assert entry("hub.docker.com/v2/library/").matches(redis)  # DUCC matches URLs
    assert entry("registry-1.docker.io").matches(redis)  # where the requests really go
    assert not entry("quay.io").matches(redis)
    gitlab = parse_reference("gitlab-registry.cern.ch/atlas/athena:22")
    assert entry("cern.ch").matches(gitlab)
    assert entry("https://gitlab-registry.cern.ch/v2/atlas/").matches(gitlab)
    assert not entry("https://gitlab-registry.cern.ch/v2/cms/").matches(gitlab)


def test_ducc_proxy_rewrites_host_and_path():
    ref = parse_reference("https://registry.hub.docker.com/library/redis:4")
    with_path = DuccRegistry("X", "docker", proxy="harbor.example.org/dockerhub").proxied(ref)
    assert (with_path.registry, with_path.repository, with_path.tag, with_path.scheme) == \
        ("harbor.example.org", "dockerhub/library/redis", "4", "https")
    bare = DuccRegistry("X", "docker", proxy="cache:5000").proxied(ref)
    assert (bare.registry, bare.repository) == ("cache:5000", "library/redis")
    explicit = DuccRegistry("X", "docker", proxy="http://cache:5000/a/b/").proxied(ref)
    assert (explicit.registry, explicit.repository, explicit.scheme) == \
        ("cache:5000", "a/b/library/redis", "http")


# ---- registries.conf ------------------------------------------------------------

def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_registries_conf_mirrors_insecure_hosts_and_drop_ins(tmp_path):
    main = write(tmp_path / "registries.conf", """
        unqualified-search-registries = ["docker.io"]
        [[registry]]
        prefix = "docker.io"
        location = "docker.io"
        [[registry.mirror]]
        location = "mirror.example.org/hub"
        insecure = true
        [[registry.mirror]]
        location = "fresh.example.org"
        pull-from-mirror = "tag-only"

        [[registry]]
        location = "quay.io"
        mirror-by-digest-only = true
        [[registry.mirror]]
        location = "quay-mirror.example.org"

        [[registry]]
        prefix = "internal.example.org"
        insecure = true
        """)
    dropin = write(tmp_path / "registries.conf.d" / "50-quay.conf", """
        [[registry]]
        prefix = "quay.io"
        location = "quay.io"
        """)
    conf = read_registries_conf([main, dropin])
    assert conf.insecure == {"mirror.example.org", "internal.example.org"}
    by_prefix = {ns.prefix: ns for ns in conf.namespaces}
    assert by_prefix["docker.io"].mirrors == (
        Mirror("mirror.example.org/hub", insecure=True),
        Mirror("fresh.example.org", pull_from="tag-only"),
    )
    assert by_prefix["quay.io"].mirrors == ()  # the drop-in replaced the table

    only_main = read_registries_conf([main])
    quay = {ns.prefix: ns for ns in only_main.namespaces}["quay.io"]
    assert quay.mirrors == (Mirror("quay-mirror.example.org", pull_from="digest-only"),)


def test_registries_conf_v1_insecure_list(tmp_path):
    conf = read_registries_conf([write(tmp_path / "r.conf", """
        [registries.insecure]
        registries = ["old.example.org:5000"]
        """)])
    assert conf.insecure == {"old.example.org:5000"} and conf.namespaces == ()
    assert read_registries_conf([tmp_path / "missing.conf"]).namespaces == ()


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[[registry]\n", "is not valid TOML"),
        ('[[registry]]\ninsecure = true\n', "neither `prefix` nor `location`"),
        ('[[registry]]\nlocation = "a.io"\n[[registry.mirror]]\ninsecure = true\n',
         "has no `location`"),
        ('[[registry]]\nlocation = "a.io"\n[[registry.mirror]]\nlocation = "m.io"\n'
         'pull-from-mirror = "sometimes"\n', "pull-from-mirror must be one of"),
        ('[[registry]]\nlocation = "a.io"\nmirror-by-digest-only = true\n'
         '[[registry.mirror]]\nlocation = "m.io"\npull-from-mirror = "tag-only"\n',
         "cannot set pull-from-mirror"),
        ('[[registry]]\nlocation = "https://a.io"\n', "without a scheme"),
        ('[[registry]]\nlocation = "a.io"\ninsecure = "yes"\n', "must be true or false"),
        ('[[registry]]\nprefix = "*.a.io"\nlocation = "b.io"\n', "wildcard prefix"),
    ],
)
def test_registries_conf_mistakes_name_the_file(tmp_path, text, fragment):
    path = write(tmp_path / "registries.conf", text)
    with pytest.raises(RegistryConfigError) as info:
        read_registries_conf([path])
    assert fragment in str(info.value) and str(path) in str(info.value)


# ---- choosing endpoints ---------------------------------------------------------

def names(routes: Routes, text: str) -> list[str]:
    return [f"{e.registry}/{e.repository}" for e in routes.endpoints(parse_reference(text))]


def test_the_longest_prefix_chooses_the_mirrors():
    routes = Routes(namespaces=[
        RegistryNamespace("docker.io", "docker.io", mirrors=(Mirror("m.example.org/hub"),)),
        RegistryNamespace("docker.io/library/special", "docker.io/library/special"),
        RegistryNamespace("example.com/foo", "internal.example.net/bar",
                          mirrors=(Mirror("m0.local/mirror-for-foo"),)),
        RegistryNamespace("*.corp.example", "", mirrors=(Mirror("cache.corp.example"),)),
    ])
    assert names(routes, "busybox") == ["m.example.org/hub/library/busybox",
                                        "docker.io/library/busybox"]
    # DUCC's Hub name is the same image for podman: it is mirrored too, and kept as written
    assert names(routes, "https://registry.hub.docker.com/library/busybox") == [
        "m.example.org/hub/library/busybox", "registry.hub.docker.com/library/busybox"]
    assert names(routes, "docker.io/library/special:1") == ["docker.io/library/special"]
    # the example of containers-registries.conf(5)
    assert names(routes, "example.com/foo/image:latest") == [
        "m0.local/mirror-for-foo/image", "internal.example.net/bar/image"]
    assert names(routes, "example.com/foobar/image") == ["example.com/foobar/image"]
    assert names(routes, "example.com:5000/foo/image") == ["example.com:5000/foo/image"]
    assert names(routes, "registry.corp.example/team/app") == [
        "cache.corp.example/team/app", "registry.corp.example/team/app"]
    assert names(routes, "quay.io/a/b") == ["quay.io/a/b"]


def test_a_host_prefix_does_not_match_another_port():
    routes = Routes(namespaces=[RegistryNamespace("example.com", "example.com",
                                                  mirrors=(Mirror("m.local"),))])
    assert names(routes, "example.com/a") == ["m.local/a", "example.com/a"]
    assert names(routes, "example.com:5000/a") == ["example.com:5000/a"]
    assert names(routes, "example.community/a") == ["example.community/a"]


def test_pull_from_mirror_by_tag_or_by_digest():
    routes = Routes(namespaces=[RegistryNamespace("r.io", "r.io", mirrors=(
        Mirror("digests.local", pull_from="digest-only"),
        Mirror("tags.local", pull_from="tag-only"),
        Mirror("all.local"),
    ))])
    assert names(routes, "r.io/a:1") == ["tags.local/a", "all.local/a", "r.io/a"]
    assert names(routes, f"r.io/a@sha256:{H}") == ["digests.local/a", "all.local/a", "r.io/a"]
    # a tag with a digest pulls the digest
    assert names(routes, f"r.io/a:1@sha256:{H}") == ["digests.local/a", "all.local/a", "r.io/a"]
    endpoint = routes.endpoints(parse_reference(f"r.io/a:1@sha256:{H}"))[0]
    assert (endpoint.tag, str(endpoint.digest)) == ("1", f"sha256:{H}")


def test_a_ducc_proxy_is_the_only_endpoint_and_wins_over_mirrors():
    routes = Routes(
        ducc=[DuccRegistry("OTHER", "quay.io", proxy="nowhere.local"),
              DuccRegistry("HUB", "docker.io", proxy="harbor.local/hub"),
              DuccRegistry("HUB2", "docker.io", proxy="second.local")],
        namespaces=[RegistryNamespace("docker.io", "docker.io", mirrors=(Mirror("m.local"),))])
    assert names(routes, "docker.io/library/redis:7") == ["harbor.local/hub/library/redis"]
    assert names(routes, "ghcr.io/a/b") == ["ghcr.io/a/b"]


# ---- following a route ----------------------------------------------------------

IMG = image([layer([Entry("hello", data=b"routes\n")])], label="unit-routes")


def streamed(body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    """A response whose body the client streams (as from the network)."""
    return httpx.Response(200, headers=headers, stream=httpx.ByteStream(body))


class FakeRegistries:
    """Hosts that serve IMG as `repository`, or fail as told; records every request."""

    def __init__(self, serving: dict[str, str], failing: dict[str, int] | None = None,
                 corrupt: tuple[str, ...] = ()) -> None:
        self.serving = serving  # host -> repository it serves IMG under
        self.failing = failing or {}  # host -> HTTP status
        self.corrupt = corrupt
        self.requests: list[tuple[str, str, str]] = []  # (host, path, Authorization)
        self.transport = httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        host, path = request.url.netloc.decode(), request.url.path
        self.requests.append((host, path, request.headers.get("Authorization", "")))
        if host in self.failing:
            return httpx.Response(self.failing[host])
        repository = self.serving.get(host)
        if repository is None or not path.startswith(f"/v2/{repository}/"):
            return httpx.Response(404, json={"errors": [{"code": "NAME_UNKNOWN"}]})
        rest = path[len(f"/v2/{repository}/"):]
        if rest == "tags/list":
            return streamed(b'{"tags": ["1", "2"]}')
        manifest = IMG.manifest + (b" " if host in self.corrupt else b"")
        if rest in ("manifests/1", f"manifests/{IMG.manifest_digest}"):
            return streamed(manifest, {
                "Content-Type": "application/vnd.oci.image.manifest.v1+json",
                "Docker-Content-Digest": IMG.manifest_digest})
        for blob in (IMG.config, *IMG.layers):
            if rest == f"blobs/{blob.digest}":
                return streamed(blob.data)
        return httpx.Response(404, json={"errors": [{"code": "MANIFEST_UNKNOWN"}]})

    def hosts(self) -> list[str]:
        return [host for host, _, _ in self.requests]


def client(fake: FakeRegistries, routes: Routes) -> RegistryClient:
    return RegistryClient(routes=routes, transport=fake.transport, auth_files=[],
                          retry_for=0.5, backoff=0.01)


def mirrored(*mirrors: str) -> Routes:
    return Routes(namespaces=[RegistryNamespace("origin.io", "origin.io",
                                                mirrors=tuple(Mirror(m) for m in mirrors))])


def test_every_public_method_follows_the_route():
    fake = FakeRegistries({"mirror.io": "hub/app"})
    ref = parse_reference("origin.io/app:1")
    with client(fake, mirrored("mirror.io/hub")) as registry:
        image_ = registry.resolve(ref)
        assert str(image_.manifest.digest) == IMG.manifest_digest
        assert str(registry.head_digest(ref)) == IMG.manifest_digest
        assert registry.list_tags(ref) == ["1", "2"]
        desc = image_.manifest.layers[0]
        with registry.open_blob(ref, desc) as blob:
            assert blob.read(-1) == IMG.layers[0].data
    assert set(fake.hosts()) == {"mirror.io"}


def test_a_mirror_without_the_image_falls_back_to_the_origin():
    fake = FakeRegistries({"origin.io": "app"}, failing={"broken.io": 503})
    with client(fake, mirrored("empty.io", "broken.io")) as registry:
        registry.resolve(parse_reference("origin.io/app:1"))
    assert fake.hosts()[:3] == ["empty.io", "broken.io", "origin.io"]
    assert fake.hosts().count("broken.io") == 2  # a mirror is not retried, only passed over


def test_a_mirror_cannot_substitute_content_for_a_digest():
    fake = FakeRegistries({"mirror.io": "app", "origin.io": "app"}, corrupt=("mirror.io",))
    pinned = parse_reference(f"origin.io/app@{IMG.manifest_digest}")
    with client(fake, mirrored("mirror.io")) as registry:
        resolved = registry.resolve(pinned)
    assert str(resolved.manifest.digest) == IMG.manifest_digest
    assert ("origin.io", f"/v2/app/manifests/{IMG.manifest_digest}", "") in fake.requests


def test_an_unreachable_mirror_is_skipped_afterwards():
    fake = FakeRegistries({"origin.io": "app"})

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.host == "down.io":
            fake.requests.append(("down.io", request.url.path, ""))
            raise httpx.ConnectError("connection refused")
        return fake.handle(request)

    fake.transport = httpx.MockTransport(handle)
    with client(fake, mirrored("down.io")) as registry:
        registry.resolve(parse_reference("origin.io/app:1"))
        registry.resolve(parse_reference("origin.io/app:1"))
    assert fake.hosts().count("down.io") == 1


def test_the_last_endpoint_fails_as_usual_and_a_ducc_proxy_has_no_fallback():
    fake = FakeRegistries({"origin.io": "app"})
    with client(fake, mirrored("empty.io")) as registry, pytest.raises(ImageNotFound) as info:
        registry.resolve(parse_reference("origin.io/other:1"))
    assert "registry origin.io" in str(info.value)
    assert fake.hosts() == ["empty.io", "origin.io"]

    fake.requests.clear()
    proxy = Routes(ducc=[DuccRegistry("P", "origin.io", proxy="cache.io/x")])
    with client(fake, proxy) as registry, pytest.raises(ImageNotFound) as info:
        registry.resolve(parse_reference("origin.io/app:1"))
    assert "registry cache.io" in str(info.value)
    assert fake.requests == [("cache.io", "/v2/x/app/manifests/1", "")]


def test_ducc_login_goes_to_the_token_service_and_nowhere_else():
    seen: list[tuple[str, str]] = []
    inner = FakeRegistries({"private.io": "team/app"})

    def handle(request: httpx.Request) -> httpx.Response:
        auth = request.headers.get("Authorization", "")
        if request.url.host == "auth.private.io":
            seen.append(("token", auth))
            expected = "Basic " + base64.b64encode(f"bot:{SECRET}".encode()).decode()
            if auth != expected:
                return httpx.Response(401)
            return streamed(b'{"token": "T0KEN"}')
        seen.append(("registry", auth))
        if auth != "Bearer T0KEN":
            return httpx.Response(401, headers={"WWW-Authenticate": (
                'Bearer realm="https://auth.private.io/token",service="private.io"')})
        return inner.handle(request)

    fake = FakeRegistries({})
    fake.transport = httpx.MockTransport(handle)
    routes = Routes(ducc=ducc_registries({
        "DUCC_AUTH_REGISTRIES": "PRIV", "DUCC_PRIV_IDENT": "private.io",
        "DUCC_PRIV_USER": "bot", "DUCC_PRIV_PASS": SECRET}))
    with client(fake, routes) as registry:
        registry.resolve(parse_reference("private.io/team/app:1"))
    assert ("token", "Basic " + base64.b64encode(f"bot:{SECRET}".encode()).decode()) in seen
    assert all(SECRET not in auth and "Basic" not in auth for kind, auth in seen
               if kind == "registry")

    routes = Routes(ducc=ducc_registries({
        "DUCC_AUTH_REGISTRIES": "PRIV", "DUCC_PRIV_IDENT": "private.io",
        "DUCC_PRIV_USER": "bot", "DUCC_PRIV_PASS": "wrong"}))
    with client(fake, routes) as registry, pytest.raises(AuthenticationFailed) as info:
        registry.resolve(parse_reference("private.io/team/app:1"))
    assert "$DUCC_PRIV_USER and $DUCC_PRIV_PASS" in str(info.value)
    assert "wrong" not in str(info.value) and "podman login" not in str(info.value)


def test_config_errors_are_lazypod_errors():
    assert issubclass(RegistryConfigError, LazypodError)
