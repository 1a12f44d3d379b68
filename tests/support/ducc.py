"""A repository laid out as CERN's DUCC writes it: layers ingested as tarballs (AUFS
`.wh.` files kept as plain files, every file owned by the repository owner),
`layers.json` missing for the oldest layers, `.metadata/.../manifest.json` as DUCC
re-encodes it (Go field names), no config.json, no podman store."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

from .images import Image


def ducc_manifest(img: Image) -> bytes:
    manifest = json.loads(img.manifest)

    def descriptor(d: dict[str, object]) -> dict[str, object]:
        return {"MediaType": d["mediaType"], "Size": d["size"], "Digest": d["digest"]}

    return json.dumps({
        "SchemaVersion": manifest["schemaVersion"],
        "MediaType": manifest["mediaType"],
        "Config": descriptor(manifest["config"]),
        "Layers": [descriptor(layer) for layer in manifest["layers"]],
    }).encode()


def write_ducc_repository(root: Path, name: str, img: Image, *,
                          records_for: set[int] = frozenset({0})) -> None:
    """`name` as registry/repository:tag; layers listed in `records_for` (by index) get a
    layers.json, the others none (DUCC's oldest layers)."""
    for index, blob in enumerate(img.layers):
        hexdigest = blob.digest.split(":")[1]
        layer_dir = root / ".layers" / hexdigest[:2] / hexdigest
        layerfs = layer_dir / "layerfs"
        layerfs.mkdir(parents=True)
        raw = _decompress(blob.data, blob.media_type)
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
            for member in tar:
                member.uid = member.gid = 0  # ingest without -k: the repository owner
            if hasattr(tarfile, "fully_trusted_filter"):  # Python 3.11.4+
                tar.extractall(layerfs, filter="fully_trusted")
            else:
                tar.extractall(layerfs)
        meta = layer_dir / ".metadata"
        meta.mkdir()
        if index in records_for:
            (meta / "layers.json").write_text(json.dumps([{
                "id": blob.diff_id.split(":")[1],
                "created": "2024-01-01T00:00:00Z",
                "compressed-diff-digest": blob.digest,
                "diff-digest": blob.diff_id,
                "diff-size": len(raw),
            }]))
        (meta / "origin.json").write_text(json.dumps({"origin": [img.config_digest]}))
    image_dir = root / ".metadata" / name
    image_dir.mkdir(parents=True)
    (image_dir / "manifest.json").write_bytes(ducc_manifest(img))
    for dirpath, dirnames, filenames in os.walk(root):
        for entry in dirnames + filenames:
            path = Path(dirpath, entry)
            if not path.is_symlink() and path.is_dir():
                path.chmod(path.stat().st_mode | 0o555)


def _decompress(data: bytes, media_type: str) -> bytes:
    import gzip

    return gzip.decompress(data) if media_type.endswith("gzip") else data
