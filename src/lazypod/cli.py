"""The `lazypod` command: a thin layer over the library.

Command names follow DUCC (`convert`, `convert-single-image`, `loop`,
`garbage-collection`, `check-image-syntax`) so its users find them.
Exit status: 0 done, 1 something failed (one line on stderr says what to do),
2 bad usage.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click

from . import __version__, faults
from .backend import Backend
from .backend.cvmfs import CvmfsBackend, CvmfsConfig
from .backend.directory import DirectoryBackend
from .check import check_repository
from .client_views import build_client_views
from .convert import Converter, ConvertOptions, RunReport, expand_wildcards
from .errors import LazypodError
from .inventory import list_images
from .layout import PODMAN_LAYERS, PODMAN_STORE, Layout
from .logs import setup_logging
from .maintenance import collect_garbage, remove_images
from .manifest import Platform
from .podman_config import PodmanConfig
from .progress import make_progress
from .recipe import load_recipe
from .reference import ImageReference, parse_reference
from .registry import RegistryClient, insecure_registries_from_conf
from .repository import RepositoryState
from .views import ViewOptions

log = logging.getLogger("lazypod")

F = TypeVar("F", bound=Callable[..., Any])


class Terminated(LazypodError):
    """SIGTERM arrived: the run stops the way an error stops it (an open CVMFS
    transaction is aborted on the way out)."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into an exception in the main thread, as Ctrl-C is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Terminated("terminated by SIGTERM; nothing half-written was left (rerun to "
                         "complete the work)")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fail_cleanly(func: F) -> F:
    """LazypodError -> one line on stderr and exit status 1, no traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with _sigterm_raises():
                return func(*args, **kwargs)
        except LazypodError as exc:
            click.echo(f"lazypod: error: {exc}", err=True)
            sys.exit(1)
        except OSError as exc:  # the last boundary: the system refused something
            where = f": {exc.filename}" if exc.filename else ""
            hint = " (free space and rerun)" if exc.errno in (errno.ENOSPC, errno.EDQUOT) \
                else ""
            click.echo(f"lazypod: error: {exc.strerror or exc}{where}{hint}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("lazypod: interrupted; the repository is as before this run "
                       "(rerun to complete the work)", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def _fault_hook() -> None:
    """Fault injection for the tests: LAZYPOD_KILL_AT=N kills lazypod (SIGKILL) at the
    N-th point where it makes a change visible; LAZYPOD_COUNT_POINTS=FILE writes how
    many points a run reached (see lazypod.faults)."""
    kill_at = os.environ.get("LAZYPOD_KILL_AT")
    count_file = os.environ.get("LAZYPOD_COUNT_POINTS")
    if not kill_at and not count_file:
        return
    reached = [0]

    def hook(point: str) -> None:
        reached[0] += 1
        if count_file:
            Path(count_file).write_text(f"{reached[0]}\n")
        if kill_at and reached[0] == int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)

    faults.install(hook)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="lazypod")
@click.option("-v", "--verbose", count=True, help="More detail (-v: info, -vv: debug).")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="Log lines as text, or as JSON objects for daemons.")
def main(verbose: int, log_format: str) -> None:
    """Publish container images as unpacked layers on CVMFS (or any shared file
    system) and let podman run them from there, with no pull."""
    setup_logging(verbose, log_format == "json")
    _fault_hook()


def _registry_options(func: F) -> F:
    func = click.option("--retry-for", type=click.FloatRange(min=0), default=60.0,
                        show_default=True, metavar="SECONDS",
                        help="How long a registry that fails transiently (5xx, 429, "
                             "dropped connections) is retried before an image fails.")(func)
    func = click.option("--insecure-registry", "insecure", multiple=True, metavar="HOST[:PORT]",
                        help="Allow plain HTTP (or unverified TLS) for this registry; "
                             "repeatable. registries.conf `insecure = true` works too.")(func)
    return click.option("--platform", metavar="OS/ARCH[/VARIANT]",
                        help="Platform to take from multi-platform images "
                             "(default: this machine's).")(func)


def _publish_options(func: F) -> F:
    func = click.option("-p", "--skip-podman", is_flag=True,
                        help="Do not write the podman stores (.podmanStore, .podmanLayers).")(func)
    func = click.option("-s", "--skip-flat", is_flag=True,
                        help="Do not write flat root file systems (.flat) and public links.")(func)
    func = click.option("--workers", type=click.IntRange(1, 32), default=4, show_default=True,
                        help="Layers fetched and unpacked at once.")(func)
    func = click.option("--progress/--no-progress", default=None,
                        help="Progress bars (default: when stderr is a terminal).")(func)
    return _backend_options(func)


def _backend_options(func: F) -> F:
    func = click.option("--backend", "backend_kind", type=click.Choice(["dir", "cvmfs"]),
                        help="Where REPOSITORY is: a directory (default), or the name of a "
                             "CVMFS repository on this release manager machine (writes go "
                             "through cvmfs_server transactions and ingests).")(func)
    func = click.option("--force", is_flag=True,
                        help="cvmfs: abort a transaction found open instead of failing; "
                             "garbage-collection: collect even while some image's metadata "
                             "is unreadable (its layers count as unused).")(func)
    func = click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path),
                        help="cvmfs: local directory for unpacking layers before they are "
                             "published (default /var/spool/lazypod).")(func)
    func = click.option("--wait-for-readers", type=click.FloatRange(min=0), default=0,
                        metavar="SECONDS",
                        help="cvmfs: when other processes hold files under the repository's "
                             "mounts (cvmfs_server would ask whether to go on), wait this "
                             "long for them before failing (default: fail at once).")(func)
    return click.option("--public-root", metavar="PATH",
                        help="Absolute path at which clients see the repository, for the "
                             "podman stores' links (default: the repository path; "
                             "/cvmfs/NAME for CVMFS).")(func)


def _backend(kind: str, repository: str, *, public_root: str | None, force: bool,
             work_dir: Path | None, wait_for_readers: float = 0, create: bool = True) -> Backend:
    if not repository.strip():
        raise LazypodError("the repository is an empty string (an unset variable?): give a "
                           "path, or a CVMFS repository name with --backend cvmfs")
    if kind == "cvmfs":
        return CvmfsBackend(cvmfs_config(repository, public_root=public_root, force=force,
                                         work_dir=work_dir, wait_for_readers=wait_for_readers))
    return DirectoryBackend(Path(repository), public_root=public_root, create=create)


def cvmfs_config(repository: str, *, public_root: str | None, force: bool,
                 work_dir: Path | None, wait_for_readers: float) -> CvmfsConfig:
    """The cvmfs backend's settings: options, then the environment (LAZYPOD_WORK_DIR;
    LAZYPOD_CVMFS_MOUNT_ROOT, LAZYPOD_CVMFS_CLIENT_ROOT and LAZYPOD_CVMFS_CONFIG_DIR
    move /cvmfs, /var/spool/cvmfs/NAME/rdonly and /etc/cvmfs, for test set-ups)."""
    env = os.environ
    client = env.get("LAZYPOD_CVMFS_CLIENT_ROOT")
    return CvmfsConfig(
        repository,
        mount_root=Path(env.get("LAZYPOD_CVMFS_MOUNT_ROOT", "/cvmfs")),
        client_root=Path(client) / repository if client else None,
        config_dir=Path(env.get("LAZYPOD_CVMFS_CONFIG_DIR", "/etc/cvmfs")),
        work_dir=work_dir or Path(env.get("LAZYPOD_WORK_DIR", "/var/spool/lazypod")),
        public_root=public_root,
        force=force,
        wait_for_readers=wait_for_readers,
    )


def registry_client(insecure: tuple[str, ...], retry_for: float = 60.0) -> RegistryClient:
    """The registry client, with podman's registries.conf read once, here."""
    return RegistryClient(insecure=set(insecure) | insecure_registries_from_conf(),
                          retry_for=retry_for)


