"""convert-single-image, convert and loop: images from registries, OCI layouts and
archives, or podman's storage into a repository."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import click

from ..convert import Converter, ConvertOptions, Rejected, RunReport
from ..errors import LazypodError
from ..manifest import Platform
from ..progress import make_progress
from ..recipe import Recipe, load_recipe
from ..reference import ImageReference, parse_reference
from ..views import ViewOptions
from .app import (
    EXIT_FAILED,
    EXIT_PARTIAL,
    CommandFailed,
    Terminated,
    ducc_globals,
    main,
    notifier,
    runs_cleanly,
)
from .options import backend_for, publish_options, registry_options, sources

log = logging.getLogger("lazypod")


def run_conversion(
    references: list[ImageReference],
    repository: str,
    *,
    insecure: tuple[str, ...],
    retry_for: float,
    platform: str | None,
    skip_podman: bool,
    skip_flat: bool,
    overwrite_layers: bool,
    convert_again: bool,
    skip_layers: bool,
    attempts: int,
    backend_kind: str | None,
    force: bool,
    work_dir: Path | None,
    wait_for_readers: float,
    public_root: str | None,
    workers: int,
    progress: bool | None,
    rejected: list[Rejected] | None = None,
) -> RunReport:
    """One conversion run, reported on stderr; raises CommandFailed unless every
    image was converted (EXIT_PARTIAL when some were)."""
    options = ConvertOptions(
        platform=Platform.parse(platform) if platform else None,
        # -f and -g also check (and repair) the views of every image, not only new ones.
        views=ViewOptions(podman_store=not skip_podman, flat=not skip_flat,
                          full=overwrite_layers or convert_again),
        workers=workers,
        attempts=attempts,
        convert_again=convert_again,
        overwrite_layers=overwrite_layers,
        skip_layers=skip_layers,
    )
    backend = backend_for(repository, backend_kind, public_root=public_root, force=force,
                          work_dir=work_dir, wait_for_readers=wait_for_readers)
    reporter = make_progress(progress)
    try:
        with sources(insecure, retry_for) as source:
            converter = Converter(backend, source, options, reporter, notifier())
            report = converter.convert(references, rejected or [])
    finally:
        reporter.close()
    _print_report(report)
    _judge(report)
    return report


def _judge(report: RunReport) -> None:
    failed = [(str(r.reference), str(r.error)) for r in report.images if not r.ok]
    failed += [(r.request, r.error) for r in report.rejected]
    total = len(report.images) + len(report.rejected)
    for problem in report.problems:
        click.echo(f"lazypod: problem: {problem}", err=True)
    if len(failed) == 1 and total == 1:
        raise CommandFailed(failed[0][1])
    if failed:
        for name, error in failed:
            click.echo(f"lazypod: error: {name}: {error}", err=True)
        if len(failed) == total:
            raise CommandFailed(f"all {len(failed)} images failed (see above); nothing was "
                                "published")
        raise CommandFailed(f"{len(failed)} of {total} images failed (see "
                            "above); the others are published", EXIT_PARTIAL)
    if report.problems:
        raise CommandFailed(f"the images were converted, but the repository has "
                            f"{len(report.problems)} problem(s) this run could not repair "
                            "(see above)", EXIT_FAILED)
    if not total:
        click.echo("lazypod: no image matched (a wildcard with no tag?)", err=True)


def _print_report(report: RunReport) -> None:
    for image in report.images:
        if image.skipped:
            click.echo(f"{image.reference.podman_name}  skipped: {image.skipped}", err=True)
        elif image.ok:
            click.echo(f"{image.reference.podman_name}  {image.manifest_digest}  "
                       f"layers {image.layers} (fetched {image.fetched_layers}, "
                       f"{image.fetched_bytes / 1e6:.1f} MB)  {image.seconds:.1f}s", err=True)
    if any(image.ok for image in report.images) and report.views and report.views.store:
        store = report.views.store
        click.echo(f"podman store: {store.images} images, {store.layers} layers "
                   f"({store.added_layers} new)", err=True)
    if report.publishes_label:
        click.echo(report.publishes_label, err=True)


def _recipe_target(recipe: Recipe, repository: str | None,
                   kwargs: dict[str, Any]) -> str:
    """REPOSITORY, else the recipe's cvmfs_repo (a CVMFS repository, as in DUCC)."""
    if repository:
        return repository
    if not recipe.cvmfs_repo:
        raise click.UsageError("the recipe has no cvmfs_repo: give REPOSITORY")
    kwargs["backend_kind"] = kwargs.get("backend_kind") or "cvmfs"
    return recipe.cvmfs_repo


