"""The stand-in cvmfs_server is strict: it does what CVMFS.md says a real one does,
so that the cvmfs backend's tests mean something."""

from __future__ import annotations

import gzip
import os
import stat
from collections.abc import Iterator

import pytest

from support.cvmfs import StandinRepo
from support.images import Entry, tar_bytes


@pytest.fixture()
def cvmfs() -> Iterator[StandinRepo]:
    repo = StandinRepo()
    yield repo
    repo.destroy()


def test_writes_outside_a_transaction_fail(cvmfs):
    with pytest.raises(OSError, match="Read-only file system"):
        (cvmfs.server_view / "x").write_text("x")


def test_a_second_transaction_fails_and_publish_commits(cvmfs):
    assert cvmfs.server("transaction", cvmfs.name).returncode == 0
    second = cvmfs.server("transaction", cvmfs.name)
    assert second.returncode != 0 and b"another transaction is already open" in second.stderr
    (cvmfs.server_view / "file").write_text("in a transaction")
    assert cvmfs.server("publish", cvmfs.name).returncode == 0
    assert (cvmfs.client_view / "file").read_text() == "in a transaction"
    assert cvmfs.counts()["publish"] == 1


def test_abort_drops_the_scratch_area(cvmfs):
    cvmfs.server("transaction", cvmfs.name, check=True)
    (cvmfs.server_view / "dropped").write_text("x")
    cvmfs.server("abort", "-f", cvmfs.name, check=True)
    assert not (cvmfs.client_view / "dropped").exists()
    assert not cvmfs.state()["transaction"]


def test_transaction_cannot_make_whiteouts_and_escapes_opaque(cvmfs):
    cvmfs.server("transaction", cvmfs.name, check=True)
    with pytest.raises(PermissionError):
        os.mknod(cvmfs.server_view / "wh", stat.S_IFCHR, os.makedev(0, 0))
    (cvmfs.server_view / "dir").mkdir()
    os.setxattr(cvmfs.server_view / "dir", "trusted.overlay.opaque", b"y")
    os.mknod(cvmfs.server_view / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    cvmfs.server("publish", cvmfs.name, check=True)
    assert os.getxattr(cvmfs.client_view / "dir", "trusted.overlay.opaque") == b"y"
    assert os.lstat(cvmfs.client_view / "null").st_rdev == os.makedev(1, 3)


def ingest(cvmfs, entries, *args):
    return cvmfs.server("ingest", *args, "-t", "-", "-b", "base", cvmfs.name,
                        input=tar_bytes(entries))


def test_ingest_semantics(cvmfs):
    proc = ingest(cvmfs, [
        Entry("deep/dir/file", data=b"content", uid=1000, gid=1000, xattrs={"user.x": "1"}),
        Entry("deep/dir/link", "hardlink", target="deep/dir/file"),
        Entry("deep/dir/wh", "char", mode=0, major=0, minor=0),
        Entry("deep/.wh.aufs"),
    ])
    assert proc.returncode == 0, proc.stderr
    base = cvmfs.client_view / "base"
    f, link = (os.lstat(base / "deep/dir" / n) for n in ("file", "link"))
    assert (f.st_uid, f.st_nlink, link.st_nlink) == (0, 1, 1)  # owner rewritten, copies
    assert os.listxattr(base / "deep/dir/file") == []
    assert os.lstat(base / "deep/dir/wh").st_rdev == 0
    assert (base / "deep/.wh.aufs").is_file()
    assert not (cvmfs.server_view / "base/deep/dir/wh").exists()  # hidden on the server

    ingest(cvmfs, [Entry("kept/file", data=b"x", uid=1000, gid=1000)], "-k")
    assert os.lstat(base / "kept/file").st_uid == 1000
    assert os.lstat(base / "kept").st_uid == 65534  # made by ingest itself, with -k


def test_ingest_refuses_compressed_input_and_delete_with_base(cvmfs):
    proc = cvmfs.server("ingest", "-t", "-", "-b", "x", cvmfs.name,
                        input=gzip.compress(tar_bytes([Entry("f", data=b"x")])))
    assert proc.returncode != 0 and b"Unrecognized archive format" in proc.stderr
    proc = cvmfs.server("ingest", "--delete", "x", "-t", "-", "-b", "x", cvmfs.name,
                        input=tar_bytes([Entry("f")]))
    assert proc.returncode == 1 and b"PANIC" in proc.stderr
    assert cvmfs.server("ingest", "--delete", "missing", cvmfs.name).returncode == 0


def test_xattrs_cannot_be_set_on_ingested_directories(cvmfs):
    ingest(cvmfs, [Entry("d/", "dir"), Entry("d/f", data=b"x")])
    cvmfs.server("transaction", cvmfs.name, check=True)
    os.setxattr(cvmfs.server_view / "base/d", "user.late", b"1")
    proc = cvmfs.server("publish", cvmfs.name)
    assert proc.returncode != 0 and b"Value too large" in proc.stderr
    assert cvmfs.state()["transaction"]
    cvmfs.server("abort", "-f", cvmfs.name, check=True)


def test_unknown_commands_are_refused(cvmfs):
    assert cvmfs.server("gc", cvmfs.name).returncode == 2
    assert cvmfs.server("ingest", "--weird", cvmfs.name).returncode == 2


