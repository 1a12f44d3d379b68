"""The unpacker: overlay whiteouts, metadata, and the one door for hostile names.

Tests that write a layer run with each file-system evaluator (`fs`): root's where the
tests run as root (scripts/test.sh runs them as root, then as an ordinary user), an
ordinary user's always."""

from __future__ import annotations

import io
import os
import stat

import pytest

from lazypod.errors import LayerError, UnsafeLayer
from lazypod.fseval import FsEval, Meta, RootFs, UnprivilegedFs
from lazypod.fsutil import current_umask
from lazypod.securepath import SafePath
from lazypod.tarstream import TarReader
from lazypod.unpack import DirectorySink, unpack_layer
from support.images import Entry, tar_bytes

ROOT = os.geteuid() == 0
NEEDS_ROOT = "RootFs gives entries away and makes device nodes: only as root (the " \
    "unprivileged run tests UnprivilegedFs)"


@pytest.fixture(params=["root", "unprivileged"])
def fs(request) -> FsEval:
    if request.param == "root":
        if not ROOT:
            pytest.skip(NEEDS_ROOT)
        return RootFs(umask=current_umask())
    return UnprivilegedFs(umask=current_umask())


@pytest.fixture()
def root_fs() -> FsEval:
    if not ROOT:
        pytest.skip(NEEDS_ROOT)
    return RootFs(umask=current_umask())


def owner(fs: FsEval, uid: int, gid: int) -> tuple[int, int]:
    """Whose an entry the tar gives to uid:gid is on disk."""
    return (uid, gid) if fs.privileged else (os.geteuid(), os.getegid())


def unpack(tmp_path, entries, warnings=None, fs=None):
    root = tmp_path / "layerfs"
    root.mkdir()
    warn = (warnings if warnings is not None else []).append
    stats = unpack_layer(TarReader(io.BytesIO(tar_bytes(entries))),
                         DirectorySink(root, fs=fs, warn=warn), warn=warn)
    return root, stats


