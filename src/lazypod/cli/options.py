"""Options shared by several commands, and what the REPOSITORY argument means.

REPOSITORY, as in DUCC, is a CVMFS repository name when this machine is its
release manager (`/etc/cvmfs/repositories.d/NAME` exists): the cvmfs backend is
then chosen without `--backend`. A path (with a `/`, or `.`) is a directory
repository. Any other bare name is refused rather than guessed, because a DUCC
cron line run where the repository is not set up would otherwise convert into
`./unpacked.cern.ch` and report success; an existing directory that already holds
a repository is still taken as one.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ..errors import LazypodError
from ..layout import LAYERS, METADATA, PODMAN_STORE
from .app import temporary_dir

# Backends, registries and sources are imported where used: a command that needs
# none of them (`ls`, `check`) starts without loading them.
if TYPE_CHECKING:
    from ..backend import Backend
    from ..backend.cvmfs import CvmfsConfig
    from ..registry import RegistryClient
    from ..sources import Sources

__all__ = [
    "GRACE_PERIOD",
    "backend_for",
    "backend_options",
    "cvmfs_config",
    "publish_options",
    "read_path",
    "registry_client",
    "registry_options",
    "sources",
]

F = TypeVar("F", bound=Callable[..., Any])


def registry_options(func: F) -> F:
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


def publish_options(func: F) -> F:
    """What a conversion writes, and DUCC's conversion flags."""
    func = click.option("-p", "--skip-podman", is_flag=True,
                        help="Do not write the podman stores (.podmanStore, .podmanLayers).")(func)
    func = click.option("-s", "--skip-flat", is_flag=True,
                        help="Do not write flat root file systems (.flat) and public links.")(func)
    func = click.option("-f", "--overwrite-layers", is_flag=True,
                        help="Fetch and unpack every layer again, even those the repository "
                             "has (repairs a layer damaged on disk), and check the views of "
                             "every image (a run otherwise renders only new images).")(func)
    func = click.option("-g", "--convert-again", is_flag=True,
                        help="Convert images the repository already holds as their source "
                             "has them (their metadata and views are rewritten).")(func)
    func = click.option("-d", "--skip-layers", is_flag=True,
                        help="Fetch no layers: only images whose layers the repository has "
                             "are converted; the others are skipped (not failed).")(func)
    func = click.option("-r", "--attempts", type=click.IntRange(1, 100), default=1,
                        show_default=True, metavar="N",
                        help="Times to try each image before it counts as failed.")(func)
    func = click.option("-i", "--skip-thin-image", is_flag=True, expose_value=False,
                        help="Accepted for DUCC: lazypod makes no thin images.")(func)
    func = click.option("--thin-image-name", metavar="NAME", expose_value=False,
                        help="Accepted for DUCC: lazypod makes no thin images.")(func)
    func = click.option("-u", "--username", metavar="USER", expose_value=False,
                        help="Accepted for DUCC (the thin image's push user): unused.")(func)
    func = click.option("--workers", type=click.IntRange(1, 32), default=4, show_default=True,
                        help="Layers fetched and unpacked at once.")(func)
    func = click.option("--progress/--no-progress", default=None,
                        help="Progress bars (default: when stderr is a terminal).")(func)
    return backend_options(func)


def backend_options(func: F) -> F:
    func = click.option("--backend", "backend_kind", type=click.Choice(["dir", "cvmfs"]),
                        help="What REPOSITORY is: a directory, or a CVMFS repository on "
                             "this release manager machine (default: cvmfs for a name "
                             "listed in /etc/cvmfs/repositories.d, else dir).")(func)
    func = click.option("--force", is_flag=True,
                        help="cvmfs: abort a transaction found open instead of failing; "
                             "garbage-collection: collect even while some image's metadata "
                             "is unreadable (its layers count as unused).")(func)
    func = click.option("-t", "--work-dir", "--temporary-dir", "work_dir",
                        type=click.Path(file_okay=False, path_type=Path),
                        help="cvmfs: local directory for unpacking layers before they are "
                             "published (default: $LAZYPOD_WORK_DIR, $DUCC_TMP_DIR, "
                             "/var/spool/lazypod).")(func)
    func = click.option("--wait-for-readers", type=click.FloatRange(min=0), default=0,
                        metavar="SECONDS",
                        help="cvmfs: when other processes hold files under the repository's "
                             "mounts (cvmfs_server would ask whether to go on), wait this "
                             "long for them before failing (default: fail at once).")(func)
    return click.option("--public-root", metavar="PATH",
                        help="Absolute path at which clients see the repository, for the "
                             "podman stores' links (default: the repository path; "
                             "/cvmfs/NAME for CVMFS).")(func)


def _cvmfs_config_dir() -> Path:
    return Path(os.environ.get("LAZYPOD_CVMFS_CONFIG_DIR", "/etc/cvmfs"))


def _is_cvmfs_repository(name: str) -> bool:
    return "/" not in name and name not in (".", "..") and \
        (_cvmfs_config_dir() / "repositories.d" / name).is_dir()


