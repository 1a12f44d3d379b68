"""lazypod against podman itself, on the same machine, in the same run.

    bench/run.sh [--rounds N] [--runs N]

1. Builds (once, cached in $LAZYPOD_BENCH_CACHE, default /var/tmp/lazypod-bench) a
   multi-layer image of about 400 MB: a Debian bookworm minbase made with
   debootstrap, a layer installing packages with apt, a layer deleting files.
2. Pushes it to a fresh docker-registry on loopback.
3. Conversion: `podman pull` into an empty storage root vs `lazypod
   convert-single-image` into an empty repository, alternated, N rounds; wall
   time and peak RSS (of the lazypod process tree) per round; medians compared.
4. Start-up: `podman run --rm IMAGE true` with the image in podman's own storage vs
   from the repository's image store.
5. Lazy pulls: `podman pull` with the repository's layer store (every layer present)
   vs a plain `podman pull`.
6. Memory whatever the layer size: peak RSS converting one 1 GiB layer.
7. Client views: `lazypod views` for a repository of 100 images (configs present).
8. The cvmfs backend (bench/cvmfs.py): publishes per run against DUCC's count, with
   the tests' stand-in cvmfs_server.
9. The cvmfs backend on a real stratum 0 (bench/cvmfs_real.py), when cvmfs_server is
   installed: publishing against DUCC's way, a cold start from the client view against
   a cold pull, entries per catalog.
Prints the tables and writes them to bench/results/latest.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from isal import igzip  # noqa: E402

from support.debian import minbase_rootfs  # noqa: E402
from support.images import Blob, Entry, busybox_entries, image, layer  # noqa: E402
from support.podman import Podman  # noqa: E402
from support.registry import Registry  # noqa: E402

LAZYPOD = str(Path(sys.executable).with_name("lazypod"))
CACHE = Path(os.environ.get("LAZYPOD_BENCH_CACHE", "/var/tmp/lazypod-bench"))
CONTAINERFILE = """\
FROM localhost/bench-base:1
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-numpy perl \
    libssl3 curl ca-certificates && rm -rf /var/lib/apt/lists/*
RUN rm -rf /usr/share/doc/* /usr/share/man && echo done > /etc/bench-marker
"""
IMAGE = "localhost/bench:2"


def build_image(builder: Podman) -> None:
    """The benchmark image, in the builder's storage as IMAGE."""
    if builder("image", "exists", IMAGE, check=False).returncode == 0:
        return
    print("bench: debootstrap --variant=minbase bookworm (once, about 30 s)", flush=True)
    rootfs = minbase_rootfs()
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "--exclude=./.complete", "-c", "."],
                           stdout=subprocess.PIPE)
    subprocess.run(builder.command("import", "-", "localhost/bench-base:1"), env=builder.env,
                   stdin=tar.stdout, stdout=subprocess.DEVNULL, check=True)
    tar.wait()
    (CACHE / "Containerfile").write_text(CONTAINERFILE)
    print("bench: podman build (apt-get install in a container)", flush=True)
    builder("build", "--network=host", "-t", IMAGE, "-f", str(CACHE / "Containerfile"),
            str(CACHE))


def settle(drop_caches: bool) -> None:
    """Start every measurement alike: dirty pages written, optionally caches dropped."""
    os.sync()
    if drop_caches:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB, the kernel's high-water mark) of a command."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(0.02):
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]))
            except (OSError, ValueError):
                pass

    sampler = threading.Thread(target=sample)
    sampler.start()
    _, stderr = proc.communicate()
    elapsed = time.monotonic() - started
    stop.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"bench: {' '.join(cmd)} failed: {stderr.decode()}")
    return elapsed, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="conversion rounds")
    parser.add_argument("--runs", type=int, default=10, help="podman run repetitions")
    parser.add_argument("--drop-caches", action="store_true",
                        help="drop the page cache before each measurement (slow and noisy on "
                             "virtual machines whose memory comes back from the host)")
    parser.add_argument("--big-layer-mib", type=int, default=1024,
                        help="size of the one-layer image for the memory measure (0: skip)")
    parser.add_argument("--cvmfs-only", action="store_true", help="only the cvmfs benchmarks")
    parser.add_argument("--cvmfs-real", action=argparse.BooleanOptionalAction, default=None,
                        help="the real stratum 0 benchmark (default: when cvmfs_server is "
                             "installed)")
    parser.add_argument("--scale", type=int, default=0, metavar="N",
                        help="also the scale benchmark with N images (bench/scale.py; "
                             "10000 takes about 10 minutes)")
    parser.add_argument("--scale-rtt", type=float, default=0.05, metavar="SECONDS",
                        help="round-trip time of the scale benchmark's no-op update")
    parser.add_argument("--scale-only", action="store_true", help="only the scale benchmark")
    args = parser.parse_args()
    import cvmfs  # bench/cvmfs.py
    import cvmfs_real  # bench/cvmfs_real.py
    import scale  # bench/scale.py

    if args.scale_only:
        _write_results([scale.main(args.scale or 1000, args.scale_rtt)])
        return

    sections = [] if args.cvmfs_only else [podman_comparison(args)]
    if args.big_layer_mib and not args.cvmfs_only:
        sections.append(big_layer_memory(args.big_layer_mib))
    if not args.cvmfs_only:
        sections.append(client_views(100))
    sections.append(cvmfs.main())
    real = cvmfs_real.available() if args.cvmfs_real is None else args.cvmfs_real
    if real:
        sections.append(with_bench_image(cvmfs_real.main))
    if args.scale:
        sections.append(scale.main(args.scale, args.scale_rtt))
    _write_results(sections)


def _write_results(sections: list[str]) -> None:
    results_dir = HERE / "results"
    results_dir.mkdir(exist_ok=True)
    (results_dir / "latest.md").write_text("\n\n".join(sections) + "\n")


def client_views(count: int) -> str:
    """`lazypod views` for a repository of `count` images sharing a base."""
    work = Path(tempfile.mkdtemp(prefix="lazypod-bench-views-", dir="/var/tmp"))
    registry = Registry(work)
    try:
        base = layer(busybox_entries())
        names = []
        for i in range(count):
            img = image([base, layer([Entry(f"app/{i}", data=f"{i}".encode())])],
                        label=f"views{i}")
            names.append(registry.push("bench/views", str(i), img))
        recipe = work / "recipe.yaml"
        recipe.write_text("version: 1\ninput:\n" + "".join(f"  - '{n}'\n" for n in names))
        repo = work / "repo"
        convert_s, _ = timed([LAZYPOD, "convert", "--skip-flat", "--insecure-registry",
                              registry.host, str(recipe), str(repo)])
        views_s, _ = timed([LAZYPOD, "views", str(repo), "--into", str(work / "views"),
                            "--offline"])
        proc = subprocess.run([LAZYPOD, "views", str(repo), "--into", str(work / "views"),
                               "--offline"], capture_output=True, text=True, check=True)
        files = re.search(r"(\d+) metadata records, (\d+) parsed", proc.stderr)
        rerun_s, _ = timed([LAZYPOD, "views", str(repo), "--into", str(work / "views"),
                            "--offline"])
        table = (f"Client views for a repository of {count} images (converted in "
                 f"{convert_s:.1f} s by one `lazypod convert`): `lazypod views` "
                 f"{views_s:.2f} s, {files.group(1) if files else '?'} metadata records "
                 f"({files.group(2) if files else '?'} parsed by that second run); "
                 f"rerun with nothing new {rerun_s:.2f} s.")
        print(table, flush=True)
        return table
    finally:
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)


def big_layer_memory(mib: int) -> str:
    """Peak RSS converting an image whose single layer holds `mib` MiB of random data."""
    work = Path(tempfile.mkdtemp(prefix="lazypod-bench-big-", dir="/var/tmp"))
    registry = Registry(work)
    try:
        tar_path = work / "layer.tar"
        with tarfile.open(tar_path, "w") as tar:
            for i in range(max(1, mib // 256)):
                data = work / "chunk"
                with data.open("wb") as f:
                    for _ in range(256):
                        f.write(os.urandom(1 << 20))
                tar.add(data, arcname=f"big/{i}")
                data.unlink()
        raw = tar_path.read_bytes()
        tar_path.unlink()
        blob = Blob(igzip.compress(raw, compresslevel=1),
                    "application/vnd.oci.image.layer.v1.tar+gzip",
                    "sha256:" + hashlib.sha256(raw).hexdigest())
        del raw
        name = registry.push("bench/big", "1", image([blob]))
        del blob
        settle(False)
        seconds, rss = timed([LAZYPOD, "convert-single-image", "--skip-flat",
                              "--insecure-registry", registry.host, name, str(work / "repo")])
        table = (f"One layer of {mib} MiB (random data, gzip): convert-single-image peak RSS "
                 f"{rss / 1024:.0f} MiB, {seconds:.1f} s.")
        print(table, flush=True)
        return table
    finally:
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)


def with_bench_image(measure: Callable[[Podman, Registry, str, int], str]) -> str:
    """Run `measure(builder, registry, name, unpacked bytes)` with the bench image
    pushed to a fresh registry."""
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lazypod-bench-", dir="/var/tmp"))
    builder = Podman(CACHE / "builder", runroot=Path("/tmp/lazypod-bench-builder"))
    registry = Registry(work)
    try:
        build_image(builder)
        name = f"{registry.host}/bench/debian:1"
        builder("push", "-q", "--tls-verify=false", IMAGE, f"docker://{name}")
        size = int(builder.text("image", "inspect", "--format", "{{.Size}}", IMAGE))
        return measure(builder, registry, name, size)
    finally:
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)


def podman_comparison(args: argparse.Namespace) -> str:
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lazypod-bench-", dir="/var/tmp"))
    builder = Podman(CACHE / "builder", runroot=Path("/tmp/lazypod-bench-builder"))
    registry = Registry(work)
    try:
        build_image(builder)
        name = f"{registry.host}/bench/debian:1"
        builder("push", "-q", "--tls-verify=false", IMAGE, f"docker://{name}")
        size = builder.text("image", "inspect", "--format", "{{.Size}}", IMAGE)
        layers = builder.text("image", "inspect", "--format", "{{len .RootFS.Layers}}", IMAGE)

        pull_times, convert_times, convert_rss = [], [], []
        for round_ in range(args.rounds):
            pulled = Podman(work / f"pull-{round_}")
            settle(args.drop_caches)
            seconds, _ = timed(pulled.command("pull", "-q", "--tls-verify=false", name),
                               env=pulled.env)
            pull_times.append(seconds)
            pulled.reset()
            repo = work / f"repo-{round_}"
            settle(args.drop_caches)
            seconds, rss = timed([LAZYPOD, "convert-single-image", "--insecure-registry",
                                  registry.host, name, str(repo)])
            convert_times.append(seconds)
            convert_rss.append(rss)
            if round_ < args.rounds - 1:
                shutil.rmtree(repo)
            print(f"bench: round {round_ + 1}: podman pull {pull_times[-1]:.2f}s, "
                  f"lazypod convert {convert_times[-1]:.2f}s ({rss / 1024:.0f} MiB)", flush=True)

        repo = work / f"repo-{args.rounds - 1}"
        plain_pulls, als_pulls = [], []
        for round_ in range(args.rounds):
            plain = Podman(work / f"plain-{round_}")
            als = Podman(work / f"als-{round_}", storage_opts=[
                f"overlay.additionallayerstore={repo}/.podmanLayers"])
            for podman, results in ((plain, plain_pulls), (als, als_pulls)):
                settle(args.drop_caches)
                results.append(timed(podman.command("pull", "-q", "--tls-verify=false", name),
                                     env=podman.env)[0])
                podman.reset()
        local = Podman(work / "run-local")
        local("pull", "-q", "--tls-verify=false", name)
        from_repo = Podman(work / "run-repo", storage_opts=[
            f"additionalimagestore={repo}/.podmanStore"])
        run_local, run_repo = [], []
        for podman in (local, from_repo):
            podman("run", "--rm", "--network=none", name, "true")  # warm caches alike
        for _ in range(args.runs):
            for podman, results in ((local, run_local), (from_repo, run_repo)):
                results.append(timed(podman.command("run", "--rm", "--network=none", name,
                                                    "true"), env=podman.env)[0])
        local.reset()
        from_repo.reset()

        pull = statistics.median(pull_times)
        # Each round runs the two back to back: its ratio is immune to slow drifts of
        # the machine that move both.
        rounds_text = ", ".join(f"{c / p:.2f}" for p, c in zip(pull_times, convert_times,
                                                               strict=True))
        convert = statistics.median(convert_times)
        r_local, r_repo = statistics.median(run_local), statistics.median(run_repo)
        plain_pull, als_pull = statistics.median(plain_pulls), statistics.median(als_pulls)
        table = "\n".join([
            f"Image: Debian bookworm minbase + apt-get install layer + deletions, "
            f"{int(size) / 1e6:.0f} MB, {layers.strip()} layers; "
            f"{os.cpu_count()} CPUs; podman {builder.text('--version').split()[-1]}; "
            f"medians of {args.rounds} conversions and {args.runs} runs.",
            "",
            "| measure | podman | lazypod | ratio (lazypod/podman) |",
            "|---|---|---|---|",
            f"| pull vs convert-single-image, wall | {pull:.2f} s | {convert:.2f} s | "
            f"{convert / pull:.2f} (per round: {rounds_text}) |",
            f"| convert-single-image peak RSS | | {max(convert_rss) / 1024:.0f} MiB | |",
            f"| `podman run --rm IMAGE true`, local storage vs repository | {r_local:.3f} s | "
            f"{r_repo:.3f} s | {r_repo / r_local:.2f} |",
            f"| `podman pull`, plain vs with the repository's layer store | {plain_pull:.2f} s | "
            f"{als_pull:.2f} s | {als_pull / plain_pull:.2f} |",
        ])
        print()
        print(table, flush=True)
        return table
    finally:
        registry.stop()
        subprocess.run(["umount", "-R", str(work)], stderr=subprocess.DEVNULL, check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
