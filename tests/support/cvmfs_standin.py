"""A strict stand-in for CernVM-FS 2.12's `cvmfs_server`, for tests only (CVMFS is not
packaged for Debian). It implements the commands lazypod uses with the semantics
measured on a real stratum 0 (shared/docs/CVMFS.md), and refuses everything else.

Per repository, under $CVMFS_STANDIN_HOME/<name>/:
  published/   the committed tree: what a client sees (bind-mounted read-only at the
               client path; 0/0 devices and trusted.overlay.* visible as stored)
  scratch/     upper and work directories while a transaction is open
  state.json   open transaction?, counters, injected faults
  implicit     directories an `ingest -k` made itself (owner -1): nothing below them
               can be changed in a later transaction
  ingest-N.json  what ingest number N received (name, type, link, content hash)

The server view (`<mount root>/<name>`) is, as on a real server, an overlayfs over
`published/`: read-only between transactions (a write fails with EROFS), read-write
inside one, where the kernel itself refuses `mknod c 0 0` and escapes
`trusted.overlay.*` xattrs of new directories, which publish stores unescaped.

As the real server does: `ingest` and `publish` refuse writable descriptors and a
working directory under the server view, and ask about read-only descriptors there,
reading the answer from standard input ("aborted." unless it is y); `ingest -t`
takes a file or a FIFO; a tar that breaks off publishes nothing; a hardlink member
becomes a copy of its source as the catalog has it (its metadata, no xattrs; a
missing source PANICs); existing directories keep their metadata. Closing a
transaction while files are held under the client view counts a forced remount
(a real server waits 60 s, then unmounts lazily).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

XATTR_VALUE_MAX = 256
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")


def home() -> Path:
    return Path(os.environ["CVMFS_STANDIN_HOME"])


class Repo:
    def __init__(self, name: str) -> None:
        self.name = name
        self.base = home() / name
        if not (self.base / "state.json").exists():
            fail(f"repository {name} does not exist", 1)
        self.state: dict[str, Any] = json.loads((self.base / "state.json").read_text())
        self.published = self.base / "published"
        self.upper = self.base / "scratch" / "upper"
        self.work = self.base / "scratch" / "work"
        self.mount = Path(self.state["mount"])

    def save(self) -> None:
        # Atomic: the tests read the state while a command runs.
        temp = self.base / f"state.json.{os.getpid()}"
        temp.write_text(json.dumps(self.state, indent=1))
        os.replace(temp, self.base / "state.json")

    def count(self, what: str) -> int:
        self.state["counts"][what] += 1
        self.save()
        return int(self.state["counts"][what])

    def include_xattrs(self) -> bool:
        conf = Path(self.state["server_conf"]).read_text()
        return "CVMFS_INCLUDE_XATTRS=true" in conf.replace(" ", "")

    def owner(self) -> tuple[int, int]:
        return int(self.state["owner"][0]), int(self.state["owner"][1])

    # -- the server view ---------------------------------------------------------

    # As on a real server, one union mount over the published tree and the scratch
    # area: read-only between transactions, remounted read-write for one (descriptors
    # held on it stay valid), replaced when a transaction closes.

    def unmount_view(self) -> None:
        # Lazily: a publisher may still hold files of the old view open.
        subprocess.run(["umount", "-l", str(self.mount)], check=False, capture_output=True)

    def mount_view(self, *, writable: bool) -> None:
        self.unmount_view()
        for d in (self.upper, self.work):
            d.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={self.published},upperdir={self.upper},workdir={self.work}"
                        + ("" if writable else ",ro"), str(self.mount)], check=True)

    def set_writable(self, writable: bool) -> None:
        subprocess.run(["mount", "-o", f"remount,{'rw' if writable else 'ro'}",
                        str(self.mount)], check=True)

    def reset_view(self) -> None:
        """Close: the scratch area is dropped, a fresh read-only view mounted."""
        self.unmount_view()
        shutil.rmtree(self.base / "scratch", ignore_errors=True)
        self.mount_view(writable=False)

    def implicit(self) -> set[bytes]:
        path = self.base / "implicit"
        return set(path.read_bytes().split(b"\0")) - {b""} if path.exists() else set()

    def add_implicit(self, paths: list[bytes]) -> None:
        with (self.base / "implicit").open("ab") as f:
            for p in paths:
                f.write(p + b"\0")


def fail(message: str, code: int = 1) -> None:
    print(message, file=sys.stderr)
    sys.exit(code)


# -- repository creation (what `cvmfs_server mkfs` would do; called by the test fixture) -----

def mkfs(name: str, *, mount_root: Path, client_root: Path, config_dir: Path,
         owner: tuple[int, int] = (0, 0), include_xattrs: bool = True) -> Path:
    base = home() / name
    (base / "published").mkdir(parents=True)
    os.chown(base / "published", *owner)
    conf = config_dir / "repositories.d" / name / "server.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(f"CVMFS_REPOSITORY_NAME={name}\nCVMFS_UNION_FS_TYPE=overlayfs\n"
                    + ("CVMFS_INCLUDE_XATTRS=true\n" if include_xattrs else ""))
    mount = mount_root / name
    mount.mkdir(parents=True)
    client = client_root / name
    client.mkdir(parents=True)
    state = {"mount": str(mount), "client": str(client), "server_conf": str(conf),
             "owner": list(owner), "transaction": False,
             "counts": {"transaction": 0, "publish": 0, "abort": 0, "ingest": 0,
                        "forced_remounts": 0, "publish_command": 0},
             "fail": {}}
    (base / "state.json").write_text(json.dumps(state, indent=1))
    repo = Repo(name)
    repo.mount_view(writable=False)
    subprocess.run(["mount", "--bind", str(base / "published"), str(client)], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(client)], check=True)
    return mount


def rmfs(name: str) -> None:
    repo = Repo(name)
    repo.unmount_view()
    subprocess.run(["umount", "-l", repo.state["client"]], check=False, capture_output=True)
    shutil.rmtree(repo.base, ignore_errors=True)


# -- what a real cvmfs_server checks before it changes anything ----------------------------

def _holders(path: Path, *, read_only: bool | None) -> list[str]:
    """Processes with a file open under `path` (read-only ones, writable ones, or all),
    as `cvmfs_publish lsof` finds them; this process aside."""
    mine = {os.getpid()}
    prefix = str(path).rstrip("/")
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) in mine:
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                flags = int(Path(f"/proc/{pid}/fdinfo/{fd}").read_text().split("flags:")[1]
                            .split()[0], 8)
            except (OSError, IndexError, ValueError):
                continue
            if target != prefix and not target.startswith(prefix + "/"):
                continue
            is_ro = flags & os.O_ACCMODE == os.O_RDONLY
            if read_only is None or is_ro == read_only:
                found.append(f"{pid} {target}")
    return found


def _cwd_under(path: Path) -> bool:
    """The server's own working directory (the caller's, inherited) is under `path`."""
    prefix = str(path).rstrip("/")
    cwd = os.getcwd()
    return cwd == prefix or cwd.startswith(prefix + "/")


def _check_before_change(repo: Repo, *, ingest: bool) -> None:
    """cvmfs_server's checks before ingest and publish: writable descriptors and a
    working directory under the server view are fatal (ingest aborts its transaction
    first); read-only ones make it ask whether to go on, reading the answer from
    standard input, and "no" leaves the transaction open, ingest's own included."""
    stop = _abort_ingest if ingest else (lambda _repo, message: fail(message))
    if _holders(repo.mount, read_only=False):
        stop(repo, f"Open writable file descriptors on {repo.name}")
    if _cwd_under(repo.mount):
        stop(repo, f"Current working directory is in /cvmfs/{repo.name}.  Please release, "
                   "e.g. by 'cd $HOME'.")
    readers = _holders(repo.mount, read_only=True)
    if not readers:
        return
    print(f"\nWARNING! There are open read-only file descriptors in /cvmfs/{repo.name}\n"
          + "\n".join(readers) + "\n\n         Do you want to proceed anyway? (y/N) ", end="")
    sys.stdout.flush()
    reply = sys.stdin.readline().strip()
    if reply not in ("y", "Y"):
        print("aborted.")
        sys.exit(1)


