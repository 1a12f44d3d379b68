"""Small commands DUCC's users call: check-image-syntax, download-manifest, version."""

from __future__ import annotations

import json

import click

from .. import __version__
from ..manifest import Platform
from ..reference import parse_reference
from .app import alias, ducc_globals, main, runs_cleanly, temporary_dir_option
from .options import registry_client, registry_options

_CSV_FIELDS = ("name", "user", "scheme", "registry", "repository", "tag", "digest", "is_thin")


@alias("check-image", "image-check")
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
    check-image, image-check."""
    ref = parse_reference(image, allow_wildcard=True)
    if machine_friendly:
        scheme = ref.scheme or "https"
        name = f"{scheme}://{ref.registry}/{ref.repository}"
        name += f":{ref.tag}" if ref.tag else ""
        name += f"@{ref.digest}" if ref.digest else ""
        row = (name, "", scheme, ref.registry, ref.repository, ref.tag or "",
               str(ref.digest or ""), "false")
        click.echo(",".join(_CSV_FIELDS))
        click.echo(",".join(row))
        return
    click.echo(f"registry:    {ref.registry}")
    click.echo(f"repository:  {ref.repository}")
    click.echo(f"tag:         {ref.tag or ''}")
    click.echo(f"digest:      {ref.digest or ''}")
    click.echo(f"podman name: {ref.podman_name}")
    click.echo(f"layout name: {ref.public_name}")


@alias("get-manifest")
@main.command("download-manifest")
@click.argument("image")
@click.option("-u", "--username", metavar="USER", expose_value=False,
              help="Accepted for DUCC: credentials come from podman's auth files or "
                   "DUCC_AUTH_REGISTRIES.")
@click.option("--raw", is_flag=True, help="The manifest's bytes as the registry sent them.")
@registry_options
@ducc_globals
@temporary_dir_option
@runs_cleanly
def download_manifest(image: str, raw: bool, insecure: tuple[str, ...], retry_for: float,
                      platform: str | None) -> None:
    """Print IMAGE's manifest (for a multi-platform tag, this machine's platform or
    --platform's), verified against its digest. Alias: get-manifest."""
    ref = parse_reference(image)
    with registry_client(insecure, retry_for) as registry:
        _, manifest = registry.resolve_manifest(
            ref, Platform.parse(platform) if platform else None)
    if raw:
        click.echo(manifest.raw.decode(), nl=False)
    else:
        click.echo(json.dumps(json.loads(manifest.raw), indent=2))


@alias("v")
@main.command("version")
@ducc_globals
@temporary_dir_option
@runs_cleanly
def version() -> None:
    """Print lazypod's version. Alias: v."""
    click.echo(f"lazypod {__version__}")
