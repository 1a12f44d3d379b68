"""Path arithmetic of the repository layout (a contract DUCC and clients read).

    .layers/<h2>/<h>/layerfs/                     one layer, unpacked (overlay format)
    .layers/<h2>/<h>/.metadata/layers.json        DUCC's layer record (+ uidset/gidset)
    .layers/<h2>/<h>/.metadata/origin.json        {"origin": [image names]}
    .layers/<h2>/<h>/.metadata/tar-split.json.gz  podman's tar-split (save/push)
    .metadata/<registry>/<repository>:<tag>/      manifest.json, config.json (+ index.json)
    .flat/<c2>/<c>/                               flattened root file system
    <registry>/<repository>:<tag>                 symlink to .flat/<c2>/<c>
    .podmanStore/  .podmanLayers/                 podman views
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .digest import Digest

__all__ = ["LAYER_RECORD", "Layout"]

LAYERS = ".layers"
METADATA = ".metadata"
LAYERFS = "layerfs"  # a layer's unpacked content, beside its METADATA
# DUCC's layer record (its presence marks a layer complete); containers/storage names
# its list of layers (`.podmanStore/overlay-layers/`) the same.
LAYER_RECORD = "layers.json"
FLAT = ".flat"
PODMAN_STORE = ".podmanStore"
PODMAN_LAYERS = ".podmanLayers"
STAGING = ".lazypod-staging"
LOCK = ".lazypod.lock"
HIDDEN = frozenset({LAYERS, METADATA, FLAT, PODMAN_STORE, PODMAN_LAYERS, STAGING, LOCK})


@dataclass(frozen=True)
class Layout:
    """Where things are in a repository rooted at `root`."""

    root: Path

    def layer_rel(self, digest: Digest) -> str:
        return f"{LAYERS}/{digest.hex[:2]}/{digest.hex}"

    def layer_dir(self, digest: Digest) -> Path:
        return self.root / self.layer_rel(digest)

    def layerfs(self, digest: Digest) -> Path:
        return self.layer_dir(digest) / LAYERFS

    def layer_metadata(self, digest: Digest) -> Path:
        return self.layer_dir(digest) / METADATA

    def image_rel(self, public_name: str) -> str:
        return f"{METADATA}/{public_name}"

    def image_dir(self, public_name: str) -> Path:
        return self.root / self.image_rel(public_name)

    def flat_rel(self, config: Digest) -> str:
        return f"{FLAT}/{config.hex[:2]}/{config.hex}"

    def flat_dir(self, config: Digest) -> Path:
        return self.root / self.flat_rel(config)
