"""Flat root file systems (`.flat/<c2>/<c>/`) and the public links to them.

A flat tree is the image's layers merged as overlayfs would merge them, plus what
Apptainer/Singularity expect of a sandbox directory (`.singularity.d/` with the
image's environment and run script, and the usual mount points). Layers are read
from the repository; whiteouts are honoured in every form a repository may hold
them: overlay 0/0 character devices and opaque xattrs, AUFS `.wh.` files (DUCC's
layers), and the layer's `whiteouts.json` (a CVMFS publisher's own view hides
overlay whiteouts).

The merged tree is handed to the backend as a `FlatTree`, which the `dir`
backend materialises as a directory and the `cvmfs` backend streams as one tar
into `cvmfs_server ingest`. In a directory, a flat tree's files are hardlinks to
the layers' files: a flat tree costs no space and one system call per file
(copying them doubled the repository and the conversion time). The price, noted
in the README: a file's link count, as a container sees it, is one higher than
after a podman pull.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shlex
import shutil
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..backend import TreeWriter
from ..fsutil import UMASK
from ..manifest import ImageConfig
from ..repository import ImageRecord, LayerWhiteouts, RepositoryState
from ..unpack import OPAQUE_XATTRS

__all__ = ["FlatTree", "merge_layers", "render_flat"]

_AUFS_OPAQUE = b".wh..wh..opq"
_AUFS_META = b".wh..wh."
_AUFS_PREFIX = b".wh."
_SKIPPED_XATTRS = ("trusted.overlay.", "user.overlay.")


@dataclass
class Node:
    """One entry of the merged tree: read from `source`, or made from `data`."""

    st_mode: int
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    source: bytes | None = None  # absolute path in a layer
    data: bytes | None = None  # synthetic file content
    target: bytes = b""  # synthetic symlink target
    rdev: int = 0
    inode: tuple[int, int] | None = None  # of the source, when it has other links
    children: dict[bytes, Node] = field(default_factory=dict)

    @classmethod
    def from_source(cls, path: bytes, st: os.stat_result) -> Node:
        inode = (st.st_dev, st.st_ino) if st.st_nlink > 1 and stat.S_ISREG(st.st_mode) else None
        return cls(st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, source=path,
                   rdev=st.st_rdev, inode=inode)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st_mode)


class FlatTree:
    """A merged image tree, ready to be written as a directory or a tar stream."""

    def __init__(self) -> None:
        self.root = Node(stat.S_IFDIR | 0o755)

    # -- building --------------------------------------------------------------

    def lookup(self, path: bytes) -> Node | None:
        node = self.root
        for part in _parts(path):
            child = node.children.get(part)
            if child is None:
                return None
            node = child
        return node

    def remove(self, path: bytes) -> None:
        parts = _parts(path)
        parent = self.lookup(b"/".join(parts[:-1])) if parts else None
        if parent is not None and parent.is_dir:
            parent.children.pop(parts[-1], None)

    def put(self, path: bytes, node: Node) -> None:
        parts = _parts(path)
        if not parts:
            node.children = self.root.children
            self.root = node
            return
        parent = self.root
        for part in parts[:-1]:
            child = parent.children.get(part)
            if child is None or not child.is_dir:
                child = parent.children[part] = Node(stat.S_IFDIR | 0o755)
            parent = child
        existing = parent.children.get(parts[-1])
        if existing is not None and existing.is_dir and node.is_dir:
            node.children = existing.children  # an upper directory merges with the lower
        parent.children[parts[-1]] = node

    def walk(self) -> Iterator[tuple[bytes, Node]]:
        """(relative path, node), parents before children, in name order."""
        stack: list[tuple[bytes, Node]] = [(b"", self.root)]
        while stack:
            path, node = stack.pop()
            yield path, node
            for name in sorted(node.children, reverse=True):
                stack.append((path + b"/" + name if path else name, node.children[name]))

    # -- writing ---------------------------------------------------------------

    def materialize(self, dest: Path) -> None:
        """Write the tree into the empty directory `dest`: files are hardlinks to the
        layers' files (copies where the file system refuses)."""
        dest_b = os.fsencode(dest)
        dirs: list[tuple[bytes, Node, int | None]] = []
        copies: dict[tuple[int, int], bytes] = {}  # layer inode -> its copy here
        root = os.geteuid() == 0
        for rel, node in self.walk():
            path = os.path.join(dest_b, rel) if rel else dest_b
            kind = stat.S_IFMT(node.st_mode)
            if stat.S_ISDIR(kind):
                created = None
                if rel:  # root writes anywhere: the final mode at once saves a chmod
                    mode = stat.S_IMODE(node.st_mode) & 0o777 if root else 0o700
                    os.mkdir(path, mode)
                    created = mode & ~UMASK
                dirs.append((path, node, created))
                continue
            if stat.S_ISREG(kind) and node.source is not None:
                if node.inode is not None and node.inode in copies:
                    os.link(copies[node.inode], path)
                    continue
                try:
                    os.link(node.source, path, follow_symlinks=False)
                    continue  # owner, mode, times and xattrs are the layer file's
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                        raise
                shutil.copyfile(node.source, path, follow_symlinks=False)
                if node.inode is not None:
                    copies[node.inode] = path
            elif stat.S_ISREG(kind):
                with open(path, "wb") as f:
                    f.write(node.data or b"")
            elif stat.S_ISLNK(kind):
                os.symlink(os.readlink(node.source) if node.source else node.target, path)
            else:
                os.mknod(path, node.st_mode, node.rdev)
            _apply_meta(path, node)
        for path, node, created in reversed(dirs):
            _apply_meta(path, node, created)

    def tar_members(
        self, prefix: str
    ) -> Iterator[tuple[tarfile.TarInfo, bytes | None, bytes | None]]:
        """(header, path to read the content from, or the content) for every entry, with
        names under `prefix`; hardlink identity is not kept (CVMFS would break it)."""
        for rel, node in self.walk():
            name = f"{prefix}/{os.fsdecode(rel)}" if rel else prefix
            info = tarfile.TarInfo(name)
            kind = stat.S_IFMT(node.st_mode)
            info.mode = stat.S_IMODE(node.st_mode)
            info.uid, info.gid = node.uid, node.gid
            info.mtime = node.mtime_ns // 10**9
            source: bytes | None = None
            if stat.S_ISDIR(kind):
                info.type = tarfile.DIRTYPE
            elif stat.S_ISREG(kind):
                info.type = tarfile.REGTYPE
                if node.source is not None:
                    info.size = os.lstat(node.source).st_size
                    source = node.source
                else:
                    info.size = len(node.data or b"")
            elif stat.S_ISLNK(kind):
                info.type = tarfile.SYMTYPE
                target = os.readlink(node.source) if node.source else node.target
                info.linkname = os.fsdecode(target)
            elif stat.S_ISCHR(kind) or stat.S_ISBLK(kind):
                info.type = tarfile.CHRTYPE if stat.S_ISCHR(kind) else tarfile.BLKTYPE
                info.devmajor, info.devminor = os.major(node.rdev), os.minor(node.rdev)
            elif stat.S_ISFIFO(kind):
                info.type = tarfile.FIFOTYPE
            yield info, source, node.data if source is None else None


