"""Image references: docker grammar, DUCC URLs, podman's normalisation."""

from __future__ import annotations

import pytest

from lazypod import InvalidReference, parse_reference

H = "a" * 64


@pytest.mark.parametrize(
    ("text", "podman_name", "public_name"),
    [
        ("ubuntu", "docker.io/library/ubuntu:latest", "docker.io/library/ubuntu:latest"),
        ("ubuntu:22.04", "docker.io/library/ubuntu:22.04", "docker.io/library/ubuntu:22.04"),
        ("library/ubuntu", "docker.io/library/ubuntu:latest", "docker.io/library/ubuntu:latest"),
        ("docker.io/ubuntu", "docker.io/library/ubuntu:latest", "docker.io/library/ubuntu:latest"),
        ("index.docker.io/user/app:v1", "docker.io/user/app:v1", "docker.io/user/app:v1"),
        ("docker://quay.io/centos/centos:stream9", "quay.io/centos/centos:stream9",
         "quay.io/centos/centos:stream9"),
        ("localhost/app", "localhost/app:latest", "localhost/app:latest"),
        ("host:5000/a/b:tag", "host:5000/a/b:tag", "host:5000/a/b:tag"),
        (f"host:5000/a/b@sha256:{H}", f"host:5000/a/b@sha256:{H}", f"host:5000/a/b@sha256:{H}"),
        (f"host:5000/a/b:tag@sha256:{H}", "host:5000/a/b:tag", "host:5000/a/b:tag"),
        ("https://registry.hub.docker.com/library/fedora:latest",
         "docker.io/library/fedora:latest", "registry.hub.docker.com/library/fedora:latest"),
        ("https://registry.hub.docker.com/fedora", "docker.io/library/fedora:latest",
         "registry.hub.docker.com/library/fedora:latest"),
        ("http://127.0.0.1:5000/x/y:1", "127.0.0.1:5000/x/y:1", "127.0.0.1:5000/x/y:1"),
        ("gitlab-registry.cern.ch/a/b/c/d:x_y.z-1", "gitlab-registry.cern.ch/a/b/c/d:x_y.z-1",
         "gitlab-registry.cern.ch/a/b/c/d:x_y.z-1"),
        ("a__b/c-d--e.f:1", "docker.io/a__b/c-d--e.f:1", "docker.io/a__b/c-d--e.f:1"),
    ],
)
def test_names(text, podman_name, public_name):
    ref = parse_reference(text)
    assert ref.podman_name == podman_name
    assert ref.public_name == public_name


def test_parts_and_api_host():
    ref = parse_reference(f"https://registry.hub.docker.com/library/debian:stable@sha256:{H}")
    assert (ref.registry, ref.repository, ref.tag, str(ref.digest), ref.scheme) == (
        "registry.hub.docker.com", "library/debian", "stable", f"sha256:{H}", "https")
    assert ref.api_host == "registry-1.docker.io"
    assert ref.manifest_ref == f"sha256:{H}"
    assert parse_reference("quay.io/a/b").api_host == "quay.io"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("Ubuntu", "bad repository component 'Ubuntu'"),
        ("docker.io/Library/x", "lowercase"),
        ("ubuntu:bad tag", "bad tag"),
        ("ubuntu:" + "x" * 200, "bad tag"),
        ("ubuntu@sha256:123", "64 hex digits"),
        ("ubuntu@md5:" + "a" * 32, "unsupported digest algorithm"),
        ("ftp://host/x", "scheme 'ftp'"),
        ("https://registry-only", "registry/repository"),
        ("host:port:5000/x", "bad registry"),
        ("a//b", "bad repository component ''"),
        ("ubuntu:*", "wildcards only in recipes"),
    ],
)
def test_invalid_references_name_the_bad_part(text, fragment):
    with pytest.raises(InvalidReference, match=None) as info:
        parse_reference(text)
    assert fragment in str(info.value)


def test_wildcards_in_recipes():
    ref = parse_reference("https://gitlab-registry.cern.ch/some/group/image:*", allow_wildcard=True)
    assert ref.has_wildcard and ref.tag == "*"
    assert ref.with_tag("v1").podman_name == "gitlab-registry.cern.ch/some/group/image:v1"