def _close(repo: Repo) -> None:
    """Closing a transaction remounts the client view; anything held there makes a real
    server wait 60 s and unmount lazily (an orphaned client can follow): counted."""
    client = Path(repo.state["client"])
    if _holders(client, read_only=None):
        print(f"{repo.name} is forcefully remounted in 60 seconds (files held under {client})",
              file=sys.stderr)
        repo.state["counts"]["forced_remounts"] = \
            repo.state["counts"].get("forced_remounts", 0) + 1
        repo.save()


# -- commands -------------------------------------------------------------------------

def cmd_list(args: list[str]) -> None:
    for state_file in sorted(home().glob("*/state.json")):
        state = json.loads(state_file.read_text())
        name = state_file.parent.name
        info = " - in transaction" if state["transaction"] else ""
        print(f"{name} (stratum0 / local{info})")


def cmd_check(args: list[str]) -> None:
    if len(args) != 1:
        fail("usage: cvmfs_server check <repository>", 2)
    repo = Repo(args[0])
    if repo.state["transaction"]:
        fail(f"{repo.name} is in a transaction")
    print(f"Verifying integrity of {repo.name}... ok")


def cmd_transaction(args: list[str]) -> None:
    template = None
    if args[:1] == ["-T"]:
        template, args = args[1], args[2:]
    if len(args) != 1:
        fail("usage: cvmfs_server transaction [-T /src=/dst] <repository>", 2)
    repo = Repo(args[0])
    if repo.state["transaction"]:
        fail(f"another transaction is already open on {repo.name}")
    if template:
        src_text, sep, dst_text = template.partition("=")
        src = repo.published / src_text.strip("/")
        dst = repo.published / dst_text.strip("/")
        if not sep or not src.exists() or dst.exists() or not dst.parent.is_dir():
            fail("template transaction: source missing, destination exists or its parent "
                 "is missing", 22)
        subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
        repo.reset_view()
        repo.count("publish")
    repo.set_writable(True)
    repo.state["transaction"] = True
    repo.count("transaction")