def _apply_meta(path: bytes, node: Node, created: int | None = None) -> None:
    """Owner, mode, xattrs and times; `created` is the mode the entry was made with."""
    if os.geteuid() == 0 and (node.uid or node.gid):  # root's new entries are root's
        os.chown(path, node.uid, node.gid, follow_symlinks=False)
    if not stat.S_ISLNK(node.st_mode):
        if created is None or stat.S_IMODE(node.st_mode) != created:
            os.chmod(path, stat.S_IMODE(node.st_mode))
        if node.source is not None:
            _copy_xattrs(node.source, path)
    os.utime(path, ns=(node.mtime_ns, node.mtime_ns), follow_symlinks=False)


def _copy_xattrs(source: bytes, dest: bytes) -> None:
    with contextlib.suppress(OSError):
        for name in os.listxattr(source, follow_symlinks=False):
            if not name.startswith(_SKIPPED_XATTRS):
                os.setxattr(dest, name, os.getxattr(source, name, follow_symlinks=False),
                            follow_symlinks=False)


def _parts(path: bytes) -> list[bytes]:
    return [p for p in path.split(b"/") if p and p != b"."]


# -- merging layers ---------------------------------------------------------------------

def merge_layers(layerfs_dirs: list[Path], records: list[LayerWhiteouts | None]) -> FlatTree:
    """Merge layers bottom to top, as overlayfs shows them."""
    tree = FlatTree()
    for layerfs, record in zip(layerfs_dirs, records, strict=True):
        entries, whiteouts, opaque = _scan_layer(os.fsencode(layerfs))
        if record is not None:
            whiteouts += list(record.whiteouts)
            opaque += list(record.opaque_dirs)
        for directory in opaque:  # everything below came from the lower layers
            node = tree.lookup(directory)
            if node is not None and node.is_dir:
                node.children = {}
        for path in whiteouts:
            tree.remove(path)
        for rel, node in entries:
            existing = tree.lookup(rel)
            if existing is not None and existing.is_dir and not node.is_dir:
                tree.remove(rel)
            tree.put(rel, node)
    return tree


