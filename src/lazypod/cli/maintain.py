"""Commands that look after a repository: rm, garbage-collection, check, ls, views,
podman-config."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO, TypeVar

import click

from ..layout import PODMAN_LAYERS, PODMAN_STORE, Layout
from ..podman_config import PodmanConfig
from ..reference import parse_reference
from .app import ducc_globals, main, runs_cleanly, temporary_dir_option
from .options import GRACE_PERIOD, backend_for, backend_options, read_path, registry_client

log = logging.getLogger("lazypod")

F = TypeVar("F", bound=Callable[..., Any])


@main.command("rm")
@click.argument("repository")
@click.argument("images", nargs=-1, required=True)
@backend_options
@ducc_globals
@runs_cleanly
def rm(repository: str, images: tuple[str, ...], backend_kind: str | None, force: bool,
       work_dir: Path | None, wait_for_readers: float, public_root: str | None) -> None:
    """Remove IMAGES (by name, e.g. docker.io/library/debian:bookworm) from REPOSITORY:
    their metadata, public links and podman store entries. Their layers stay until
    `lazypod garbage-collection`."""
    backend = backend_for(repository, backend_kind, public_root=public_root, force=force,
                          work_dir=work_dir, wait_for_readers=wait_for_readers, create=False)
    from ..maintenance import remove_images
    for name in remove_images(backend, [parse_reference(i) for i in images]):
        click.echo(f"removed {name}", err=True)


@main.command("garbage-collection")
@click.argument("repository")
@click.option("--dry-run", is_flag=True,
              help="Only list what would be removed (nothing is written, not even a lock).")
@click.option("--grace-period", type=GRACE_PERIOD, default="0", metavar="PERIOD",
              help="Keep unused layers and flat trees changed less than this long ago: "
                   "days as in DUCC (7), or with a unit (7d, 12h, 30m, 45s).")
@backend_options
@ducc_globals
@runs_cleanly
def garbage_collection(repository: str, dry_run: bool, grace_period: float,
                       backend_kind: str | None, force: bool, work_dir: Path | None,
                       wait_for_readers: float, public_root: str | None) -> None:
    """Remove layers and flat trees that no image of REPOSITORY uses (reachability
    from .metadata, as DUCC's current garbage collection), then refresh the views.
    Alias: gc."""
    backend = backend_for(repository, backend_kind, public_root=public_root, force=force,
                          work_dir=work_dir, wait_for_readers=wait_for_readers, create=False)
    from ..maintenance import collect_garbage
    report = collect_garbage(backend, dry_run=dry_run, grace_seconds=grace_period,
                             force=force)
    verb = "would remove" if dry_run else "removed"
    for rel in report.layers + report.flats:
        click.echo(f"{verb} {rel}")
    click.echo(f"garbage-collection: {verb} {len(report.layers)} layers and "
               f"{len(report.flats)} flat trees; {report.kept_in_grace} kept in the grace "
               "period", err=True)


@main.command("check")
@click.argument("repository")
@click.option("--deep", is_flag=True,
              help="Also rebuild every layer's original tarball from its tar-split and "
                   "files and compare it with the diff ID, and hash the podman store's "
                   "files again (reads everything).")
@click.option("--public-root", metavar="PATH",
              help="Where the stores' links expect the repository, if not at REPOSITORY.")
@ducc_globals
@temporary_dir_option
@runs_cleanly
def check(repository: str, deep: bool, public_root: str | None) -> None:
    """Check REPOSITORY (a path, or a CVMFS repository's name) for integrity: images,
    layers, podman stores, links. Exit status 1 if anything is wrong."""
    from ..check import check_repository
    report = check_repository(read_path(repository), deep=deep, public_root=public_root,
                              on_layer=lambda d: log.info("verifying layer %s", d))
    for warning in report.warnings:
        click.echo(f"warning: {warning}")
    for error in report.errors:
        click.echo(f"error: {error}")
    verified = (f", {report.verified_layers} layers ({report.verified_bytes / 1e6:.1f} MB) "
                "verified byte for byte" if deep else "")
    click.echo(f"check: {report.images} images, {report.layers} layers{verified}: "
               f"{len(report.errors)} errors, {len(report.warnings)} warnings", err=True)
    if not report.ok:
        sys.exit(1)


def _mode_options(func: F) -> F:
    func = click.option("--rootless", "mode", flag_value="rootless",
                        help="Only the rootless settings.")(func)
    func = click.option("--rootful", "mode", flag_value="rootful",
                        help="Only the rootful settings.")(func)
    return click.option("--storage-opts", is_flag=True,
                        help="Print `--storage-opt` flags for one podman command instead of "
                             "storage.conf lines.")(func)


def _print_config(config: PodmanConfig, mode: str | None, storage_opts: bool) -> None:
    modes = [mode == "rootless"] if mode else [False, True]
    for i, rootless in enumerate(modes):
        if storage_opts:
            click.echo(" ".join(f"--storage-opt {opt}" for opt in config.storage_opts(
                rootless=rootless)))
        else:
            if i:
                click.echo()
            click.echo(config.storage_conf(rootless=rootless), nl=False)


@main.command("podman-config")
@click.argument("repository")
@_mode_options
@click.option("--no-layer-store", is_flag=True, help="Leave out the additional layer store.")
@click.option("--aufs-whiteouts", is_flag=True,
              help="The repository's layers hold AUFS .wh. files (DUCC wrote them): use "
                   "fuse-overlayfs rootful too. `lazypod views` finds out by itself.")
@ducc_globals
@runs_cleanly
def podman_config(repository: str, mode: str | None, storage_opts: bool, no_layer_store: bool,
                  aufs_whiteouts: bool) -> None:
    """Print the podman settings that run images from REPOSITORY (the path where
    podman sees it, e.g. /cvmfs/unpacked.cern.ch)."""
    root = str(Path(repository).absolute()).rstrip("/")
    config = PodmanConfig(f"{root}/{PODMAN_STORE}",
                          None if no_layer_store else f"{root}/{PODMAN_LAYERS}",
                          aufs_whiteouts)
    _print_config(config, mode, storage_opts)


@main.command("views")
@click.argument("repository")
@click.option("--into", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Local directory for the views (created; reruns update it).")
@click.option("--offline", is_flag=True,
              help="Never ask a registry for a missing image config: skip such images.")
@click.option("--no-layer-store", is_flag=True, help="Only the image store.")
@click.option("--public-root", metavar="PATH",
              help="Where podman sees the repository, if not at REPOSITORY.")
@click.option("--insecure-registry", "insecure", multiple=True, metavar="HOST[:PORT]",
              help="Allow plain HTTP for this registry when fetching configs.")
@click.option("--select", "patterns", multiple=True, metavar="PATTERN",
              help="Only the images this shell pattern matches, by repository name "
                   "(registry/repository:tag) or podman name; repeatable. Reruns with "
                   "another selection update the views to it.")
@click.option("--select-file", type=click.File("r", encoding="utf-8"), metavar="FILE",
              help="Patterns as --select, one per line ('#' starts a comment).")
@click.option("--full", is_flag=True,
              help="Check and repair the views of every image; a rerun otherwise renders "
                   "only the images new to the views (and drops those gone).")
@_mode_options
@ducc_globals
@runs_cleanly
def views(repository: str, into: Path, offline: bool, no_layer_store: bool,
          public_root: str | None, insecure: tuple[str, ...], patterns: tuple[str, ...],
          select_file: TextIO | None, full: bool, mode: str | None,
          storage_opts: bool) -> None:
    """Build a podman image store and layer store for REPOSITORY (e.g. one written by
    DUCC, read-only) into a local directory; no root needed, nothing copied. Prints
    the podman settings that use them.

    With --select, the views hold a chosen subset: podman 4 lists images in time
    that grows with the square of the store's size (README, Benchmarks), so a site
    that runs a few hundred of ten thousand images renders views of those."""
    from ..client_views import build_client_views

    selection = [*patterns, *_pattern_lines(select_file)]
    if (patterns or select_file) and not selection:
        raise click.UsageError("--select-file holds no pattern")
    registry = None if offline else registry_client(insecure)
    try:
        report = build_client_views(read_path(repository), into, registry=registry,
                                    public_root=public_root, layer_store=not no_layer_store,
                                    select=selection, full=full)
    finally:
        if registry is not None:
            registry.close()
    if report.selected is not None:
        click.echo(f"views: {report.selected} images match the selection", err=True)
    click.echo(f"views: {report.images} images in {into}/store; configs: "
               f"{report.configs_local} in the repository, {report.configs_cached} cached, "
               f"{report.configs_fetched} fetched; diff IDs: {report.diff_ids_from_records} "
               f"from layer records, {report.diff_ids_from_configs} from configs, 0 computed; "
               f"{report.layers_scanned} layers scanned for AUFS whiteouts "
               f"({'found: fuse-overlayfs needed' if report.aufs_layers else 'none'}); "
               f"{report.records} metadata records, {report.records_parsed} parsed (the "
               f"others from the record cache); {report.seconds:.2f}s", err=True)
    out = into.absolute()
    config = PodmanConfig(f"{out}/store", None if no_layer_store else f"{out}/layers",
                          report.needs_fuse_overlayfs)
    _print_config(config, mode, storage_opts)


def _pattern_lines(file: TextIO | None) -> list[str]:
    if file is None:
        return []
    try:
        lines = [line.split("#", 1)[0].strip() for line in file]
    except UnicodeDecodeError as exc:
        raise click.BadParameter(f"{file.name} is not UTF-8 text ({exc.reason})") from None
    return [line for line in lines if line]


@main.command("ls")
@click.argument("repository")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image.")
@ducc_globals
@runs_cleanly
def ls(repository: str, as_json: bool) -> None:
    """List the images of REPOSITORY (a path, or a CVMFS repository's name) and which
    views hold them."""
    from ..inventory import list_images
    from ..record_cache import paused_gc
    from ..repository import RepositoryState

    with paused_gc():  # tens of thousands of records, and no cycles
        rows = list_images(RepositoryState.load(Layout(read_path(repository))))
    for row in rows:
        if as_json:
            click.echo(json.dumps(row.as_dict()))
        else:
            click.echo(row.line())
