"""lazypod: run container images with podman straight from CernVM-FS, or from any
shared file system holding their layers unpacked, with no pull.

The command line (`lazypod --help`) is a thin layer over this API.
"""

from __future__ import annotations

__version__ = "0.1.0"

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

# Where each public name lives: imported when first used, so that a command that
# needs no registry (`ls`, `check`, `views --offline`) does not load the HTTP stack.
_HOMES = {
    "DirectoryBackend": "backend.directory",
    "Converter": "convert", "ConvertOptions": "convert", "ImageResult": "convert",
    "RunReport": "convert", "expand_wildcards": "convert",
    "Digest": "digest",
    "Layout": "layout",
    "Platform": "manifest",
    "PodmanConfig": "podman_config",
    "ImageReference": "reference", "parse_reference": "reference",
    "RegistryClient": "registry",
    "RepositoryState": "repository",
    "ViewOptions": "views",
    **dict.fromkeys((
        "AuthenticationFailed", "BackendError", "ImageNotFound", "IntegrityError",
        "InvalidRecipe", "InvalidReference", "LayerError", "LazypodError", "RegistryError",
        "RegistryUnreachable", "RepositoryBusy", "RepositoryError", "UnsafeLayer",
        "UnsupportedImage"), "errors"),
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


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
