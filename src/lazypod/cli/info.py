"""Small commands DUCC's users call: check-image-syntax, download-manifest, version."""

from __future__ import annotations

import json

import click

from .. import __version__
from ..errors import LazypodError
from ..manifest import Platform
from ..reference import ImageReference, parse_reference
from ..sources import LayoutSource
from .app import ducc_globals, main, runs_cleanly, temporary_dir_option
from .options import registry_options, sources

_CSV_FIELDS = ("name", "user", "scheme", "registry", "repository", "tag", "digest", "is_thin")


@main.command("check-image-syntax")
@click.argument("image")
@click.option("-z", "--machine-friendly", is_flag=True,
              help="DUCC's CSV: a header line and one row (name,user,scheme,registry,"
                   "repository,tag,digest,is_thin).")
@ducc_globals
@temporary_dir_option
@runs_cleanly
def check_image_syntax(image: str, machine_friendly: bool) -> None:
    """Parse IMAGE and print how lazypod and podman will name it. Aliases:
    check-image, image-check.

    \b
    IMAGE is read from (skopeo's transports):
      NAME, docker://NAME      a registry: ubuntu, quay.io/a/b:1, host:5000/a@sha256:...,
                               https://host/a/b:1 (DUCC)
      oci:DIR[:REF]            an OCI image layout (skopeo, buildah, podman save
                               --format oci-dir); REF is matched against the
                               org.opencontainers.image.ref.name annotations; without
                               REF, the layout's only image
      oci-archive:FILE[:REF]   a tar of such a layout (podman save --format oci-archive)
      containers-storage:NAME  an image in podman's storage (saved through podman)

    \b
    An image that is not in a registry is published as: REF when it is a
    qualified name (quay.io/a/b:1), localhost/REF when it is an unqualified one
    (a/b:1), localhost/<DIR or FILE name>:REF when it is a tag; without REF, by
    the same rule from the only image's ref name, else localhost/<name>:latest.
    """
    ref = parse_reference(image, allow_wildcard=True)
    if ref.source is not None and ref.source.ref is None and \
            ref.source.transport != "containers-storage":
        ref = _named_by_layout(ref)
    if machine_friendly:
        scheme = ref.scheme or (ref.source.transport if ref.source else "https")
        name = f"{scheme}://{ref.registry}/{ref.repository}"
        name += f":{ref.tag}" if ref.tag else ""
        name += f"@{ref.digest}" if ref.digest else ""
        if ref.source is not None:
            name = str(ref)
        row = (name, "", scheme, ref.registry, ref.repository, ref.tag or "",
               str(ref.digest or ""), "false")
        click.echo(",".join(_CSV_FIELDS))
        click.echo(",".join(row))
        return
    if ref.source is not None:
        click.echo(f"transport:   {ref.source.transport}")
        click.echo(f"path:        {ref.source.path}")
        if ref.source.transport != "containers-storage":
            click.echo(f"ref:         {ref.source.ref or '(none: the only image)'}")
    click.echo(f"registry:    {ref.registry}")
    click.echo(f"repository:  {ref.repository}")
    click.echo(f"tag:         {ref.tag or ''}")
    click.echo(f"digest:      {ref.digest or ''}")
    click.echo(f"podman name: {ref.podman_name}")
    click.echo(f"layout name: {ref.public_name}")


@main.command("download-manifest")
@click.argument("image")
@click.option("-u", "--username", metavar="USER", expose_value=False,
              help="Accepted for DUCC: credentials come from podman's auth files or "
                   "DUCC_AUTH_REGISTRIES.")
@click.option("--raw", is_flag=True, help="The manifest's bytes as its source holds them.")
@registry_options
@ducc_globals
@temporary_dir_option
@runs_cleanly
def download_manifest(image: str, raw: bool, insecure: tuple[str, ...], retry_for: float,
                      platform: str | None) -> None:
    """Print IMAGE's manifest (for a multi-platform tag, this machine's platform or
    --platform's), verified against its digest. IMAGE may name any source
    (`oci:DIR[:REF]`, `oci-archive:FILE[:REF]`, `containers-storage:NAME`: see
    check-image-syntax). Alias: get-manifest."""
    ref = parse_reference(image)
    with sources(insecure, retry_for) as source:
        _, manifest = source.resolve_manifest(
            ref, Platform.parse(platform) if platform else None)
    if raw:
        click.echo(manifest.raw.decode(), nl=False)
    else:
        click.echo(json.dumps(json.loads(manifest.raw), indent=2))


def _named_by_layout(ref: ImageReference) -> ImageReference:
    """A layout's only image under the name its annotation gives it, when the layout
    can be read (a conversion names it so); else the name from IMAGE alone."""
    layouts = LayoutSource()
    try:
        return layouts.expand(ref)[0]
    except LazypodError as exc:
        click.echo(f"lazypod: note: {exc}; the name below assumes its only image has no "
                   "ref name", err=True)
        return ref
    finally:
        layouts.close()


@main.command("version")
@ducc_globals
@temporary_dir_option
@runs_cleanly
def version() -> None:
    """Print lazypod's version. Alias: v."""
    click.echo(f"lazypod {__version__}")