def cmd_publish(args: list[str]) -> None:
    if len(args) != 1:
        fail("usage: cvmfs_server publish <repository>", 2)
    repo = Repo(args[0])
    if not repo.state["transaction"]:
        fail(f"{repo.name} is not in a transaction")
    # The fault counts `publish` commands (as the shim in front of a real server does).
    if repo.state["fail"].get("publish") == repo.count("publish_command"):
        fail("injected failure: publish failed (the transaction stays open)")
    (repo.base / "publish-started").touch()
    time.sleep(float(repo.state["fail"].get("publish_sleep", 0)))
    _check_before_change(repo, ingest=False)
    _close(repo)
    repo.unmount_view()
    try:
        _merge(repo)
    except _Violation as exc:
        repo.mount_view(writable=True)  # the transaction stays open, scratch and all
        fail(str(exc))
    repo.reset_view()
    repo.state["transaction"] = False
    repo.save()
    repo.count("publish")


def cmd_abort(args: list[str]) -> None:
    if args[:1] != ["-f"] or len(args) != 2:
        fail("usage (stand-in): cvmfs_server abort -f <repository>", 2)
    repo = Repo(args[1])
    if not repo.state["transaction"]:
        fail(f"{repo.name} is not in a transaction")
    _close(repo)
    repo.reset_view()
    repo.state["transaction"] = False
    repo.save()
    repo.count("abort")


