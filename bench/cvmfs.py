"""The cvmfs backend against the tests' stand-in cvmfs_server: publishes per run and
wall time for converting 5 images sharing a base, compared with the count DUCC's
algorithm needs (4 publishes per image plus 4 per new layer for its podman store
alone, by its own code, plus one ingest per layer).

    bench/run.sh --cvmfs-only        (bench/run.sh runs it after the podman comparison)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from support.cvmfs import StandinRepo  # noqa: E402
from support.images import Entry, busybox_entries, image, layer  # noqa: E402
from support.registry import Registry  # noqa: E402

LAZYPOD = str(Path(sys.executable).with_name("lazypod"))
IMAGES = 5


def ducc_publishes(layers_per_image: list[list[str]]) -> int:
    """DUCC's count: per image 4 store publishes, per new layer 4 store publishes and
    its ingest."""
    seen: set[str] = set()
    total = 0
    for layers in layers_per_image:
        new = [d for d in layers if d not in seen]
        seen.update(new)
        total += 4 + 4 * len(new) + len(new)
    return total


def main() -> str:
    work = Path(tempfile.mkdtemp(prefix="lazypod-bench-cvmfs-", dir="/var/tmp"))
    registry = Registry(work)
    repo = StandinRepo("bench.cern.ch")
    try:
        base = layer([*busybox_entries(), *(Entry(f"usr/share/base/{i}", data=os.urandom(4096))
                                              for i in range(500))])
        names, layer_lists = [], []
        for i in range(IMAGES):
            top = layer([Entry(f"opt/app{i}/{j}", data=os.urandom(2048)) for j in range(200)])
            img = image([base, top], label=f"bench{i}")
            names.append(registry.push("bench/app", str(i), img))
            layer_lists.append([b.digest for b in img.layers])
        recipe = work / "recipe.yaml"
        recipe.write_text("version: 1\ncvmfs_repo: bench.cern.ch\ninput:\n"
                          + "".join(f"  - 'http://{n}'\n" for n in names))
        env = {**os.environ, **repo.env}
        started = time.monotonic()
        subprocess.run([LAZYPOD, "convert", "--insecure-registry", registry.host,
                        "--public-root", str(repo.client_view), str(recipe)],
                       env=env, check=True, capture_output=True)
        seconds = time.monotonic() - started
        counts = repo.counts()
        ducc = ducc_publishes(layer_lists)
        table = "\n".join([
            f"{IMAGES} images sharing a base layer (2 layers each, 6 distinct), "
            "stand-in cvmfs_server:",
            "",
            "| measure | lazypod | DUCC's algorithm |",
            "|---|---|---|",
            f"| publishes per run (ingests included) | {counts['publish']} "
            f"({counts['transaction']} transactions, {counts['ingest']} ingests) | {ducc} |",
            f"| wall time of the run | {seconds:.2f} s | |",
        ])
        print(table)
        return table
    finally:
        repo.destroy()
        registry.stop()
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main()
