"""webhook: registry notifications in, conversions and removals out (see lazypod.webhook)."""

from __future__ import annotations

import logging
import os
import signal
import socket
from pathlib import Path

import click

from ..backend import Backend
from ..convert import ConvertOptions
from ..errors import LazypodError
from ..manifest import Platform
from ..views import ViewOptions
from ..webhook import JobQueue, RepositoryPublisher, Webhook, WebhookServer
from .app import ducc_globals, main, notifier, runs_cleanly
from .options import GRACE_PERIOD, backend_for, backend_options, registry_client, registry_options

log = logging.getLogger("lazypod")

SECRET_ENV = "LAZYPOD_WEBHOOK_SECRET"  # noqa: S105  (the variable's name, not a secret)


class _Stop(BaseException):
    """SIGTERM: leave the job in progress the way an interrupted conversion is left
    (an open CVMFS transaction is aborted). A BaseException, so that no job's error
    handling takes it for a failure to try again."""


def _secret(secret_file: Path | None, no_auth: bool) -> bytes | None:
    if secret_file is not None:
        try:
            text = secret_file.read_text(errors="replace")
        except OSError as exc:
            raise LazypodError(f"cannot read the secret file {secret_file}: "
                               f"{exc.strerror}") from None
        where = str(secret_file)
    else:
        text, where = os.environ.get(SECRET_ENV, ""), SECRET_ENV
    secret = text.strip()
    if secret and no_auth:
        raise click.UsageError(f"--no-auth, and a secret in {where}: choose one")
    if no_auth:
        log.warning("--no-auth: anyone who can reach the webhook can make it convert and "
                    "remove images")
        return None
    if not secret:
        raise LazypodError(
            f"no shared secret ({where} is empty or unset): give --secret-file FILE or set "
            f"{SECRET_ENV} to the value the registry sends as its Authorization header, or "
            "--no-auth to accept anyone who can reach the port")
    if not secret.isascii() or not secret.isprintable():
        raise LazypodError(f"the secret in {where} must be printable ASCII (it is sent as an "
                           "HTTP header)")
    return secret.encode()


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise click.BadParameter(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:8080, "
                                 "[::1]:8080, 0.0.0.0:8080)", param_hint="--listen")
    return host, int(port)


def _pairs(values: tuple[str, ...], sep: str, hint: str) -> list[tuple[str, str]]:
    pairs = []
    for value in values:
        left, found, right = value.partition(sep)
        if not left or (sep == "=" and (not found or not right)):
            raise click.BadParameter(f"{value!r}: expected {hint}", param_hint=hint)
        pairs.append((left.strip(), right.strip().strip("/")))
    return pairs


class _V6Server(WebhookServer):
    address_family = socket.AF_INET6


@main.command("webhook")
@click.argument("repository")
@click.option("--listen", default="127.0.0.1:8080", show_default=True, metavar="HOST:PORT",
              help="Address to listen on for the registry's notifications.")
@click.option("--secret-file", type=click.Path(dir_okay=False, path_type=Path),
              help=f"File holding the shared secret, which requests must send as their "
                   f"Authorization header (default: ${SECRET_ENV}).")
@click.option("--no-auth", is_flag=True, help="Accept requests without a secret.")
@click.option("--allow", multiple=True, metavar="REGISTRY[/PREFIX]",
              help="Only images of this registry (under this repository prefix); others "
                   "are refused with 403. Repeatable; default: any image.")
@click.option("--registry-alias", multiple=True, metavar="FROM=TO",
              help="Name the registry FROM (as notifications name it, e.g. a host behind "
                   "a load balancer) as TO. Repeatable.")
