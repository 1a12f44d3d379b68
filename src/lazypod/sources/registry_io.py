"""How the registry client reads a registry's answers: bodies whole (with a limit) or
streamed, pagination links, the retry budget of one request, and which errors httpx
raises on its own (translated where httpx is called, nowhere else)."""

from __future__ import annotations

import logging
import re
import time

import httpx

from ..errors import RegistryError, RegistryUnreachable, UnsupportedImage

__all__ = ["HTTPX_ERRORS", "BytesReader", "Dropped", "ResponseReader", "RetryBudget",
           "next_link", "read_limited"]

log = logging.getLogger("lazypod.registry")

# Everything httpx raises on its own: its HTTPError tree, and the errors outside it
# that a registry's answer can provoke (a malformed realm or Link URL, a body read
# twice).
HTTPX_ERRORS = (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError)


class RetryBudget:
    """The retry budget of one request: transient failures (connection errors, drops
    mid-body, 429, 5xx) are retried with exponential backoff, honouring Retry-After,
    until `retry_for` seconds have passed since the first failure."""

    def __init__(self, retry_for: float, backoff: float, what: str) -> None:
        self._retry_for = retry_for
        self._backoff = backoff
        self._what = what
        self._first: float | None = None
        self._attempt = 0

    def wait(self, error: RegistryError, retry_after: str | None = None, *,
             budget: float | None = None) -> None:
        """Sleep before the next attempt, or raise `error` once the budget is spent
        (`budget`: a shorter one for this kind of failure)."""
        now = time.monotonic()
        if self._first is None:
            self._first = now
        self._attempt += 1
        delay = min(self._backoff * 2 ** (self._attempt - 1), 16.0)
        if retry_after and retry_after.strip().isdigit():
            delay = max(delay, min(float(retry_after), 60.0))
        allowed = self._retry_for if budget is None else min(budget, self._retry_for)
        if now + delay > self._first + allowed:
            if self._attempt > 1:
                raise type(error)(f"{error} (tried for {now - self._first:.0f} s)")
            raise error
        log.warning("%s; retrying in %.1fs", error, delay)
        time.sleep(delay)


class Dropped(RegistryUnreachable):
    """The connection broke off in the middle of a response body."""


def read_limited(resp: httpx.Response, limit: int, what: str) -> bytes:
    data = bytearray()
    try:
        for chunk in resp.iter_raw():
            data += chunk
            if len(data) > limit:
                raise UnsupportedImage(f"{what} is larger than {limit} bytes")
    except HTTPX_ERRORS as exc:
        raise Dropped(f"{what}: connection dropped ({exc})") from None
    expected = resp.headers.get("Content-Length")
    if expected and expected.isdigit() and int(expected) != len(data):
        raise Dropped(f"{what}: connection dropped ({len(data)} of {expected} bytes)")
    return bytes(data)


class BytesReader:
    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)

    def read(self, n: int = -1) -> bytes:
        chunk = self._data if n < 0 else self._data[:n]
        self._data = self._data[len(chunk):]
        return bytes(chunk)


def next_link(link: str | None) -> str | None:
    if not link:
        return None
    match = re.search(r"<([^>]+)>\s*;\s*rel=\"?next\"?", link)
    if not match:
        return None
    target = match.group(1)
    if "://" in target:
        target = "/" + target.split("://", 1)[1].split("/", 1)[1]
    return target


class ResponseReader:
    """A file-like view of a streamed response body that translates transport errors."""

    def __init__(self, resp: httpx.Response, what: str) -> None:
        self._chunks = resp.iter_raw(1 << 20)
        self._buffer = b""
        self._what = what

    def read(self, n: int = -1) -> bytes:
        try:
            if n < 0:
                rest = self._buffer + b"".join(self._chunks)
                self._buffer = b""
                return rest
            while len(self._buffer) < n:
                chunk = next(self._chunks, None)
                if chunk is None:
                    break
                if not self._buffer and len(chunk) >= n:
                    self._buffer = chunk
                    break
                self._buffer += chunk
        except HTTPX_ERRORS as exc:
            raise Dropped(f"{self._what}: connection dropped ({exc})") from None
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data
