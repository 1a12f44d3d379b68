"""A strict, streaming reader of layer tarballs (ustar, GNU and PAX).

Why not `tarfile`: podman's `save`/`push` rebuild a layer byte for byte from its
tar-split, which needs every raw header byte and the exact position of every
payload; `tarfile` hides both. This reader hands out, for each member, the raw
bytes that preceded its payload (previous padding, extended headers, the header
block) and the payload as a stream, and at the end everything after the last
payload. Names stay bytes (layers hold non-UTF-8 names); they are `unsafe_*`
until `securepath` has judged them.

Semantics follow Go's archive/tar (what podman reads layers with): header-only
types (links, directories, devices, FIFOs) carry no payload whatever their
size field says; PAX records override header fields; GNU long names and links
are honoured; sparse and multi-volume members are refused.
"""

from __future__ import annotations

import base64
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field

from .digest import Readable
from .errors import LayerError

__all__ = ["MemberType", "TarMember", "TarReader"]

BLOCK = 512
MAX_EXTENDED_HEADER = 1 << 20


class MemberType:
    FILE = "file"
    HARDLINK = "hardlink"
    SYMLINK = "symlink"
    CHAR = "char"
    BLOCK = "block"
    DIR = "dir"
    FIFO = "fifo"


_TYPES = {
    b"0": MemberType.FILE,
    b"\0": MemberType.FILE,
    b"7": MemberType.FILE,
    b"1": MemberType.HARDLINK,
    b"2": MemberType.SYMLINK,
    b"3": MemberType.CHAR,
    b"4": MemberType.BLOCK,
    b"5": MemberType.DIR,
    b"6": MemberType.FIFO,
    b"D": MemberType.DIR,  # GNU dump dir: a directory whose payload lists names
}
_REFUSED = {
    b"S": "GNU sparse file",
    b"M": "GNU multi-volume continuation",
    b"N": "old GNU long name",
}


@dataclass
class TarMember:
    unsafe_name: bytes
    type: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    atime_ns: int | None = None
    unsafe_linkname: bytes = b""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    raw_header: bytes = b""  # every byte between the previous payload and this one
    _reader: TarReader | None = field(default=None, repr=False)

    def chunks(self) -> Iterator[memoryview]:
        """The payload, in chunks; must be consumed before the next member is read."""
        assert self._reader is not None
        return self._reader._payload(self.size)