@click.option("--queue-size", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Images waiting at most; beyond, notifications get 503 (retried).")
@click.option("--attempts", type=click.IntRange(1, 100), default=3, show_default=True,
              metavar="N", help="Times a job is tried before it is dropped.")
@click.option("--retry-delay", type=click.FloatRange(min=0), default=10.0, show_default=True,
              metavar="SECONDS",
              help="First wait before a failed job, or a busy repository, is tried again; "
                   "doubled each time (up to 10 minutes; 1 minute for a busy repository).")
@click.option("--gc-grace", type=GRACE_PERIOD, default="0", metavar="PERIOD",
              help="Grace period of the garbage collection after a delete (as gc's).")
@click.option("--no-gc-on-delete", is_flag=True,
              help="Remove deleted images but collect no garbage (run `lazypod gc` apart).")
@click.option("-p", "--skip-podman", is_flag=True,
              help="Do not write the podman stores (.podmanStore, .podmanLayers).")
@click.option("-s", "--skip-flat", is_flag=True,
              help="Do not write flat root file systems (.flat) and public links.")
@click.option("-i", "--skip-thin-image", is_flag=True, expose_value=False,
              help="Accepted for DUCC: lazypod makes no thin images.")
@click.option("--workers", type=click.IntRange(1, 32), default=4, show_default=True,
              help="Layers fetched and unpacked at once.")
@registry_options
@backend_options
@ducc_globals
@runs_cleanly
def webhook(repository: str, listen: str, secret_file: Path | None, no_auth: bool,
            allow: tuple[str, ...], registry_alias: tuple[str, ...], queue_size: int,
            attempts: int, retry_delay: float, gc_grace: float, no_gc_on_delete: bool,
            skip_podman: bool, skip_flat: bool, workers: int, insecure: tuple[str, ...],
            retry_for: float, platform: str | None, backend_kind: str | None, force: bool,
            work_dir: Path | None, wait_for_readers: float, public_root: str | None) -> None:
    """Convert what a registry pushes and remove what it deletes, as it notifies
    (Harbor webhooks, distribution's `notifications: endpoints:`), into REPOSITORY.

    Notifications are POSTed to / with the shared secret as their Authorization
    header; GET /healthz says how many jobs wait. Jobs run one at a time; a busy
    repository (a `loop` converting) is waited for. SIGTERM stops the webhook (the
    job in progress is abandoned as an interrupted conversion is; waiting jobs are
    logged) with exit status 0.
    """
    logging.getLogger().setLevel(min(logging.getLogger().level, logging.INFO))
    secret = _secret(secret_file, no_auth)
    host, port = _listen(listen)
    allowed = _pairs(allow, "/", "REGISTRY[/PREFIX]")
    aliases = dict(_pairs(registry_alias, "=", "FROM=TO"))

    def backend(create: bool) -> Backend:
        return backend_for(repository, backend_kind, public_root=public_root, force=force,
                           work_dir=work_dir, wait_for_readers=wait_for_readers, create=create)

    backend(True)  # a REPOSITORY that means nothing fails now, not at the first push
    options = ConvertOptions(
        platform=Platform.parse(platform) if platform else None,
        views=ViewOptions(podman_store=not skip_podman, flat=not skip_flat),
        workers=workers,
    )
    publisher = RepositoryPublisher(backend, lambda: registry_client(insecure, retry_for),
                                    options, grace_seconds=gc_grace, force=force,
                                    notifier=notifier())
    queue = JobQueue(queue_size)
    worker = Webhook(queue, publisher, attempts=attempts, retry_delay=retry_delay,
                     collect_after_delete=not no_gc_on_delete)
    server_class = _V6Server if ":" in host else WebhookServer
    try:
        server = server_class((host, port), queue, secret=secret, allow=allowed,
                              aliases=aliases)
    except OSError as exc:
        raise LazypodError(f"cannot listen on {listen}: {exc.strerror or exc}") from None

    def stop(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough
        raise _Stop

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with server.serving():
            log.info("webhook listening on %s for %s", listen, repository)
            worker.run()
    except _Stop:
        running = queue.running
        waiting = queue.drain()
        log.warning("stopping (SIGTERM)%s; %d waiting jobs dropped%s",
                    f": {running} abandoned" if running else "", len(waiting),
                    f": {', '.join(map(str, waiting))}" if waiting else "")
    finally:
        signal.signal(signal.SIGTERM, previous)
