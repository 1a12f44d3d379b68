"""An image's layers merged into one tree, as overlayfs shows them, and written out.

Layers are read through `securepath.walk_layer` (never through a symlink found in
a layer: an image's `var/run -> /run` or `dev/fd -> /proc/self/fd` is an entry of
the tree, not a way into the publisher's host). Each layer is scanned once per run
(`LayerScans`) and its scan shared by every image that uses the layer; the merged
tree of one image lives only while that image is written.

Whiteouts are honoured in every form a repository may hold them: overlay 0/0
character devices and opaque xattrs, AUFS `.wh.` files (DUCC's layers), and the
layer's `whiteouts.json`.

Writing: into a directory, a tree's files are reflink copies of the layers' files
where the file system makes them (XFS, btrfs: no space, an inode of their own),
else hardlinks (no space, one system call per file, but the inode is the layer's:
`podman run --rootfs DIR:O`, not `DIR`); into a tar for `cvmfs_server ingest`, they are
hardlink members naming the layers' files in the repository, which CVMFS turns
into catalog entries sharing the content (no file content is read or sent).
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..digest import Digest
from ..fseval import At, FsEval, Meta, process_fs
from ..layout import LAYERFS, Layout
from ..overlay import (
    AUFS_META_PREFIX,
    AUFS_OPAQUE,
    AUFS_PREFIX,
    OPAQUE_XATTRS,
    RESERVED_XATTR_PREFIXES,
    is_whiteout,
)
from ..repository import LayerWhiteouts
from ..securepath import LayerDir, walk_layer

__all__ = ["FlatTree", "LayerScan", "LayerScans", "Node", "OpenLayers", "merge_layers",
           "scan_layer"]

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FICLONE = 0x40049409  # ioctl: share a file's extents (XFS, btrfs)


@dataclass(slots=True)
class Node:
    """One entry of a tree: from a layer (`layer`, `path`), or made up (`data`)."""

    st_mode: int
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    rdev: int = 0
    layer: str = ""  # hex digest of the source layer; "" for made-up entries
    path: bytes = b""  # its path in that layer
    data: bytes | None = None  # a made-up file's content
    target: bytes = b""  # a symlink's target
    xattrs: dict[str, bytes] = field(default_factory=dict)
    inode: int = 0  # the source's inode number when it has other links in its layer
    children: dict[bytes, Node] | None = None  # directories of a merged tree
    size: int = 0  # a file's size
    origin: bytes = b""  # the first name (walk order) of its inode in its layer, if not path

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st_mode)


@dataclass
class LayerScan:
    """What one layer holds: its entries (parents first), what it deletes below it."""

    digest: Digest
    entries: list[Node] = field(default_factory=list)
    whiteouts: list[bytes] = field(default_factory=list)
    opaque: list[bytes] = field(default_factory=list)


def scan_layer(layerfs: Path, digest: Digest, record: LayerWhiteouts | None) -> LayerScan:
    """Read a layer through the door; `record` adds whiteouts a view may hide."""
    scan = LayerScan(digest)
    hexdigest = digest.hex
    aufs_meta = b""  # an AUFS bookkeeping directory being skipped
    first_names: dict[int, bytes] = {}  # inode -> its first name, for hardlink members
    for entry in walk_layer(layerfs, xattrs="special"):
        path = entry.path
        if not path:
            if _opaque_marker(entry.xattrs):
                scan.opaque.append(b"")
            continue
        if aufs_meta and path.startswith(aufs_meta):
            continue
        parent, _, name = path.rpartition(b"/")
        if name.startswith(AUFS_PREFIX):
            if name == AUFS_OPAQUE:
                scan.opaque.append(parent)
            elif name.startswith(AUFS_META_PREFIX):
                aufs_meta = path + b"/"
            else:
                hidden = name[len(AUFS_PREFIX):]
                scan.whiteouts.append(parent + b"/" + hidden if parent else hidden)
            continue
        st = entry.st
        if is_whiteout(st):
            scan.whiteouts.append(path)
            continue
        if stat.S_ISDIR(st.st_mode) and _opaque_marker(entry.xattrs):
            scan.opaque.append(path)
        scan.entries.append(Node(
            st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_rdev, hexdigest, path,
            target=entry.target,
            xattrs={k: v for k, v in entry.xattrs.items()
                    if not k.startswith(RESERVED_XATTR_PREFIXES)},
            inode=st.st_ino if st.st_nlink > 1 and stat.S_ISREG(st.st_mode) else 0,
            size=st.st_size if stat.S_ISREG(st.st_mode) else 0,
            origin=_first_name(first_names, st, path),
        ))
    if record is not None:
        known = set(scan.whiteouts)
        scan.whiteouts += [w for w in record.whiteouts if w not in known]
        known = set(scan.opaque)
        scan.opaque += [o for o in record.opaque_dirs if o not in known]
    return scan


def _first_name(first_names: dict[int, bytes], st: os.stat_result, path: bytes) -> bytes:
    """The name a file's other names follow in its layer's ingest (`cvmfs_plan` walks
    in the same order and makes the others hardlink members of it), or b"" for the
    first itself. A flat tree's hardlink member must name that one: a member naming
    another hardlink member of the same ingest fails it when cvmfs_server happens to
    clone them in the other order."""
    if st.st_nlink < 2 or not stat.S_ISREG(st.st_mode):
        return b""
    first = first_names.setdefault(st.st_ino, path)
    return b"" if first == path else first


def _opaque_marker(xattrs: dict[str, bytes]) -> bool:
    return any(xattrs.get(key) == b"y" for key in OPAQUE_XATTRS)


class LayerScans:
    """Scans of the layers a batch of trees needs: each layer read once, and let go
    once the last tree that needs it has been built. `layer_dir` says where a layer
    is read from (a pending one from the run's staging, a published one, on CVMFS,
    from the client view)."""

    def __init__(self, layer_dir: Callable[[Digest], Path], uses: Iterable[Digest]) -> None:
        self._layer_dir = layer_dir
        self._remaining: Counter[Digest] = Counter(uses)
        self._scans: dict[Digest, LayerScan] = {}

    def get(self, digest: Digest) -> LayerScan:
        scan = self._scans.get(digest)
        if scan is None:
            directory = self._layer_dir(digest)
            scan = self._scans[digest] = scan_layer(
                directory / LAYERFS, digest, LayerWhiteouts.read(directory))
        return scan

    def release(self, digest: Digest) -> bool:
        """One tree that needed the layer is done; True when no other will need it."""
        self._remaining[digest] -= 1
        if self._remaining[digest] <= 0:
            self._scans.pop(digest, None)
            return True
        return False

    def prefetch(self) -> None:
        """Read every layer now (so that nothing is read from the repository later)."""
        for digest in self._remaining:
            self.get(digest)


@dataclass
class OpenLayers:
    """What the trees of a batch share while they are written: open layers (directory
    descriptors), whether the file system makes reflinks (asked once), and what
    depends on privilege (`fs`, the process's by default)."""

    layers: dict[str, LayerDir] = field(default_factory=dict)
    reflinks: bool | None = None
    fs: FsEval = field(default_factory=process_fs)

    def close(self, hexdigest: str | None = None) -> None:
        """Close one layer, or all."""
        for key in [hexdigest] if hexdigest else list(self.layers):
            layer = self.layers.pop(key, None)
            if layer is not None:
                layer.close()


class FlatTree:
    """A merged tree; `layer_dirs` says where each source layer is read from, and
    `layer_rels` where it is in the repository (hex digest -> layerfs)."""

    def __init__(self, layer_dirs: dict[str, Path], layer_rels: dict[str, str],
                 opened: OpenLayers | None = None) -> None:
        self.root = Node(stat.S_IFDIR | 0o755, children={})
        self.layer_dirs = layer_dirs
        self.layer_rels = layer_rels
        self.opened = opened

    # -- building --------------------------------------------------------------

    def lookup(self, path: bytes) -> Node | None:
        node: Node | None = self.root
        for part in _parts(path):
            if node is None or node.children is None:
                return None
            node = node.children.get(part)
        return node

    def remove(self, path: bytes) -> None:
        parts = _parts(path)
        parent = self.lookup(b"/".join(parts[:-1])) if parts else None
        if parent is not None and parent.children is not None:
            parent.children.pop(parts[-1], None)

    def put(self, path: bytes, node: Node) -> None:
        """Add `node` at `path`, as an upper layer's entry lands on the lower ones."""
        parts = _parts(path)
        parent = self.root
        for part in parts[:-1]:
            assert parent.children is not None
            child = parent.children.get(part)
            if child is None or child.children is None:
                child = parent.children[part] = Node(stat.S_IFDIR | 0o755, children={})
            parent = child
        assert parent.children is not None
        if node.is_dir:
            existing = parent.children.get(parts[-1])
            children = existing.children if existing is not None and existing.children \
                is not None else {}
            node = replace(node, children=children)  # merged with the lower directory
        parent.children[parts[-1]] = node

    def walk(self) -> Iterator[tuple[bytes, Node]]:
        """(relative path, node), parents before children, in name order."""
        stack: list[tuple[bytes, Node]] = [(b"", self.root)]
        while stack:
            path, node = stack.pop()
            yield path, node
            for name in sorted(node.children or (), reverse=True):
                assert node.children is not None
                stack.append((path + b"/" + name if path else name, node.children[name]))

    # -- writing into a directory -----------------------------------------------

    def materialize(self, dest: Path) -> None:
        """Write the tree into the empty directory `dest`: files are reflink copies or
        hardlinks of the layers' files (copies where the file system refuses both)."""
        opened = self.opened or OpenLayers()
        writer = _DirectoryWriter(self, dest, opened)
        try:
            writer.write()
        finally:
            writer.close()
            if self.opened is None:
                opened.close()

    # -- writing as a tar ---------------------------------------------------------

    def tar_members(self, prefix: str, defer: Callable[[str, str, Node], bool] | None = None,
                    ) -> Iterator[tuple[tarfile.TarInfo, bytes | None]]:
        """(header, content) for every entry, named under `prefix` (relative to the
        repository root). Files from layers are hardlink members naming the layer's
        file in the repository (the first name of its inode there): no content is
        read; made-up files carry theirs. `defer(name, linkname, node)` may take a
        layer file out of the tar (the caller writes it some other way)."""
        for rel, node in self.walk():
            info = tarfile.TarInfo(f"{prefix}/{os.fsdecode(rel)}" if rel else prefix)
            kind = stat.S_IFMT(node.st_mode)
            info.mode = stat.S_IMODE(node.st_mode)
            info.uid, info.gid = node.uid, node.gid
            info.uname = info.gname = ""
            info.mtime = node.mtime_ns // 10**9
            data: bytes | None = None
            if stat.S_ISDIR(kind):
                info.type = tarfile.DIRTYPE
            elif stat.S_ISREG(kind):
                if node.layer:
                    info.type = tarfile.LNKTYPE
                    info.linkname = os.fsdecode(
                        f"{self.layer_rels[node.layer]}/".encode() + (node.origin or node.path))
                    if defer is not None and defer(info.name, info.linkname, node):
                        continue
                else:
                    info.type = tarfile.REGTYPE
                    data = node.data or b""
                    info.size = len(data)
            elif stat.S_ISLNK(kind):
                info.type = tarfile.SYMTYPE
                info.linkname = os.fsdecode(node.target)
            elif stat.S_ISCHR(kind) or stat.S_ISBLK(kind):
                info.type = tarfile.CHRTYPE if stat.S_ISCHR(kind) else tarfile.BLKTYPE
                info.devmajor, info.devminor = os.major(node.rdev), os.minor(node.rdev)
            elif stat.S_ISFIFO(kind):
                info.type = tarfile.FIFOTYPE
            else:
                continue  # sockets: nothing a tar can hold
            yield info, data


def merge_layers(scans: list[LayerScan], tree: FlatTree) -> FlatTree:
    """Merge layers bottom to top into `tree`, as overlayfs shows them."""
    for scan in scans:
        for directory in scan.opaque:  # everything below came from the lower layers
            node = tree.lookup(directory)
            if node is not None and node.children is not None:
                node.children = {}
        for path in scan.whiteouts:
            tree.remove(path)
        for node in scan.entries:
            tree.put(node.path, node)
    return tree


def _parts(path: bytes) -> list[bytes]:
    return [p for p in path.split(b"/") if p and p != b"."]


class _DirectoryWriter:
    """Writes a FlatTree below `dest`. Entries are made by their path relative to the
    descriptor of `dest`: the tree is our own, made here, and its only symlinks are
    leaves (a symlink node has no children), so no name is resolved through one; it
    saves opening every directory. Layers are read through `securepath`'s door,
    their directory descriptors shared by all the trees of a batch (`layers`)."""

    def __init__(self, tree: FlatTree, dest: Path, opened: OpenLayers) -> None:
        self._tree = tree
        self._dest_fd = os.open(dest, _DIR_FLAGS)
        self._fs = opened.fs
        self._opened = opened
        self._copies: dict[tuple[str, int], bytes] = {}  # (layer, inode) -> our copy

    def close(self) -> None:
        os.close(self._dest_fd)

    def write(self) -> None:
        assert self._tree.root.children is not None
        self._write_children(b"", self._tree.root)

    def _write_children(self, prefix: bytes, directory: Node) -> None:
        assert directory.children is not None
        dest = self._dest_fd
        for name in sorted(directory.children):
            node = directory.children[name]
            rel = prefix + b"/" + name if prefix else name
            kind = stat.S_IFMT(node.st_mode)
            if stat.S_ISDIR(kind):
                # Root may write anywhere: the final mode at once saves a chmod.
                mode = self._fs.new_dir_mode(stat.S_IMODE(node.st_mode))
                os.mkdir(rel, mode, dir_fd=dest)
                self._write_children(rel, node)
                self._apply_meta(rel, node, created=mode)
            elif stat.S_ISREG(kind) and node.layer:
                if not self._link(dest, rel, rel, node):
                    self._apply_meta(rel, node, created=None)
            elif stat.S_ISREG(kind):
                fd = os.open(rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                             stat.S_IMODE(node.st_mode), dir_fd=dest)
                try:
                    _write_all(fd, node.data or b"")
                finally:
                    os.close(fd)
                self._apply_meta(rel, node, created=stat.S_IMODE(node.st_mode))
            elif stat.S_ISLNK(kind):
                os.symlink(node.target, rel, dir_fd=dest)
                self._apply_meta(rel, node, created=None)
            elif stat.S_ISSOCK(kind):
                continue
            elif stat.S_ISFIFO(kind):
                os.mknod(rel, node.st_mode, dir_fd=dest)
                self._apply_meta(rel, node, created=None)
            else:
                self._fs.make_device(At(dest, rel), node.st_mode, node.rdev,
                                     os.fsdecode(rel))
                self._apply_meta(rel, node, created=None)

    def _link(self, dir_fd: int, name: bytes, rel: bytes, node: Node) -> bool:
        """The layer's file in the tree: a reflink copy where the file system makes
        them (its own inode: a container writing to it changes no layer), else a
        hardlink (shared: the README says how to run a flat tree). True if that gave
        the entry its metadata too."""
        key = (node.layer, node.inode)
        if node.inode and key in self._copies:
            os.link(self._copies[key], name, src_dir_fd=self._dest_fd, dst_dir_fd=dir_fd,
                    follow_symlinks=False)
            return True
        layer = self._layer(node.layer)
        path = tuple(node.path.split(b"/"))
        if self._opened.reflinks is not False:
            if self._copy(layer, path, dir_fd, name, reflink=True):
                self._opened.reflinks = True
                self._remember(key, node, rel)
                return False
            self._opened.reflinks = False
        parent, source = layer.parent(path, create=False)
        try:
            os.link(source, name, src_dir_fd=parent, dst_dir_fd=dir_fd, follow_symlinks=False)
            return True  # owner, mode, times and xattrs are the layer file's
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
        self._copy(layer, path, dir_fd, name, reflink=False)
        self._remember(key, node, rel)
        return False

    def _remember(self, key: tuple[str, int], node: Node, rel: bytes) -> None:
        if node.inode:
            self._copies[key] = rel

    def _copy(self, layer: LayerDir, path: tuple[bytes, ...], dir_fd: int, name: bytes, *,
              reflink: bool) -> bool:
        """Copy a layer file (content and xattrs); with `reflink`, only by sharing its
        extents: False (and nothing left behind) where the file system cannot."""
        src = layer.open_file(path)
        try:
            dst = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                          dir_fd=dir_fd)
            try:
                if reflink:
                    try:
                        fcntl.ioctl(dst, _FICLONE, src)
                    except OSError:
                        os.close(dst)
                        dst = -1
                        os.unlink(name, dir_fd=dir_fd)
                        return False
                else:
                    with open(src, "rb", closefd=False) as fin, \
                            open(dst, "wb", closefd=False) as fout:
                        shutil.copyfileobj(fin, fout, 1 << 20)
                xattrs = {key: os.getxattr(src, key) for key in os.listxattr(src)
                          if not key.startswith(RESERVED_XATTR_PREFIXES)}
                self._fs.set_xattrs(At(dst), xattrs, os.fsdecode(name), _ignore)
            finally:
                if dst >= 0:
                    os.close(dst)
        finally:
            os.close(src)
        return True

    def _layer(self, hexdigest: str) -> LayerDir:
        layer = self._opened.layers.get(hexdigest)
        if layer is None:
            layer = self._opened.layers[hexdigest] = LayerDir(self._tree.layer_dirs[hexdigest])
        return layer

    def _apply_meta(self, rel: bytes, node: Node, *, created: int | None) -> None:
        """Owner, mode, xattrs and times of an entry just made; `created`: the mode it
        was made with. A made-up entry keeps the time it was made at. Xattrs the file
        system or this user cannot keep are left out, as a copy of the layer's files
        leaves them out."""
        meta = Meta(stat.S_IMODE(node.st_mode), node.uid, node.gid, node.mtime_ns,
                    node.mtime_ns, node.xattrs)
        self._fs.apply_meta(At(self._dest_fd, rel), meta, os.fsdecode(rel), ours=True,
                            created=created, symlink=stat.S_ISLNK(node.st_mode),
                            times=bool(node.layer or node.mtime_ns), warn=_ignore)


def _ignore(message: str) -> None:
    pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def build_tree(scans: LayerScans, layers: list[Digest], layer_dir: Callable[[Digest], Path],
               repo_layout: Layout, extra: Callable[[FlatTree], None],
               opened: OpenLayers | None = None) -> FlatTree:
    """The merged tree of an image whose (non-foreign) layers are `layers`."""
    tree = FlatTree(
        {d.hex: layer_dir(d) / LAYERFS for d in layers},
        {d.hex: f"{repo_layout.layer_rel(d)}/{LAYERFS}" for d in layers},
        opened,
    )
    merge_layers([scans.get(d) for d in layers], tree)
    extra(tree)
    return tree
