"""Streaming decompression of layer blobs, and a reader that measures the result.

gzip goes through ISA-L (`isal`, several times faster than zlib on x86), zstd
through `zstandard`; both read multi-member/multi-frame streams. Decoder errors
become IntegrityError: a blob that verified against its digest but does not
decompress is corrupt at the source.
"""

from __future__ import annotations

import hashlib
import io
import zlib
from typing import Any

import zstandard
from isal import igzip

from .digest import Digest, Readable
from .errors import IntegrityError, UnsupportedImage
from .manifest import Compression

__all__ = ["MeasuringReader", "open_decompressed"]


class _Translating:
    """Turns decoder exceptions into IntegrityError naming the blob."""

    def __init__(self, inner: Any, what: str) -> None:
        self._inner = inner
        self._what = what

    def read(self, n: int = -1) -> bytes:
        try:
            data: bytes = self._inner.read(n)
        except (OSError, EOFError, zlib.error, zstandard.ZstdError) as exc:
            if isinstance(exc, OSError) and exc.errno is not None:
                raise  # a real I/O error (disk, network), not a decoding one
            raise IntegrityError(f"{self._what} does not decompress ({exc}): corrupt or "
                                 "truncated blob") from None
        return data


class _RawAdapter(io.RawIOBase):
    """Gives any `read(n)` object the `readinto` that decoders want."""

    def __init__(self, inner: Readable) -> None:
        self._inner = inner

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._inner.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def open_decompressed(raw: Readable, compression: str, what: str) -> Readable:
    """A reader of the uncompressed layer tar from a reader of the blob."""
    if compression == Compression.GZIP:
        gz = _igzip_reader(_RawAdapter(raw))
        return _Translating(gz, what)
    if compression == Compression.ZSTD:
        reader = zstandard.ZstdDecompressor().stream_reader(
            raw, read_size=1 << 20, read_across_frames=True  # type: ignore[arg-type]
        )
        return _Translating(reader, what)
    if compression == Compression.NONE:
        return raw
    raise UnsupportedImage(f"{what}: unsupported compression {compression!r}")


def _igzip_reader(raw: io.RawIOBase) -> Any:
    return igzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[no-untyped-call]


class MeasuringReader:
    """Passes bytes through, counting them and hashing them (the layer's diff ID)."""

    def __init__(self, inner: Readable) -> None:
        self._inner = inner
        self._hash = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._inner.read(n)
        if data:
            self._hash.update(data)
            self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    @property
    def digest(self) -> Digest:
        return Digest("sha256", self._hash.hexdigest())

