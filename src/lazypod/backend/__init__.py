"""Storage backends: where a run writes, and how readers see it whole.

A backend opens a `PublishRun` (under the repository's lock). Its contract, in call
order, as containers/image writes its ImageDestination's:

1. `stage_layer(digest)` gives a `StagedLayer` to unpack into, in a local staging
   directory nobody else reads; `seal(record, whiteouts)` ends the unpacking (any
   thread). `commit()` makes it *pending* (the converter's thread): `has_layer` says
   yes, `layer_dir` reads it, readers of the repository do not see it yet.
   `abort()` drops it.
2. Writes (`write_file`, `symlink`, `remove`, `make_dir`, `touch_lock`,
   `replace_dir`) and layer content (`add_whiteouts`, `unmark_opaque`, `add_trees`)
   issued before `settle()` wait for it: readers never see metadata that names a
   layer before the layer is complete.
3. `settle()` publishes the pending layers with their records last (a layer is
   complete when its `layers.json` exists, and its files are on disk before that
   file is), then the waiting content and writes, in the order they were issued.
   After it, writes take effect as they are issued (each one whole). It may be
   called again after more layers were staged (a checkpoint).
4. `commit()` settles what is left and publishes it (`cvmfs`: the publish; `dir`:
   nothing more, the layers' records were synced, and what came after them is
   written again by the next run if a crash loses it). Leaving the run's context
   without it (an exception, a signal) drops what is not settled: staged layers,
   waiting writes, and on CVMFS the open transaction. What a failure leaves is
   always a state readers accept: the last published one, or one with complete
   layers that no image names yet.

The `dir` backend makes every single write atomic (a temporary sibling, then a
rename) and syncs the file system once per settle (before the layer records); the
`cvmfs` backend makes one run two publishes: one `cvmfs_server ingest` (layer
content, whiteouts, flat trees) and one transaction (xattrs, records, metadata,
podman stores, links).
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from ..digest import Digest
from ..layout import Layout
from ..repository import LayerRecord, LayerWhiteouts

if TYPE_CHECKING:  # unpacking is loaded by the backends that unpack, when they do
    from ..unpack import LayerSink

__all__ = ["Backend", "PublishRun", "StagedLayer", "TreeBatch", "TreeSource", "TreeWriter"]


class TreeWriter(Protocol):
    """Writes under the repository root so that readers see each change whole."""

    layout: Layout  # where writes go
    public_root: str  # the absolute path at which clients see the repository

    def layer_dir(self, digest: Digest) -> Path:
        """Where to read a layer (`layerfs/`, `.metadata/`): pending, or published."""
        ...

    def write_file(self, rel: str, data: bytes, mode: int = 0o644) -> None: ...
    def symlink(self, rel: str, target: str) -> None: ...
    def replace_dir(self, rel: str, fill: Callable[[Path], None]) -> None: ...
    def remove(self, rel: str) -> None: ...
    def make_dir(self, rel: str) -> None: ...
    def touch_lock(self, rel: str, token: bytes) -> None: ...
    def lock_files(self, rels: list[str]) -> AbstractContextManager[None]: ...
    def add_trees(self, batch: TreeBatch) -> None: ...
    def add_whiteouts(self, layer: Digest, paths: list[bytes]) -> None: ...
    def unmark_opaque(self, layer: Digest, path: bytes) -> None: ...
    def settle(self) -> None: ...


class TreeSource(Protocol):
    """A whole directory tree to add (a flat image), as files or as a tar stream."""

    def materialize(self, dest: Path) -> None: ...
    def tar_members(self, prefix: str, defer: Callable[[str, str, Any], bool] | None = None,
                    ) -> Iterator[tuple[tarfile.TarInfo, bytes | None]]: ...


class TreeBatch(Protocol):
    """New whole trees, built one at a time while they are iterated."""

    def __len__(self) -> int: ...
    def rels(self) -> list[str]: ...
    def prefetch(self) -> None: ...
    def __iter__(self) -> Iterator[tuple[str, TreeSource]]: ...


class StagedLayer(Protocol):
    """A layer being unpacked; invisible to readers until the run settles."""

    @property
    def sink(self) -> LayerSink: ...
    @property
    def tar_split(self) -> IO[bytes]: ...

    def seal(self, record: LayerRecord, whiteouts: LayerWhiteouts) -> None: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


class PublishRun(TreeWriter, Protocol):
    checkpoints: bool  # whether settling during a run is cheap (a checkpoint)

    def has_layer(self, digest: Digest) -> bool: ...
    def stage_layer(self, digest: Digest) -> StagedLayer: ...
    def write_back(self) -> None:
        """The layers are all staged: start what makes them durable, in the
        background, while views are rendered (`settle()` still finishes it)."""
    def commit(self) -> None: ...
    @property
    def publishes(self) -> int: ...


class Backend(Protocol):
    name: str
    layout: Layout

    def run(self) -> AbstractContextManager[PublishRun]: ...
