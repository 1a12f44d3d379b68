"""The one seam for privilege (`fseval`): what root and an ordinary user do differently,
each tested whoever runs the suite as far as the kernel allows (scripts/test.sh runs
the unit suite as root, then as an ordinary user)."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from lazypod.digest import Digest
from lazypod.errors import LayerError
from lazypod.fseval import At, FsEval, Meta, RootFs, UnprivilegedFs, process_fs
from lazypod.fsutil import current_umask, make_dirs, write_new
from lazypod.unpack import DirectorySink
from lazypod.views.flat_tree import FlatTree, Node, OpenLayers, merge_layers, scan_layer

ROOT = os.geteuid() == 0


def meta(mode: int = 0o644, uid: int = 0, gid: int = 0, xattrs: dict[str, bytes] | None = None,
         mtime_ns: int = 1_600_000_000 * 10**9) -> Meta:
    return Meta(mode, uid, gid, mtime_ns, mtime_ns + 1, xattrs or {})


class Spy(UnprivilegedFs):
    """Records the changes an evaluator makes beyond the shared code."""

    def __init__(self) -> None:
        super().__init__(umask=0o022)
        self.calls: list[str] = []

    def chown(self, at: At, uid: int, gid: int) -> None:
        self.calls.append(f"chown {uid}:{gid}")

    def chmod(self, at: At, mode: int) -> None:
        self.calls.append(f"chmod {mode:o}")
        super().chmod(at, mode)


@pytest.fixture()
def directory(tmp_path: Path):
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    yield tmp_path, fd
    os.close(fd)


def test_the_process_gets_roots_evaluator_only_as_root():
    fs = process_fs()
    assert isinstance(fs, RootFs) is ROOT and fs.privileged is ROOT
    assert isinstance(fs, UnprivilegedFs) is not ROOT


def test_the_umask_is_read_when_the_evaluator_is_chosen():
    old = os.umask(0o077)
    try:
        assert current_umask() == 0o077
        assert process_fs().umask == 0o077
    finally:
        os.umask(old)
    assert process_fs().umask == old == current_umask()


def test_repository_files_are_0644_and_directories_0755_whatever_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        write_new(tmp_path / "f", b"x")
        make_dirs(tmp_path / "a" / "b")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "f").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "a").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(tmp_path / "a" / "b").st_mode) == 0o755


def test_modes_entries_are_made_with():
    root, user = RootFs(umask=0o022), UnprivilegedFs(umask=0o022)
    # Root writes into any directory: final permissions at once (less setuid bits).
    assert (root.new_dir_mode(0o2555), root.new_file_mode(0o4755)) == (0o555, 0o755)
    # A user must be able to fill what it makes; the modes come with the metadata.
    assert (user.new_dir_mode(0o555), user.new_file_mode(0o444)) == (0o700, 0o600)
    assert root.made(0o777) == 0o755


def test_an_ordinary_user_keeps_what_it_makes(directory):
    path, fd = directory
    (path / "f").write_bytes(b"x")
    UnprivilegedFs(umask=0o022).chown(At(fd, b"f"), 1234, 5678)
    st = os.lstat(path / "f")
    assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())


def test_root_gives_entries_away_never_through_a_symlink(directory):
    path, fd = directory
    (path / "f").write_bytes(b"x")
    os.symlink("f", path / "l")
    fs = RootFs(umask=0o022)
    if not ROOT:  # the kernel refuses an ordinary user; nothing hides it
        with pytest.raises(PermissionError):
            fs.chown(At(fd, b"f"), 1234, 5678)
        return
    fs.chown(At(fd, b"l"), 1234, 5678)
    assert os.lstat(path / "l").st_uid == 1234 and os.lstat(path / "f").st_uid == 0
    fs.chown(At(fd, b"."), 42, 43)
    assert (os.stat(path).st_uid, os.stat(path).st_gid) == (42, 43)


def test_an_ordinary_user_makes_no_device_node(directory):
    path, fd = directory
    with pytest.raises(LayerError, match="cannot create device node 'dev/sda': unpacking "
                                         "device nodes needs root"):
        UnprivilegedFs(umask=0o022).make_device(At(fd, b"sda"), stat.S_IFBLK | 0o600,
                                                os.makedev(8, 0), "dev/sda")
    assert os.listdir(path) == []


def test_root_makes_device_nodes_and_says_so_when_the_kernel_refuses(directory):
    path, fd = directory
    fs = RootFs(umask=0o022)
    if not ROOT:  # what root without CAP_MKNOD (a user namespace) meets too
        with pytest.raises(LayerError, match="'dev/sda': unpacking device nodes needs root"):
            fs.make_device(At(fd, b"sda"), stat.S_IFBLK | 0o600, os.makedev(8, 0), "dev/sda")
        return
    fs.make_device(At(fd, b"sda"), stat.S_IFBLK | 0o600, os.makedev(8, 0), "dev/sda")
    st = os.lstat(path / "sda")
    assert stat.S_ISBLK(st.st_mode) and st.st_rdev == os.makedev(8, 0)


def test_trusted_xattrs_are_roots(directory):
    path, fd = directory
    (path / "f").write_bytes(b"x")
    warnings: list[str] = []
    xattrs = {"user.k": b"v", "trusted.k": b"t"}
    UnprivilegedFs(umask=0o022).set_xattrs(At(fd, b"f"), xattrs, "f", warnings.append)
    assert os.getxattr(path / "f", "user.k") == b"v"
    assert warnings == ["xattr trusted.k of 'f' not kept: only root may set it"]
    if ROOT:
        assert not UnprivilegedFs(umask=0o022).may_set_xattr("trusted.k")
        RootFs(umask=0o022).set_xattrs(At(fd, b"f"), xattrs, "f", warnings.append)
        assert os.getxattr(path / "f", "trusted.k") == b"t"
        assert len(warnings) == 1


def test_xattrs_that_cannot_be_kept_warn_or_raise(directory):
    """user.* xattrs on a symlink: refused by the kernel to everyone."""
    path, fd = directory
    os.symlink("target", path / "l")
    warnings: list[str] = []
    fs = process_fs()
    fs.set_xattrs(At(fd, b"l"), {"user.k": b"v"}, "l", warnings.append)
    assert len(warnings) == 1 and "xattr user.k of 'l' not kept" in warnings[0]
    with pytest.raises(OSError) as raised:  # the cvmfs backend: every xattr must land
        fs.set_xattrs(At(fd, b"l"), {"user.k": b"v"}, "l", None)
    assert raised.value.errno in (errno.EPERM, errno.ENOTSUP)


def test_meta_is_applied_through_a_descriptor_a_name_or_the_directory_itself(directory):
    path, fd = directory
    fs = process_fs()
    (path / "by-name").write_bytes(b"x")
    fs.apply_meta(At(fd, b"by-name"), meta(0o4750, xattrs={"user.a": b"1"}), "by-name",
                  ours=True, created=None, warn=None)
    file_fd = os.open(path / "by-fd", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fs.apply_meta(At(file_fd), meta(0o640), "by-fd", ours=True, created=0o600, warn=None)
    finally:
        os.close(file_fd)
    fs.apply_meta(At(fd, b"."), meta(0o750), ".", ours=True, created=None, warn=None)
    for name, mode in (("by-name", 0o4750), ("by-fd", 0o640), (".", 0o750)):
        st = os.lstat(path / name)
        assert stat.S_IMODE(st.st_mode) == mode, name
        assert (st.st_atime_ns, st.st_mtime_ns) == (1_600_000_000 * 10**9 + 1,
                                                    1_600_000_000 * 10**9), name
    assert os.getxattr(path / "by-name", "user.a") == b"1"


def test_a_symlinks_own_times_are_set_its_target_untouched(directory):
    path, fd = directory
    (path / "target").write_bytes(b"x")
    before = os.stat(path / "target").st_mtime_ns
    os.symlink("target", path / "l")
    process_fs().apply_meta(At(fd, b"l"), meta(0o777), "l", ours=True, created=None,
                            symlink=True, warn=None)
    assert os.lstat(path / "l").st_mtime_ns == 1_600_000_000 * 10**9
    assert os.stat(path / "target").st_mtime_ns == before


@pytest.mark.parametrize(
    ("ours", "created", "owner", "expected"),
    [
        (True, 0o644, (0, 0), []),  # made as it should be: nothing to do
        (True, 0o600, (0, 0), ["chmod 644"]),
        (True, 0o644, (5, 0), ["chown 5:0"]),
        (False, 0o644, (0, 0), ["chown 0:0"]),  # an inode made before: its owner is set
        (True, None, (0, 0), ["chmod 644"]),
    ],
)
def test_only_what_differs_from_how_the_entry_was_made_is_changed(
    directory, ours, created, owner, expected
):
    path, fd = directory
    (path / "f").write_bytes(b"x")
    spy = Spy()
    spy.apply_meta(At(fd, b"f"), meta(0o644, *owner), "f", ours=ours, created=created,
                   warn=None)
    assert spy.calls == expected


def test_the_umask_decides_what_a_new_entry_is_made_as(directory):
    path, fd = directory
    (path / "f").write_bytes(b"x")
    spy = Spy()
    spy.umask = 0o077
    spy.apply_meta(At(fd, b"f"), meta(0o644), "f", ours=True, created=0o644, warn=None)
    assert spy.calls == ["chmod 644"]  # made 0600 under that umask


def test_evaluators_say_what_they_are():
    assert repr(RootFs(umask=0o022)) == "RootFs(umask=0o022)"
    assert isinstance(process_fs(), FsEval)


def evaluator(kind: str) -> FsEval:
    if kind == "root" and not ROOT:
        pytest.skip("RootFs gives entries away and makes device nodes: only as root (the "
                    "unprivileged run tests UnprivilegedFs)")
    return (RootFs if kind == "root" else UnprivilegedFs)(umask=current_umask())


T = 1_500_000_000 * 10**9


@pytest.mark.parametrize("kind", ["root", "unprivileged"])
def test_flat_trees_are_written_through_the_evaluator(tmp_path, kind):
    fs = evaluator(kind)
    tree = FlatTree({}, {}, OpenLayers(fs=fs))
    tree.put(b"d", Node(stat.S_IFDIR | 0o750, uid=1000, gid=1001, mtime_ns=T))
    tree.put(b"d/suid", Node(stat.S_IFREG | 0o4755, uid=1000, gid=1001, mtime_ns=T,
                             data=b"#!"))
    tree.put(b"d/fifo", Node(stat.S_IFIFO | 0o640, uid=7, gid=8, mtime_ns=T))
    tree.put(b"d/l", Node(stat.S_IFLNK | 0o777, uid=9, gid=9, mtime_ns=T, target=b"/x"))
    dest = tmp_path / "flat"
    dest.mkdir()
    tree.materialize(dest)
    me = (os.geteuid(), os.getegid())
    for name, mode, owner in (("d", 0o750, (1000, 1001)), ("d/suid", 0o4755, (1000, 1001)),
                              ("d/fifo", 0o640, (7, 8))):
        st = os.lstat(dest / name)
        assert stat.S_IMODE(st.st_mode) == mode, name
        assert (st.st_uid, st.st_gid) == (owner if fs.privileged else me), name
        assert st.st_mtime_ns == T, name
    link = os.lstat(dest / "d/l")
    assert (link.st_uid, link.st_mtime_ns) == ((9 if fs.privileged else me[0]), T)


@pytest.mark.parametrize("kind", ["root", "unprivileged"])
def test_flat_tree_device_nodes(tmp_path, kind):
    fs = evaluator(kind)
    tree = FlatTree({}, {}, OpenLayers(fs=fs))
    tree.put(b"dev", Node(stat.S_IFDIR | 0o755, mtime_ns=T))
    tree.put(b"dev/null", Node(stat.S_IFCHR | 0o666, mtime_ns=T, rdev=os.makedev(1, 3)))
    dest = tmp_path / "flat"
    dest.mkdir()
    if not fs.privileged:
        with pytest.raises(LayerError, match="'dev/null': unpacking device nodes needs root"):
            tree.materialize(dest)
        return
    tree.materialize(dest)
    st = os.lstat(dest / "dev/null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert stat.S_IMODE(st.st_mode) == 0o666


def test_setuid_bits_are_set_again_after_a_chown_clears_them(directory):
    path, fd = directory
    (path / "f").write_bytes(b"x")
    spy = Spy()
    spy.apply_meta(At(fd, b"f"), meta(0o4755, 5, 0), "f", ours=True, created=0o4755,
                   warn=None)
    assert spy.calls == ["chown 5:0", "chmod 4755"]


@pytest.mark.parametrize("kind", ["root", "unprivileged"])
def test_flat_tree_copies_of_layer_files_keep_mode_and_xattrs(tmp_path, kind):
    """Across file systems a layer's file is copied (no hardlink, no reflink)."""
    fs = evaluator(kind)
    other = Path("/dev/shm")
    if not other.is_dir() or other.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another file system than pytest's temporary files")
    layerfs = tmp_path / "layerfs"
    layerfs.mkdir()
    sink = DirectorySink(layerfs, fs=fs)
    sink.file((b"f",), meta(0o640, 1000, 1000, {"user.k": b"v"}), [memoryview(b"content")])
    sink.finish()
    digest = Digest("sha256", "0" * 64)
    tree = merge_layers([scan_layer(layerfs, digest, None)],
                        FlatTree({digest.hex: layerfs}, {digest.hex: "l"}, OpenLayers(fs=fs)))
    dest = Path(tempfile.mkdtemp(dir=other))
    try:
        tree.materialize(dest)
        copy, source = os.lstat(dest / "f"), os.lstat(layerfs / "f")
        assert (dest / "f").read_bytes() == b"content" and copy.st_ino != source.st_ino
        assert stat.S_IMODE(copy.st_mode) == 0o640 and copy.st_mtime_ns == source.st_mtime_ns
        assert (copy.st_uid, copy.st_gid) == ((1000, 1000) if fs.privileged
                                              else (os.geteuid(), os.getegid()))
        assert os.getxattr(dest / "f", "user.k") == b"v"
    finally:
        shutil.rmtree(dest)
