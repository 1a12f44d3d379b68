"""Image references: the docker grammar and DUCC's URL form, normalised as podman does.

Accepted forms::

    ubuntu                                   -> docker.io/library/ubuntu:latest
    ubuntu:22.04, library/ubuntu:22.04       -> docker.io/library/ubuntu:22.04
    docker://quay.io/centos/centos:stream9   (podman's transport prefix)
    host:5000/a/b:tag@sha256:<hex>           (tag kept as the name, digest pulled and checked)
    https://registry.hub.docker.com/library/ubuntu:latest   (DUCC; http:// means plain HTTP)

and images that are not in a registry, in skopeo's transport syntax (`SourceLocation`)::

    oci:DIR[:REF]            an OCI image layout (skopeo, buildah, podman save --format oci-dir)
    oci-archive:FILE[:REF]   a tar of one (podman save --format oci-archive)
    containers-storage:NAME  an image in podman's own storage

Such an image is published under a name derived from the reference alone (see
`_local_name`): REF when it is a qualified image name, `localhost/REF` when it is
an unqualified one (podman's name for a local image), `localhost/<DIR or FILE's
base name>:REF` when it is a bare tag; without REF the layout's only image, named by
its `org.opencontainers.image.ref.name` annotation by the same rule (the source
reads it, `ImageSource.expand`), else `localhost/<base name>:latest`.

The registry is kept as written (DUCC writes `registry.hub.docker.com/...` links and
users rely on them); `podman_name` is the fully qualified name podman stores and
looks up, with every Docker Hub alias folded into `docker.io`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path, PurePath

from .digest import Digest
from .errors import InvalidReference

__all__ = ["DOCKER_HUB", "DOCKER_HUB_ALIASES", "LOCAL_TRANSPORTS", "ImageReference",
           "SourceLocation", "local_reference", "parse_reference"]

DOCKER_HUB = "docker.io"
DOCKER_HUB_ALIASES = frozenset(
    {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
)
_HUB_API = "registry-1.docker.io"

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST_RE = re.compile(
    rf"^(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?$"
)
_PATH_COMPONENT_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_TAG_PATTERN_RE = re.compile(r"^[\w*][\w.*-]{0,127}$")
_NAME_MAX = 255
LOCAL_TRANSPORTS = ("oci", "oci-archive", "containers-storage")
_PORT_THEN_PATH = re.compile(r"^[0-9]+/")
LOCALHOST = "localhost"


@dataclass(frozen=True)
class SourceLocation:
    """Where an image that is not in a registry is read from: `transport:path[:ref]`.

    `path` is the layout directory or archive file (as given), or for
    containers-storage the image's fully qualified name; `ref` is matched against
    the layout's `org.opencontainers.image.ref.name` annotations (None: the layout's
    only image)."""

    transport: str
    path: str
    ref: str | None = None

    def __str__(self) -> str:
        return f"{self.transport}:{self.path}" + (f":{self.ref}" if self.ref is not None else "")


@dataclass(frozen=True, slots=True)
class ImageReference:
    """A parsed, normalised image reference."""

    registry: str
    repository: str
    tag: str | None = None
    digest: Digest | None = None
    scheme: str | None = None  # "http" or "https" when given in DUCC's URL form
    # Not a registry image: where it is read from (registry, repository and tag are
    # then the name it is published under).
    source: SourceLocation | None = None

    @property
    def podman_registry(self) -> str:
        return DOCKER_HUB if self.registry in DOCKER_HUB_ALIASES else self.registry

    @property
    def api_host(self) -> str:
        """host[:port] that serves the distribution API for this registry."""
        return _HUB_API if self.registry in DOCKER_HUB_ALIASES else self.registry

    @property
    def has_wildcard(self) -> bool:
        if self.source is not None:
            return self.source.ref is not None and "*" in self.source.ref
        return self.tag is not None and "*" in self.tag

    @property
    def podman_name(self) -> str:
        """The name podman stores: `docker.io/library/ubuntu:22.04` or `repo@sha256:...`."""
        base = f"{self.podman_registry}/{self.repository}"
        if self.tag is not None:
            return f"{base}:{self.tag}"
        assert self.digest is not None
        return f"{base}@{self.digest}"

    @property
    def public_name(self) -> str:
        """The name in the repository layout (`.metadata/<name>`, the public link)."""
        base = f"{self.registry}/{self.repository}"
        if self.tag is not None:
            return f"{base}:{self.tag}"
        assert self.digest is not None
        return f"{base}@{self.digest}"

    @property
    def manifest_ref(self) -> str:
        """What to ask the registry for: the digest when pinned, else the tag."""
        if self.digest is not None:
            return str(self.digest)
        assert self.tag is not None
        return self.tag

    def with_tag(self, tag: str) -> ImageReference:
        """The same image under another tag; for a layout, `tag` is the REF (a tag or
        a name), and the publish name follows from it."""
        if self.source is not None:
            return local_reference(self.source.transport, self.source.path, tag)
        return replace(self, tag=tag)

    def __str__(self) -> str:
        if self.source is not None:
            return str(self.source)
        text = f"{self.registry}/{self.repository}"
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


def parse_reference(text: str, *, allow_wildcard: bool = False) -> ImageReference:
    """Parse an image reference; raise InvalidReference naming the bad part."""
    original = text
    text = text.strip()
    if not text:
        raise InvalidReference("empty image reference")
    transport, colon, rest = text.partition(":")
    # `oci:5000/app` stays a registry (host `oci`, port 5000), as repository layouts
    # name such a host; a layout directory named so is `oci:./5000/app`.
    if colon and transport in LOCAL_TRANSPORTS and not _PORT_THEN_PATH.match(rest):
        return _parse_local(transport, rest, original, allow_wildcard)
    scheme: str | None = None
    if text.startswith("docker://"):
        text = text[len("docker://") :]
    elif "://" in text:
        scheme, _, text = text.partition("://")
        scheme = scheme.lower()
        if scheme not in ("http", "https"):
            raise InvalidReference(
                f"invalid image reference {original!r}: scheme {scheme!r} is not http, "
                "https or docker"
            )
        if "/" not in text:
            raise InvalidReference(
                f"invalid image reference {original!r}: a URL needs registry/repository"
            )

    host_part = text.split("/", 1)[0]
    if "@" in host_part and "/" in text:
        # user:password@host/...: never echoed (the message would carry the secret)
        raise InvalidReference(
            "invalid image reference: it holds credentials (user:password@ before the "
            "registry); give them with `podman login` or DUCC_AUTH_REGISTRIES instead")
    name, digest = _split_digest(text, original)
    name, tag = _split_tag(name, original, allow_wildcard)

    registry, remainder = _split_registry(name, force_registry=scheme is not None)
    if not _HOST_RE.match(registry):
        raise InvalidReference(f"invalid image reference {original!r}: bad registry {registry!r}")
    if registry in DOCKER_HUB_ALIASES and "/" not in remainder:
        remainder = f"library/{remainder}"
    if registry == "index.docker.io" and scheme is None:
        registry = DOCKER_HUB
    for component in remainder.split("/"):
        if not _PATH_COMPONENT_RE.match(component):
            hint = " (repository names must be lowercase)" if component.lower() != component else ""
            raise InvalidReference(
                f"invalid image reference {original!r}: bad repository component "
                f"{component!r}{hint}"
            )
    if len(registry) + 1 + len(remainder) > _NAME_MAX:
        raise InvalidReference(
            f"invalid image reference {original!r}: name longer than {_NAME_MAX} characters"
        )
    if tag is None and digest is None:
        tag = "latest"
    return ImageReference(registry, remainder, tag, digest, scheme)


def _split_digest(text: str, original: str) -> tuple[str, Digest | None]:
    if "@" not in text:
        return text, None
    name, _, digest_text = text.partition("@")
    try:
        digest = Digest.parse(digest_text)
    except InvalidReference as exc:
        raise InvalidReference(f"invalid image reference {original!r}: {exc}") from None
    return name, digest


def _split_tag(name: str, original: str, allow_wildcard: bool) -> tuple[str, str | None]:
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon <= slash:  # no tag, or the colon belongs to host:port
        return name, None
    tag = name[colon + 1 :]
    pattern = _TAG_PATTERN_RE if allow_wildcard else _TAG_RE
    if not pattern.match(tag):
        why = " (wildcards only in recipes)" if "*" in tag and not allow_wildcard else ""
        raise InvalidReference(f"invalid image reference {original!r}: bad tag {tag!r}{why}")
    return name[:colon], tag


def _split_registry(name: str, *, force_registry: bool) -> tuple[str, str]:
    if not name:
        raise InvalidReference("invalid image reference: empty name")
    first, sep, rest = name.partition("/")
    if force_registry:
        return first, rest
    looks_like_host = "." in first or ":" in first or first == "localhost" or first != first.lower()
    if not sep or not looks_like_host:
        return DOCKER_HUB, name
    return first, rest


def local_reference(transport: str, path: str, ref: str | None, *,
                    allow_wildcard: bool = True) -> ImageReference:
    """The reference of an image in a layout (`oci`, `oci-archive`) under the name it
    is published as (module docstring)."""
    original = str(SourceLocation(transport, path, ref))
    registry, repository, tag, digest = _local_name(transport, path, ref, original,
                                                    allow_wildcard)
    return ImageReference(registry, repository, tag, digest,
                          source=SourceLocation(transport, path, ref))


def _parse_local(transport: str, rest: str, original: str,
                 allow_wildcard: bool) -> ImageReference:
    if transport == "containers-storage":
        if rest.startswith("["):
            raise InvalidReference(f"invalid image reference {original!r}: a [driver@root] "
                                   "store is not supported (lazypod asks podman, which "
                                   "uses its own storage.conf)")
        if "*" in rest:
            raise InvalidReference(f"invalid image reference {original!r}: no wildcards in "
                                   "containers-storage: names")
        if not rest:
            raise InvalidReference(f"invalid image reference {original!r}: give the image's "
                                   "name after containers-storage:")
        registry, repository, tag, digest = _qualified_locally(rest, original, False)
        name = ImageReference(registry, repository, tag, digest)
        return replace(name, source=SourceLocation(transport, str(name)))
    # As containers/image splits it: the path ends at the first colon.
    path, colon, ref = rest.partition(":")
    if not path:
        raise InvalidReference(f"invalid image reference {original!r}: {transport}: needs a "
                               f"{'directory' if transport == 'oci' else 'file'} path")
    if colon and not ref:
        raise InvalidReference(f"invalid image reference {original!r}: nothing after the "
                               "second ':' (leave it out for the layout's only image)")
    return local_reference(transport, path, ref if colon else None,
                           allow_wildcard=allow_wildcard)


def _local_name(transport: str, path: str, ref: str | None, original: str,
                allow_wildcard: bool) -> tuple[str, str, str | None, Digest | None]:
    """(registry, repository, tag, digest) of a layout's image in the repository."""
    if ref is not None and any(c in ref for c in "/:@"):
        return _qualified_locally(ref, original, allow_wildcard)
    base = _base_name(transport, path, original)
    if ref is None:
        return LOCALHOST, base, "latest", None
    pattern = _TAG_PATTERN_RE if allow_wildcard else _TAG_RE
    if not pattern.match(ref):
        why = " (wildcards only in recipes)" if "*" in ref and not allow_wildcard else ""
        raise InvalidReference(f"invalid image reference {original!r}: REF {ref!r} is neither "
                               f"a tag nor an image name{why}")
    return LOCALHOST, base, ref, None


