"""Every error lazypod raises on purpose, as one tree.

Each message is one line a user can act on; the CLI prints it as is and exits
non-zero. Third-party errors (httpx, zstandard, OSError from the kernel) are
translated into these at one boundary each, never passed through.

    LazypodError
    ├── InvalidReference          an image name that does not parse
    ├── InvalidRecipe             a wishlist that does not parse
    ├── RegistryConfigError       registries.conf or DUCC_* settings that cannot be used
    ├── NotificationError         a webhook request that is not a notification we read
    ├── RegistryError             anything a registry answered or failed to answer
    │   ├── RegistryUnreachable   connection refused, DNS, TLS, timeouts after retries
    │   ├── AuthenticationFailed  401/403 with or without credentials
    │   ├── ImageNotFound         unknown repository, tag or digest
    │   └── UnsupportedImage      manifest kind, media type or platform we cannot use
    ├── SourceError               an OCI layout, OCI archive or podman image that cannot be read
    ├── IntegrityError            content does not match its digest or size
    ├── LayerError                a layer tarball that cannot be unpacked
    │   └── UnsafeLayer           a member that would land outside the layer
    ├── RepositoryError           the repository on disk is not as it should be
    │   └── RepositoryBusy        another lazypod holds the repository lock
    └── BackendError              the storage backend (cvmfs_server, disk) failed
"""

from __future__ import annotations

__all__ = [
    "AuthenticationFailed",
    "BackendError",
    "ImageNotFound",
    "IntegrityError",
    "InvalidRecipe",
    "InvalidReference",
    "LayerError",
    "LazypodError",
    "NotificationError",
    "RegistryConfigError",
    "RegistryError",
    "RegistryUnreachable",
    "RepositoryBusy",
    "RepositoryError",
    "SourceError",
    "UnsafeLayer",
    "UnsupportedImage",
]


class LazypodError(Exception):
    """Base of every error lazypod raises on purpose."""


class InvalidReference(LazypodError):
    """An image reference that does not follow the docker or DUCC grammar."""


class InvalidRecipe(LazypodError):
    """A DUCC recipe (wishlist) that cannot be used."""


class RegistryConfigError(LazypodError):
    """Registry settings (registries.conf, DUCC's environment variables) that cannot
    be used as they are."""


class NotificationError(LazypodError):
    """A request body that is not a notification lazypod understands (HTTP 400)."""


class RegistryError(LazypodError):
    """A registry answered something we cannot use."""


class RegistryUnreachable(RegistryError):
    """The registry could not be reached, even after retries."""


class AuthenticationFailed(RegistryError):
    """The registry refused us: missing or wrong credentials."""


class ImageNotFound(RegistryError):
    """The repository, tag or digest does not exist in the registry."""


class UnsupportedImage(RegistryError):
    """A manifest kind, media type or platform lazypod cannot convert."""


class SourceError(LazypodError):
    """An image source other than a registry (`oci:`, `oci-archive:`,
    `containers-storage:`) that is missing, is not what its transport says, or does
    not hold the image asked for."""


class IntegrityError(LazypodError):
    """Content that does not match the digest or size that names it."""


class LayerError(LazypodError):
    """A layer tarball that is malformed or cannot be written."""


class UnsafeLayer(LayerError):
    """A layer member that would land outside the layer directory."""


class RepositoryError(LazypodError):
    """The repository on disk is not in a state lazypod can work with."""


class RepositoryBusy(RepositoryError):
    """Another lazypod process is writing the repository."""


class BackendError(LazypodError):
    """The storage backend failed (cvmfs_server, the disk)."""