def _scan_layer(root: bytes) -> tuple[list[tuple[bytes, Node]], list[bytes], list[bytes]]:
    entries: list[tuple[bytes, Node]] = []
    whiteouts: list[bytes] = []
    opaque: list[bytes] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = b"" if rel_dir == b"." else rel_dir
        if rel_dir and _is_opaque(dirpath):
            opaque.append(rel_dir)
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.join(rel_dir, name) if rel_dir else name
            if name == _AUFS_OPAQUE:
                opaque.append(rel_dir)
                continue
            if name.startswith(_AUFS_META):
                continue
            if name.startswith(_AUFS_PREFIX):
                hidden = name[len(_AUFS_PREFIX):]
                whiteouts.append(os.path.join(rel_dir, hidden) if rel_dir else hidden)
                continue
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                # Listed but not there: an overlay whiteout as a CVMFS server's own
                # overlay shows it; the layer's whiteouts.json has it.
                continue
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                whiteouts.append(rel)
                continue
            entries.append((rel, Node.from_source(full, st)))
        dirnames[:] = [d for d in dirnames if not d.startswith(_AUFS_META)]
    return entries, whiteouts, opaque


def _is_opaque(path: bytes) -> bool:
    for name in OPAQUE_XATTRS:
        with contextlib.suppress(OSError):
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
    return False


# -- Apptainer / Singularity ---------------------------------------------------------------

_MOUNT_POINTS = (b"proc", b"sys", b"dev", b"tmp", b"var/tmp", b"home", b"root", b"etc",
                 b"cvmfs")
_RUNSCRIPT = """#!/bin/sh
# Generated by lazypod from the image's ENTRYPOINT and CMD, as Apptainer does.
OCI_ENTRYPOINT={entrypoint}
OCI_CMD={cmd}
if [ $# -gt 0 ]; then
    SINGULARITY_OCI_RUN="$OCI_ENTRYPOINT \\"\\$@\\""
else
    SINGULARITY_OCI_RUN="$OCI_ENTRYPOINT $OCI_CMD"
fi
{workdir}eval "set -- $SINGULARITY_OCI_RUN \\"\\$@\\""
exec "$@"
"""


def _shell_words(words: tuple[str, ...]) -> str:
    return shlex.quote(" ".join(shlex.quote(w) for w in words))


