"""A non-root user with subordinate ids runs images from the repository with the
configuration `lazypod podman-config --rootless` prints."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.images import edge_case_layers, image
from support.podman import ROOTLESS_USER, snapshot_in_container

pytestmark = [pytest.mark.podman, pytest.mark.registry, pytest.mark.rootless]


@pytest.fixture()
def shared_repo() -> Iterator[Path]:
    """A repository in a place the unprivileged user can reach (pytest's tmp is 0700)."""
    parent = Path(tempfile.mkdtemp(prefix="lazypod-shared-", dir="/tmp"))
    os.chmod(parent, 0o755)
    yield parent / "repo"
    shutil.rmtree(parent, ignore_errors=True)


def rootless_opts(lazypod, repo: Path) -> list[str]:
    printed = lazypod("podman-config", "--rootless", "--storage-opts", str(repo)).stdout.split()
    assert printed[0::2] == ["--storage-opt"] * (len(printed) // 2)
    return printed[1::2]


def test_rootless_user_sees_the_same_tree_as_a_normal_pull(
    registry, lazypod, podman_factory, shared_repo
):
    img = image(edge_case_layers(), label="rootless")
    name = registry.push("test/edge", "rootless", img)
    lazypod.convert(name, shared_repo)

    opts = rootless_opts(lazypod, shared_repo)
    from_repo = podman_factory("rootless-repo", user=ROOTLESS_USER, storage_opts=opts)
    # The same overlay settings, without the repository: only the image's origin differs.
    pulled = podman_factory("rootless-pulled", user=ROOTLESS_USER,
                            storage_opts=[o for o in opts if "additional" not in o])
    pulled("pull", "--tls-verify=false", name)

    mark = registry.mark()
    repo_tree = snapshot_in_container(from_repo, name)
    assert registry.requests(since=mark) == []
    pulled_tree = snapshot_in_container(pulled, name)

    assert repo_tree == expected_rootless_view(pulled_tree)
    assert "./opt/remove-me" not in repo_tree and "./var/lib/replaced/old-a" not in repo_tree
    assert repo_tree["./usr/local/bin/suid"][0] == "-rwsr-xr-x"
    assert repo_tree["./var/lib/gone/y"][1] == "9"


def expected_rootless_view(pulled: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """What a rootless user sees of the repository, from the same image pulled normally.

    Two documented differences, both from the kernel, not from lazypod's data:
    * the repository's files keep the publisher's owners, so the kernel checks the
      user's access as "other": a file that others may not read shows no content,
      and nothing below a directory that others may not enter is visible;
    * a rootless pull cannot create device nodes (podman skips them); the repository,
      written by root, has them.
    """
    expected = {}
    for path, (mode, size, digest, target) in pulled.items():
        parents = [p for p in pulled if path.startswith(p + "/") and p != "."]
        if any(pulled[p][0][7] != "r" or pulled[p][0][9] not in "xt" for p in parents):
            continue
        if mode.startswith("-") and mode[7] != "r":
            digest = ""
        expected[path] = (mode, size, digest, target)
    expected["./srv/null"] = ("crw-rw-rw-", "0", "-", "-")
    return expected


def test_rootless_container_can_write_where_the_image_expects(
    registry, lazypod, podman_factory, shared_repo
):
    img = image(edge_case_layers(), label="rootless-write")
    name = registry.push("test/edge", "rootless-write", img)
    lazypod.convert(name, shared_repo)
    podman = podman_factory("rootless-write", user=ROOTLESS_USER,
                            storage_opts=rootless_opts(lazypod, shared_repo))

    out = podman.text("run", "--rm", "--network=none", name, "/bin/busybox", "sh", "-c",
                      "echo changed > /etc/passwd && echo new > /opt/new && cat /etc/passwd "
                      "/opt/new && ls -l /etc/mtab")
    assert out.startswith("changed\nnew\n")
