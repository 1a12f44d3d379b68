"""DUCC's users' command lines, replayed against lazypod: the invocations found in the
wild (unpacked.cern.ch's cron line, DUCC's webhook listener, its loop.sh), with the
recipes' shapes, must end as they end with DUCC: the same paths in the repository,
notification lines its listener reads, exit statuses its monitoring counts.

The cvmfs ones run against the strict stand-in cvmfs_server (LAZYPOD_TEST_CVMFS=real
runs them against this machine's stratum 0)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from support.cvmfs import make_repo
from support.ducc import write_ducc_repository
from support.images import Entry, busybox_entries, image, layer
from support.proxy import FaultyProxy

pytestmark = [pytest.mark.registry]

DUCC_TIME = re.compile(r"^[ \d]\d [A-Z][a-z]{2} \d{4} - \d{2}:\d{2}:\d{2}\.\d{3}$")


@pytest.fixture()
def cvmfs(lazypod):
    repo = make_repo()
    lazypod.env.update(repo.env)
    yield repo
    repo.destroy()


def small_image(label: str, extra: bytes = b""):
    return image([layer(busybox_entries()),
                  layer([Entry(f"data/{label}", data=label.encode() + extra)])], label=label)


def insecure(lazypod, registry) -> None:
    """What an operator writes once for a plain-HTTP registry (DUCC's listener passes
    image names without a scheme)."""
    Path(lazypod.env["CONTAINERS_REGISTRIES_CONF"]).write_text(
        f'[[registry]]\nlocation = "{registry.host}"\ninsecure = true\n')


def notifications(path: Path) -> list[dict[str, str]]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for line in lines:
        assert all(isinstance(v, str) for v in line.values()), line  # DUCC's map[string]string
        assert list(line) == sorted(line), line
        assert DUCC_TIME.match(line["time"]), line["time"]
    return lines


def actions(lines: list[dict[str, str]]) -> list[str]:
    return [line["action"] for line in lines]


def link_target(root: Path, name: str) -> str:
    return os.readlink(root / name)


# -- unpacked.cern.ch's cron line -------------------------------------------------------

def test_the_cron_line_converts_a_wishlist_into_ducc_paths(registry, lazypod, cvmfs):
    """`cvmfs_ducc convert recipe.yaml --skip-podman --skip-thin-image`: the recipe's
    cvmfs_repo, http:// entries, a wildcard, a digest-only entry and an entry whose
    tags cannot be listed; that one fails alone (exit 3), the rest lands where DUCC
    puts it."""
    one = registry.push("ducc/app", "1.0", small_image("app10"))
    registry.push("ducc/app", "1.1", small_image("app11"))
    registry.push("ducc/app", "2.0", small_image("app20"))
    pinned_img = small_image("pinned")
    registry.push("ducc/pinned", "x", pinned_img)
    host = registry.host
    recipe = cvmfs.base / "recipe.yaml"
    recipe.write_text(
        "version: 1\nuser: smosciat\ncvmfs_repo: " + cvmfs.name + "\n"
        "output_format: '$(scheme)://registry.example.org/thin/$(image)'\ninput:\n"
        f"  - 'http://{one}'\n"
        f"  - 'http://{host}/ducc/app:1.*'\n"
        f"  - 'http://{host}/ducc/pinned@{pinned_img.manifest_digest}'\n"
        f"  - 'http://{host}/ducc/no-such-repository:*'\n"
        "  - 'https://user:secret@example.org/a/b:1'\n")
    proc = lazypod("convert", str(recipe), "--skip-podman", "--skip-thin-image",
                   "--public-root", str(cvmfs.client_view), check=False)
    assert proc.returncode == 3, proc.stderr
    assert "2 of 5 images failed" in proc.stderr and "the others are published" in proc.stderr
    assert "secret" not in proc.stderr + proc.stdout

    view = cvmfs.client_view
    for tag in ("1.0", "1.1"):
        meta = view / ".metadata" / host / "ducc" / f"app:{tag}" / "manifest.json"
        manifest = json.loads(meta.read_bytes())
        for blob in manifest["layers"]:
            hexd = blob["digest"].split(":")[1]
            assert (view / ".layers" / hexd[:2] / hexd / "layerfs").is_dir()
        config_hex = manifest["config"]["digest"].split(":")[1]
        assert link_target(view, f"{host}/ducc/app:{tag}") == \
            f"../../.flat/{config_hex[:2]}/{config_hex}"
    assert not (view / ".metadata" / host / "ducc" / "app:2.0").exists()  # not 1.*
    assert (view / ".metadata" / host / "ducc" / f"pinned@{pinned_img.manifest_digest}"
            / "manifest.json").is_file()
    assert not (view / ".podmanStore").exists()  # --skip-podman
    assert not cvmfs.state()["transaction"]


# -- DUCC's webhook listener ------------------------------------------------------------

def test_the_webhook_listeners_push_command_and_its_notification_file(registry, lazypod,
                                                                     cvmfs):
    """`cvmfs_ducc convert-single-image -n LOG -p IMAGE REPO --skip-thin-image
    --skip-podman`, IMAGE without a scheme: the listener scans LOG for
    `"status":"error"` and retries; here there is none, and the lines it and
    dashboards read are there."""
    insecure(lazypod, registry)
    name = registry.push("ducc/hook", "1", small_image("hook"))
    log = cvmfs.base / "ducc-conversion.log_hook_260101-120000"
    lazypod("convert-single-image", "-n", str(log), "-p", name, cvmfs.name,
            "--skip-thin-image", "--skip-podman", "--public-root", str(cvmfs.client_view))

    lines = notifications(log)
    assert '"status":"error"' not in log.read_text()
    seen = actions(lines)
    assert seen[0] == "start_ducc" and seen[-1] == "end_ducc"
    assert lines[-1]["status"] == "ok" and lines[-1]["exit_code"] == "0"
    assert float(lines[-1]["time_elapsed_s"]) > 0
    assert lines[0]["pid"] == lines[-1]["pid"]
    starts = [line for line in lines if line["action"] == "start_layer_conversion"]
    ends = {line["id"]: line for line in lines if line["action"] == "end_layer_conversion"}
    assert len(starts) == 2 and {s["id"] for s in starts} == set(ends)
    for start in starts:
        end = ends[start["id"]]
        assert end["status"] == "ok" and int(end["size_bytes"]) > 0
        assert end["image"] == start["image"] == f"{registry.host}/ducc/hook:1"
        assert re.fullmatch(r"[0-9a-f]{64}", end["layer"])
    published = {line["layer_digest"] for line in lines if line["action"] == "publish_layer"}
    assert published == {s["layer"] for s in starts}
    flat = [line for line in lines if line["action"] == "publish_flat_image"]
    assert [f["public_path"] for f in flat] == [f"{registry.host}/ducc/hook:1"]
    assert flat[0]["private_path"].startswith(".flat/")
    assert link_target(cvmfs.client_view, flat[0]["public_path"]).endswith(
        flat[0]["private_path"])
    # Before start_ducc nothing, after end_ducc nothing: one run, one pair.
    assert seen.count("start_ducc") == seen.count("end_ducc") == 1


def test_a_failed_push_conversion_says_error_in_the_notification_file(registry, lazypod,
                                                                     cvmfs):
    insecure(lazypod, registry)
    log = cvmfs.base / "conversion.log"
    proc = lazypod("convert-single-image", "-n", str(log), "-p",
                   f"{registry.host}/ducc/never-pushed:1", cvmfs.name, "--skip-thin-image",
                   "--skip-podman", check=False)
    assert proc.returncode == 1 and proc.stderr.count("lazypod: error") == 1, proc.stderr
    lines = notifications(log)
    assert '"status":"error"' in log.read_text()  # what the listener looks for
    failed = [line for line in lines if line.get("status") == "error"]
    assert {line["action"] for line in failed} == {"end_image_conversion", "end_ducc"}
    assert "not found" in failed[0]["error"]
    assert not cvmfs.state()["transaction"] and cvmfs.counts()["publish"] == 0


def test_the_webhook_listeners_delete_then_gc(registry, lazypod, cvmfs):
    """On a delete the listener removes the link and `.metadata/<image>` in a
    transaction of its own, then runs `garbage-collection --grace-period 0 -n LOG
    REPO`: the image's own layer goes, the shared base stays."""
    insecure(lazypod, registry)
    keep = registry.push("ducc/keep", "1", small_image("keep"))
    gone_img = small_image("gone")
    gone = registry.push("ducc/gone", "1", gone_img)
    for name in (keep, gone):
        lazypod("convert-single-image", "-p", name, cvmfs.name, "--skip-thin-image",
                "--public-root", str(cvmfs.client_view))
    cvmfs.server("transaction", cvmfs.name, check=True)
    shutil.rmtree(cvmfs.server_view / ".metadata" / gone)
    (cvmfs.server_view / gone).unlink()
    cvmfs.server("publish", cvmfs.name, check=True)

    log = cvmfs.base / "gc.log"
    lazypod("garbage-collection", "--grace-period", "0", "-n", str(log), cvmfs.name)
    own = gone_img.layers[1].digest.split(":")[1]
    base = gone_img.layers[0].digest.split(":")[1]
    assert not (cvmfs.client_view / ".layers" / own[:2] / own).exists()
    assert (cvmfs.client_view / ".layers" / base[:2] / base / "layerfs").is_dir()
    assert '"status":"error"' not in log.read_text()
    assert actions(notifications(log)) == ["start_ducc", "end_ducc"]
    assert not cvmfs.state()["transaction"]