def _holds_repository(path: Path) -> bool:
    return any((path / name).is_dir() for name in (LAYERS, METADATA, PODMAN_STORE))


def backend_kind_for(repository: str, kind: str | None) -> str:
    """The backend REPOSITORY means (see the module's docstring)."""
    if not repository.strip():
        raise LazypodError("the repository is an empty string (an unset variable?): give a "
                           "path, or the name of a CVMFS repository")
    if kind is not None:
        return kind
    if _is_cvmfs_repository(repository):
        return "cvmfs"
    if "/" in repository or repository in (".", "..") or _holds_repository(Path(repository)):
        return "dir"
    raise LazypodError(
        f"{repository!r} is neither a path nor a CVMFS repository of this machine (no "
        f"{_cvmfs_config_dir()}/repositories.d/{repository}): write ./{repository} for a "
        f"directory here, or create the repository with `cvmfs_server mkfs {repository}`")


def backend_for(repository: str, kind: str | None, *, public_root: str | None, force: bool,
                work_dir: Path | None, wait_for_readers: float = 0,
                create: bool = True) -> Backend:
    from ..backend.cvmfs import CvmfsBackend
    from ..backend.directory import DirectoryBackend

    if backend_kind_for(repository, kind) == "cvmfs":
        return CvmfsBackend(cvmfs_config(repository, public_root=public_root, force=force,
                                         work_dir=work_dir, wait_for_readers=wait_for_readers))
    return DirectoryBackend(Path(repository), public_root=public_root, create=create)


def cvmfs_config(repository: str, *, public_root: str | None, force: bool,
                 work_dir: Path | None, wait_for_readers: float) -> CvmfsConfig:
    """The cvmfs backend's settings: options, then the environment (LAZYPOD_WORK_DIR,
    DUCC_TMP_DIR; LAZYPOD_CVMFS_MOUNT_ROOT, LAZYPOD_CVMFS_CLIENT_ROOT and
    LAZYPOD_CVMFS_CONFIG_DIR move /cvmfs, /var/spool/cvmfs/NAME/rdonly and /etc/cvmfs,
    for test set-ups)."""
    from ..backend.cvmfs import CvmfsConfig

    env = os.environ
    client = env.get("LAZYPOD_CVMFS_CLIENT_ROOT")
    work = work_dir or temporary_dir() or Path(
        env.get("LAZYPOD_WORK_DIR") or env.get("DUCC_TMP_DIR") or "/var/spool/lazypod")
    return CvmfsConfig(
        repository,
        mount_root=Path(env.get("LAZYPOD_CVMFS_MOUNT_ROOT", "/cvmfs")),
        client_root=Path(client) / repository if client else None,
        config_dir=_cvmfs_config_dir(),
        work_dir=work,
        public_root=public_root,
        force=force,
        wait_for_readers=wait_for_readers,
    )


def read_path(repository: str) -> Path:
    """A repository to read (ls, check, views): a path, or a CVMFS repository's name
    (its mount, /cvmfs/NAME)."""
    path = Path(repository)
    if not repository.strip():
        raise click.BadParameter("an empty string (an unset variable?)")
    if path.is_dir():
        return path
    if _is_cvmfs_repository(repository):
        return Path(os.environ.get("LAZYPOD_CVMFS_MOUNT_ROOT", "/cvmfs")) / repository
    raise click.BadParameter(f"{repository} is not a directory")


def registry_client(insecure: tuple[str, ...], retry_for: float = 60.0) -> RegistryClient:
    """The registry client, with podman's registries.conf (insecure registries,
    mirrors) and DUCC's DUCC_AUTH_REGISTRIES (logins, proxies) read once, here: a
    mistake in either fails any command that talks to a registry, in one line."""
    from ..ducc_env import ducc_registries
    from ..registry import RegistryClient
    from ..registry_conf import read_registries_conf
    from ..routes import Routes

    conf = read_registries_conf()
    routes = Routes(ducc_registries(), conf.namespaces)
    return RegistryClient(insecure=set(insecure) | conf.insecure, routes=routes,
                          retry_for=retry_for)


@contextlib.contextmanager
def sources(insecure: tuple[str, ...], retry_for: float = 60.0) -> Iterator[Sources]:
    """Every image source (registries, OCI layouts and archives, podman's storage)
    behind one, for the length of a command."""
    from ..sources import Sources

    with registry_client(insecure, retry_for) as registry, Sources(registry) as found:
        yield found


_GRACE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([dhms]?)\s*$")
_UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1, "": 86400}


class _GracePeriod(click.ParamType):  # type: ignore[type-arg]
    """DUCC's integer days (`7`), or a number with a unit: `7d`, `12h`, `30m`, `45s`."""

    name = "PERIOD"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        if isinstance(value, (int, float)):
            return float(value) * 86400
        match = _GRACE.match(str(value))
        if not match:
            self.fail(f"{value!r} is not a period: give days (7, as DUCC) or a number with "
                      "a unit (7d, 12h, 30m, 45s)", param, ctx)
        return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


GRACE_PERIOD = _GracePeriod()
