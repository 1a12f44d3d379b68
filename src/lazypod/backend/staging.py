"""A layer being unpacked into a local directory, whichever backend publishes it."""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
from pathlib import Path
from typing import IO, Any, cast

from isal import igzip

from ..digest import Digest
from ..errors import BackendError
from ..fseval import FsEval
from ..fsutil import remove_tree, write_new
from ..layout import LAYERFS, METADATA
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
    whiteouts.json, and the record waiting as layers.json.pending). `fs`: what
    depends on privilege (the process's by default)."""

    def __init__(self, digest: Digest, path: Path, *, fs: FsEval | None = None) -> None:
        self.digest = digest
        self.path = path
        for directory in (path, path / LAYERFS, path / METADATA):
            directory.mkdir(mode=0o755, parents=directory == path)
            os.chmod(directory, 0o755)
        self.sink = DirectorySink(path / LAYERFS, fs=fs,
                                  warn=lambda m: log.warning("%s", m))
        self._tar_split_file = open(  # noqa: SIM115 (closed by seal or abort)
            os.open(path / METADATA / TAR_SPLIT,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644), "wb")
        # No name and no time in the gzip header: the bytes depend on the content only.
        writer: Any = igzip.GzipFile(  # type: ignore[no-untyped-call]
            filename="", mode="wb", fileobj=self._tar_split_file, compresslevel=1, mtime=0)
        self.tar_split = cast(IO[bytes], writer)

    def seal(self, record: LayerRecord, whiteouts: LayerWhiteouts) -> None:
        """The layer is unpacked and verified: close the tar-split, write the records."""
        meta = self.path / METADATA
        try:
            self.tar_split.close()
            self._tar_split_file.close()
            self._let_go()
            write_new(meta / WHITEOUTS, whiteouts.to_json())
            write_new(meta / PENDING_RECORD, layer_record_json(record))
            os.chmod(meta / TAR_SPLIT, 0o644)
        except OSError as exc:  # the caller names the image and the layer
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise BackendError("no space left on device while writing the layer's "
                                   "records: free space and rerun") from None
            raise BackendError(f"cannot write the layer's records in {meta}: "
                               f"{exc.strerror or exc}") from None

    def _let_go(self) -> None:
        """Drop the closed compressor: its state (about 80 KiB) would otherwise live as
        long as the run holds the layer, and a run of 10,000 images holds them all."""
        closed = io.BytesIO()
        closed.close()
        self.tar_split = closed

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.tar_split.close()
        with contextlib.suppress(Exception):
            self._tar_split_file.close()
        self._let_go()
        with contextlib.suppress(Exception):
            self.sink.abandon()
        remove_tree(self.path, quiet=True)
