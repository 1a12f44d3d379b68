"""The podman configuration that makes a repository's views usable, rootful and rootless."""

from __future__ import annotations

from dataclasses import dataclass

from .layout import PODMAN_STORE

__all__ = ["PodmanConfig"]

FUSE_OVERLAYFS = "/usr/bin/fuse-overlayfs"


@dataclass(frozen=True)
class PodmanConfig:
    """`root` is the path at which podman sees the repository (e.g. /cvmfs/unpacked.cern.ch)."""

    root: str

    @property
    def image_store(self) -> str:
        return f"{self.root.rstrip('/')}/{PODMAN_STORE}"

    def storage_opts(self, *, rootless: bool) -> list[str]:
        """`--storage-opt` values for a one-off `podman` command."""
        opts = [f"additionalimagestore={self.image_store}"]
        if rootless:
            opts += [f"overlay.mount_program={FUSE_OVERLAYFS}", "overlay.mountopt=squash_to_root"]
        return opts

    def storage_conf(self, *, rootless: bool) -> str:
        """The storage.conf lines (TOML) for the machine's or the user's configuration."""
        where = (
            "~/.config/containers/storage.conf (rootless podman)"
            if rootless
            else "/etc/containers/storage.conf (rootful podman)"
        )
        lines = [
            f"# {where}",
            "[storage]",
            'driver = "overlay"',
            "",
            "[storage.options]",
            f'additionalimagestores = ["{self.image_store}"]',
        ]
        if rootless:
            lines += [
                "",
                "# The repository's files belong to the publisher's users, which a user",
                "# namespace cannot map: fuse-overlayfs presents them as the container's root,",
                "# so the container can write where the image expects (e.g. /etc/mtab).",
                "# /dev/fuse must be usable by the user.",
                "[storage.options.overlay]",
                f'mount_program = "{FUSE_OVERLAYFS}"',
                'mountopt = "squash_to_root"',
            ]
        return "\n".join(lines) + "\n"