class RecordingSink:
    """Keeps what the unpacker hands over (the judged operations), writes nothing."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, SafePath, Meta | None]] = []

    def directory(self, path, meta):
        self.calls.append(("directory", path, meta))

    def file(self, path, meta, chunks):
        self.calls.append(("file", path, meta))

    def symlink(self, path, meta, target):
        self.calls.append(("symlink", path, meta))

    def hardlink(self, path, target, meta):
        self.calls.append(("hardlink", path, meta))

    def device(self, path, meta, kind, major, minor):
        self.calls.append(("device", path, meta))

    def fifo(self, path, meta):
        self.calls.append(("fifo", path, meta))

    def whiteout(self, path, meta):
        self.calls.append(("whiteout", path, meta))

    def opaque(self, path):
        self.calls.append(("opaque", path, None))

    def finish(self):
        pass


def judged(entries, warnings):
    sink = RecordingSink()
    unpack_layer(TarReader(io.BytesIO(tar_bytes(entries))), sink, warn=warnings.append)
    return {b"/".join(path): meta for _, path, meta in sink.calls}


def test_whiteouts_become_overlay_whiteouts(tmp_path, fs):
    root, stats = unpack(tmp_path, [
        Entry("a/", "dir"),
        Entry("a/.wh.gone", uid=5, gid=6),
        Entry("b/.wh..wh..opq"),
        Entry("b/new", data=b"n"),
        Entry(".wh..wh.plnk/", "dir"),  # AUFS bookkeeping: dropped
    ], fs=fs)
    st = os.lstat(root / "a/gone")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert (st.st_uid, st.st_gid) == owner(fs, 5, 6)
    assert not (root / "a/.wh.gone").exists()
    # No marker: whiteouts of what lies below come with the views (views.opaque).
    assert os.listxattr(root / "b") == []
    assert sorted(os.listdir(root / "b")) == ["new"]
    assert not (root / ".wh..wh.plnk").exists()
    assert (stats.whiteouts, stats.opaque_dirs) == ([(b"a", b"gone")], [(b"b",)])


def test_metadata_is_kept(tmp_path, fs):
    root, stats = unpack(tmp_path, [
        Entry("d/", "dir", mode=0o700, uid=1000, gid=1001, mtime=1_600_000_000),
        Entry("d/suid", data=b"#!", mode=0o4755, uid=0, gid=0),
        Entry("d/sticky/", "dir", mode=0o1777),
        Entry("d/fifo", "fifo", mode=0o600, uid=7, gid=8),
        Entry("d/x", data=b"x", xattrs={"user.a": "b"}, uid=1000, gid=1000, mode=0o640),
        Entry("d/h", "hardlink", target="d/x", uid=1000, gid=1000, mode=0o640),
        Entry("d/s", "symlink", target="/absolute/target", uid=9, gid=9),
    ], fs=fs)
    st = os.lstat(root / "d")
    assert (stat.S_IMODE(st.st_mode), st.st_mtime) == (0o700, 1_600_000_000)
    assert (st.st_uid, st.st_gid) == owner(fs, 1000, 1001)
    assert stat.S_IMODE(os.lstat(root / "d/suid").st_mode) == 0o4755
    assert stat.S_IMODE(os.lstat(root / "d/sticky").st_mode) == 0o1777
    fifo = os.lstat(root / "d/fifo")
    assert stat.S_ISFIFO(fifo.st_mode) and (fifo.st_uid, fifo.st_gid) == owner(fs, 7, 8)
    x = os.lstat(root / "d/x")
    assert (stat.S_IMODE(x.st_mode), x.st_uid, x.st_gid) == (0o640, *owner(fs, 1000, 1000))
    assert os.lstat(root / "d/s").st_uid == owner(fs, 9, 9)[0]
    assert os.getxattr(root / "d/x", "user.a") == b"b"
    assert os.lstat(root / "d/h").st_ino == os.lstat(root / "d/x").st_ino
    assert os.readlink(root / "d/s") == "/absolute/target"
    assert stat.S_IMODE(os.lstat(root).st_mode) == 0o555  # as containers/storage makes it
    root_st = os.lstat(root)
    assert (root_st.st_uid, root_st.st_gid) == owner(fs, 0, 0)
    assert stats.uids == {0, 7, 9, 1000}  # the tar's owners, whoever unpacked it


def test_later_members_replace_earlier_ones(tmp_path, fs):
    root, _ = unpack(tmp_path, [
        Entry("x/", "dir"),
        Entry("x/child", data=b"c"),
        Entry("x", data=b"now a file"),
        Entry("y", data=b"file"),
        Entry("y/", "dir"),
        Entry("y/z", data=b"z"),
    ], fs=fs)
    assert (root / "x").read_bytes() == b"now a file"
    assert (root / "y/z").read_bytes() == b"z"


def test_overlay_xattrs_from_the_tarball_are_dropped(tmp_path, fs):
    warnings: list[str] = []
    root, _ = unpack(tmp_path, [
        Entry("d/", "dir", xattrs={"trusted.overlay.redirect": "/etc", "user.ok": "1"}),
    ], warnings, fs=fs)
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
def test_hostile_members_are_refused(tmp_path, entries, fragment, fs):
    with pytest.raises(UnsafeLayer, match=fragment):
        unpack(tmp_path, entries, fs=fs)
    assert not (tmp_path / "x").exists() and not (tmp_path / "etc").exists()


def test_a_non_directory_root_member_is_refused(tmp_path):
    with pytest.raises(LayerError, match="names the layer root"):
        unpack(tmp_path, [Entry("./", data=b"x")])


DEVICES = [
    Entry("dev/", "dir"),
    Entry("dev/null", "char", mode=0o666, major=1, minor=3),
    Entry("dev/sda", "block", mode=0o660, uid=0, gid=6, major=8, minor=0),
    Entry("dev/mem", "char", mode=0o600, uid=1000, gid=1000, major=1, minor=1),
]


def test_device_nodes_are_tamed_before_they_reach_a_sink():
    warnings: list[str] = []
    metas = judged(DEVICES, warnings)
    assert (metas[b"dev/null"].mode, metas[b"dev/null"].uid) == (0o666, 0)
    assert (metas[b"dev/sda"].mode, metas[b"dev/sda"].uid, metas[b"dev/sda"].gid) == (
        0o600, 0, 0)
    assert (metas[b"dev/mem"].mode, metas[b"dev/mem"].uid) == (0o600, 0)
    assert len([w for w in warnings if "device" in w]) == 2


def test_a_second_name_is_tamed_as_the_device_it_names():
    warnings: list[str] = []
    metas = judged([
        Entry("dev/", "dir"),
        Entry("dev/sda", "block", mode=0o660, uid=0, gid=6, major=8, minor=0),
        Entry("dev/also-sda", "hardlink", target="dev/sda", mode=0o666, uid=1000, gid=1000),
    ], warnings)
    for name in (b"dev/sda", b"dev/also-sda"):
        assert (metas[name].mode, metas[name].uid, metas[name].gid) == (0o600, 0, 0), name
    assert len(warnings) == 2


def test_an_ordinary_user_cannot_unpack_device_nodes(tmp_path):
    with pytest.raises(LayerError, match="'dev/null': unpacking device nodes needs root"):
        unpack(tmp_path, DEVICES, fs=UnprivilegedFs(umask=current_umask()))


def test_device_nodes_do_not_open_host_devices_to_readers(tmp_path, root_fs):
    warnings: list[str] = []
    root, _ = unpack(tmp_path, DEVICES, warnings, fs=root_fs)
    null, sda, mem = (os.lstat(root / "dev" / n) for n in ("null", "sda", "mem"))
    assert stat.S_IMODE(null.st_mode) == 0o666
    assert (stat.S_IMODE(sda.st_mode), sda.st_uid, sda.st_gid) == (0o600, 0, 0)
    assert (stat.S_IMODE(mem.st_mode), mem.st_uid) == (0o600, 0)
    assert sda.st_rdev == os.makedev(8, 0)
    assert len([w for w in warnings if "device" in w]) == 2


def test_deep_paths_are_fine_absurd_ones_refused(tmp_path, fs):
    deep = "/".join(["d"] * 255)
    root, _ = unpack(tmp_path, [Entry(f"{deep}/file", data=b"deep")], fs=fs)
    assert (root / deep / "file").read_bytes() == b"deep"
    (tmp_path / "2").mkdir()
    with pytest.raises(UnsafeLayer, match="257 directories deep"):
        unpack(tmp_path / "2", [Entry("/".join(["d"] * 257), data=b"x")])


def test_a_second_name_cannot_untame_a_device(tmp_path, root_fs):
    warnings: list[str] = []
    root, _ = unpack(tmp_path, [
        Entry("dev/", "dir"),
        Entry("dev/sda", "block", mode=0o660, uid=0, gid=6, major=8, minor=0),
        Entry("dev/also-sda", "hardlink", target="dev/sda", mode=0o666, uid=1000, gid=1000),
    ], warnings, fs=root_fs)
    for name in ("sda", "also-sda"):
        st = os.lstat(root / "dev" / name)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 0, 0), name
    assert len(warnings) == 2


def test_block_devices_keep_their_numbers(tmp_path, root_fs):
    root, _ = unpack(tmp_path, [Entry("d/dev", "block", mode=0o600, major=8, minor=1)],
                     fs=root_fs)
    assert os.lstat(root / "d/dev").st_rdev == os.makedev(8, 1)


def test_an_ordinary_user_keeps_user_xattrs_and_drops_trusted_ones(tmp_path):
    warnings: list[str] = []
    root, _ = unpack(tmp_path, [
        Entry("f", data=b"x", xattrs={"user.k": "v", "trusted.lazypod": "1"}),
    ], warnings, fs=UnprivilegedFs(umask=current_umask()))
    assert os.getxattr(root / "f", "user.k") == b"v"
    assert "trusted.lazypod" not in os.listxattr(root / "f")
    assert any("xattr trusted.lazypod of 'f' not kept" in w for w in warnings)


def test_modes_are_the_tars_whatever_the_umask(tmp_path, fs):
    """The umask is read when a layer is written, not when lazypod was imported."""
    old = os.umask(0o077)
    try:
        sink_fs = type(fs)(umask=current_umask())
        root, _ = unpack(tmp_path, [
            Entry("d/", "dir", mode=0o755),
            Entry("d/f", data=b"x", mode=0o644),
            Entry("d/g", data=b"x", mode=0o600),
        ], fs=sink_fs)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.lstat(root / "d").st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(root / "d/f").st_mode) == 0o644
    assert stat.S_IMODE(os.lstat(root / "d/g").st_mode) == 0o600


def test_errors_name_the_member(tmp_path, fs):
    (tmp_path / "layerfs").mkdir()
    with pytest.raises(LayerError, match="layer member 'l'"):
        # A NUL in a PAX linkpath reaches no system call: it is refused by name.
        unpack_layer(TarReader(io.BytesIO(_pax_symlink(b"l", b"a\0b"))),
                     DirectorySink(tmp_path / "layerfs", fs=fs))


def _pax_symlink(name: bytes, target: bytes) -> bytes:
    import tarfile

    info = tarfile.TarInfo(name.decode())
    info.type = tarfile.SYMTYPE
    info.linkname = "placeholder"
    info.pax_headers = {"linkpath": target.decode()}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info)
    return buf.getvalue()


def test_a_conversion_error_names_the_image_the_layer_and_the_member(tmp_path):
    """What a publisher reads in the log: which image, which of its layers, which member."""
    from helpers import FakeRegistry

    from lazypod import Converter, ConvertOptions, DirectoryBackend
    from lazypod.reference import parse_reference
    from support.images import image, layer

    hostile = layer([Entry("ok", data=b"x"), Entry("../escape", data=b"x")])
    registry = FakeRegistry()
    name = registry.push("test/hostile", "1", image([layer([Entry("base", data=b"b")]),
                                                     hostile]))
    with registry.client() as client:
        report = Converter(DirectoryBackend(tmp_path / "repo"), client,
                           ConvertOptions(workers=1)).convert([parse_reference(name)])
    [item] = report.images
    message = str(item.error)
    assert "\n" not in message, message
    assert "test/hostile:1" in message
    assert f"layer {hostile.digest.removeprefix('sha256:')[:12]}" in message
    assert "'../escape'" in message and "refusing the layer" in message
