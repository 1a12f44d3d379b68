"""What a CVMFS server does, as the cvmfs backend relies on it (shared/docs/CVMFS.md).

With the default stand-in these check that it is strict, so that the backend's tests
mean something; with LAZYPOD_TEST_CVMFS=real the same tests check the real server,
which is how a difference between the two is found."""

from __future__ import annotations

import contextlib
import errno
import gzip
import os
import stat
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.cvmfs import make_repo, real_server
from support.images import Entry, tar_bytes


@pytest.fixture()
def cvmfs() -> Iterator[object]:
    repo = make_repo()
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
    if "-b" not in args:
        args = (*args, "-b", "base")
    return cvmfs.server("ingest", *args, "-t", "-", cvmfs.name, input=tar_bytes(entries))


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
    assert ingest(cvmfs, [Entry("f", data=b"kept")], "-b", "x").returncode == 0
    proc = cvmfs.server("ingest", "--delete", "x", "-t", "-", "-b", "x", cvmfs.name,
                        input=tar_bytes([Entry("f")]))
    assert proc.returncode == 1 and b"PANIC" in proc.stdout + proc.stderr
    assert (cvmfs.client_view / "x/f").read_bytes() == b"kept"  # the repository is intact
    assert not cvmfs.state()["transaction"]
    assert cvmfs.server("ingest", "--delete", "missing", cvmfs.name).returncode == 0


def test_nothing_below_a_directory_that_ingest_made_itself_can_change(cvmfs):
    """`ingest -k` gives the parents it makes on its own the owner -1; a transaction
    cannot copy them up. (Directories ingest was given, or made without -k, take
    xattrs and new entries later: the opaque test below relies on that.)"""
    assert ingest(cvmfs, [Entry("implicit/explicit/", "dir"), Entry("implicit/explicit/f",
                                                                     data=b"x")],
                  "-k").returncode == 0
    assert os.lstat(cvmfs.client_view / "base/implicit").st_uid == 65534
    cvmfs.server("transaction", cvmfs.name, check=True)
    try:
        (cvmfs.server_view / "base/implicit/explicit/new").write_text("n")
    except OSError as exc:  # the real server: the write fails
        assert exc.errno == errno.EOVERFLOW
    else:  # the stand-in (a kernel overlay over a plain directory): the publish fails
        proc = cvmfs.server("publish", cvmfs.name)
        assert proc.returncode != 0 and b"Value too large" in proc.stderr
        assert cvmfs.state()["transaction"]
    cvmfs.server("abort", "-f", cvmfs.name, check=True)


@pytest.mark.skipif(real_server(), reason="a property of the stand-in: it refuses what it "
                                          "does not implement")
def test_unknown_commands_are_refused(cvmfs):
    assert cvmfs.server("gc", cvmfs.name).returncode == 2
    assert cvmfs.server("ingest", "--weird", cvmfs.name).returncode == 2




# -- measured on a real CernVM-FS 2.12.0 stratum 0, 2026-12-01 ------------------------------

def ingest_fifo(cvmfs, data: bytes, base: str = "/"):
    """`ingest -k -t FIFO` with standard input /dev/null, as lazypod runs it."""
    fifo = cvmfs.base / "in.fifo"
    if fifo.exists():
        fifo.unlink()
    os.mkfifo(fifo)
    env = {**os.environ, **cvmfs.env}
    command = [str(Path(cvmfs.env["PATH"].split(":")[0]) / "cvmfs_server"), "ingest", "-k",
               "-t", str(fifo), "-b", base, cvmfs.name]
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env)
    fd = None
    while fd is None and proc.poll() is None:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            time.sleep(0.02)
    if fd is not None:
        os.set_blocking(fd, True)
        with contextlib.suppress(BrokenPipeError):
            os.write(fd, data)
        os.close(fd)
    out = proc.communicate()[0]
    return proc.returncode, out


def raw_tar(members, *, end: bool = True) -> bytes:
    out = b""
    for info, data in members:
        if data is not None:
            info.size = len(data)
        out += info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        if data:
            out += data + bytes(-len(data) % 512)
    return out + (bytes(1024) if end else b"")


def info(name: str, kind: bytes = tarfile.REGTYPE, **fields) -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type = kind
    for key, value in fields.items():
        setattr(member, key, value)
    return member


def test_ingest_through_a_fifo_at_the_root_and_hardlinks_clone(cvmfs):
    rc, out = ingest_fifo(cvmfs, raw_tar([
        (info("d", tarfile.DIRTYPE, mode=0o755), None),
        (info("d/file", mode=0o640, uid=1000, gid=1000, mtime=1_600_000_000), b"hello"),
        (info("d/clone", tarfile.LNKTYPE, linkname="d/file", mode=0o777, uid=5), None),
    ]))
    assert rc == 0, out
    clone = os.lstat(cvmfs.client_view / "d/clone")
    # A clone of the source's catalog entry: its metadata, not the member's, one link.
    assert (stat.S_IMODE(clone.st_mode), clone.st_uid, clone.st_mtime, clone.st_nlink) == \
        (0o640, 1000, 1_600_000_000, 1)
    rc, out = ingest_fifo(cvmfs, raw_tar([
        (info("e", tarfile.DIRTYPE, mode=0o755), None),
        (info("e/later", tarfile.LNKTYPE, linkname="d/file"), None),  # an earlier revision
    ]))
    assert rc == 0, out
    assert (cvmfs.client_view / "e/later").read_bytes() == b"hello"
    rc, _ = ingest_fifo(cvmfs, raw_tar([(info("e/x", tarfile.LNKTYPE, linkname="no/such"),
                                         None)]))
    assert rc != 0 and not (cvmfs.client_view / "e/x").exists()
    assert not cvmfs.state()["transaction"]