class TarReader:
    """Iterate members of a tar stream; `trailer` holds the bytes after the last payload."""

    def __init__(self, stream: Readable, chunk_size: int = 1 << 20) -> None:
        self._stream = stream
        # Bytes read but not consumed are self._buf[self._pos:]; slicing a moving
        # offset (not the buffer) keeps many small members from costing quadratic copies.
        self._buf = b""
        self._pos = 0
        self._chunk = chunk_size
        self._pending_payload = 0  # unread payload bytes of the current member
        self._pending_pad = 0
        self._globals: dict[str, bytes] = {}
        self.trailer = b""

    # -- low level ----------------------------------------------------------

    def _fill(self, n: int) -> bool:
        if len(self._buf) - self._pos >= n:
            return True
        parts = [self._buf[self._pos :]]
        have = len(parts[0])
        while have < n:
            data = self._stream.read(max(self._chunk, n - have))
            if not data:
                break
            parts.append(data)
            have += len(data)
        self._buf = b"".join(parts)
        self._pos = 0
        return have >= n

    def _take(self, n: int, what: str) -> bytes:
        if not self._fill(n):
            raise LayerError(f"layer tarball is truncated inside {what}")
        data = self._buf[self._pos : self._pos + n]
        self._pos += n
        return data

    def _payload(self, size: int) -> Iterator[memoryview]:
        remaining = min(size, self._pending_payload)
        while remaining:
            if self._pos >= len(self._buf):
                self._buf = self._stream.read(self._chunk)
                self._pos = 0
                if not self._buf:
                    raise LayerError("layer tarball is truncated inside a file's content")
            take = min(remaining, len(self._buf) - self._pos)
            data = memoryview(self._buf)[self._pos : self._pos + take]
            self._pos += take
            remaining -= take
            self._pending_payload -= take
            yield data

    def _skip_pending(self) -> None:
        for _ in self._payload(self._pending_payload):
            pass

    # -- members ------------------------------------------------------------

    def __iter__(self) -> Iterator[TarMember]:
        while True:
            self._skip_pending()
            raw = bytearray(self._take(self._pending_pad, "padding") if self._pending_pad else b"")
            self._pending_pad = 0
            member = self._next_header(raw)
            if member is None:
                self.trailer = bytes(raw) + self._drain()
                return
            yield member

    def _drain(self) -> bytes:
        rest = [self._buf[self._pos :]]
        self._buf, self._pos = b"", 0
        while True:
            data = self._stream.read(self._chunk)
            if not data:
                return b"".join(rest)
            rest.append(data)

    def _next_header(self, raw: bytearray) -> TarMember | None:
        pax: dict[str, bytes] = {}
        long_name: bytes | None = None
        long_link: bytes | None = None
        while True:
            if not self._fill(BLOCK):
                if self._pos >= len(self._buf) and not raw.strip(b"\0") and not pax:
                    return None  # a stream ending without end-of-archive blocks
                raise LayerError("layer tarball is truncated inside a header")
            block = self._take(BLOCK, "a header")
            raw += block
            if block == bytes(BLOCK):
                return None
            _verify_checksum(block)
            typeflag = block[156:157]
            size = _number(block[124:136], "size")
            if typeflag in (b"x", b"g", b"L", b"K"):
                if size > MAX_EXTENDED_HEADER:  # as Go's archive/tar: no memory bombs
                    raise LayerError(f"layer tarball has an extended header of {size} bytes "
                                     f"(at most {MAX_EXTENDED_HEADER} are allowed)")
                data = self._take(size, "an extended header")
                raw += data
                pad = -size % BLOCK
                raw += self._take(pad, "padding")
                if typeflag == b"x":
                    pax.update(_parse_pax(data))
                elif typeflag == b"g":
                    self._globals.update(_parse_pax(data))
                elif typeflag == b"L":
                    long_name = data.rstrip(b"\0")
                else:
                    long_link = data.rstrip(b"\0")
                continue
            if typeflag in _REFUSED:
                raise LayerError(f"layer holds a {_REFUSED[typeflag]}, which lazypod cannot unpack")
            if typeflag == b"V":  # volume label: nothing to extract
                self._pending_payload, self._pending_pad = size, -size % BLOCK
                self._skip_pending()
                raw += self._take(self._pending_pad, "padding")
                self._pending_pad = 0
                continue
            return self._member(block, typeflag, size, {**self._globals, **pax},
                                long_name, long_link, bytes(raw))

    def _member(
        self,
        block: bytes,
        typeflag: bytes,
        size: int,
        pax: dict[str, bytes],
        long_name: bytes | None,
        long_link: bytes | None,
        raw: bytes,
    ) -> TarMember:
        name = _cstr(block[0:100])
        magic = block[257:265]
        if magic[:6] == b"ustar\0":
            prefix = _cstr(block[345:500])
            if prefix:
                name = prefix + b"/" + name
        if long_name is not None:
            name = long_name
        if "path" in pax:
            name = pax["path"]
        link = long_link if long_link is not None else _cstr(block[157:257])
        if "linkpath" in pax:
            link = pax["linkpath"]
        kind = _TYPES.get(typeflag)
        if kind is None:
            kind = MemberType.FILE  # unknown types are regular files, as POSIX says
        if typeflag == b"\0" and name.endswith(b"/"):
            kind = MemberType.DIR  # old V7 archives mark directories by a trailing slash
        if "size" in pax:
            size = _pax_int(pax["size"], "size")
        payload = size if kind == MemberType.FILE or typeflag == b"D" else 0
        if "mtime" in pax:
            mtime_ns = _pax_time(pax["mtime"])
        else:
            mtime_ns = _number(block[136:148], "mtime") * 10**9
        atime_ns = _pax_time(pax["atime"]) if "atime" in pax else None
        member = TarMember(
            unsafe_name=name,
            type=kind,
            mode=_number(block[100:108], "mode") & 0o7777,
            uid=_pax_int(pax["uid"], "uid") if "uid" in pax else _number(block[108:116], "uid"),
            gid=_pax_int(pax["gid"], "gid") if "gid" in pax else _number(block[116:124], "gid"),
            size=payload,
            mtime_ns=mtime_ns,
            atime_ns=atime_ns,
            unsafe_linkname=link,
            devmajor=_number(block[329:337], "devmajor") if kind in ("char", "block") else 0,
            devminor=_number(block[337:345], "devminor") if kind in ("char", "block") else 0,
            xattrs=_xattrs(pax),
            raw_header=raw,
            _reader=self,
        )
        self._pending_payload = payload
        self._pending_pad = -payload % BLOCK
        return member


