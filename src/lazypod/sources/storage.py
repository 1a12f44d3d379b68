"""`containers-storage:NAME`: an image in podman's own storage, read through podman.

podman's storage is podman's business (its locks, drivers and layer formats), so
lazypod does not read it: `podman image save --format oci-archive` writes the image
into a private temporary directory, and the archive is read as an `oci-archive:`
source. That costs the image's uncompressed size in the temporary directory, for
the length of the run. The image is looked up by its fully qualified name (an
unqualified NAME means `localhost/NAME`, podman's name for local images), so what
is published is exactly the image the name shows in `podman images`.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from ..digest import Digest, VerifyingReader
from ..errors import SourceError
from ..manifest import Descriptor, ImageConfig, ImageManifest, ManifestIndex, Platform
from ..reference import ImageReference
from .oci import OciLayout

__all__ = ["PodmanStorageSource"]


class PodmanStorageSource:
    """The `ImageSource` of `containers-storage:` references."""

    def __init__(self, podman: Sequence[str] = ("podman",), work_dir: Path | None = None,
                 timeout: float = 3600.0) -> None:
        self._podman = list(podman)
        self._work_dir = work_dir
        self._timeout = timeout
        self._saved: dict[str, OciLayout] = {}
        self._dirs: list[Path] = []
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            for layout in self._saved.values():
                layout.close()
            self._saved.clear()
            for directory in self._dirs:
                shutil.rmtree(directory, ignore_errors=True)
            self._dirs.clear()

    def _layout(self, ref: ImageReference) -> OciLayout:
        assert ref.source is not None and ref.source.transport == "containers-storage"
        name = ref.source.path
        with self._lock:
            layout = self._saved.get(name)
            if layout is None:
                layout = self._saved[name] = self._save(name, str(ref))
            return layout

    def _save(self, name: str, label: str) -> OciLayout:
        directory = Path(tempfile.mkdtemp(prefix="lazypod-storage-", dir=self._work_dir))
        self._dirs.append(directory)
        archive = directory / "image.tar"
        command = [*self._podman, "image", "save", "--format", "oci-archive", "-o",
                   str(archive), name]
        try:
            proc = subprocess.run(command, capture_output=True, text=True,
                                  timeout=self._timeout, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise SourceError(f"{label}: podman is not installed (it reads its own "
                              "storage for lazypod)") from None
        except subprocess.TimeoutExpired:
            raise SourceError(f"{label}: `podman image save` did not finish in "
                              f"{self._timeout:.0f} s") from None
        if proc.returncode != 0:
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            why = lines[-1].removeprefix("Error: ") if lines else f"exit {proc.returncode}"
            raise SourceError(f"{label}: podman could not save it: {why}")
        return OciLayout.archive(archive, label)

    def expand(self, ref: ImageReference) -> list[ImageReference]:
        return [ref]

    def list_tags(self, ref: ImageReference) -> list[str]:
        return []

    def head_digest(self, ref: ImageReference) -> Digest | None:
        return None

    def resolve_manifest(self, ref: ImageReference, platform: Platform | None = None
                         ) -> tuple[ManifestIndex | None, ImageManifest]:
        return self._layout(ref).resolve(None, platform, "podman saved several images")

    def get_config(self, ref: ImageReference, manifest: ImageManifest) -> ImageConfig:
        return self._layout(ref).config(manifest)

    def open_blob(self, ref: ImageReference, desc: Descriptor,
                  what: str = "blob") -> contextlib.AbstractContextManager[VerifyingReader]:
        return self._layout(ref).open_blob(desc, what)