def test_a_tar_that_breaks_off_publishes_nothing_but_a_clean_prefix_is_taken(cvmfs):
    rc, _ = ingest_fifo(cvmfs, raw_tar([(info("cut", mode=0o644), b"x" * 100_000)],
                                       end=False)[:20_000])
    assert rc != 0 and not (cvmfs.client_view / "cut").exists()
    poison = info(".interrupted")
    poison.size = 1 << 20
    rc, _ = ingest_fifo(cvmfs, raw_tar([(info("ok1", mode=0o644), b"ok")], end=False)
                        + poison.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"))
    assert rc != 0 and not (cvmfs.client_view / "ok1").exists()
    # Members, then nothing, without the end-of-archive blocks: accepted. So a stream
    # lazypod must abandon is ended with a header that announces content never sent.
    rc, _ = ingest_fifo(cvmfs, raw_tar([(info("ok2", mode=0o644), b"ok")], end=False))
    assert rc == 0 and (cvmfs.client_view / "ok2").exists()
    assert not cvmfs.state()["transaction"]


def test_ingest_keeps_what_a_transaction_set_on_a_directory(cvmfs):
    cvmfs.server("transaction", cvmfs.name, check=True)
    opaque = cvmfs.server_view / "layer/opaque"
    opaque.mkdir(parents=True)
    os.setxattr(opaque, "trusted.overlay.opaque", b"y")
    os.setxattr(opaque, "user.kept", b"1")
    os.utime(opaque, (1_000_000_000, 1_000_000_000))
    cvmfs.server("publish", cvmfs.name, check=True)
    rc, out = ingest_fifo(cvmfs, raw_tar([
        (info("layer/opaque/gone", tarfile.CHRTYPE, devmajor=0, devminor=0, mode=0), None),
        (info("layer/opaque/new", mode=0o644), b"new"),
    ]))
    assert rc == 0, out
    client = cvmfs.client_view / "layer/opaque"
    assert os.getxattr(client, "trusted.overlay.opaque") == b"y"
    assert os.getxattr(client, "user.kept") == b"1"
    assert os.stat(client).st_mtime == 1_000_000_000
    assert os.lstat(client / "gone").st_rdev == 0 and stat.S_ISCHR(
        os.lstat(client / "gone").st_mode)


def test_a_later_transaction_in_an_opaque_directory_drops_the_marker(cvmfs):
    cvmfs.server("transaction", cvmfs.name, check=True)
    for name in ("touched", "reset"):
        (cvmfs.server_view / name).mkdir()
        os.setxattr(cvmfs.server_view / name, "trusted.overlay.opaque", b"y")
        os.setxattr(cvmfs.server_view / name, "user.overlay.opaque", b"y")
    cvmfs.server("publish", cvmfs.name, check=True)
    cvmfs.server("transaction", cvmfs.name, check=True)
    (cvmfs.server_view / "touched/child").write_text("c")  # copies the directory up
    os.removexattr(cvmfs.server_view / "reset", "user.overlay.opaque")
    os.setxattr(cvmfs.server_view / "reset", "trusted.overlay.opaque", b"y")
    cvmfs.server("publish", cvmfs.name, check=True)
    assert os.listxattr(cvmfs.client_view / "touched") == ["user.overlay.opaque"]
    assert os.listxattr(cvmfs.client_view / "reset") == ["trusted.overlay.opaque"]


def test_a_reader_under_the_server_view_makes_ingest_stop_with_its_transaction_open(cvmfs):
    rc, _ = ingest_fifo(cvmfs, raw_tar([(info("f", mode=0o644), b"x")]))
    assert rc == 0
    with open(cvmfs.server_view / "f", "rb"):
        rc, out = ingest_fifo(cvmfs, raw_tar([(info("g", mode=0o644), b"y")]))
    assert rc == 1 and b"Do you want to proceed anyway?" in out and b"aborted." in out
    assert cvmfs.state()["transaction"]  # ingest opened it and did not abort it
    cvmfs.server("abort", "-f", cvmfs.name, check=True)
    assert not (cvmfs.client_view / "g").exists()


def test_a_catalog_marker_for_a_directory_the_tar_does_not_give_takes_it_over(cvmfs):
    rc, out = ingest_fifo(cvmfs, raw_tar([(info("d", tarfile.DIRTYPE, mode=0o755), None)]))
    assert rc == 0 and os.lstat(cvmfs.client_view / "d").st_uid == 0, out
    rc, out = ingest_fifo(cvmfs, raw_tar([(info("d/.cvmfscatalog", mode=0o644), b"")]))
    assert rc == 0, out
    assert os.lstat(cvmfs.client_view / "d").st_uid == 65534  # owner -1 now
    cvmfs.server("transaction", cvmfs.name, check=True)
    try:
        (cvmfs.server_view / "d/new").write_text("n")
    except OSError as exc:  # the real server: EACCES in it, EOVERFLOW below it
        assert exc.errno in (errno.EACCES, errno.EOVERFLOW)
    else:  # the stand-in
        proc = cvmfs.server("publish", cvmfs.name)
        assert proc.returncode != 0 and b"Value too large" in proc.stderr
    cvmfs.server("abort", "-f", cvmfs.name, check=True)