def test_the_grace_period_is_in_days(registry, lazypod, repo):
    """DUCC's `--grace-period 7` keeps unused layers a week, not 7 seconds."""
    name = registry.push("ducc/grace", "1", small_image("grace"))
    lazypod.convert(name, repo)
    lazypod("rm", str(repo), name)
    kept = "removed 0 layers and 0 flat trees; 3 kept in the grace period"
    assert kept in lazypod("gc", "--grace-period", "7", str(repo)).stderr
    assert kept in lazypod("gc", "--grace-period", "1h", str(repo)).stderr
    proc = lazypod("garbage-collection", "--grace-period", "0", str(repo))
    assert "removed 2 layers and 1 flat trees; 0 kept" in proc.stderr
    bad = lazypod("gc", "--grace-period", "a week", str(repo), check=False)
    assert bad.returncode == 2 and "give days (7, as DUCC)" in bad.stderr


# -- the repository argument ------------------------------------------------------------

def test_a_bare_name_that_is_not_a_repository_here_is_refused(lazypod, tmp_path, registry):
    """DUCC's argument is always a CVMFS repository: on a machine that does not
    publish it, nothing is converted into ./unpacked.cern.ch."""
    work = tmp_path / "cwd"
    work.mkdir()
    for args in (["convert-single-image", f"{registry.host}/ducc/x:1", "unpacked.cern.ch"],
                 ["garbage-collection", "--dry-run", "unpacked.cern.ch"],
                 ["rm", "unpacked.cern.ch", "busybox"]):
        proc = lazypod(*args, check=False, cwd=work)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
        assert "./unpacked.cern.ch" in proc.stderr and "cvmfs_server mkfs" in proc.stderr
    assert list(work.iterdir()) == []


