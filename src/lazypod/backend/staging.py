"""A layer being unpacked into a local directory, whichever backend publishes it."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import IO, Any, cast

from isal import igzip

from ..digest import Digest
from ..fsutil import UMASK, write_new
from ..repository import (
    LAYER_RECORD,
    TAR_SPLIT,
    WHITEOUTS,
    LayerRecord,
    LayerWhiteouts,
    layer_record_json,
)
from ..unpack import DirectorySink

__all__ = ["PENDING_RECORD", "LocalLayer"]

log = logging.getLogger(__name__)

# The layer record waits under this name until the layer's files are on disk.
PENDING_RECORD = LAYER_RECORD + ".pending"


class LocalLayer:
    """`<path>/layerfs/` (the unpacked layer) and `<path>/.metadata/` (tar-split,
    whiteouts.json, and the record waiting as layers.json.pending)."""

    def __init__(self, digest: Digest, path: Path) -> None:
        self.digest = digest
        self.path = path
        for directory in (path, path / "layerfs", path / ".metadata"):
            directory.mkdir(mode=0o755, parents=directory == path)
            if UMASK & 0o755:
                os.chmod(directory, 0o755)
        self.sink = DirectorySink(path / "layerfs", warn=lambda m: log.warning("%s", m))
        self._tar_split_file = open(  # noqa: SIM115 (closed by seal or abort)
            os.open(path / ".metadata" / TAR_SPLIT,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644), "wb")
        # No name and no time in the gzip header: the bytes depend on the content only.
        writer: Any = igzip.GzipFile(  # type: ignore[no-untyped-call]
            filename="", mode="wb", fileobj=self._tar_split_file, compresslevel=1, mtime=0)
        self.tar_split = cast(IO[bytes], writer)

    def seal(self, record: LayerRecord, whiteouts: LayerWhiteouts) -> None:
        """The layer is unpacked and verified: close the tar-split, write the records."""
        self.tar_split.close()
        self._tar_split_file.close()
        meta = self.path / ".metadata"
        write_new(meta / WHITEOUTS, whiteouts.to_json())
        write_new(meta / PENDING_RECORD, layer_record_json(record))
        if UMASK & 0o644:
            os.chmod(meta / TAR_SPLIT, 0o644)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.tar_split.close()
        with contextlib.suppress(Exception):
            self._tar_split_file.close()
        with contextlib.suppress(Exception):
            self.sink.abandon()
        shutil.rmtree(self.path, ignore_errors=True)