def cmd_ingest(args: list[str]) -> None:
    keep_owner = catalog = False
    source = base = None
    deletes: list[str] = []
    rest: list[str] = []
    it = iter(args)
    for arg in it:
        if arg == "-k":
            keep_owner = True
        elif arg == "--catalog":
            catalog = True
        elif arg == "-t":
            source = next(it)
        elif arg == "-b":
            base = next(it)
        elif arg in ("--delete", "-d"):
            deletes.append(next(it))
        elif arg.startswith("-"):
            fail(f"stand-in: unsupported ingest option {arg}", 2)
        else:
            rest.append(arg)
    if len(rest) != 1:
        fail("usage: cvmfs_server ingest ... <repository>", 2)
    repo = Repo(rest[0])
    if repo.state["transaction"]:
        fail(f"another transaction is already open on {repo.name}")
    if base is not None and any(d.strip("/") == base.strip("/") for d in deletes) \
            and (repo.published / base.strip("/")).exists():
        fail("PANIC: deleting and ingesting the same path in one command", 1)
    number = repo.state["counts"]["ingest"] + 1
    if repo.state["fail"].get("ingest") == number:
        if source is not None:
            with open(sys.stdin.fileno() if source == "-" else source, "rb",
                      closefd=source != "-") as stream:
                stream.read(4096)
        if repo.state["fail"].get("ingest_leaves_transaction"):
            repo.set_writable(True)
            repo.state["transaction"] = True
            repo.save()
        fail("injected failure: ingest failed")
    # A real ingest opens its transaction first: a check that says no leaves it open.
    repo.state["transaction"] = True
    repo.save()
    _check_before_change(repo, ingest=True)
    repo.set_writable(True)
    staged = None
    if source is not None:
        if base is None:
            _abort_ingest(repo, "ingest needs -b", 2)
        stream = sys.stdin.buffer if source == "-" else open(source, "rb")  # noqa: SIM115
        (repo.base / "ingest-started").touch()
        time.sleep(float(repo.state["fail"].get("ingest_sleep", 0)))
        head = stream.peek(8)[:8] if hasattr(stream, "peek") else b""
        if any(head.startswith(m) for m in _COMPRESSED_MAGIC):
            _abort_ingest(repo, "Unrecognized archive format")
        # The whole tar is read before anything changes: a broken stream publishes nothing.
        staged = _read_tar(repo, stream, number)
    for delete in deletes:  # first, as the real one does
        target = repo.published / delete.strip("/")
        if not target.exists() and not target.is_symlink():
            print(f"warning: {delete} does not exist", file=sys.stderr)
        else:
            _remove(target)
    if staged is not None:
        assert base is not None
        try:
            added = _apply_tar(repo, staged, base.strip("/"), keep_owner)
        finally:
            shutil.rmtree(staged[0], ignore_errors=True)
        if catalog:
            (repo.published / base.strip("/") / ".cvmfscatalog").touch()
        repo.add_implicit(added)
    _end_ingest(repo)
    repo.count("ingest")
    repo.count("publish")


def _end_ingest(repo: Repo) -> None:
    _close(repo)
    repo.reset_view()
    repo.state["transaction"] = False
    repo.save()


def _abort_ingest(repo: Repo, message: str, code: int = 1) -> None:
    """A failed ingest aborts its own transaction before it dies, as the real one."""
    _end_ingest(repo)
    repo.count("abort")
    fail(message, code)


# -- what ingest does with a tar --------------------------------------------------------

Staged = tuple[Path, list[tuple[tarfile.TarInfo, Path | None]]]


def _read_tar(repo: Repo, stream: Any, number: int) -> Staged:
    """Every member, file contents into a staging directory; fails (and nothing is
    published) on a truncated or malformed tar, as libarchive makes ingest PANIC.
    What came in is logged (name, type, link, content hash) for the tests."""
    stage = Path(tempfile.mkdtemp(prefix="ingest-", dir=repo.base))
    members: list[tuple[tarfile.TarInfo, Path | None]] = []
    log = []
    try:
        tar = tarfile.open(  # noqa: SIM115 (read to the end below)
            fileobj=stream, mode="r|", encoding="utf-8", errors="surrogateescape")
        for i, member in enumerate(tar):
            content = None
            digest = ""
            if member.isreg():
                content = stage / str(i)
                with content.open("wb") as f:
                    data = tar.extractfile(member)
                    assert data is not None
                    h = hashlib.sha256()
                    while chunk := data.read(1 << 20):
                        h.update(chunk)
                        f.write(chunk)
                    if f.tell() != member.size:
                        raise tarfile.ReadError("unexpected end of data")
                    digest = h.hexdigest()
            members.append((member, content))
            log.append({"name": member.name, "type": member.type.decode(),
                        "linkname": member.linkname, "size": member.size,
                        "sha256": digest, "mode": member.mode})
    except (tarfile.TarError, EOFError, OSError) as exc:
        shutil.rmtree(stage, ignore_errors=True)
        _abort_ingest(repo, f"PANIC: Fatal error in reading the archive: {exc}\n"
                            "Synchronization failed")
    (repo.base / f"ingest-{number}.json").write_text(json.dumps(log))
    return stage, members


