"""Registry routes end to end, with real registries: DUCC's pull-through proxies and
logins from the environment, and registries.conf mirrors in front of an origin."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.auth import PASSWORD, USER, TokenService, htpasswd_registry
from support.images import Entry, Image, busybox_entries, image, layer
from support.registry import Registry, free_port

pytestmark = [pytest.mark.registry]

LAZYPOD_AGENT = "lazypod/"
BOGUS = "origin.invalid"  # the origin's name for lazypod: never resolves


def routed_image(registry: Registry, name: str, label: str) -> Image:
    img = image([layer(busybox_entries()), layer([Entry("route", data=label.encode())])],
                label=label)
    registry.push(name, "1", img)
    return img


def by_lazypod(registry: Registry, since: int) -> list[str]:
    """`METHOD path` of the requests lazypod made since `since`."""
    return [f"{r.method} {r.path}" for r in registry.requests(since)
            if r.user_agent.startswith(LAZYPOD_AGENT)]


def assert_converted(repo: Path, public_name: str, img: Image) -> None:
    meta = repo / ".metadata" / public_name
    assert (meta / "manifest.json").read_bytes() == img.manifest
    top = img.layers[-1].digest
    assert (repo / ".layers" / top[7:9] / top[7:] / "layerfs" / "route").is_file()


@pytest.fixture(scope="module")
def pull_through(registry, tmp_path_factory) -> Iterator[Registry]:
    """A registry that is a pull-through cache of the origin (`registry`)."""
    reg = Registry(tmp_path_factory.mktemp("pull-through"), proxy_of=registry.host)
    yield reg
    reg.stop()


@pytest.fixture(scope="module")
def plain_mirror(tmp_path_factory) -> Iterator[Registry]:
    """A registry holding copies under a path of its own (`hub/...`)."""
    reg = Registry(tmp_path_factory.mktemp("plain-mirror"))
    yield reg
    reg.stop()


def ducc_env(lazypod, name: str, **variables: str) -> None:
    lazypod.env["DUCC_AUTH_REGISTRIES"] = name
    for kind, value in variables.items():
        lazypod.env[f"DUCC_{name}_{kind.upper()}"] = value


# ---- DUCC's _PROXY --------------------------------------------------------------

@pytest.mark.parametrize("insecure_by", ["option", "http-url"])
def test_ducc_proxy_serves_an_image_whose_registry_cannot_be_reached(
        registry, pull_through, lazypod, repo, insecure_by):
    img = routed_image(registry, f"routes/proxied-{insecure_by}", f"proxied {insecure_by}")
    ducc_env(lazypod, "CACHE", ident=BOGUS, proxy=pull_through.host)
    name = f"{BOGUS}/routes/proxied-{insecure_by}:1"
    origin_mark, proxy_mark = registry.mark(), pull_through.mark()
    if insecure_by == "option":
        lazypod("convert-single-image", "--insecure-registry", pull_through.host, name,
                str(repo))
    else:  # DUCC's URL form: the proxy is asked with the image's scheme
        lazypod("convert-single-image", f"http://{name}", str(repo))

    assert_converted(repo, f"{BOGUS}/routes/proxied-{insecure_by}:1", img)
    asked = by_lazypod(pull_through, proxy_mark)
    assert f"GET /v2/routes/proxied-{insecure_by}/manifests/1" in asked
    assert f"GET /v2/routes/proxied-{insecure_by}/blobs/{img.layers[-1].digest}" in asked
    # the cache fetched from the origin; lazypod never did
    origin = registry.requests(origin_mark)
    assert any(img.layers[-1].digest in r.path and r.status == 200 for r in origin)
    assert by_lazypod(registry, origin_mark) == []


def test_ducc_proxy_with_a_path_and_wildcard_tags(registry, lazypod, repo):
    """`_PROXY=host/path` puts the path before the repository (a Harbor proxy-cache
    project); tags of a wildcard are listed through the proxy too."""
    img = routed_image(registry, "dockerhub/routes/pathy", "pathy")
    ducc_env(lazypod, "HARBOR", ident=BOGUS, proxy=f"{registry.host}/dockerhub")
    mark = registry.mark()
    lazypod("convert-single-image", "--insecure-registry", registry.host,
            f"{BOGUS}/routes/pathy:*", str(repo))
    assert_converted(repo, f"{BOGUS}/routes/pathy:1", img)
    asked = by_lazypod(registry, mark)
    assert any(a.startswith("GET /v2/dockerhub/routes/pathy/tags/list") for a in asked)
    assert "GET /v2/dockerhub/routes/pathy/manifests/1" in asked


# ---- DUCC's _USER and _PASS ------------------------------------------------------

@pytest.fixture(scope="module")
def private_image(registry) -> Image:
    return routed_image(registry, "routes/private", "private")


@pytest.fixture(scope="module")
def token_registry(registry, private_image, tmp_path_factory) -> Iterator[Registry]:
    service = TokenService(tmp_path_factory.mktemp("route-tokens"))
    reg = service.registry(tmp_path_factory.mktemp("route-token-registry"), registry.storage)
    yield reg
    reg.stop()
    service.stop()


@pytest.fixture(scope="module")
def basic_registry(registry, private_image, tmp_path_factory) -> Iterator[Registry]:
    reg = htpasswd_registry(tmp_path_factory.mktemp("route-basic-registry"), registry.storage)
    yield reg
    reg.stop()


def secret_forms(password: str) -> list[str]:
    return [password, base64.b64encode(f"{USER}:{password}".encode()).decode()]


@pytest.mark.parametrize("kind", ["token", "basic"])
def test_ducc_login_from_the_environment(request, kind, private_image, lazypod, repo):
    reg = request.getfixturevalue(f"{kind}_registry")
    assert not Path(lazypod.env["REGISTRY_AUTH_FILE"]).exists()
    ducc_env(lazypod, "PRIV", ident=reg.host, user=USER, **{"pass": PASSWORD})
    proc = lazypod("-vvv", "convert-single-image", "--insecure-registry", reg.host,
                   f"{reg.host}/routes/private:1", str(repo))
    assert_converted(repo, f"{reg.host}/routes/private:1", private_image)
    for form in secret_forms(PASSWORD):
        assert form not in proc.stderr and form not in proc.stdout


@pytest.mark.parametrize("kind", ["token", "basic"])
def test_a_wrong_ducc_password_is_one_line_and_never_shown(request, kind, lazypod, repo):
    reg = request.getfixturevalue(f"{kind}_registry")
    wrong = "Wr0ng-but-secret-all-the-same"
    ducc_env(lazypod, "PRIV", ident=reg.host, user=USER, **{"pass": wrong})
    proc = lazypod("-vvv", "convert-single-image", "--insecure-registry", reg.host,
                   f"{reg.host}/routes/private:1", str(repo), check=False)
    assert proc.returncode == 1
    errors = [x for x in proc.stderr.splitlines() if x.startswith("lazypod: error:")]
    assert len(errors) == 1 and "$DUCC_PRIV_USER and $DUCC_PRIV_PASS" in errors[0]
    for form in secret_forms(wrong):
        assert form not in proc.stderr and form not in proc.stdout


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        ({"user": USER, "pass": PASSWORD}, "$DUCC_GL_IDENT is not set"),
        ({"ident": "gitlab", "user": USER}, "$DUCC_GL_PASS is not set"),
    ],
)
def test_a_missing_ducc_variable_is_one_line_naming_it(lazypod, repo, variables, named):
    ducc_env(lazypod, "GL", **variables)
    proc = lazypod("-vvv", "convert-single-image", "quay.io/some/image:1", str(repo),
                   check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = [x for x in proc.stderr.splitlines() if x.startswith("lazypod: error:")]
    assert len(errors) == 1 and named in errors[0]
    assert PASSWORD not in proc.stderr + proc.stdout
    assert not repo.exists()
    # what needs no registry does not care
    assert lazypod("check-image-syntax", "quay.io/some/image:1").returncode == 0


# ---- registries.conf mirrors ---------------------------------------------------

def registries_conf(lazypod, text: str) -> None:
    Path(lazypod.env["CONTAINERS_REGISTRIES_CONF"]).write_text(text)


def test_a_mirror_that_is_down_falls_back_to_the_origin(registry, lazypod, repo):
    img = routed_image(registry, "routes/fallback", "fallback")
    down = f"127.0.0.1:{free_port()}"
    registries_conf(lazypod, f"""