def _recipe_entries(recipe: Recipe) -> tuple[list[ImageReference], list[Rejected]]:
    """The recipe's images, and its malformed entries (one bad line does not stop a
    wishlist)."""
    rejected = []
    for number, _text, why in recipe.rejected:
        log.warning("recipe %s: input #%d skipped: %s", recipe.path, number, why)
        rejected.append(Rejected(f"{recipe.path} input #{number}", why))
    return list(recipe.images), rejected


@main.command("convert-single-image")
@click.argument("image")
@click.argument("repository")
@registry_options
@publish_options
@ducc_globals
@runs_cleanly
def convert_single_image(image: str, repository: str, **kwargs: Any) -> None:
    """Convert IMAGE (e.g. docker.io/library/debian:bookworm, or with a wildcard tag,
    `repo:v1.*`) into REPOSITORY. IMAGE may also be an OCI layout or archive
    (`oci:DIR[:REF]`, `oci-archive:FILE[:REF]`, e.g. from `podman save`) or an image
    of podman's storage (`containers-storage:NAME`); `lazypod check-image-syntax
    --help` says which name such an image is published under.

    REPOSITORY is the name of a CVMFS repository this machine publishes (e.g.
    unpacked.cern.ch: the cvmfs backend), or a directory path (created if missing).
    The layers are unpacked once under .layers/, the manifest and config go to
    .metadata/, and the podman image store .podmanStore/ is updated; run `lazypod
    podman-config REPOSITORY` for the podman settings that use it.
    """
    run_conversion([parse_reference(image, allow_wildcard=True)], repository, **kwargs)


@main.command("convert")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("repository", required=False)
@registry_options
@publish_options
@ducc_globals
@runs_cleanly
def convert(recipe: Path, repository: str | None, **kwargs: Any) -> None:
    """Convert every image of a DUCC RECIPE (wishlist, YAML) into REPOSITORY.

    Tags may be wildcards (`image:*`, `image:v1.*`). Entries may name OCI layouts,
    archives and podman's storage as IMAGE of convert-single-image does (a relative
    path is relative to the recipe). Without REPOSITORY, the
    recipe's cvmfs_repo is used, with the cvmfs backend. An entry that cannot be
    parsed or whose tags cannot be listed fails alone: the others are converted,
    and the exit status is 3.
    """
    parsed = load_recipe(recipe)
    target = _recipe_target(parsed, repository, kwargs)
    if parsed.output_format:
        log.info("recipe output_format (DUCC thin images) is not used by lazypod")
    images, rejected = _recipe_entries(parsed)
    run_conversion(images, target, rejected=rejected, **kwargs)


@main.command("loop")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("repository", required=False)
@click.option("--interval", type=click.IntRange(min=0), default=600, show_default=True,
              metavar="SECONDS", help="Time between the starts of two conversions.")
@click.option("--max-runs", type=click.IntRange(min=1), metavar="N",
              help="Stop after N conversions (default: never).")
@registry_options
@publish_options
@ducc_globals
@runs_cleanly
def loop(recipe: Path, repository: str | None, interval: int, max_runs: int | None,
         **kwargs: Any) -> None:
    """Convert RECIPE again and again (new tags of wildcard entries, moved tags),
    rereading it before every run, as DUCC's loop does. A failed run is logged and
    the loop goes on; SIGTERM stops it (an open CVMFS transaction is aborted). Use
    --log-format json when a service manager collects the logs."""
    logging.getLogger().setLevel(min(logging.getLogger().level, logging.INFO))
    runs = 0
    try:
        while max_runs is None or runs < max_runs:
            started = time.monotonic()
            runs += 1
            try:
                parsed = load_recipe(recipe)
                run_kwargs = dict(kwargs)
                target = _recipe_target(parsed, repository, run_kwargs)
                images, rejected = _recipe_entries(parsed)
                report = run_conversion(images, target, rejected=rejected, **run_kwargs)
                log.info("loop run %d done: %d images, %d publishes, %.1fs", runs,
                         len(report.images), report.publishes, report.seconds)
            except Terminated:
                raise
            except LazypodError as exc:
                log.error("loop run %d failed: %s", runs, exc)
            if max_runs is not None and runs >= max_runs:
                break
            time.sleep(max(0.0, interval - (time.monotonic() - started)))
    except Terminated:
        # How a service manager stops the loop: the run under way was abandoned as
        # a failed run is (nothing half-written); stopping is not a failure.
        log.info("loop stopped by SIGTERM after %d run(s)", runs)