def _apply_tar(repo: Repo, staged: Staged, base: str, keep_owner: bool) -> list[bytes]:
    owner = repo.owner()
    root = os.fsencode(repo.published)
    implicit: list[bytes] = []
    hardlinks: list[tuple[bytes, bytes]] = []
    # A catalog's directory entries keep their times when entries are added below them.
    dir_times: dict[bytes, tuple[int, int]] = {}

    def keep_time(directory: bytes) -> None:
        if directory not in dir_times and os.path.isdir(directory):
            st = os.lstat(directory)
            dir_times[directory] = (st.st_atime_ns, st.st_mtime_ns)

    given = {os.fsencode(m.name).strip(b"/") for m, _ in staged[1] if m.isdir()}
    for member, content in staged[1]:
        name = os.fsencode(member.name).strip(b"/")
        if name in (b"", b"."):
            continue
        parts = [p for p in name.split(b"/") if p not in (b"", b".")]
        if b".." in parts:
            fail(f"ingest: refusing member {member.name}")
        rel = os.path.join(os.fsencode(base), *parts) if base else os.path.join(*parts)
        path = os.path.join(root, rel)
        parent = os.path.dirname(path)
        while parent != root and not os.path.isdir(parent):
            parent = os.path.dirname(parent)
        keep_time(parent)
        made = _make_parents(path, (65534, 65534) if keep_owner else owner)
        if keep_owner:
            implicit += [os.path.relpath(d, root) for d in made]
        uid, gid = (member.uid, member.gid) if keep_owner else owner
        if member.islnk():  # resolved last, from the catalog, as ingest's PostUpload does
            link = os.fsencode(member.linkname).strip(b"/")
            hardlinks.append((path, os.path.join(root, os.fsencode(base), link) if base
                              else os.path.join(root, link)))
            continue
        if member.isdir():
            if os.path.lexists(path) and not os.path.isdir(path):
                os.unlink(path)
            if os.path.isdir(path):
                continue  # an existing directory keeps what it has (ingest: not new)
            os.mkdir(path)
            dir_times[path] = (int(member.mtime * 1e9), int(member.mtime * 1e9))
        else:
            if os.path.lexists(path):
                _remove(Path(os.fsdecode(path)))
            if member.isreg():
                assert content is not None
                shutil.copyfile(content, path)
            elif member.issym():
                os.symlink(os.fsencode(member.linkname), path)
            elif member.ischr() or member.isblk():
                kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
                os.mknod(path, kind | member.mode, os.makedev(member.devmajor, member.devminor))
            elif member.isfifo():
                os.mkfifo(path, member.mode)
        os.chown(path, uid, gid, follow_symlinks=False)
        if not member.issym():
            os.chmod(path, member.mode)
        os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)
        parent_rel = os.path.dirname(rel)
        if parts[-1] == b".cvmfscatalog" and keep_owner and \
                os.path.dirname(name) not in given:
            # A catalog marker in a directory the tar does not give: ingest rewrites that
            # directory's entry from its own placeholder, owned by -1 (measured).
            os.chown(os.path.dirname(path), 65534, 65534)
            implicit.append(parent_rel)
    for path, source in hardlinks:
        # A catalog entry cloned from the source: its content and metadata, no xattrs,
        # an independent copy (nlink 1). A missing source makes ingest PANIC.
        if not os.path.isfile(source) or os.path.islink(source):
            _abort_ingest(repo, f"PANIC: catalog for file '{os.fsdecode(source)}' cannot be "
                                "found, aborting\nSynchronization failed")
        if os.path.lexists(path):
            _remove(Path(os.fsdecode(path)))
        shutil.copyfile(source, path)
        st = os.lstat(source)
        os.chown(path, st.st_uid, st.st_gid)
        os.chmod(path, stat.S_IMODE(st.st_mode))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    for directory, times in dir_times.items():
        os.utime(directory, ns=times)
    return implicit


