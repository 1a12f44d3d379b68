"""The cvmfs backend's plan for one new layer: every entry goes into the tar that
`cvmfs_server ingest` reads (whiteouts included, a second name of a file as a
hardlink member, nothing read through a symlink of the layer); xattrs, which ingest
drops, are written in the transaction that follows, and the times of the
directories that held them put back."""

from __future__ import annotations

import os
import stat
import tarfile
from pathlib import Path

import pytest

from lazypod.backend.cvmfs_plan import LayerPlan
from lazypod.digest import Digest

MTIME = 1_600_000_000
DIGEST = Digest.of(b"a layer")


def user_xattrs_work(path: Path) -> bool:
    probe = path / ".xattr-probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, "user.probe", b"1")
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


def make_layer(root: Path, *, xattrs: bool) -> Path:
    """A layer as lazypod unpacks one (overlay format), made with plain system calls."""
    layerfs = root / "layerfs"
    for directory in ("etc", "bin", "run", "usr/lib"):
        (layerfs / directory).mkdir(parents=True, exist_ok=True)
    (layerfs / "etc/conf").write_bytes(b"key=value\n")
    os.chmod(layerfs / "etc/conf", 0o640)
    (layerfs / "bin/a").write_bytes(b"#!/bin/sh\n")
    os.link(layerfs / "bin/a", layerfs / "bin/b")
    os.symlink("a", layerfs / "bin/sh")
    os.symlink("/etc", layerfs / "escape")  # the publisher's /etc: never followed
    os.mknod(layerfs / "gone", stat.S_IFCHR | 0o644, os.makedev(0, 0))  # a whiteout
    os.mkfifo(layerfs / "run/fifo", 0o600)
    if xattrs:
        os.setxattr(layerfs / "etc/conf", "user.origin", b"test")
        os.setxattr(layerfs / "usr/lib", "user.dir", b"yes")
    for dirpath, dirnames, filenames in os.walk(layerfs, topdown=False):
        for name in [*filenames, *dirnames, ""]:
            os.utime(os.path.join(dirpath, name), (MTIME, MTIME), follow_symlinks=False)
    return layerfs


@pytest.fixture()
def layer(tmp_path: Path) -> Path:
    if not user_xattrs_work(tmp_path):
        pytest.skip("the file system of the temporary directory has no user xattrs")
    return make_layer(tmp_path / "local", xattrs=True)


def members(plan: LayerPlan, prefix: str) -> dict[str, tuple[tarfile.TarInfo, bytes | None]]:
    """The plan's members, each file's content read while the plan holds the layer open."""
    out: dict[str, tuple[tarfile.TarInfo, bytes | None]] = {}
    for info, content in plan.members(prefix):
        data: bytes | None = None
        if callable(content):
            fd = content()
            try:
                data = os.read(fd, 1 << 20)
            finally:
                os.close(fd)
        elif content is not None:
            data = content
        assert info.name not in out, info.name
        out[info.name] = (info, data)
    return out


def test_every_entry_goes_into_the_tar(layer: Path) -> None:
    prefix = ".layers/ab/abcd/layerfs"
    found = members(LayerPlan.make(DIGEST, layer), prefix)
    names = list(found)
    assert names[0] == prefix  # the layer root, as an explicit member
    rel = sorted(n[len(prefix) + 1:] for n in names[1:])
    assert rel == ["bin", "bin/a", "bin/b", "bin/sh", "escape", "etc", "etc/conf", "gone",
                   "run", "run/fifo", "usr", "usr/lib"]
    for name in names:  # parents before their children
        parent = name.rpartition("/")[0]
        if name != prefix:
            assert names.index(parent) < names.index(name)


def test_members_carry_what_ingest_keeps(layer: Path) -> None:
    prefix = "p"
    found = members(LayerPlan.make(DIGEST, layer), prefix)
    conf, data = found["p/etc/conf"]
    assert conf.isreg() and data == b"key=value\n" and conf.size == len(data)
    assert conf.mode == 0o640 and conf.mtime == MTIME
    assert (conf.uid, conf.gid) == (os.geteuid(), os.getegid())
    assert found["p/etc"][0].isdir() and found["p/etc"][0].mtime == MTIME
    whiteout, _ = found["p/gone"]
    assert whiteout.ischr() and (whiteout.devmajor, whiteout.devminor) == (0, 0)
    assert found["p/run/fifo"][0].isfifo()
    sh, _ = found["p/bin/sh"]
    assert sh.issym() and sh.linkname == "a"
    escape, _ = found["p/escape"]
    assert escape.issym() and escape.linkname == "/etc"
    assert not any(name.startswith("p/escape/") for name in found)


def test_a_second_name_is_a_hardlink_member(layer: Path) -> None:
    found = members(LayerPlan.make(DIGEST, layer), "p")
    (first, first_data), (second, second_data) = found["p/bin/a"], found["p/bin/b"]
    # Whichever name comes first carries the content; the other links to it.
    if first.islnk():
        (first, first_data), (second, second_data) = (second, second_data), (first, first_data)
    assert first.isreg() and first_data == b"#!/bin/sh\n"
    assert second.islnk() and second.linkname == first.name and second_data is None


def test_xattrs_are_left_for_the_transaction(layer: Path, tmp_path: Path) -> None:
    plan = LayerPlan.make(DIGEST, layer)
    assert plan.needs_transaction
    # What ingest made of the layer: the same entries, no xattrs, new directory times.
    ingested = make_layer(tmp_path / "server", xattrs=False)
    os.utime(ingested / "etc", (MTIME + 500, MTIME + 500))
    os.utime(ingested / "usr", (MTIME + 500, MTIME + 500))
    plan.write_xattrs(ingested)
    assert os.getxattr(ingested / "etc/conf", "user.origin") == b"test"
    assert os.getxattr(ingested / "usr/lib", "user.dir") == b"yes"
    assert "user.origin" not in os.listxattr(ingested / "bin/a")
    # The directories holding them have the layer's times again.
    assert os.stat(ingested / "etc").st_mtime == MTIME
    assert os.stat(ingested / "usr").st_mtime == MTIME


def test_a_layer_without_xattrs_needs_no_transaction(tmp_path: Path) -> None:
    plan = LayerPlan.make(DIGEST, make_layer(tmp_path / "plain", xattrs=False))
    assert not plan.needs_transaction


def test_a_socket_cannot_be_ingested(tmp_path: Path) -> None:
    import socket

    layerfs = tmp_path / "layerfs"
    layerfs.mkdir()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(layerfs / "sock"))
        plan = LayerPlan.make(DIGEST, layerfs)
        with pytest.raises(ValueError, match="socket"):
            members(plan, "p")
