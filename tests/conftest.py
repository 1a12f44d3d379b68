"""Fixtures: the real registry and podman, started and isolated by the test run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support.images import Image, busybox_layer, image
from support.podman import Podman
from support.proxy import FaultyProxy
from support.registry import Registry

LAZYPOD = str(Path(sys.executable).with_name("lazypod"))


@pytest.fixture(scope="session", autouse=True)
def record_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The run's record caches (lazypod's, in-process and in its commands) in a
    directory of the run's own, not in the user's ~/.cache."""
    path = tmp_path_factory.mktemp("record-cache")
    saved = os.environ.get("LAZYPOD_CACHE_DIR")
    os.environ["LAZYPOD_CACHE_DIR"] = str(path)
    yield path
    if saved is None:
        os.environ.pop("LAZYPOD_CACHE_DIR", None)
    else:
        os.environ["LAZYPOD_CACHE_DIR"] = saved


@pytest.fixture()
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A record cache of the test's own, with no racy-file margin: the tests change
    files right after reading them (and wait out the clock tick themselves)."""
    from lazypod import record_cache

    cache = tmp_path / "cache"
    monkeypatch.setenv("LAZYPOD_CACHE_DIR", str(cache))
    monkeypatch.setattr(record_cache, "RACY_SECONDS", 0.0)
    return cache


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = Registry(tmp_path_factory.mktemp("registry"))
    yield reg
    reg.stop()


@pytest.fixture()
def proxy(registry: Registry) -> Iterator[FaultyProxy]:
    front = FaultyProxy(registry.host)
    yield front
    front.stop()


@pytest.fixture(scope="session")
def busybox_image(registry: Registry) -> tuple[str, Image]:
    img = image([busybox_layer()])
    return registry.push("library/busybox", "1", img), img


class Lazypod:
    """Runs the real `lazypod` command, isolated from the machine's podman config."""

    def __init__(self, home: Path) -> None:
        home.mkdir(parents=True, exist_ok=True)
        (home / "registries.conf").write_text("")
        self.env = {
            **os.environ,
            "HOME": str(home),
            "XDG_CONFIG_HOME": str(home / ".config"),
            "XDG_RUNTIME_DIR": str(home / "run"),
            "CONTAINERS_REGISTRIES_CONF": str(home / "registries.conf"),
            "REGISTRY_AUTH_FILE": str(home / "auth.json"),
        }

    def __call__(self, *args: str, check: bool = True, timeout: float = 600,
                 cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([LAZYPOD, *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=cwd)
        if check and proc.returncode != 0:
            raise AssertionError(f"lazypod {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stderr}")
        return proc

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([LAZYPOD, *args], env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def convert(self, image: str, root: Path, *extra: str,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        host = image.split("/", 1)[0]
        return self("convert-single-image", "--insecure-registry", host, image, str(root),
                    *extra, check=check)


@pytest.fixture()
def lazypod(tmp_path: Path) -> Lazypod:
    return Lazypod(tmp_path / "lazypod-home")


@pytest.fixture()
def podman_factory(tmp_path: Path) -> Iterator[Callable[..., Podman]]:
    made: list[Podman] = []

    def make(name: str = "podman", **kwargs: object) -> Podman:
        pod = Podman(tmp_path / name, **kwargs)  # type: ignore[arg-type]
        made.append(pod)
        return pod

    yield make
    for pod in made:
        pod.reset()


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    return tmp_path / "repo"


def tree_of(root: Path) -> dict[str, tuple[int, int, int, bytes | str]]:
    """A repository's files, for "unchanged" assertions (mode, uid, size, content)."""
    out: dict[str, tuple[int, int, int, bytes | str]] = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            if name == ".lazypod.lock":  # holds the pid of the last run
                out[str(path.relative_to(root))] = (st.st_mode, st.st_uid, 0, b"")
                continue
            if path.is_symlink():
                content: bytes | str = os.readlink(path)
            elif path.is_file() and name != ".lazypod.lock":
                content = path.read_bytes()
            else:
                content = b""
            out[str(path.relative_to(root))] = (st.st_mode, st.st_uid, st.st_size
                                                if not path.is_dir() else 0, content)
    return out


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The integration tests need the real tools (never skipped for want of them: the
    run fails, saying what to do); tests/unit needs none and runs anywhere."""
    unit = Path(__file__).parent / "unit"
    if all(unit in Path(str(item.path)).parents for item in items):
        return
    for tool in ("podman", "docker-registry", "fuse-overlayfs"):
        if shutil.which(tool) is None:
            raise pytest.UsageError(f"{tool} is missing: run scripts/setup.sh first")
