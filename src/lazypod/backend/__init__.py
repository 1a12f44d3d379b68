"""Storage backends: where a conversion run writes, and how readers see it whole.

A backend opens a `PublishRun`. The converter stages layers through it, writes
image metadata, calls `flush()` (after which the repository under
`layout.root` holds everything written so far), renders the views through the
same run, and calls `commit()`. The `dir` backend makes every single write
atomic (temporary sibling, then rename); the `cvmfs` backend batches them into
a bounded number of CVMFS publishes.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import IO, Protocol

from ..digest import Digest
from ..layout import Layout
from ..repository import LayerRecord, LayerWhiteouts
from ..unpack import LayerSink

__all__ = ["Backend", "PublishRun", "StagedLayer", "TreeBatch", "TreeSource", "TreeWriter"]


class TreeWriter(Protocol):
    """Writes under the repository root so that readers see each change whole."""

    layout: Layout  # where writes go
    read_layout: Layout  # where published content (layer files) is read from
    public_root: str  # the absolute path at which clients see the repository

    def write_file(self, rel: str, data: bytes, mode: int = 0o644) -> None: ...
    def symlink(self, rel: str, target: str) -> None: ...
    def replace_dir(self, rel: str, fill: Callable[[Path], None]) -> None: ...
    def remove(self, rel: str) -> None: ...
    def make_dir(self, rel: str) -> None: ...
    def touch_lock(self, rel: str, token: bytes) -> None: ...
    def lock_files(self, rels: list[str]) -> AbstractContextManager[None]: ...
    def add_trees(self, batch: TreeBatch) -> None: ...


class TreeSource(Protocol):
    """A whole directory tree to add (a flat image), as files or as a tar stream."""

    def materialize(self, dest: Path) -> None: ...
    def tar_members(self, prefix: str) -> Iterator[tuple[tarfile.TarInfo, bytes | None]]: ...


class TreeBatch(Protocol):
    """New whole trees, built one at a time while they are iterated."""

    def __len__(self) -> int: ...
    def rels(self) -> list[str]: ...
    def prefetch(self) -> None: ...
    def __iter__(self) -> Iterator[tuple[str, TreeSource]]: ...


class StagedLayer(Protocol):
    """A layer being unpacked; invisible to readers until committed."""

    @property
    def sink(self) -> LayerSink: ...
    @property
    def tar_split(self) -> IO[bytes]: ...

    def commit(self, record: LayerRecord, whiteouts: LayerWhiteouts) -> None: ...
    def abort(self) -> None: ...


class PublishRun(TreeWriter, Protocol):
    def has_layer(self, digest: Digest) -> bool: ...
    def stage_layer(self, digest: Digest) -> StagedLayer: ...
    def flush(self) -> None: ...
    def commit(self) -> None: ...
    @property
    def publishes(self) -> int: ...


class Backend(Protocol):
    name: str
    layout: Layout

    def run(self) -> AbstractContextManager[PublishRun]: ...
