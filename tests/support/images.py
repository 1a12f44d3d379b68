"""Hand-built images: layers written entry by entry, so tests get exact edge cases
(whiteouts, opaque directories, hardlinks, devices, FIFOs, xattrs, setuid files,
long and non-UTF-8 names, hostile members)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

BUSYBOX = Path("/bin/busybox")
MTIME = 1_700_000_000


@dataclass
class Entry:
    name: str | bytes
    kind: str = "file"  # file dir symlink hardlink fifo char block
    data: bytes = b""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    target: str | bytes = ""
    xattrs: dict[str, str] = field(default_factory=dict)
    major: int = 0
    minor: int = 0
    mtime: int = MTIME


_KINDS = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "fifo": tarfile.FIFOTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
}


def _text(name: str | bytes) -> str:
    return name.decode("utf-8", "surrogateescape") if isinstance(name, bytes) else name


def tar_bytes(entries: list[Entry], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8",
                      errors="surrogateescape") as tar:
        for e in entries:
            info = tarfile.TarInfo(_text(e.name))
            info.type = _KINDS[e.kind]
            info.mode = e.mode if e.mode is not None else (0o755 if e.kind == "dir" else 0o644)
            info.uid, info.gid = e.uid, e.gid
            info.uname = info.gname = ""
            info.mtime = e.mtime
            info.linkname = _text(e.target)
            info.devmajor, info.devminor = e.major, e.minor
            if e.xattrs:
                info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in e.xattrs.items()}
            if e.kind == "file":
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
            else:
                tar.addfile(info)
    return buf.getvalue()


@dataclass
class Blob:
    data: bytes
    media_type: str
    diff_id: str = ""

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.data).hexdigest()

    def descriptor(self) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": len(self.data)}


def layer(entries: list[Entry] | bytes, compression: str = "gzip") -> Blob:
    raw = entries if isinstance(entries, bytes) else tar_bytes(entries)
    diff_id = "sha256:" + hashlib.sha256(raw).hexdigest()
    if compression == "gzip":
        return Blob(gzip.compress(raw, compresslevel=6, mtime=0),
                    "application/vnd.oci.image.layer.v1.tar+gzip", diff_id)
    if compression == "zstd":
        return Blob(zstandard.ZstdCompressor().compress(raw),
                    "application/vnd.oci.image.layer.v1.tar+zstd", diff_id)
    return Blob(raw, "application/vnd.oci.image.layer.v1.tar", diff_id)


@dataclass
class Image:
    manifest: bytes
    config: Blob
    layers: list[Blob]

    @property
    def manifest_digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.manifest).hexdigest()

    @property
    def config_digest(self) -> str:
        return self.config.digest


def image(layers: list[Blob], *, env: list[str] | None = None, cmd: list[str] | None = None,
          arch: str = "amd64", docker: bool = False, created: str = "2024-01-01T00:00:00Z",
          label: str = "") -> Image:
    config = {
        "created": created,
        "architecture": arch,
        "os": "linux",
        "config": {
            "Env": env or ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": cmd or ["/bin/busybox", "sh"],
            "Labels": {"test": label} if label else None,
        },
        "rootfs": {"type": "layers", "diff_ids": [b.diff_id for b in layers]},
        "history": [{"created": created, "created_by": f"layer {i}"} for i in range(len(layers))],
    }
    config_blob = Blob(json.dumps(config, sort_keys=True).encode(),
                       "application/vnd.docker.container.image.v1+json" if docker
                       else "application/vnd.oci.image.config.v1+json")
    if docker:
        for b in layers:
            if b.media_type.endswith("tar+gzip"):
                b.media_type = "application/vnd.docker.image.rootfs.diff.tar.gzip"
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json" if docker
        else "application/vnd.oci.image.manifest.v1+json",
        "config": config_blob.descriptor(),
        "layers": [b.descriptor() for b in layers],
    }
    return Image(json.dumps(manifest, indent=2).encode(), config_blob, layers)


def index(images: list[tuple[Image, str, str, str | None]]) -> bytes:
    """An OCI index of (image, os, arch, variant) entries."""
    manifests = []
    for img, os_name, arch, variant in images:
        platform = {"os": os_name, "architecture": arch}
        if variant:
            platform["variant"] = variant
        manifests.append({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": img.manifest_digest,
            "size": len(img.manifest),
            "platform": platform,
        })
    return json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                       "manifests": manifests}, indent=2).encode()


# -- ready-made layers ----------------------------------------------------------------

def busybox_entries(applets: tuple[str, ...] = ("sh", "ls", "cat", "find", "stat")) -> list[Entry]:
    entries = [
        Entry("./", "dir", mode=0o755),
        Entry("bin/", "dir"),
        Entry("bin/busybox", data=BUSYBOX.read_bytes(), mode=0o755),
        Entry("etc/", "dir"),
        Entry("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\n"
                                b"user:x:1000:1000::/home/user:/bin/sh\n"),
        Entry("etc/group", data=b"root:x:0:\nuser:x:1000:\n"),
        Entry("tmp/", "dir", mode=0o1777),
    ]
    entries += [Entry(f"bin/{a}", "symlink", target="busybox") for a in applets]
    return entries


def busybox_layer(**kw: object) -> Blob:
    return layer(busybox_entries(), **kw)  # type: ignore[arg-type]


def edge_case_layers() -> list[Blob]:
    """A base plus upper layers exercising every kind of entry and both whiteout forms."""
    base = [
        *busybox_entries(),
        Entry("opt/", "dir"),
        Entry("opt/remove-me", data=b"deleted by layer 2\n"),
        Entry("opt/keep", data=b"kept\n"),
        Entry("var/", "dir"),
        Entry("var/lib/", "dir"),
        Entry("var/lib/replaced/", "dir", mode=0o750),
        Entry("var/lib/replaced/old-a", data=b"a\n"),
        Entry("var/lib/replaced/sub/", "dir"),
        Entry("var/lib/replaced/sub/old-b", data=b"b\n"),
        Entry("var/lib/gone/", "dir"),
        Entry("var/lib/gone/x", data=b"x\n"),
        Entry("usr/", "dir"),
        Entry("usr/bin/", "dir"),
        Entry("usr/bin/orig", data=b"#!/bin/sh\necho original\n", mode=0o755),
    ]
    upper = [
        Entry("opt/", "dir"),
        Entry("opt/.wh.remove-me"),
        Entry("var/lib/", "dir"),
        Entry("var/lib/.wh.gone"),
        Entry("var/lib/replaced/", "dir", mode=0o755),
        Entry("var/lib/replaced/.wh..wh..opq"),
        Entry("var/lib/replaced/new", data=b"after opaque\n"),
        Entry("usr/bin/", "dir"),
        Entry("usr/bin/orig", data=b"#!/bin/sh\necho replaced\n", mode=0o755),
        Entry("usr/bin/hardlink", "hardlink", target="usr/bin/orig"),
        Entry("usr/local/", "dir"),
        Entry("usr/local/bin/", "dir"),
        Entry("usr/local/bin/suid", data=b"#!/bin/sh\nid\n", mode=0o4755),
        Entry("usr/local/bin/sgid", data=b"#!/bin/sh\nid\n", mode=0o2755, gid=1000),
        Entry("usr/local/bin/hl-a", data=b"shared content\n", mode=0o755),
        Entry("usr/local/bin/hl-b", "hardlink", target="usr/local/bin/hl-a"),
        Entry("srv/", "dir"),
        Entry("srv/fifo", "fifo", mode=0o640),
        Entry("srv/null", "char", mode=0o666, major=1, minor=3),
        Entry("srv/xattr-file", data=b"has an xattr\n", xattrs={"user.lazypod": "hello"}),
        Entry("srv/abs-link", "symlink", target="/etc/passwd"),
        Entry("srv/dangling", "symlink", target="../nowhere"),
        Entry("srv/" + "long-name-" * 12, data=b"long\n"),
        Entry(b"srv/caf\xe9-latin1", data=b"non-utf8 name\n"),
        Entry("home/", "dir"),
        Entry("home/user/", "dir", uid=1000, gid=1000, mode=0o750),
        Entry("home/user/file", data=b"owned by 1000\n", uid=1000, gid=1000, mode=0o600),
        Entry("root/", "dir", mode=0o700),
        Entry("root/private/", "dir", mode=0o700),
        Entry("root/private/secret", data=b"secret\n", mode=0o600),
        Entry("srv/sticky/", "dir", mode=0o1777),
        Entry("srv/empty", data=b""),
    ]
    top = [
        Entry("srv/", "dir"),
        Entry("srv/.wh.empty"),
        Entry("var/lib/gone/", "dir"),  # recreated after the whiteout of layer 2
        Entry("var/lib/gone/.wh..wh..opq"),
        Entry("var/lib/gone/y", data=b"y is new\n"),
        Entry("opt/keep", data=b"modified in layer 3\n", mode=0o600),
    ]
    return [layer(base), layer(upper), layer(top, compression="zstd")]


def export_oci_layout(img: Image, directory: Path, tag: str) -> None:
    """Write `img` as an OCI layout (for skopeo or podman to read)."""
    if directory.exists():
        shutil.rmtree(directory)
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    for blob in [img.config, *img.layers]:
        (blobs / blob.digest.split(":")[1]).write_bytes(blob.data)
    (blobs / img.manifest_digest.split(":")[1]).write_bytes(img.manifest)
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (directory / "index.json").write_text(json.dumps({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": img.manifest_digest, "size": len(img.manifest),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    }))


# -- OCI layouts and archives, as skopeo and podman save write them --------------------

@dataclass
class LayoutEntry:
    """One descriptor of a layout's index.json: an image, or an index of images."""

    image: Image | None = None
    ref_name: str | None = None
    platform: tuple[str, str] | None = None  # (os, architecture) in index.json itself
    children: list[tuple[Image, str, str, str | None]] = field(default_factory=list)