def test_a_bare_name_this_machine_publishes_is_the_cvmfs_repository(registry, lazypod,
                                                                   cvmfs):
    insecure(lazypod, registry)
    name = registry.push("ducc/bare", "1", small_image("bare"))
    proc = lazypod("convert-single-image", "-p", name, cvmfs.name,
                   "--public-root", str(cvmfs.client_view))
    assert "cvmfs: 2 publishes" in proc.stderr
    listed = lazypod("ls", "--json", str(cvmfs.client_view)).stdout
    assert json.loads(listed)["name"] == name


# -- small commands ------------------------------------------------------------------

def test_check_image_syntax_machine_friendly_is_ducc_csv(lazypod):
    for command in ("check-image-syntax", "check-image", "image-check"):
        proc = lazypod(command, "-z", "https://registry.hub.docker.com/library/redis:4")
        assert proc.stdout == (
            "name,user,scheme,registry,repository,tag,digest,is_thin\n"
            "https://registry.hub.docker.com/library/redis:4,,https,"
            "registry.hub.docker.com,library/redis,4,,false\n")
    digest = "sha256:" + "b1e5" * 16
    proc = lazypod("check-image", "-z", f"registry.hub.docker.com/minio/minio@{digest}")
    assert proc.stdout.splitlines()[1] == (
        f"https://registry.hub.docker.com/minio/minio@{digest},,https,"
        f"registry.hub.docker.com,minio/minio,,{digest},false")
    proc = lazypod("check-image", "https://user:hunter2@example.org/a/b:1", check=False)
    assert proc.returncode == 1 and "credentials" in proc.stderr
    assert "hunter2" not in proc.stderr + proc.stdout


