"""The overlay format of a layer directory, in one place: what marks a whiteout and
an opaque directory, in every form a repository may hold them.

* overlay (lazypod's layers): a whiteout is a character device 0/0 named as the
  entry it hides; an opaque directory carries `trusted.overlay.opaque=y`, which
  rootful kernel overlay reads and hides from containers;
* AUFS (the tarball form, in layers DUCC ingested): `.wh.NAME` files, and
  `.wh..wh..opq` in an opaque directory; `.wh..wh.*` are AUFS bookkeeping.

Readers honour both. Layers lazypod writes carry no `user.*` marker: rootful kernel
overlay would show it to containers, whose images built on top would then carry
it (see the README's opaque directory design); rootless overlay and fuse-overlayfs,
which cannot read `trusted.*`, get explicit whiteouts instead.
"""

from __future__ import annotations

import os
import stat

__all__ = [
    "AUFS_META_PREFIX",
    "AUFS_OPAQUE",
    "AUFS_PREFIX",
    "LEGACY_OPAQUE_XATTRS",
    "OPAQUE_XATTR",
    "OPAQUE_XATTRS",
    "RESERVED_XATTR_PREFIXES",
    "is_whiteout",
]

AUFS_PREFIX = b".wh."
AUFS_OPAQUE = b".wh..wh..opq"
AUFS_META_PREFIX = b".wh..wh."
# What lazypod writes on an opaque directory.
OPAQUE_XATTR = "trusted.overlay.opaque"
# Opaque markers older lazypod versions (and other tools) wrote, which readers honour
# and a normal run removes from lazypod's own layers.
LEGACY_OPAQUE_XATTRS = ("user.overlay.opaque", "user.fuseoverlayfs.opaque")
OPAQUE_XATTRS = (OPAQUE_XATTR, *LEGACY_OPAQUE_XATTRS)
# Xattrs that steer an overlay implementation: a layer must not bring its own, and
# copies of layer files (flat trees) leave them out.
RESERVED_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.", "user.fuseoverlayfs.")


def is_whiteout(st: os.stat_result) -> bool:
    """An overlay whiteout: a character device with device number 0/0."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
