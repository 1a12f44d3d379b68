"""The real podman, each test run with its own storage root, never the machine's."""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

CONTAINERS_CONF = """\
# What podman needs in this sandbox (see shared ENVIRONMENT.md): the hard RLIMIT_NOFILE
# is capped, and crun cannot handle the hybrid cgroup layout; runc can.
[containers]
default_ulimits = []
[engine]
runtime = "runc"
"""

ROOTLESS_USER = "lazypod-test"


class Podman:
    def __init__(
        self,
        base: Path,
        *,
        storage_opts: Sequence[str] = (),
        user: str | None = None,
        runroot: Path | None = None,
    ) -> None:
        if user:  # pytest's temporary directories are 0700: the user could not reach them
            base = Path(tempfile.mkdtemp(prefix=f"lzp-{base.name}-", dir="/tmp"))
        self.base = base
        self.user = user
        base.mkdir(parents=True, exist_ok=True)
        self.conf = base / "containers.conf"
        self.conf.write_text(CONTAINERS_CONF)
        self.root = base / "root"
        # podman refuses a runroot longer than 50 characters: keep it short, in /tmp.
        self.runroot = runroot or Path(tempfile.mkdtemp(prefix="lzp-run-", dir="/tmp"))
        self.storage_opts = list(storage_opts)
        self.env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "CONTAINERS_CONF": str(self.conf),
            "CONTAINERS_STORAGE_CONF": str(base / "storage.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(base / "registries.conf"),
            "HOME": str(base / "home"),
        }
        (base / "storage.conf").write_text(
            f'[storage]\ndriver = "overlay"\nrunroot = "{self.runroot}"\n'
            f'graphroot = "{self.root}"\n'
        )
        (base / "registries.conf").write_text("unqualified-search-registries = []\n")
        (base / "home").mkdir(exist_ok=True)
        if user:
            entry = pwd.getpwnam(user)
            runtime = Path(f"/run/user/{entry.pw_uid}")
            runtime.mkdir(parents=True, exist_ok=True)
            os.chown(runtime, entry.pw_uid, entry.pw_gid)
            os.chmod(runtime, 0o700)
            self.env["XDG_RUNTIME_DIR"] = str(runtime)
            self.env["USER"] = user
            os.chmod(base, 0o755)
            for path in (base, base / "home", self.runroot):
                os.chown(path, entry.pw_uid, entry.pw_gid)
            for path in (self.conf, base / "storage.conf", base / "registries.conf"):
                os.chmod(path, 0o644)

    def command(self, *args: str) -> list[str]:
        cmd = ["podman", "--root", str(self.root), "--runroot", str(self.runroot),
               "--storage-driver", "overlay"]
        for opt in self.storage_opts:
            cmd += ["--storage-opt", opt]
        cmd += list(args)
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", "env", *(f"{k}={v}" for k, v in
                                                             self.env.items()), *cmd]
        return cmd

    def __call__(self, *args: str, check: bool = True, timeout: float = 600,
                 input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        proc = subprocess.run(self.command(*args), env=self.env, capture_output=True,
                              timeout=timeout, input=input, cwd=self.base)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(args)} failed ({proc.returncode}):\n"
                f"{proc.stderr.decode(errors='replace')}"
            )
        return proc

    def text(self, *args: str) -> str:
        return self(*args).stdout.decode("utf-8", "backslashreplace")

    def reset(self) -> None:
        self("rm", "-af", check=False)
        self("system", "reset", "-f", check=False)
        shutil.rmtree(self.base, ignore_errors=True)
        shutil.rmtree(self.runroot, ignore_errors=True)


# -- trees as a container sees them ---------------------------------------------------

def snapshot(root: Path, *, hardlinks: bool = True) -> dict[str, tuple[object, ...]]:
    """Every entry under `root`: type, mode, owner, size, content hash, link target,
    device numbers, user xattrs and, for files that share their inode with another
    path of the tree, the hardlink group (its first path). Link counts themselves are
    left out: they count links outside the tree too."""
    tree: dict[str, tuple[object, ...]] = {}
    inode_paths: dict[tuple[int, int], list[str]] = {}
    root_b = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(root_b):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root_b).decode("utf-8", "backslashreplace")
            st = os.lstat(full)
            kind = stat.S_IFMT(st.st_mode)
            extra: tuple[object, ...] = ()
            if stat.S_ISREG(kind):
                with open(full, "rb") as f:
                    extra = (st.st_size, hashlib.sha256(f.read()).hexdigest())
                if hardlinks and st.st_nlink > 1:
                    inode_paths.setdefault((st.st_dev, st.st_ino), []).append(rel)
            elif stat.S_ISLNK(kind):
                extra = (os.readlink(full).decode("utf-8", "backslashreplace"),)
            elif stat.S_ISCHR(kind) or stat.S_ISBLK(kind):
                extra = (os.major(st.st_rdev), os.minor(st.st_rdev))
            xattrs = ()
            if not stat.S_ISLNK(kind):
                xattrs = tuple(sorted(
                    (k, os.getxattr(full, k, follow_symlinks=False))
                    for k in os.listxattr(full, follow_symlinks=False) if k.startswith("user.")
                ))
            mtime = None if stat.S_ISDIR(kind) else st.st_mtime_ns
            tree[rel] = (stat.filemode(st.st_mode), st.st_uid, st.st_gid, mtime, *extra, xattrs)
    for paths in inode_paths.values():
        if len(paths) > 1:
            for rel in paths:
                entry = tree[rel]
                tree[rel] = (*entry[:-1], f"link-group:{paths[0]}", entry[-1])
    return tree


def snapshot_in_container(podman: Podman, image: str) -> dict[str, tuple[str, ...]]:
    """The tree as a process in the container sees it (for rootless runs, where the
    host cannot mount the container): type, mode, size, content hash, link target."""
    script = r"""
cd / || exit 1
busybox find . -xdev \( -path ./proc -o -path ./sys -o -path ./dev -o -path ./run \
  -o -path ./etc/hosts -o -path ./etc/hostname -o -path ./etc/resolv.conf \) -prune -o -print |
while IFS= read -r p; do
  if [ -L "$p" ]; then t=$(busybox readlink "$p"); h=-
  elif [ -f "$p" ]; then t=-; h=$(busybox sha256sum "$p" | busybox cut -d' ' -f1)
  else t=-; h=-; fi
  printf '%s\t%s\t%s\t%s\n' "$p" "$(busybox stat -c '%A %s' "$p")" "$h" "$t"
done
"""
    out = podman.text("run", "--rm", "--network=none", "--entrypoint", "/bin/busybox",
                      image, "sh", "-c", script)
    tree: dict[str, tuple[str, ...]] = {}
    for line in out.splitlines():
        path, mode_size, digest, target = line.split("\t")
        mode, size = mode_size.split(" ")
        if mode.startswith("d"):
            size = "-"
        tree[path] = (mode, size, digest, target)
    return tree