def test_version_and_download_manifest(registry, lazypod):
    for command in ("version", "v"):
        assert lazypod(command).stdout.startswith("lazypod ")
    img = small_image("manifest")
    name = registry.push("ducc/manifest", "1", img)
    for command in ("download-manifest", "get-manifest"):
        proc = lazypod(command, "--insecure-registry", registry.host, f"http://{name}")
        assert json.loads(proc.stdout) == json.loads(img.manifest)
    raw = lazypod("get-manifest", "--raw", "--insecure-registry", registry.host, name).stdout
    assert raw.encode() == img.manifest


# -- conversion flags ----------------------------------------------------------------

def test_wildcards_in_convert_single_image(registry, lazypod, repo):
    for tag in ("v1.0", "v1.1", "v2.0"):
        registry.push("ducc/wild", tag, small_image(f"wild{tag}"))
    lazypod("convert-single-image", "--insecure-registry", registry.host,
            f"{registry.host}/ducc/wild:v1.*", str(repo))
    names = sorted(json.loads(line)["name"] for line in
                   lazypod("ls", "--json", str(repo)).stdout.splitlines())
    assert names == [f"{registry.host}/ducc/wild:v1.0", f"{registry.host}/ducc/wild:v1.1"]


def test_skip_podman_runs_render_what_changed_and_complete_what_a_kill_left(
        registry, lazypod, repo):
    """DUCC's usual `--skip-podman` runs: without a podman store, the public links tell
    which images are rendered; an image whose link a killed run did not write (its
    views half done) is completed by the next run, about another image."""
    first = registry.push("ducc/links", "1", small_image("links1"))
    lazypod.convert(first, repo, "--skip-podman")
    link = repo / first
    target = os.readlink(link)
    origins = sorted(repo.glob(".layers/*/*/.metadata/origin.json"))
    link.unlink()  # as a run killed before its links and origins leaves it
    for origin in origins:
        origin.unlink()

    second = registry.push("ducc/links", "2", small_image("links2"))
    lazypod.convert(second, repo, "--skip-podman")
    assert os.readlink(link) == target
    assert os.readlink(repo / second).startswith("../")
    users = [json.loads(o.read_text())["origin"] for o in origins]
    assert sorted(users) == sorted([[first], sorted([first, second])]), users
    assert (repo / ".metadata/.lazypod-views").exists()
    assert not (repo / ".podmanStore").exists()


def test_overwrite_layers_repairs_a_layer_damaged_on_disk(registry, lazypod, repo):
    img = small_image("overwrite")
    name = registry.push("ducc/overwrite", "1", img)
    lazypod.convert(name, repo)
    own = img.layers[1].digest.split(":")[1]
    damaged = repo / ".layers" / own[:2] / own / "layerfs" / "data" / "overwrite"
    damaged.write_bytes(b"damaged")
    lazypod.convert(name, repo)  # the layer is there: nothing is fetched
    assert damaged.read_bytes() == b"damaged"
    mark = registry.mark()
    lazypod.convert(name, repo, "-f")
    assert damaged.read_bytes() == b"overwrite"
    assert img.layers[1].digest in registry.blob_gets(since=mark)
    assert lazypod("check", str(repo)).returncode == 0


