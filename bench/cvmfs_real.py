"""The cvmfs backend on a real CernVM-FS stratum 0 (this machine's, made by
shared/tools/cvmfs-stratum0.sh), with the bench's Debian + numpy image.

    bench/run.sh --cvmfs-real        (bench/run.sh runs it when cvmfs_server is installed)

1. Publishing: `lazypod convert-single-image --backend cvmfs`, flat tree included,
   against what DUCC does for the layers alone: each layer, decompressed, piped into
   `cvmfs_server ingest` (one publish each). Each into a fresh repository.
2. A rerun with nothing new: publishes and wall time.
3. Entries per nested catalog (`cvmfs_server list-catalogs -e`).
4. Cold start: `podman run` of the image from the client view with the client's cache
   emptied (`cvmfs_talk ... cleanup 0`), a command that imports numpy; wall time and
   kB the client fetched (`user.rx` of the mount), against a cold `podman pull` and
   the same run.
"""

from __future__ import annotations

import json
import os
import re
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
from support.registry import Registry  # noqa: E402

LAZYPOD = str(Path(sys.executable).with_name("lazypod"))
REPO = "lzp-bench.example.org"
RUN = ["python3", "-c", "import numpy; print(numpy.arange(10).sum())"]


def server(*args: str, stdin: object = subprocess.DEVNULL,
           check: bool = True) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run(["cvmfs_server", *args], stdin=stdin, capture_output=True,
                          check=False)
    if check and proc.returncode:
        raise SystemExit(f"cvmfs_server {' '.join(args)} failed:\n"
                         f"{(proc.stdout + proc.stderr).decode()[-2000:]}")
    return proc


def fresh_repository() -> None:
    subprocess.run(["pkill", "-x", "catatonit"], check=False)  # rootless podman pauses
    server("abort", "-f", REPO, check=False)
    if Path(f"/etc/cvmfs/repositories.d/{REPO}").exists():
        server("rmfs", "-f", REPO)
    server("mkfs", "-o", "root", REPO)
    conf = Path(f"/etc/cvmfs/repositories.d/{REPO}/server.conf")
    conf.write_text(conf.read_text() + "CVMFS_INCLUDE_XATTRS=true\n")


def client_view() -> Path:
    return Path(f"/var/spool/cvmfs/{REPO}/rdonly")


def rx_kb() -> int:
    out = subprocess.run(["getfattr", "--only-values", "-n", "user.rx", str(client_view())],
                         capture_output=True, text=True, check=True).stdout
    return int(out.strip() or 0)


def empty_client_cache() -> None:
    subprocess.run(["cvmfs_talk", "-p", f"/var/spool/cvmfs/{REPO}/cvmfs_io", "cleanup", "0"],
                   check=True, capture_output=True)


def ducc_style(registry: Registry, name: str) -> float:
    """Each layer, decompressed, into its own ingest, as DUCC publishes layers."""
    repo_path = name.split("/", 1)[1].rsplit(":", 1)[0]
    manifest = json.loads(subprocess.run(
        ["curl", "-sf", "-H", "Accept: application/vnd.oci.image.manifest.v1+json,"
         "application/vnd.docker.distribution.manifest.v2+json",
         f"http://{registry.host}/v2/{repo_path}/manifests/1"],
        capture_output=True, check=True).stdout)
    started = time.monotonic()
    for layer in manifest["layers"]:
        digest = layer["digest"].split(":")[1]
        curl = subprocess.Popen(["curl", "-sf", f"http://{registry.host}/v2/{repo_path}/"
                                 f"blobs/sha256:{digest}"], stdout=subprocess.PIPE)
        gunzip = subprocess.Popen(["gzip", "-dc"], stdin=curl.stdout, stdout=subprocess.PIPE)
        assert curl.stdout is not None
        curl.stdout.close()
        server("ingest", "--catalog", "-t", "-", "-b", f".layers/{digest[:2]}/{digest}/layerfs",
               REPO, stdin=gunzip.stdout)
        gunzip.wait()
        curl.wait()
    return time.monotonic() - started