def _qualified_locally(name: str, original: str,
                       allow_wildcard: bool) -> tuple[str, str, str | None, Digest | None]:
    """`name` as podman names a local image: qualified names stay, others get
    `localhost/` (podman's registry for images built or loaded locally)."""
    if "://" in name:
        raise InvalidReference(f"invalid image reference {original!r}: {name!r} is a URL, "
                               "not an image name")
    first, slash, _ = name.partition("/")
    qualified = slash and ("." in first or ":" in first or first == LOCALHOST)
    try:
        ref = parse_reference(name if qualified else f"{LOCALHOST}/{name}",
                              allow_wildcard=allow_wildcard)
    except InvalidReference as exc:
        raise InvalidReference(f"invalid image reference {original!r}: {exc}") from None
    return ref.registry, ref.repository, ref.tag, ref.digest


def _base_name(transport: str, path: str, original: str) -> str:
    """A repository name made of the layout directory's or archive's name."""
    name = PurePath(path).name or Path(path).absolute().name
    if transport == "oci-archive" and name.lower().endswith(".tar"):
        name = name[:-4]
    gentle = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("._-")
    if _PATH_COMPONENT_RE.match(gentle):
        return gentle
    strict = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if strict:
        return strict
    raise InvalidReference(f"invalid image reference {original!r}: cannot name the image "
                           f"after {path!r}; give its name as REF ({transport}:{path}:NAME)")