[[registry]]
prefix = "{registry.host}"
location = "{registry.host}"

[[registry.mirror]]
location = "{down}/mirror"
insecure = true
""")
    mark = registry.mark()
    started = time.monotonic()
    proc = lazypod.convert(f"{registry.host}/routes/fallback:1", repo)
    assert time.monotonic() - started < 30  # a mirror is not retried
    assert_converted(repo, f"{registry.host}/routes/fallback:1", img)
    assert "GET /v2/routes/fallback/manifests/1" in by_lazypod(registry, mark)
    warnings = [x for x in proc.stderr.splitlines() if f"mirror {down}" in x]
    assert len(warnings) == 1, proc.stderr  # then skipped, not asked once per blob
    assert "unreachable" in warnings[0]


def test_a_working_mirror_is_used(registry, pull_through, lazypod, repo):
    img = routed_image(registry, "routes/mirrored", "mirrored")
    registries_conf(lazypod, f"""
[[registry]]
location = "{registry.host}"

[[registry.mirror]]
location = "{pull_through.host}"
insecure = true
""")
    origin_mark, mirror_mark = registry.mark(), pull_through.mark()
    proc = lazypod.convert(f"{registry.host}/routes/mirrored:1", repo)
    assert_converted(repo, f"{registry.host}/routes/mirrored:1", img)
    asked = by_lazypod(pull_through, mirror_mark)
    assert "GET /v2/routes/mirrored/manifests/1" in asked
    for blob in (img.config, *img.layers):
        assert f"GET /v2/routes/mirrored/blobs/{blob.digest}" in asked
    assert by_lazypod(registry, origin_mark) == []
    assert "trying the next source" not in proc.stderr


def test_a_mirror_with_a_path_and_pull_from_mirror(registry, plain_mirror, lazypod, repo,
                                                    tmp_path):
    """The mirror's path replaces the prefix; a digest-only mirror serves only pulls by
    digest (a pull by tag goes to the origin)."""
    img = image([layer(busybox_entries()), layer([Entry("route", data=b"path")])],
                label="mirror-path")
    plain_mirror.push("hub/routes/only-in-mirror", "1", img)
    registry.push("routes/only-in-mirror", "1", img)
    prefix = f"{registry.host}/routes"
    conf = f"""