def _run_conversion(
    references: list[ImageReference],
    repository: str,
    *,
    insecure: tuple[str, ...],
    retry_for: float,
    platform: str | None,
    skip_podman: bool,
    skip_flat: bool,
    backend_kind: str | None,
    force: bool,
    work_dir: Path | None,
    wait_for_readers: float,
    public_root: str | None,
    workers: int,
    progress: bool | None,
    default_backend: str = "dir",
) -> RunReport:
    options = ConvertOptions(
        platform=Platform.parse(platform) if platform else None,
        views=ViewOptions(podman_store=not skip_podman, flat=not skip_flat),
        workers=workers,
    )
    reporter = make_progress(progress)
    try:
        with registry_client(insecure, retry_for) as registry:
            expanded: list[ImageReference] = []
            for ref in references:
                expanded += expand_wildcards(registry, ref)
            backend = _backend(backend_kind or default_backend, repository,
                               public_root=public_root, force=force, work_dir=work_dir,
                               wait_for_readers=wait_for_readers)
            converter = Converter(backend, registry, options, reporter)
            report = converter.convert(expanded)
    finally:
        reporter.close()
    _print_report(report)
    failed = [r for r in report.images if not r.ok]
    for problem in report.problems:
        click.echo(f"lazypod: problem: {problem}", err=True)
    if len(failed) == 1 and len(report.images) == 1:
        raise LazypodError(str(failed[0].error))
    if failed:
        for result in failed:
            click.echo(f"lazypod: error: {result.reference}: {result.error}", err=True)
        raise LazypodError(f"{len(failed)} of {len(report.images)} images failed (see above); "
                           "the others are published")
    if report.problems:
        raise LazypodError(f"the images were converted, but the repository has "
                           f"{len(report.problems)} problem(s) this run could not repair (see "
                           "above)")
    return report