def test_convert_again_asks_the_registry_for_everything(registry, lazypod, repo):
    name = registry.push("ducc/again", "1", small_image("again"))
    lazypod.convert(name, repo)
    mark = registry.mark()
    lazypod.convert(name, repo)
    assert [r.method for r in registry.requests(since=mark)] == ["HEAD"]
    mark = registry.mark()
    lazypod.convert(name, repo, "-g")
    assert "GET" in [r.method for r in registry.requests(since=mark)]
    assert registry.blob_gets(since=mark) == []  # layers present: not fetched again


def test_skip_layers_converts_nothing_new(registry, lazypod, repo):
    name = registry.push("ducc/skip", "1", small_image("skip"))
    proc = lazypod.convert(name, repo, "-d")
    assert "skipped: layer" in proc.stderr and "--skip-layers" in proc.stderr
    assert not (repo / ".metadata").exists() or not any((repo / ".metadata").iterdir())


def test_attempts_try_an_image_again(registry, lazypod, repo):
    name = registry.push("ducc/attempts", "1", small_image("attempts"))
    proxy = FaultyProxy(registry.host)
    try:
        via = name.replace(registry.host, proxy.host)
        proxy.faults.status_times["/manifests/1"] = [404, 1]
        proc = lazypod.convert(via, repo, check=False)
        assert proc.returncode == 1 and "not found" in proc.stderr
        proxy.faults.status_times["/manifests/1"] = [404, 1]
        proc = lazypod.convert(via, repo, "-r", "2")
        assert "trying it again (attempt 2 of 2)" in proc.stderr
    finally:
        proxy.stop()


def test_ducc_no_op_flags_are_accepted(registry, lazypod, repo, tmp_path):
    name = registry.push("ducc/noop", "1", small_image("noop"))
    lazypod.convert(name, repo, "-i", "--thin-image-name", "x/y_thin", "-u", "someone",
                    "-t", str(tmp_path / "tmp"))
    assert lazypod("ls", str(repo)).stdout.startswith(name)


# -- digest-only names -----------------------------------------------------------------

def test_an_image_ducc_named_by_digest_keeps_its_names(registry, lazypod, repo):
    """DUCC publishes `reg/repo@sha256:X` as `.metadata/reg/repo` and the link
    `reg/repo:sha256:X`: converting the same image reuses both, adds no second pair,
    and podman finds it by digest."""
    img = small_image("pinned-ducc")
    registry.push("ducc/minio", "unused", img)
    base = f"{registry.host}/ducc/minio"
    write_ducc_repository(repo, base, img, records_for={0, 1})
    config_hex = img.config_digest.split(":")[1]
    flat = repo / ".flat" / config_hex[:2] / config_hex
    flat.mkdir(parents=True)
    (repo / registry.host / "ducc").mkdir(parents=True)
    link = repo / f"{base}:{img.manifest_digest}"
    link.symlink_to(f"../../.flat/{config_hex[:2]}/{config_hex}")

    lazypod.convert(f"{base}@{img.manifest_digest}", repo)
    assert sorted(p.name for p in (repo / ".metadata" / registry.host / "ducc").iterdir()) \
        == ["minio"]
    assert (repo / ".metadata" / base / "manifest.json").read_bytes() == img.manifest
    assert sorted(p.name for p in (repo / registry.host / "ducc").iterdir()) == \
        [f"minio:{img.manifest_digest}"]
    rows = [json.loads(line) for line in lazypod("ls", "--json", str(repo)).stdout.splitlines()]
    assert [r["podman_name"] for r in rows] == [f"{base}@{img.manifest_digest}"]
    assert lazypod("check", str(repo)).returncode == 0
    lazypod("rm", str(repo), f"{base}@{img.manifest_digest}")
    assert not link.is_symlink() and not (repo / ".metadata" / base).exists()
