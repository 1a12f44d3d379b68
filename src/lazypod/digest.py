"""Content digests (`sha256:<hex>`) and readers that verify them."""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from typing import Any, Protocol

from .errors import IntegrityError, InvalidReference

__all__ = ["Digest", "Readable", "VerifyingReader"]


class Readable(Protocol):
    """Anything with `read(n)`: the streams of the conversion pipeline."""

    def read(self, n: int = -1, /) -> bytes: ...

_HEX = {"sha256": 64, "sha512": 128}
_DIGEST_RE = re.compile(r"^([a-z0-9]+(?:[.+_-][a-z0-9]+)*):([a-f0-9]+)$")


@dataclass(frozen=True, order=True, slots=True)
class Digest:
    """A content digest as OCI writes it: `algorithm:hex`."""

    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        """The digest `text` names; the same object for the same text (a repository
        names each layer digest in every image that uses it: 10,000 images hold a
        few thousand distinct ones)."""
        if cls is Digest:
            return _parse(text)
        return cls._parse_new(text)

    @classmethod
    def _parse_new(cls, text: str) -> Digest:
        match = _DIGEST_RE.match(text)
        if not match:
            raise InvalidReference(f"invalid digest {text!r}: expected sha256:<64 hex digits>")
        algorithm, hexpart = match.groups()
        if algorithm not in _HEX:
            raise InvalidReference(f"unsupported digest algorithm {algorithm!r} in {text!r}")
        if len(hexpart) != _HEX[algorithm]:
            raise InvalidReference(
                f"invalid digest {text!r}: {algorithm} needs {_HEX[algorithm]} hex digits"
            )
        return cls(algorithm, hexpart)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> Any:
        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    @property
    def short(self) -> str:
        return self.hex[:12]


@functools.lru_cache(maxsize=1 << 16)
def _parse(text: str) -> Digest:
    return Digest._parse_new(text)


class VerifyingReader:
    """A file-like reader that fails at end of stream unless the content has
    the expected digest (and size, when known): no caller can forget to check."""

    def __init__(
        self, raw: Readable, expected: Digest, size: int | None = None, what: str = "blob"
    ) -> None:
        self._raw = raw
        self._expected = expected
        self._size = size
        self._what = what
        self._hash = expected.hasher()
        self.bytes_read = 0
        self._checked = False

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        if data:
            self._hash.update(data)
            self.bytes_read += len(data)
            if self._size is not None and self.bytes_read > self._size:
                raise IntegrityError(
                    f"{self._what} {self._expected} is longer than the {self._size} bytes "
                    "its descriptor says: the registry served corrupt content"
                )
        elif n != 0:
            self._verify()
        return data

    def _verify(self) -> None:
        if self._checked:
            return
        self._checked = True
        if self._size is not None and self.bytes_read != self._size:
            raise IntegrityError(
                f"{self._what} {self._expected} is truncated: {self.bytes_read} of "
                f"{self._size} bytes arrived"
            )
        actual = self._hash.hexdigest()
        if actual != self._expected.hex:
            raise IntegrityError(
                f"{self._what} {self._expected} does not match its digest "
                f"(got {self._expected.algorithm}:{actual}): the registry served corrupt content"
            )

    def drain(self) -> None:
        """Read to the end, so the digest is checked even if the consumer stopped early."""
        while self.read(1 << 20):
            pass