def _print_report(report: RunReport) -> None:
    for image in report.images:
        if image.ok:
            click.echo(f"{image.reference.podman_name}  {image.manifest_digest}  "
                       f"layers {image.layers} (fetched {image.fetched_layers}, "
                       f"{image.fetched_bytes / 1e6:.1f} MB)  {image.seconds:.1f}s", err=True)
    if any(image.ok for image in report.images) and report.views and report.views.store:
        store = report.views.store
        click.echo(f"podman store: {store.images} images, {store.layers} layers "
                   f"({store.added_layers} new)", err=True)
    if report.publishes_label:
        click.echo(report.publishes_label, err=True)


@main.command("convert-single-image")
@click.argument("image")
@click.argument("repository")
@_registry_options
@_publish_options
@_fail_cleanly
def convert_single_image(image: str, repository: str, **kwargs: Any) -> None:
    """Convert IMAGE (e.g. docker.io/library/debian:bookworm) into REPOSITORY.

    REPOSITORY is a directory, created if missing, or with --backend cvmfs the
    name of a CVMFS repository (e.g. unpacked.cern.ch). The layers are unpacked once
    under .layers/, the manifest and config go to .metadata/, and the podman
    image store .podmanStore/ is updated; run `lazypod podman-config REPOSITORY`
    for the podman settings that use it.
    """
    _run_conversion([parse_reference(image)], repository, **kwargs)


@main.command("convert")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("repository", required=False)
@_registry_options
@_publish_options
@_fail_cleanly
def convert(recipe: Path, repository: str | None, **kwargs: Any) -> None:
    """Convert every image of a DUCC RECIPE (wishlist, YAML) into REPOSITORY.

    Tags may be wildcards (`image:*`, `image:v1.*`). Without REPOSITORY, the
    recipe's cvmfs_repo is used, with the cvmfs backend.
    """
    parsed = load_recipe(recipe)
    target = repository or parsed.cvmfs_repo
    if not target:
        raise click.UsageError("the recipe has no cvmfs_repo: give REPOSITORY")
    if parsed.output_format:
        log.info("recipe output_format (DUCC thin images) is not used by lazypod")
    _run_conversion(list(parsed.images), target,
                    default_backend="dir" if repository else "cvmfs", **kwargs)