def write_oci_layout(directory: Path, entries: list[LayoutEntry]) -> Path:
    """An OCI layout holding `entries` (an entry with `children` is a nested index)."""
    if directory.exists():
        shutil.rmtree(directory)
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return "sha256:" + digest

    def put_image(img: Image) -> None:
        for blob in [img.config, *img.layers]:
            put(blob.data)
        put(img.manifest)

    manifests = []
    for entry in entries:
        if entry.children:
            for child, *_ in entry.children:
                put_image(child)
            raw = index(entry.children)
            media_type = "application/vnd.oci.image.index.v1+json"
        else:
            assert entry.image is not None
            put_image(entry.image)
            raw = entry.image.manifest
            media_type = json.loads(raw)["mediaType"]
        desc: dict[str, object] = {"mediaType": media_type, "digest": put(raw),
                                   "size": len(raw)}
        if entry.ref_name is not None:
            desc["annotations"] = {"org.opencontainers.image.ref.name": entry.ref_name}
        if entry.platform is not None:
            desc["platform"] = {"os": entry.platform[0], "architecture": entry.platform[1]}
        manifests.append(desc)
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (directory / "index.json").write_text(json.dumps({"schemaVersion": 2,
                                                      "manifests": manifests}))
    return directory


def archive_oci_layout(directory: Path, archive: Path,
                       extra: list[tarfile.TarInfo] | None = None) -> Path:
    """A tar of the layout in `directory` (as podman save --format oci-archive writes
    it), with `extra` members (hostile ones) added at the end."""
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(directory.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(directory)), recursive=False)
        for info in extra or []:
            tar.addfile(info, io.BytesIO(b"x" * info.size))
    return archive