def _cstr(field_bytes: bytes) -> bytes:
    end = field_bytes.find(b"\0")
    return field_bytes if end < 0 else field_bytes[:end]


def _number(field_bytes: bytes, what: str) -> int:
    if field_bytes and field_bytes[0] & 0x80:  # GNU base-256
        value = int.from_bytes(field_bytes[1:], "big")
        if field_bytes[0] == 0xFF:
            value -= 1 << (8 * (len(field_bytes) - 1))
        else:
            value += (field_bytes[0] & 0x3F) << (8 * (len(field_bytes) - 1))
        return value
    text = field_bytes.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise LayerError(f"layer tarball has an invalid {what} field {text!r}") from None


def _verify_checksum(block: bytes) -> None:
    stored = _number(block[148:156], "checksum")
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    if stored == unsigned:
        return
    high = sum(1 for b in block[:148] if b > 127) + sum(1 for b in block[156:] if b > 127)
    signed = unsigned - 256 * high
    if stored != signed:
        raise LayerError("layer tarball has a header with a bad checksum (corrupt archive)")


def _parse_pax(data: bytes) -> dict[str, bytes]:
    records: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            if not data[pos:].strip(b"\0"):
                break
            raise LayerError("layer tarball has a malformed PAX header")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise LayerError("layer tarball has a malformed PAX record length") from None
        record = data[space + 1 : pos + length]
        if length <= 0 or not record.endswith(b"\n") or b"=" not in record:
            raise LayerError("layer tarball has a malformed PAX record")
        key, _, value = record[:-1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value
        pos += length
    if any(k.startswith("GNU.sparse") for k in records):
        raise LayerError("layer holds a PAX sparse file, which lazypod cannot unpack")
    return records


def _pax_int(value: bytes, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise LayerError(f"layer tarball has an invalid PAX {what} {value!r}") from None


def _pax_time(value: bytes) -> int:
    text = value.decode("ascii", "replace")
    negative = text.startswith("-")
    whole, _, frac = text.lstrip("-").partition(".")
    try:
        ns = int(whole or "0") * 10**9 + int((frac + "000000000")[:9] or "0")
    except ValueError:
        raise LayerError(f"layer tarball has an invalid PAX time {text!r}") from None
    return -ns if negative else ns


def _xattrs(pax: dict[str, bytes]) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for key, value in pax.items():
        if key.startswith("SCHILY.xattr."):
            found[key[len("SCHILY.xattr.") :]] = value
        elif key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote(key[len("LIBARCHIVE.xattr.") :])
            try:
                found[name] = base64.b64decode(value + b"=" * (-len(value) % 4))
            except ValueError:
                raise LayerError(f"layer tarball has an invalid xattr value for {name}") from None
    return found
