"""Scale: a production-sized wishlist, on a synthetic registry with real latency.

    bench/run.sh --scale-only --scale 10000 [--scale-rtt 0.05]   (or --scale N with the rest)

N images of 3 layers (a base shared by all, a layer shared by groups of 10, one of
its own) in 100 repositories, served by `synthetic_registry` behind Docker Hub's
token flow, `dir` backend:

1. fresh conversion of the N images, flat trees included (no added latency);
2. a no-op update (nothing changed), with the given round-trip time on every request;
3. `views` from scratch, and a rerun after 10 more images; `ls`, `check` (twice: the
   first hashes the store's files), each with the record cache of the commands before;
4. peak memory of each command (the kernel's high-water mark);
5. `podman images` with the repository's store (podman of this machine), and with
   views of a tenth of the images (`views --select`).

LAZYPOD_BENCH_KEEP=1 keeps the work directory (repository, recipes) for a closer look.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from support.podman import Podman  # noqa: E402
from synthetic_registry import SyntheticRegistry  # noqa: E402

LAZYPOD = str(Path(sys.executable).with_name("lazypod"))


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (MiB, of the process and its children) and stderr."""
    started = time.monotonic()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], env=env, capture_output=True,
                          text=True, check=False)
    elapsed = time.monotonic() - started
    lines = proc.stderr.strip().splitlines()
    if proc.returncode:
        raise SystemExit(f"bench: {' '.join(cmd)} failed: {proc.stderr[-2000:]}")
    return elapsed, int(lines[-1]) // 1024, "\n".join(lines[:-1])


def recipe(path: Path, names: list[str]) -> Path:
    path.write_text("version: 1\ninput:\n" + "".join(f"  - 'http://{n}'\n" for n in names))
    return path


def main(images: int = 1000, rtt: float = 0.05, podman_images: bool = True) -> str:
    work = Path(tempfile.mkdtemp(prefix="lazypod-bench-scale-", dir="/var/tmp"))
    rows: list[tuple[str, str, str]] = []
    try:
        print(f"bench: synthetic registry with {images + 10} images", flush=True)
        with SyntheticRegistry(images=images + 10) as registry:
            first, extra = registry.names[:images], registry.names[images:]
            repo = work / "repo"
            wish = recipe(work / "recipe.yaml", first)
            seconds, rss, _ = timed([LAZYPOD, "convert", "--insecure-registry", registry.host,
                                     str(wish), str(repo)])
            rows.append((f"fresh convert of {images} images, flat trees included",
                         f"{seconds:.1f} s ({images / seconds:.0f} images/s)", f"{rss} MiB"))
            registry.rtt = rtt
            registry.requests = 0
            seconds, rss, _ = timed([LAZYPOD, "convert", "--insecure-registry", registry.host,
                                     str(wish), str(repo)])
            rows.append((f"no-op update of {images} images at {rtt * 1000:.0f} ms round trip "
                         "(tokens included)",
                         f"{seconds:.1f} s, {registry.requests} requests", f"{rss} MiB"))
            registry.rtt = 0
            views = work / "views"
            seconds, rss, _ = timed([LAZYPOD, "views", str(repo), "--into", str(views),
                                     "--offline"])
            rows.append((f"`views` for {images} images, from scratch", f"{seconds:.1f} s",
                         f"{rss} MiB"))
            seconds, rss, _ = timed([LAZYPOD, "convert", "--insecure-registry", registry.host,
                                     str(recipe(work / "more.yaml", extra)), str(repo)])
            rows.append(("convert of 10 more images", f"{seconds:.2f} s", f"{rss} MiB"))
            seconds, rss, _ = timed([LAZYPOD, "views", str(repo), "--into", str(views),
                                     "--offline"])
            rows.append(("`views` rerun after 10 more images", f"{seconds:.2f} s", f"{rss} MiB"))
            # The first check hashes the podman store's big-data files; later ones only
            # those whose stat changed (record_cache.py).
            for command, what in (("ls", ""), ("check", ", first"), ("check", ", again")):
                seconds, rss, _ = timed([LAZYPOD, command, str(repo)])
                rows.append((f"`{command}` of {images + 10} images{what}",
                             f"{seconds:.2f} s", f"{rss} MiB"))
        if podman_images:
            podman = Podman(work / "podman", storage_opts=[
                f"additionalimagestore={repo}/.podmanStore"])
            started = time.monotonic()
            out = podman.text("images", "--format", "{{.ID}}")
            rows.append((f"`podman images` with the store "
                         f"(podman {podman.text('--version').split()[-1]})",
                         f"{time.monotonic() - started:.1f} s, {len(out.split())} images", ""))
            podman.reset()
            # What a site with podman 4 does: views of the images its nodes run (a tenth).
            selected = work / "selected"
            timed([LAZYPOD, "views", str(repo), "--into", str(selected), "--offline",
                   "--no-layer-store", "--select", "*:t*0"])
            podman = Podman(work / "podman-selected", storage_opts=[
                f"additionalimagestore={selected}/store"])
            started = time.monotonic()
            out = podman.text("images", "--format", "{{.ID}}")
            rows.append(("`podman images` with views of a tenth of the images "
                         "(`views --select '*:t*0'`)",
                         f"{time.monotonic() - started:.1f} s, {len(out.split())} images", ""))
            podman.reset()
    finally:
        if os.environ.get("LAZYPOD_BENCH_KEEP"):
            print(f"bench: kept {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    table = "\n".join([
        f"Scale: {images} images of 3 layers (synthetic registry on loopback, 100 "
        f"repositories, Docker Hub's token flow), `dir` backend, {os.cpu_count()} CPUs.",
        "",
        "| measure | time | peak RSS |",
        "|---|---|---|",
        *(f"| {a} | {b} | {c} |" for a, b, c in rows),
    ])
    print(table, flush=True)
    return table


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000,
         float(sys.argv[2]) if len(sys.argv) > 2 else 0.05)