@main.command("loop")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("repository", required=False)
@click.option("--interval", type=click.IntRange(min=1), default=600, show_default=True,
              metavar="SECONDS", help="Time between the starts of two conversions.")
@click.option("--max-runs", type=click.IntRange(min=1), metavar="N",
              help="Stop after N conversions (default: never).")
@_registry_options
@_publish_options
@_fail_cleanly
def loop(recipe: Path, repository: str | None, interval: int, max_runs: int | None,
         **kwargs: Any) -> None:
    """Convert RECIPE again and again (new tags of wildcard entries, moved tags),
    rereading it before every run, as DUCC's loop does. A failed run is logged and
    the loop goes on; SIGTERM stops it (an open CVMFS transaction is aborted). Use
    --log-format json when a service manager collects the logs."""
    logging.getLogger().setLevel(min(logging.getLogger().level, logging.INFO))
    runs = 0
    while max_runs is None or runs < max_runs:
        started = time.monotonic()
        runs += 1
        try:
            parsed = load_recipe(recipe)
            target = repository or parsed.cvmfs_repo
            if not target:
                raise click.UsageError("the recipe has no cvmfs_repo: give REPOSITORY")
            report = _run_conversion(list(parsed.images), target,
                                     default_backend="dir" if repository else "cvmfs",
                                     **kwargs)
            log.info("loop run %d done: %d images, %d publishes, %.1fs", runs,
                     len(report.images), report.publishes, report.seconds)
        except LazypodError as exc:
            log.error("loop run %d failed: %s", runs, exc)
        if max_runs is not None and runs >= max_runs:
            break
        time.sleep(max(0.0, interval - (time.monotonic() - started)))


@main.command("rm")
@click.argument("repository")
@click.argument("images", nargs=-1, required=True)
@_backend_options
@_fail_cleanly
def rm(repository: str, images: tuple[str, ...], backend_kind: str | None, force: bool,
       work_dir: Path | None, wait_for_readers: float, public_root: str | None) -> None:
    """Remove IMAGES (by name, e.g. docker.io/library/debian:bookworm) from REPOSITORY:
    their metadata, public links and podman store entries. Their layers stay until
    `lazypod garbage-collection`."""
    backend = _backend(backend_kind or "dir", repository, public_root=public_root,
                       force=force, work_dir=work_dir, wait_for_readers=wait_for_readers,
                       create=False)
    for name in remove_images(backend, [parse_reference(i) for i in images]):
        click.echo(f"removed {name}", err=True)


@main.command("garbage-collection")
@click.argument("repository")
@click.option("--dry-run", is_flag=True,
              help="Only list what would be removed (nothing is written, not even a lock).")
@click.option("--grace-period", type=click.IntRange(min=0), default=0, metavar="SECONDS",
              help="Keep unused layers younger than this.")
@_backend_options
@_fail_cleanly
def garbage_collection(repository: str, dry_run: bool, grace_period: int,
                       backend_kind: str | None, force: bool, work_dir: Path | None,
                       wait_for_readers: float, public_root: str | None) -> None:
    """Remove layers and flat trees that no image of REPOSITORY uses (reachability
    from .metadata, as DUCC's current garbage collection), then refresh the views."""
    backend = _backend(backend_kind or "dir", repository, public_root=public_root,
                       force=force, work_dir=work_dir, wait_for_readers=wait_for_readers,
                       create=False)
    report = collect_garbage(backend, dry_run=dry_run, grace_seconds=grace_period,
                             force=force)
    verb = "would remove" if dry_run else "removed"
    for rel in report.layers + report.flats:
        click.echo(f"{verb} {rel}")
    click.echo(f"garbage-collection: {verb} {len(report.layers)} layers and "
               f"{len(report.flats)} flat trees; {report.kept_in_grace} kept in the grace "
               "period", err=True)


