"""The public API is what `lazypod.__all__` says, and nothing moves silently."""

from __future__ import annotations

import lazypod

PUBLIC = {
    "AuthenticationFailed", "BackendError", "ConvertOptions", "Converter", "Digest",
    "DirectoryBackend", "ImageNotFound", "ImageReference", "ImageResult", "IntegrityError",
    "InvalidRecipe", "InvalidReference", "LayerError", "Layout", "LazypodError", "Platform",
    "PodmanConfig", "RegistryClient", "RegistryError", "RegistryUnreachable", "RepositoryBusy",
    "RepositoryError", "RepositoryState", "RunReport", "UnsafeLayer", "UnsupportedImage",
    "ViewOptions", "__version__", "expand_wildcards", "parse_reference",
}


def test_public_api_is_pinned():
    assert set(lazypod.__all__) == PUBLIC
    for name in lazypod.__all__:
        assert hasattr(lazypod, name), name


def test_every_error_is_a_lazypod_error():
    for name in lazypod.__all__:
        obj = getattr(lazypod, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, lazypod.LazypodError), name
