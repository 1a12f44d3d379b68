"""Flat trees (`.flat/`, for Apptainer) show an image's layers merged as overlayfs
merges them: whiteouts hide what lies below, opaque directories hide everything
below them, an upper entry replaces a lower one of another kind, hardlinks stay
linked. Images are converted in-process from an in-memory registry."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from helpers import IS_ROOT, FakeRegistry, convert, describe, tree

from support.images import Entry, image, layer

BASE = [
    Entry("a/", "dir"),
    Entry("a/keep", data=b"keep"),
    Entry("a/gone", data=b"deleted by layer 2"),
    Entry("d/", "dir", mode=0o750),
    Entry("d/old", data=b"hidden by the opaque d"),
    Entry("d/sub/", "dir"),
    Entry("d/sub/deep", data=b"hidden too"),
    Entry("f2d", data=b"a file, a directory in layer 2"),
    Entry("d2f/", "dir"),
    Entry("d2f/child", data=b"goes with its directory"),
    Entry("tree/", "dir"),
    Entry("tree/leaf/", "dir"),
    Entry("tree/leaf/x", data=b"x"),
    Entry("h/", "dir"),
    Entry("h/orig", data=b"shared by two names"),
    Entry("h/link", "hardlink", target="h/orig"),
    Entry("h/pair-a", data=b"pair"),
    Entry("h/pair-b", "hardlink", target="h/pair-a"),
    Entry("mode", data=b"private", mode=0o600, uid=1000, gid=1000, mtime=1_500_000_000),
    Entry("s2d", "symlink", target="/etc"),
    Entry("shadow", data=b"root:*:1::::::\n", mode=0o000),  # as in Fedora and RHEL images
    Entry("ro/", "dir", mode=0o555),
    Entry("ro/inside", data=b"in a read-only directory"),
    Entry("d2s/", "dir"),
    Entry("d2s/child", data=b"goes with its directory"),
]
UPPER = [
    Entry("a/", "dir"),
    Entry("a/.wh.gone"),
    Entry("d/", "dir", mode=0o755),
    Entry("d/.wh..wh..opq"),
    Entry("d/new", data=b"after the opaque marker"),
    Entry("f2d/", "dir"),
    Entry("f2d/inside", data=b"now a directory"),
    Entry("d2f", data=b"now a file"),
    Entry(".wh.tree"),  # a whole directory
    Entry("h/", "dir"),
    Entry("h/orig", data=b"replaced in layer 2"),  # h/link keeps the old content
    Entry("h/.wh.pair-a"),  # h/pair-b keeps the content
    Entry("h/two-a", data=b"linked in layer 2"),
    Entry("h/two-b", "hardlink", target="h/two-a"),
    Entry("added-then-gone", data=b"removed by layer 3"),
    Entry("s2d/", "dir"),  # replaces the symlink: nothing lands in the host's /etc
    Entry("s2d/file", data=b"in a real directory"),
    Entry("d2s", "symlink", target="a"),
]
TOP = [
    Entry("tree/", "dir"),  # recreated after its whiteout: nothing of the old one comes back
    Entry("tree/fresh", data=b"fresh"),
    Entry(".wh.added-then-gone"),
    Entry("a/", "dir"),
    Entry("a/keep", data=b"keep, modified in layer 3"),
]


@pytest.fixture(scope="module")
def flat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    registry = FakeRegistry()
    name = registry.push("library/app", "1", image([layer(BASE), layer(UPPER),
                                                    layer(TOP, compression="zstd")]))
    root = tmp_path_factory.mktemp("merge") / "repo"
    convert(registry, root, name)
    link = root / "registry.test/library/app:1"
    assert link.is_symlink()
    return link.resolve()


def test_the_public_link_leads_to_the_flat_tree(flat: Path) -> None:
    assert flat.parent.parent.name == ".flat"
    assert (flat / ".singularity.d/runscript").is_file()


def test_whiteouts_hide_lower_entries(flat: Path) -> None:
    assert sorted(os.listdir(flat / "a")) == ["keep"]
    assert (flat / "a/keep").read_bytes() == b"keep, modified in layer 3"
    assert not (flat / "added-then-gone").exists()


def test_a_whiteout_of_a_directory_hides_its_subtree_and_a_later_one_starts_empty(
        flat: Path) -> None:
    assert tree(flat / "tree") == {"fresh": "file:fresh"}


def test_an_opaque_directory_hides_everything_below_it(flat: Path) -> None:
    assert tree(flat / "d") == {"new": "file:after the opaque marker"}
    # The directory itself is the upper layer's.
    assert stat.S_IMODE((flat / "d").stat().st_mode) == 0o755


def test_a_file_replaced_by_a_directory_and_a_directory_by_a_file(flat: Path) -> None:
    assert tree(flat / "f2d") == {"inside": "file:now a directory"}
    assert describe(flat / "d2f") == "file:now a file"


def test_a_symlink_replaced_by_a_directory_and_a_directory_by_a_symlink(flat: Path) -> None:
    assert describe(flat / "s2d") == "dir"
    assert tree(flat / "s2d") == {"file": "file:in a real directory"}
    assert not Path("/etc/file").exists()
    assert describe(flat / "d2s") == "link:a"
    assert (flat / "d2s/keep").read_bytes() == b"keep, modified in layer 3"


def test_hardlinks_across_layers(flat: Path) -> None:
    # An upper layer replacing (or deleting) one name of a hardlinked pair leaves the
    # other name with the lower layer's content, as overlayfs shows it.
    assert (flat / "h/orig").read_bytes() == b"replaced in layer 2"
    assert (flat / "h/link").read_bytes() == b"shared by two names"
    assert not (flat / "h/pair-a").exists()
    assert (flat / "h/pair-b").read_bytes() == b"pair"
    assert sorted(os.listdir(flat / "h")) == ["link", "orig", "pair-b", "two-a", "two-b"]
    # Names linked within one layer stay one inode.
    assert os.path.samefile(flat / "h/two-a", flat / "h/two-b")
    assert not os.path.samefile(flat / "h/orig", flat / "h/link")


def test_unreadable_files_and_read_only_directories(flat: Path) -> None:
    assert stat.S_IMODE((flat / "shadow").lstat().st_mode) == 0o000
    assert stat.S_IMODE((flat / "ro").lstat().st_mode) == 0o555
    assert (flat / "ro/inside").read_bytes() == b"in a read-only directory"


def test_no_whiteout_reaches_the_tree(flat: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(flat):
        for name in dirnames + filenames:
            assert not name.startswith(".wh."), os.path.join(dirpath, name)
            assert describe(Path(dirpath, name)) != "whiteout", os.path.join(dirpath, name)


def test_mode_and_times_are_the_layers(flat: Path) -> None:
    st = (flat / "mode").lstat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_mtime == 1_500_000_000
    if IS_ROOT:
        assert (st.st_uid, st.st_gid) == (1000, 1000)
    else:  # an ordinary user cannot give files away: they are the user's
        assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())


def test_a_hardlink_to_a_lower_layers_file_is_refused(tmp_path: Path) -> None:
    # A layer's hardlink names a file of the same layer (as containers/storage applies
    # a layer into an empty directory); one naming a lower layer's file fails the image.
    registry = FakeRegistry()
    name = registry.push("library/bad", "1", image([
        layer([Entry("base", data=b"lower")]),
        layer([Entry("up", "hardlink", target="base")]),
    ]))
    with registry.client() as client:
        from lazypod import Converter, DirectoryBackend, parse_reference
        report = Converter(DirectoryBackend(tmp_path / "repo"), client).convert(
            [parse_reference(name)])
    [result] = report.images
    assert result.error is not None and "hardlink" in result.error
    assert not (tmp_path / "repo/registry.test/library/bad:1").exists()


def test_images_sharing_layers_get_one_tree_each(tmp_path: Path) -> None:
    registry = FakeRegistry()
    base = layer([Entry("etc/", "dir"), Entry("etc/os", data=b"base")])
    one = registry.push("library/one", "1", image([base, layer([Entry("one", data=b"1")])]))
    two = registry.push("library/two", "1", image([base, layer([Entry("etc/.wh.os")])]))
    root = tmp_path / "repo"
    convert(registry, root, one, two)
    flat_one = (root / "registry.test/library/one:1").resolve()
    flat_two = (root / "registry.test/library/two:1").resolve()
    assert flat_one != flat_two
    assert (flat_one / "etc/os").read_bytes() == b"base" and (flat_one / "one").is_file()
    assert not (flat_two / "etc/os").exists() and not (flat_two / "one").exists()
    # The base layer was fetched once for both images.
    assert len([p for p in registry.blob_gets() if base.digest in p]) == 1


def test_a_ducc_repositorys_whiteouts_in_every_form(tmp_path: Path) -> None:
    # DUCC ingested layers as tarballs: AUFS whiteouts and opaque markers are plain
    # files in its layers; older tools marked opaque directories with an xattr.
    # Converting such an image again reuses those layers as they are.
    from support.ducc import write_ducc_repository

    lower = layer([
        Entry("a/", "dir"), Entry("a/keep", data=b"keep"), Entry("a/gone", data=b"gone"),
        Entry("d/", "dir"), Entry("d/old", data=b"old"), Entry("d/sub/", "dir"),
        Entry("d/sub/deep", data=b"deep"),
        Entry("m/", "dir"), Entry("m/lower", data=b"below an xattr-marked directory"),
    ])
    upper = layer([
        Entry("a/", "dir"), Entry("a/.wh.gone"),
        Entry("d/", "dir"), Entry("d/.wh..wh..opq"), Entry("d/new", data=b"new"),
        Entry("m/", "dir"), Entry("m/upper", data=b"upper"),
    ])
    img = image([lower, upper])
    registry = FakeRegistry()
    name = registry.push("library/ducc", "1", img)
    root = tmp_path / "repo"
    write_ducc_repository(root, name, img, records_for={0, 1})
    hexpart = upper.digest.split(":", 1)[1]
    marked = root / ".layers" / hexpart[:2] / hexpart / "layerfs/m"
    try:
        os.setxattr(marked, "user.overlay.opaque", b"y")
    except OSError:
        pytest.skip("the file system of the temporary directory has no user xattrs")
    assert (marked.parent / "a/.wh.gone").is_file()  # as DUCC left it

    convert(registry, root, name)
    assert not any(blob.digest in path for blob in (lower, upper)
                   for path in registry.blob_gets())
    flat = (root / "registry.test/library/ducc:1").resolve()
    assert tree(flat / "a") == {"keep": "file:keep"}
    assert tree(flat / "d") == {"new": "file:new"}
    assert tree(flat / "m") == {"upper": "file:upper"}
