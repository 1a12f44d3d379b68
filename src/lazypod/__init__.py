"""lazypod: run container images with podman straight from CernVM-FS, or from any
shared file system holding their layers unpacked, with no pull.

The command line (`lazypod --help`) is a thin layer over this API.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .backend.directory import DirectoryBackend
from .convert import Converter, ConvertOptions, ImageResult, RunReport, expand_wildcards
from .digest import Digest
from .errors import (
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
from .layout import Layout
from .manifest import Platform
from .podman_config import PodmanConfig
from .reference import ImageReference, parse_reference
from .registry import RegistryClient
from .repository import RepositoryState
from .views import ViewOptions

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
