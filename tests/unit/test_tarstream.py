"""The tar reader: every format podman reads, and tar-split that rebuilds the stream
byte for byte (what `podman save` and `podman push` do with it)."""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from lazypod.errors import LayerError
from lazypod.tarstream import TarReader
from lazypod.unpack import DirectorySink, TarSplitWriter, unpack_layer
from support.images import Entry, tar_bytes

ENTRIES = [
    Entry("./", "dir"),
    Entry("dir/", "dir", mode=0o750, uid=1000, gid=1000),
    Entry("dir/file", data=b"content\n" * 100, mode=0o640),
    Entry("dir/empty", data=b""),
    Entry("dir/" + "long-component-" * 10 + "/", "dir"),
    Entry("dir/" + "long-component-" * 10 + "/leaf", data=b"deep"),
    Entry("dir/" + "x" * 120, data=b"long name"),
    Entry("dir/link", "symlink", target="../" + "t" * 150),
    Entry("dir/hard", "hardlink", target="dir/file"),
    Entry(b"dir/caf\xe9", data=b"latin-1 name"),
    Entry("dir/unicode-\u00e9\u4e2d", data=b"utf-8 name"),
    Entry("dir/xattr", data=b"x", xattrs={"user.k": "v", "trusted.lazypod": "\x01"}),
    Entry("dir/fifo", "fifo"),
    Entry("big-uid", data=b"b", uid=3_000_000, gid=3_000_000),
]


def reassemble(tar_split: bytes, root: Path) -> bytes:
    """What containers/storage does with a tar-split and the layer's files."""
    out = bytearray()
    for line in gzip.decompress(tar_split).splitlines():
        entry = json.loads(line)
        if entry["type"] == 2:
            out += base64.b64decode(entry["payload"])
        elif entry.get("size"):
            name = entry["name"].encode() if "name" in entry else base64.b64decode(
                entry["name_raw"])
            out += (root / os.fsdecode(name)).read_bytes()
    return bytes(out)


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT],
                         ids=["pax", "gnu"])
def test_tar_split_rebuilds_the_stream_byte_for_byte(tmp_path, fmt):
    entries = [e for e in ENTRIES if fmt == tarfile.PAX_FORMAT or not e.xattrs]
    data = tar_bytes(entries, fmt=fmt) + b"\0" * 4096  # trailing padding is kept too
    split = io.BytesIO()
    with gzip.GzipFile(fileobj=split, mode="wb") as gz:
        unpack_layer(TarReader(io.BytesIO(data), chunk_size=1000), DirectorySink(tmp_path),
                     TarSplitWriter(gz))
    assert reassemble(split.getvalue(), tmp_path) == data


def test_members_and_metadata(tmp_path):
    data = tar_bytes(ENTRIES)
    names = {m.unsafe_name: m for m in TarReader(io.BytesIO(data))}
    assert names[b"dir/" + b"x" * 120].size == 9
    assert names[b"dir/link"].unsafe_linkname == b"../" + b"t" * 150
    assert names[b"dir/caf\xe9"].type == "file"
    assert names[b"dir/xattr"].xattrs == {"user.k": b"v", "trusted.lazypod": b"\x01"}
    assert names[b"big-uid"].uid == 3_000_000
    assert names[b"dir/"].mode == 0o750


def test_ustar_prefix_and_v7_directories():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("p" * 90 + "/" + "n" * 90)
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    names = [m.unsafe_name for m in TarReader(io.BytesIO(buf.getvalue()))]
    assert names == [("p" * 90 + "/" + "n" * 90).encode()]


def test_corrupt_and_truncated_archives_are_refused():
    data = bytearray(tar_bytes([Entry("f", data=b"x" * 2000)]))
    data[10] ^= 0xFF
    with pytest.raises(LayerError, match="bad checksum"):
        list(TarReader(io.BytesIO(bytes(data))))
    truncated = tar_bytes([Entry("f", data=b"x" * 2000)])[:1200]
    with pytest.raises(LayerError, match="truncated"):
        for member in TarReader(io.BytesIO(truncated)):
            for _ in member.chunks():
                pass


def test_sparse_files_are_refused():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("sparse")
        info.type = tarfile.GNUTYPE_SPARSE
        tar.addfile(info)
    with pytest.raises(LayerError, match="sparse"):
        list(TarReader(io.BytesIO(buf.getvalue())))


def test_oversized_extended_headers_are_refused():
    info = tarfile.TarInfo("f")
    info.pax_headers = {"comment": "x" * (2 << 20)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info)
    with pytest.raises(LayerError, match="extended header"):
        list(TarReader(io.BytesIO(buf.getvalue())))
