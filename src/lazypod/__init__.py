"""lazypod: run container images with podman straight from CernVM-FS, or from any
shared file system holding their layers unpacked, with no pull.

The command line (`lazypod --help`) is a thin layer over this API.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .backend.directory import DirectoryBackend  # noqa: E402
from .convert import ConvertOptions, Converter, ImageResult, RunReport, expand_wildcards  # noqa: E402
from .digest import Digest  # noqa: E402
from .errors import (  # noqa: E402
    AuthenticationFailed,
    BackendError,
    ImageNotFound,
    IntegrityError,
    InvalidRecipe,
    InvalidReference,
    LayerError,
    LazypodError,
    RegistryError,
    RegistryUnreachable,
    RepositoryBusy,
    RepositoryError,
    UnsafeLayer,
    UnsupportedImage,
)
from .layout import Layout  # noqa: E402
from .manifest import Platform  # noqa: E402
from .podman_config import PodmanConfig  # noqa: E402
from .reference import ImageReference, parse_reference  # noqa: E402
from .registry import RegistryClient  # noqa: E402
from .repository import RepositoryState  # noqa: E402
from .views import ViewOptions  # noqa: E402

__all__ = [
    "AuthenticationFailed",
    "BackendError",
    "ConvertOptions",
    "Converter",
    "Digest",
    "DirectoryBackend",
    "ImageNotFound",
    "ImageReference",
    "ImageResult",
    "IntegrityError",
    "InvalidRecipe",
    "InvalidReference",
    "LayerError",
    "Layout",
    "LazypodError",
    "Platform",
    "PodmanConfig",
    "RegistryClient",
    "RegistryError",
    "RegistryUnreachable",
    "RepositoryBusy",
    "RepositoryError",
    "RepositoryState",
    "RunReport",
    "UnsafeLayer",
    "UnsupportedImage",
    "ViewOptions",
    "__version__",
    "expand_wildcards",
    "parse_reference",
]