def _make_parents(path: bytes, owner: tuple[int, int]) -> list[bytes]:
    parent = os.path.dirname(path)
    missing = []
    while not os.path.isdir(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    for d in reversed(missing):
        os.mkdir(d, 0o755)
        os.chown(d, *owner)
    return missing


# -- what publish does with the scratch area ----------------------------------------------

class _Violation(Exception):
    pass


def _merge(repo: Repo) -> None:
    upper = os.fsencode(repo.upper)
    published = os.fsencode(repo.published)
    include = repo.include_xattrs()
    implicit = repo.implicit()
    for dirpath, dirnames, filenames in os.walk(upper):
        rel_dir = os.path.relpath(dirpath, upper)
        rel_dir = b"" if rel_dir == b"." else rel_dir
        for name in sorted(dirnames + filenames):
            rel = os.path.join(rel_dir, name) if rel_dir else name
            src = os.path.join(dirpath, name)
            dst = os.path.join(published, rel)
            st = os.lstat(src)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:  # a deletion
                _remove(Path(os.fsdecode(dst)))
                continue
            xattrs = _visible_xattrs(src) if include else {}
            if any(rel == d or rel.startswith(d + b"/") for d in implicit):
                # On a real server the write itself fails (EOVERFLOW: the copy-up of a
                # parent owned by -1); the stand-in can only refuse the publish.
                raise _Violation(f"writing {os.fsdecode(rel)}: Value too large for "
                                 "defined data type")
            if stat.S_ISDIR(st.st_mode):
                opaque = _get(src, "trusted.overlay.opaque") == b"y"
                if os.path.lexists(dst) and (opaque or not os.path.isdir(dst)):
                    _remove(Path(os.fsdecode(dst)))
                if not os.path.isdir(dst):
                    os.mkdir(dst)
            else:
                if os.path.lexists(dst):
                    _remove(Path(os.fsdecode(dst)))
                if stat.S_ISREG(st.st_mode):
                    shutil.copyfile(src, dst)  # hardlinks become independent copies
                elif stat.S_ISLNK(st.st_mode):
                    os.symlink(os.readlink(src), dst)
                else:
                    os.mknod(dst, st.st_mode, st.st_rdev)
            os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
            if not stat.S_ISLNK(st.st_mode):
                os.chmod(dst, stat.S_IMODE(st.st_mode))
                for key in _stored_xattrs(dst):
                    os.removexattr(dst, key)
                for key, value in xattrs.items():
                    os.setxattr(dst, key, value)
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    # Directory times once all children are in.
    for dirpath, dirnames, _ in os.walk(upper):
        for name in dirnames:
            src = os.path.join(dirpath, name)
            st = os.lstat(src)
            if stat.S_ISDIR(st.st_mode):  # os.walk counts symlinks to directories too
                rel = os.path.relpath(src, upper)
                os.utime(os.path.join(published, rel), ns=(st.st_atime_ns, st.st_mtime_ns))


def _get(path: bytes, key: str) -> bytes | None:
    try:
        return os.getxattr(path, key, follow_symlinks=False)
    except OSError:
        return None


def _visible_xattrs(path: bytes) -> dict[str, bytes]:
    """The xattrs a client sees after publish: overlay's own are dropped, escaped ones
    (set by the user on new directories) unescaped, long values skipped."""
    found = {}
    if os.path.islink(path):
        return found
    for key in os.listxattr(path, follow_symlinks=False):
        value = os.getxattr(path, key, follow_symlinks=False)
        if key.startswith("trusted.overlay.overlay."):
            key = "trusted.overlay." + key[len("trusted.overlay.overlay."):]
        elif key.startswith("trusted.overlay."):
            continue
        if len(value) <= XATTR_VALUE_MAX:
            found[key] = value
    return found


def _stored_xattrs(path: bytes) -> dict[str, bytes]:
    if os.path.islink(path) or not os.path.lexists(path):
        return {}
    return {k: os.getxattr(path, k, follow_symlinks=False)
            for k in os.listxattr(path, follow_symlinks=False)}


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


COMMANDS = {"transaction": cmd_transaction, "publish": cmd_publish, "abort": cmd_abort,
            "ingest": cmd_ingest, "list": cmd_list, "check": cmd_check}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        fail(f"stand-in cvmfs_server: unsupported command {sys.argv[1:]!r}", 2)
    COMMANDS[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    main()