def lazypod(*args: str) -> tuple[float, str]:
    started = time.monotonic()
    proc = subprocess.run([LAZYPOD, *args], capture_output=True, text=True, check=False,
                          cwd="/")
    if proc.returncode:
        raise SystemExit(f"lazypod {' '.join(args)} failed: {proc.stderr[-2000:]}")
    return time.monotonic() - started, proc.stderr


def publishes(stderr: str) -> int:
    match = re.search(r"cvmfs: (\d+) publishes", stderr)
    return int(match.group(1)) if match else 0


def catalog_entries() -> list[int]:
    out = server("list-catalogs", "-e", "-x", REPO).stdout.decode()
    counts = []
    for line in out.splitlines():
        fields = line.split()
        if fields and fields[0].isdigit():
            counts.append(int(fields[0]))
    return counts


def main(builder: Podman, registry: Registry, name: str, unpacked_bytes: int) -> str:
    work = Path(tempfile.mkdtemp(prefix="lazypod-bench-cvmfs-real-", dir="/var/tmp"))
    try:
        fresh_repository()
        ducc = ducc_style(registry, name)
        fresh_repository()
        convert_args = ("convert-single-image", "--backend", "cvmfs", "--insecure-registry",
                        registry.host, "--public-root", str(client_view()),
                        "--work-dir", str(work / "spool"), name, REPO)
        converted, stderr = lazypod(*convert_args)
        first_publishes = publishes(stderr)
        rerun, stderr = lazypod(*convert_args)
        rerun_publishes = publishes(stderr)
        entries = catalog_entries()

        subprocess.run(["sync"], check=True)
        from_repo = Podman(work / "cold-repo", storage_opts=[
            f"additionalimagestore={client_view()}/.podmanStore"])
        empty_client_cache()
        before = rx_kb()
        started = time.monotonic()
        out = from_repo.text("run", "--rm", "--network=none", name, *RUN)
        cold_repo = time.monotonic() - started
        fetched_kb = rx_kb() - before
        assert out.strip() == "45", out
        from_repo.reset()

        pulled = Podman(work / "cold-pull")
        started = time.monotonic()
        pulled("pull", "-q", "--tls-verify=false", name)
        out = pulled.text("run", "--rm", "--network=none", name, *RUN)
        cold_pull = time.monotonic() - started
        assert out.strip() == "45", out
        pulled.reset()

        fetched_share = fetched_kb * 1000 / unpacked_bytes
        table = "\n".join([
            f"Real CernVM-FS 2.12.0 stratum 0 on this machine (Apache on loopback); the "
            f"bench image ({unpacked_bytes / 1e6:.0f} MB unpacked).",
            "",
            "| measure | baseline | lazypod | ratio |",
            "|---|---|---|---|",
            f"| publish: DUCC-style (each layer piped into `cvmfs_server ingest`, layers only) "
            f"vs `convert-single-image --backend cvmfs` (layers, flat tree, podman stores) "
            f"| {ducc:.1f} s | {converted:.1f} s | **{converted / ducc:.2f}** |",
            f"| publishes in the run | | {first_publishes} | |",
            f"| rerun with nothing new | | {rerun:.2f} s, {rerun_publishes} publishes | |",
            f"| cold start, `podman run IMAGE {' '.join(RUN[:2])} 'import numpy…'`: cold "
            f"`podman pull` + run vs run from the client view, cache emptied | "
            f"{cold_pull:.1f} s | {cold_repo:.1f} s | **{cold_pull / cold_repo:.1f}x** "
            "faster |",
            f"| bytes the client fetched for that run | {unpacked_bytes / 1e6:.0f} MB "
            f"unpacked | {fetched_kb / 1000:.1f} MB | **{fetched_share:.1%}** |",
            f"| entries per nested catalog ({len(entries)} catalogs) | | max "
            f"{max(entries)}, median {sorted(entries)[len(entries) // 2]} | |",
        ])
        print(table, flush=True)
        return table
    finally:
        subprocess.run(["pkill", "-x", "catatonit"], check=False)
        server("abort", "-f", REPO, check=False)
        shutil.rmtree(work, ignore_errors=True)


def available() -> bool:
    return shutil.which("cvmfs_server") is not None and Path("/etc/cvmfs").is_dir() and \
        os.geteuid() == 0
