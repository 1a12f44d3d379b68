"""`VerifyingReader`: content is checked against its digest and size at end of stream,
so no consumer can forget to; a stream longer than its descriptor fails at once."""

from __future__ import annotations

import hashlib
import io

import pytest

from lazypod import Digest, IntegrityError, InvalidReference
from lazypod.digest import VerifyingReader

DATA = bytes(range(256)) * 40  # 10240 bytes
SHA256 = Digest("sha256", hashlib.sha256(DATA).hexdigest())


class Trickle:
    """A stream that gives at most `step` bytes per read, as a socket does."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data = io.BytesIO(data)
        self._step = step

    def read(self, n: int = -1) -> bytes:
        return self._data.read(self._step if n < 0 else min(n, self._step))


def read_all(reader: VerifyingReader, size: int = 1000) -> bytes:
    out = bytearray()
    while chunk := reader.read(size):
        out += chunk
    return bytes(out)


@pytest.mark.parametrize("size", [len(DATA), None])
def test_the_right_content_passes(size: int | None) -> None:
    reader = VerifyingReader(Trickle(DATA, 333), SHA256, size)
    assert read_all(reader) == DATA
    assert reader.bytes_read == len(DATA)
    assert reader.read(10) == b""  # asking again at the end is harmless


def test_sha512() -> None:
    digest = Digest.parse("sha512:" + hashlib.sha512(DATA).hexdigest())
    assert read_all(VerifyingReader(io.BytesIO(DATA), digest, len(DATA))) == DATA
    with pytest.raises(IntegrityError):
        read_all(VerifyingReader(io.BytesIO(DATA[:-1] + b"!"), digest, len(DATA)))


def test_other_content_fails_at_end_of_stream() -> None:
    corrupt = DATA[:5000] + b"X" + DATA[5001:]
    reader = VerifyingReader(io.BytesIO(corrupt), SHA256, len(DATA), what="layer")
    assert reader.read(len(DATA)) == corrupt  # nothing can be told before the end
    with pytest.raises(IntegrityError, match="does not match its digest") as caught:
        reader.read(1)
    message = str(caught.value)
    assert message.startswith("layer ") and str(SHA256) in message
    assert hashlib.sha256(corrupt).hexdigest() in message  # what arrived instead


def test_truncation_fails() -> None:
    reader = VerifyingReader(io.BytesIO(DATA[:-10]), SHA256, len(DATA))
    with pytest.raises(IntegrityError, match=f"truncated: {len(DATA) - 10} of {len(DATA)}"):
        read_all(reader)


def test_truncation_is_caught_without_a_size_too() -> None:
    with pytest.raises(IntegrityError, match="does not match"):
        read_all(VerifyingReader(io.BytesIO(DATA[:-10]), SHA256))


def test_a_stream_longer_than_its_size_fails_as_soon_as_it_is() -> None:
    reader = VerifyingReader(io.BytesIO(DATA + b"more"), SHA256, len(DATA))
    assert len(reader.read(len(DATA))) == len(DATA)
    with pytest.raises(IntegrityError, match="longer than"):
        reader.read(1)


def test_the_right_bytes_with_a_wrong_size_fail() -> None:
    with pytest.raises(IntegrityError):
        read_all(VerifyingReader(io.BytesIO(DATA), SHA256, len(DATA) + 1))
    with pytest.raises(IntegrityError):
        read_all(VerifyingReader(io.BytesIO(DATA), SHA256, len(DATA) - 1))


def test_read_all_at_once() -> None:
    reader = VerifyingReader(io.BytesIO(DATA), SHA256, len(DATA))
    assert reader.read(-1) == DATA
    assert reader.read(-1) == b""
    bad = VerifyingReader(io.BytesIO(DATA[1:]), SHA256, len(DATA))
    bad.read(-1)
    with pytest.raises(IntegrityError):
        bad.read(-1)


def test_drain_checks_what_the_consumer_left() -> None:
    # A tar reader stops at the end-of-archive blocks: the padding after them counts.
    reader = VerifyingReader(io.BytesIO(DATA), SHA256, len(DATA))
    reader.read(100)
    reader.drain()
    assert reader.bytes_read == len(DATA)
    corrupt = VerifyingReader(io.BytesIO(DATA[:-1] + b"\0"), SHA256, len(DATA))
    corrupt.read(100)
    with pytest.raises(IntegrityError):
        corrupt.drain()


def test_a_zero_read_does_not_end_the_stream() -> None:
    reader = VerifyingReader(io.BytesIO(DATA), SHA256, len(DATA))
    assert reader.read(0) == b""
    assert read_all(reader) == DATA


def test_an_empty_blob() -> None:
    empty = Digest("sha256", hashlib.sha256(b"").hexdigest())
    assert VerifyingReader(io.BytesIO(b""), empty, 0).read(10) == b""


@pytest.mark.parametrize("text, why", [
    ("sha256:" + "a" * 63, "64 hex digits"),
    ("sha256:" + "A" * 64, "invalid digest"),
    ("md5:" + "a" * 32, "unsupported digest algorithm"),
    ("a" * 64, "invalid digest"),
])
def test_malformed_digests(text: str, why: str) -> None:
    with pytest.raises(InvalidReference, match=why):
        Digest.parse(text)
