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
from ..repository import TAR_SPLIT
from ..unpack import DirectorySink

__all__ = ["LocalLayer"]

log = logging.getLogger(__name__)


class LocalLayer:
    """`<path>/layerfs/` (the unpacked layer) and `<path>/.metadata/` (its tar-split)."""

    def __init__(self, digest: Digest, path: Path) -> None:
        self.digest = digest
        self.path = path
        for directory in (path, path / "layerfs", path / ".metadata"):
            directory.mkdir(mode=0o755, parents=directory == path)
            os.chmod(directory, 0o755)
        self.sink = DirectorySink(path / "layerfs", warn=lambda m: log.warning("%s", m))
        self._tar_split_file = (path / ".metadata" / TAR_SPLIT).open("wb")
        # No name and no time in the gzip header: the bytes depend on the content only.
        writer: Any = igzip.GzipFile(  # type: ignore[no-untyped-call]
            filename="", mode="wb", fileobj=self._tar_split_file, compresslevel=1, mtime=0)
        self.tar_split = cast(IO[bytes], writer)

    def finish_writing(self) -> None:
        self.tar_split.close()
        self._tar_split_file.close()
        os.chmod(self.path / ".metadata" / TAR_SPLIT, 0o644)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.tar_split.close()
        with contextlib.suppress(Exception):
            self._tar_split_file.close()
        with contextlib.suppress(Exception):
            self.sink.abandon()
        shutil.rmtree(self.path, ignore_errors=True)