@main.command("check")
@click.argument("repository", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--deep", is_flag=True,
              help="Also rebuild every layer's original tarball from its tar-split and "
                   "files and compare it with the diff ID (reads everything).")
@click.option("--public-root", metavar="PATH",
              help="Where the stores' links expect the repository, if not at REPOSITORY.")
def check(repository: Path, deep: bool, public_root: str | None) -> None:
    """Check REPOSITORY's integrity: images, layers, podman stores, links. Exit
    status 1 if anything is wrong."""
    report = check_repository(repository, deep=deep, public_root=public_root,
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


@main.command("check-image-syntax")
@click.argument("image")
@_fail_cleanly
def check_image_syntax(image: str) -> None:
    """Parse IMAGE and print how lazypod and podman will name it."""
    ref = parse_reference(image, allow_wildcard=True)
    click.echo(f"registry:    {ref.registry}")
    click.echo(f"repository:  {ref.repository}")
    click.echo(f"tag:         {ref.tag or ''}")
    click.echo(f"digest:      {ref.digest or ''}")
    click.echo(f"podman name: {ref.podman_name}")
    click.echo(f"layout name: {ref.public_name}")


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
@click.argument("repository", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--into", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Local directory for the views (created; reruns update it).")
@click.option("--offline", is_flag=True,
              help="Never ask a registry for a missing image config: skip such images.")
@click.option("--no-layer-store", is_flag=True, help="Only the image store.")
@click.option("--public-root", metavar="PATH",
              help="Where podman sees the repository, if not at REPOSITORY.")
@click.option("--insecure-registry", "insecure", multiple=True, metavar="HOST[:PORT]",
              help="Allow plain HTTP for this registry when fetching configs.")
@_mode_options
@_fail_cleanly
def views(repository: Path, into: Path, offline: bool, no_layer_store: bool,
          public_root: str | None, insecure: tuple[str, ...], mode: str | None,
          storage_opts: bool) -> None:
    """Build a podman image store and layer store for REPOSITORY (e.g. one written by
    DUCC, read-only) into a local directory; no root needed, nothing copied. Prints
    the podman settings that use them."""
    registry = None if offline else registry_client(insecure)
    try:
        report = build_client_views(repository, into, registry=registry,
                                    public_root=public_root, layer_store=not no_layer_store)
    finally:
        if registry is not None:
            registry.close()
    click.echo(f"views: {report.images} images in {into}/store; configs: "
               f"{report.configs_local} in the repository, {report.configs_cached} cached, "
               f"{report.configs_fetched} fetched; diff IDs: {report.diff_ids_from_records} "
               f"from layer records, {report.diff_ids_from_configs} from configs, 0 computed; "
               f"{report.layers_scanned} layers scanned for AUFS whiteouts "
               f"({'found: fuse-overlayfs needed' if report.aufs_layers else 'none'}); "
               f"{report.files_read} metadata files "
               f"read; {report.seconds:.2f}s", err=True)
    out = into.absolute()
    config = PodmanConfig(f"{out}/store", None if no_layer_store else f"{out}/layers",
                          report.needs_fuse_overlayfs)
    _print_config(config, mode, storage_opts)


@main.command("ls")
@click.argument("repository", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image.")
def ls(repository: Path, as_json: bool) -> None:
    """List the images of REPOSITORY and which views hold them."""
    for row in list_images(RepositoryState.load(Layout(repository))):
        if as_json:
            click.echo(json.dumps(row.as_dict()))
        else:
            click.echo(row.line())


if __name__ == "__main__":
    main()
