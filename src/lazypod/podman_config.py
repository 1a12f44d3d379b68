"""The podman configuration that makes a repository's views usable, rootful and rootless."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FUSE_OVERLAYFS", "PodmanConfig"]

FUSE_OVERLAYFS = "/usr/bin/fuse-overlayfs"


@dataclass(frozen=True)
class PodmanConfig:
    """Paths as podman sees them (e.g. /cvmfs/unpacked.cern.ch/.podmanStore)."""

    image_store: str
    layer_store: str | None = None
    aufs_whiteouts: bool = False  # layers with AUFS .wh. files need fuse-overlayfs

    def mount_program(self, *, rootless: bool) -> bool:
        return rootless or self.aufs_whiteouts

    def storage_opts(self, *, rootless: bool) -> list[str]:
        """`--storage-opt` values for a one-off `podman` command."""
        opts = [f"additionalimagestore={self.image_store}"]
        if self.layer_store:
            opts.append(f"overlay.additionallayerstore={self.layer_store}")
        if self.mount_program(rootless=rootless):
            opts.append(f"overlay.mount_program={FUSE_OVERLAYFS}")
        if rootless:
            opts.append("overlay.mountopt=squash_to_root")
        return opts

    def storage_conf(self, *, rootless: bool) -> str:
        """The storage.conf lines (TOML) for the machine's or the user's configuration."""
        where = (
            "~/.config/containers/storage.conf (rootless podman)"
            if rootless
            else "/etc/containers/storage.conf (rootful podman)"
        )
        lines = [f"# {where}", "[storage]", 'driver = "overlay"', "", "[storage.options]",
                 f'additionalimagestores = ["{self.image_store}"]']
        if self.layer_store:
            lines += ["# podman 4.x: pulls of images whose layers are all in the repository",
                      "# fetch only manifest and config (podman 5.1+ ignores it for gzip layers)",
                      f'additionallayerstores = ["{self.layer_store}"]']
        if self.mount_program(rootless=rootless):
            lines += ["", "[storage.options.overlay]"]
            if self.aufs_whiteouts:
                lines += ["# Some layers hold AUFS .wh. whiteouts (written by DUCC), which only",
                          "# fuse-overlayfs honours."]
            if rootless:
                lines += ["# The repository's files belong to the publisher's users, which a",
                          "# user namespace cannot map: fuse-overlayfs presents them as the",
                          "# container's root, so it can write where the image expects",
                          "# (e.g. /etc/mtab). /dev/fuse must be usable by the user."]
            lines.append(f'mount_program = "{FUSE_OVERLAYFS}"')
            if rootless:
                lines.append('mountopt = "squash_to_root"')
        return "\n".join(lines) + "\n"