[[registry]]
prefix = "{prefix}"
location = "{prefix}"

[[registry.mirror]]
location = "{plain_mirror.host}/hub/routes"
insecure = true
pull-from-mirror = "PULL"
"""
    registries_conf(lazypod, conf.replace("PULL", "all"))
    mark = plain_mirror.mark()
    lazypod.convert(f"{registry.host}/routes/only-in-mirror:1", repo)
    assert_converted(repo, f"{registry.host}/routes/only-in-mirror:1", img)
    assert "GET /v2/hub/routes/only-in-mirror/manifests/1" in by_lazypod(plain_mirror, mark)

    registries_conf(lazypod, conf.replace("PULL", "digest-only"))
    mark, origin_mark = plain_mirror.mark(), registry.mark()
    by_tag = tmp_path / "by-tag"
    lazypod.convert(f"{registry.host}/routes/only-in-mirror:1", by_tag)
    assert by_lazypod(plain_mirror, mark) == []
    assert "GET /v2/routes/only-in-mirror/manifests/1" in by_lazypod(registry, origin_mark)

    by_digest = tmp_path / "by-digest"
    lazypod.convert(f"{registry.host}/routes/only-in-mirror@{img.manifest_digest}", by_digest)
    assert f"GET /v2/hub/routes/only-in-mirror/manifests/{img.manifest_digest}" in \
        by_lazypod(plain_mirror, mark)


def test_a_broken_registries_conf_is_one_line(lazypod, repo):
    registries_conf(lazypod, '[[registry]]\nlocation = "a.io"\n[[registry.mirror]]\n'
                             'pull-from-mirror = "digest-only"\n')
    proc = lazypod.convert("a.io/x/y:1", repo, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "has no `location`" in proc.stderr
    assert lazypod.env["CONTAINERS_REGISTRIES_CONF"] in proc.stderr
