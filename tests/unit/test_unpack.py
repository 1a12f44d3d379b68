"""The unpacker: overlay whiteouts, metadata, and the one door for hostile names."""

from __future__ import annotations

import io
import os
import stat

import pytest

from lazypod.errors import LayerError, UnsafeLayer
from lazypod.tarstream import TarReader
from lazypod.unpack import DirectorySink, unpack_layer
from support.images import Entry, tar_bytes


def unpack(tmp_path, entries, warnings=None):
    root = tmp_path / "layerfs"
    root.mkdir()
    warn = (warnings if warnings is not None else []).append
    stats = unpack_layer(TarReader(io.BytesIO(tar_bytes(entries))),
                         DirectorySink(root, warn=warn), warn=warn)
    return root, stats


def test_whiteouts_become_overlay_whiteouts(tmp_path):
    root, stats = unpack(tmp_path, [
        Entry("a/", "dir"),
        Entry("a/.wh.gone", uid=5, gid=6),
        Entry("b/.wh..wh..opq"),
        Entry("b/new", data=b"n"),
        Entry(".wh..wh.plnk/", "dir"),  # AUFS bookkeeping: dropped
    ])
    st = os.lstat(root / "a/gone")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0 and (st.st_uid, st.st_gid) == (5, 6)
    assert not (root / "a/.wh.gone").exists()
    # No marker: whiteouts of what lies below come with the views (views.opaque).
    assert os.listxattr(root / "b") == []
    assert sorted(os.listdir(root / "b")) == ["new"]
    assert not (root / ".wh..wh.plnk").exists()
    assert (stats.whiteouts, stats.opaque_dirs) == ([(b"a", b"gone")], [(b"b",)])


def test_metadata_is_kept(tmp_path):
    root, stats = unpack(tmp_path, [
        Entry("d/", "dir", mode=0o700, uid=1000, gid=1001, mtime=1_600_000_000),
        Entry("d/suid", data=b"#!", mode=0o4755, uid=0, gid=0),
        Entry("d/sticky/", "dir", mode=0o1777),
        Entry("d/fifo", "fifo", mode=0o600),
        Entry("d/dev", "block", mode=0o660, major=8, minor=1),
        Entry("d/x", data=b"x", xattrs={"user.a": "b"}),
        Entry("d/h", "hardlink", target="d/x"),
        Entry("d/s", "symlink", target="/absolute/target"),
    ])
    st = os.lstat(root / "d")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime) == (
        0o700, 1000, 1001, 1_600_000_000)
    assert stat.S_IMODE(os.lstat(root / "d/suid").st_mode) == 0o4755
    assert stat.S_IMODE(os.lstat(root / "d/sticky").st_mode) == 0o1777
    assert stat.S_ISFIFO(os.lstat(root / "d/fifo").st_mode)
    assert os.lstat(root / "d/dev").st_rdev == os.makedev(8, 1)
    assert os.getxattr(root / "d/x", "user.a") == b"b"
    assert os.lstat(root / "d/h").st_ino == os.lstat(root / "d/x").st_ino
    assert os.readlink(root / "d/s") == "/absolute/target"
    assert stat.S_IMODE(os.lstat(root).st_mode) == 0o555  # as containers/storage makes it
    assert stats.uids == {0, 1000}


def test_later_members_replace_earlier_ones(tmp_path):
    root, _ = unpack(tmp_path, [
        Entry("x/", "dir"),
        Entry("x/child", data=b"c"),
        Entry("x", data=b"now a file"),
        Entry("y", data=b"file"),
        Entry("y/", "dir"),
        Entry("y/z", data=b"z"),
    ])
    assert (root / "x").read_bytes() == b"now a file"
    assert (root / "y/z").read_bytes() == b"z"


def test_overlay_xattrs_from_the_tarball_are_dropped(tmp_path):
    warnings: list[str] = []
    root, _ = unpack(tmp_path, [
        Entry("d/", "dir", xattrs={"trusted.overlay.redirect": "/etc", "user.ok": "1"}),
    ], warnings)
    assert os.listxattr(root / "d") == ["user.ok"]
    assert any("trusted.overlay.redirect" in w for w in warnings)


@pytest.mark.parametrize(
    ("entries", "fragment"),
    [
        ([Entry("../x", data=b"x")], "climbs out"),
        ([Entry("/etc/x", data=b"x")], "absolute name"),
        ([Entry("l", "symlink", target="/etc"), Entry("l/x", data=b"x")], "through symlink"),
        ([Entry("l", "symlink", target="."), Entry("l/x/y", data=b"x")], "through symlink"),
        ([Entry("h", "hardlink", target="../etc/passwd")], "hardlink out of the layer"),
        ([Entry("h", "hardlink", target="not-there")], "not a file of this layer"),
        ([Entry("d/", "dir"), Entry("h", "hardlink", target="d")], "not a file of this layer"),
        ([Entry("d/.wh..", data=b"")], "whiteout of nothing"),
    ],
)
def test_hostile_members_are_refused(tmp_path, entries, fragment):
    with pytest.raises(UnsafeLayer, match=fragment):
        unpack(tmp_path, entries)
    assert not (tmp_path / "x").exists() and not (tmp_path / "etc").exists()


def test_a_non_directory_root_member_is_refused(tmp_path):
    with pytest.raises(LayerError, match="names the layer root"):
        unpack(tmp_path, [Entry("./", data=b"x")])


def test_device_nodes_do_not_open_host_devices_to_readers(tmp_path):
    warnings: list[str] = []
    root, _ = unpack(tmp_path, [
        Entry("dev/", "dir"),
        Entry("dev/null", "char", mode=0o666, major=1, minor=3),
        Entry("dev/sda", "block", mode=0o660, uid=0, gid=6, major=8, minor=0),
        Entry("dev/mem", "char", mode=0o600, uid=1000, gid=1000, major=1, minor=1),
    ], warnings)
    null, sda, mem = (os.lstat(root / "dev" / n) for n in ("null", "sda", "mem"))
    assert stat.S_IMODE(null.st_mode) == 0o666
    assert (stat.S_IMODE(sda.st_mode), sda.st_uid, sda.st_gid) == (0o600, 0, 0)
    assert (stat.S_IMODE(mem.st_mode), mem.st_uid) == (0o600, 0)
    assert sda.st_rdev == os.makedev(8, 0)
    assert len([w for w in warnings if "device" in w]) == 2


def test_deep_paths_are_fine_absurd_ones_refused(tmp_path):
    deep = "/".join(["d"] * 255)
    root, _ = unpack(tmp_path, [Entry(f"{deep}/file", data=b"deep")])
    assert (root / deep / "file").read_bytes() == b"deep"
    (tmp_path / "2").mkdir()
    with pytest.raises(UnsafeLayer, match="257 directories deep"):
        unpack(tmp_path / "2", [Entry("/".join(["d"] * 257), data=b"x")])


def test_a_second_name_cannot_untame_a_device(tmp_path):
    warnings: list[str] = []
    root, _ = unpack(tmp_path, [
        Entry("dev/", "dir"),
        Entry("dev/sda", "block", mode=0o660, uid=0, gid=6, major=8, minor=0),
        Entry("dev/also-sda", "hardlink", target="dev/sda", mode=0o666, uid=1000, gid=1000),
    ], warnings)
    for name in ("sda", "also-sda"):
        st = os.lstat(root / "dev" / name)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 0, 0), name
    assert len(warnings) == 2