def apptainer_files(config: ImageConfig) -> dict[bytes, bytes]:
    env_lines = ["#!/bin/sh", "# Generated by lazypod from the image's ENV."]
    for item in config.env:
        key, sep, value = item.partition("=")
        if not sep or not key.replace("_", "a").isalnum():
            continue
        if key == "PATH":
            env_lines.append(f"export PATH={shlex.quote(value)}")
        else:
            env_lines.append(f'export {key}="${{{key}:-{_dq(value)}}}"')
    workdir = f"cd {shlex.quote(config.working_dir)} 2>/dev/null || true\n" \
        if config.working_dir else ""
    runscript = _RUNSCRIPT.format(entrypoint=_shell_words(config.entrypoint),
                                  cmd=_shell_words(config.cmd), workdir=workdir)
    return {
        b".singularity.d/env/10-docker2singularity.sh": "\n".join(env_lines).encode() + b"\n",
        b".singularity.d/runscript": runscript.encode(),
        b".singularity.d/labels.json": json.dumps(config.labels, indent=1).encode() + b"\n",
    }


def _dq(value: str) -> str:
    """Inside double quotes, keep the value literal."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$").replace("`", "\\`")


def add_apptainer_metadata(tree: FlatTree, config: ImageConfig) -> None:
    for mount_point in _MOUNT_POINTS:
        if tree.lookup(mount_point) is None:
            mode = 0o1777 if mount_point in (b"tmp", b"var/tmp") else 0o755
            tree.put(mount_point, Node(stat.S_IFDIR | mode))
    for name in (b"etc/hosts", b"etc/resolv.conf"):
        if tree.lookup(name) is None:
            tree.put(name, Node(stat.S_IFREG | 0o644, data=b""))
    for directory in (b".singularity.d", b".singularity.d/env"):
        tree.put(directory, Node(stat.S_IFDIR | 0o755))
    for name, data in apptainer_files(config).items():
        mode = 0o755 if name.endswith((b".sh", b"runscript")) else 0o644
        tree.put(name, Node(stat.S_IFREG | mode, data=data))
    tree.put(b"singularity", Node(stat.S_IFLNK | 0o777, target=b".singularity.d/runscript"))


# -- the view -----------------------------------------------------------------------------

@dataclass
class FlatReport:
    images: int = 0
    added: int = 0
    links: int = 0


def render_flat(
    state: RepositoryState, writer: TreeWriter, warn: Callable[[str], None]
) -> FlatReport:
    """Write missing flat trees (all in one batch) and the public links to them."""
    report = FlatReport()
    wanted: dict[str, ImageRecord] = {}
    for image in state.images:
        why = _why_no_flat(state, image)
        if why:
            warn(f"flat: skipping {image.public_name}: {why}")
            continue
        assert image.config is not None
        wanted.setdefault(state.layout.flat_rel(image.config.digest), image)
    missing: dict[str, FlatTree] = {}
    for rel, image in wanted.items():
        if not (state.layout.root / rel / ".singularity.d").is_dir():
            missing[rel] = _build(state, image)
    if missing:
        writer.add_trees(missing)
    report.images, report.added = len(wanted), len(missing)
    for image in state.images:
        if image.config is None or state.layout.flat_rel(image.config.digest) not in wanted:
            continue
        link = image.public_name
        depth = link.count("/")
        target = "../" * depth + state.layout.flat_rel(image.config.digest)
        writer.symlink(link, target)
        report.links += 1
    return report


def _why_no_flat(state: RepositoryState, image: ImageRecord) -> str | None:
    if image.config is None:
        return "no config.json"
    if not image.public_name.split("/", 1)[0] or image.public_name.startswith("."):
        return "its name cannot be a public link"
    for blob in image.manifest.layers:
        if blob.is_foreign:
            continue
        record = state.layer(blob.digest)
        if record is None or not record.complete:
            return f"layer {blob.digest.short} is missing"
    return None


def _build(state: RepositoryState, image: ImageRecord) -> FlatTree:
    assert image.config is not None
    blobs = [b for b in image.manifest.layers if not b.is_foreign]
    tree = merge_layers(
        [state.layout.layerfs(b.digest) for b in blobs],
        [LayerWhiteouts.read(state.layout.layer_dir(b.digest)) for b in blobs],
    )
    add_apptainer_metadata(tree, image.config)
    return tree

