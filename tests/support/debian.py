"""A real-world image: Debian bookworm minbase made with debootstrap (usrmerge links,
`dev/fd -> /proc/self/fd`, `var/run -> /run`, device nodes, thousands of files), plus
a layer that deletes, replaces and adds as `apt-get` and `RUN` steps do.

The debootstrap tree is made once per machine and kept in $LAZYPOD_TEST_CACHE
(default /var/tmp/lazypod-cache); bench/ uses the same tree.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from isal import igzip

from .images import Blob, Entry, Image, image, layer

CACHE = Path(os.environ.get("LAZYPOD_TEST_CACHE", "/var/tmp/lazypod-cache"))
MIRROR = os.environ.get("LAZYPOD_DEBIAN_MIRROR", "http://deb.debian.org/debian")


def minbase_rootfs() -> Path:
    """The debootstrap tree (made on first use, under a lock)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    rootfs = CACHE / "bookworm-minbase"
    with open(CACHE / "debootstrap.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (rootfs / ".complete").exists():
            shutil.rmtree(rootfs, ignore_errors=True)
            subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), MIRROR],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            (rootfs / ".complete").touch()
    return rootfs


def rootfs_tar(rootfs: Path) -> bytes:
    """The tree as one layer tarball, as `podman import` would make it."""
    # GNU format: whole-second times, as CVMFS keeps them (and most image builders write).
    proc = subprocess.run(
        ["tar", "--format=gnu", "--numeric-owner", "--sort=name", "--exclude=./.complete",
         "--exclude=./proc/*", "--exclude=./sys/*", "-C", str(rootfs), "-cf", "-", "."],
        check=True, capture_output=True)
    return proc.stdout


def gzip_layer(raw: bytes) -> Blob:
    """A gzip layer made quickly (ISA-L level 1): big layers are the point here."""
    return Blob(igzip.compress(raw, compresslevel=1),
                "application/vnd.oci.image.layer.v1.tar+gzip",
                "sha256:" + hashlib.sha256(raw).hexdigest())


def changes_layer() -> Blob:
    """What an image built on Debian typically adds: deletions, a directory replaced
    whole (opaque), new files, a hardlink, a setuid file."""
    return layer([
        Entry("usr/", "dir"),
        Entry("usr/share/", "dir"),
        Entry("usr/share/doc/", "dir"),
        Entry("usr/share/doc/.wh..wh..opq"),
        Entry("usr/share/doc/README.lazypod", data=b"docs were replaced\n"),
        Entry("usr/bin/", "dir"),
        Entry("usr/bin/.wh.tac"),
        Entry("usr/local/", "dir"),
        Entry("usr/local/bin/", "dir"),
        Entry("usr/local/bin/tool", data=b"#!/bin/sh\necho tool\n", mode=0o4755),
        Entry("usr/local/bin/tool-link", "hardlink", target="usr/local/bin/tool"),
        Entry("etc/", "dir"),
        Entry("etc/.wh.motd"),
        Entry("etc/lazypod-marker", data=b"debian test image\n"),
        Entry("var/", "dir"),
        Entry("var/lib/", "dir"),
        Entry("var/lib/apt/", "dir"),
        Entry("var/lib/apt/lists/", "dir"),
        Entry("var/lib/apt/lists/.wh..wh..opq"),
    ], compression="gzip")


def debian_image(label: str = "debian") -> Image:
    base = gzip_layer(rootfs_tar(minbase_rootfs()))
    return image([base, changes_layer()], label=label,
                 cmd=["/bin/sh", "-c", "cat /etc/lazypod-marker"])
