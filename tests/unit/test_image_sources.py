"""Image sources other than registries (OCI layouts, OCI archives, podman's storage
through a stand-in podman), the names they publish under, and the registry client's
httpx boundary. No podman, no registry: layouts are built in tmp_path."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tarfile
from pathlib import Path

import httpx
import pytest
from helpers import FakeRegistry, convert, respond, tree

from lazypod import Converter, ConvertOptions, DirectoryBackend
from lazypod.errors import (
    IntegrityError,
    InvalidReference,
    RegistryError,
    SourceError,
    UnsupportedImage,
)
from lazypod.manifest import Platform
from lazypod.recipe import load_recipe
from lazypod.reference import parse_reference
from lazypod.sources import LayoutSource, PodmanStorageSource, Sources
from support.images import (
    Entry,
    Image,
    LayoutEntry,
    archive_oci_layout,
    busybox_entries,
    image,
    layer,
    write_oci_layout,
)

AMD64 = Platform("linux", "amd64")


def app_image(label: str = "app", arch: str = "amd64") -> Image:
    return image([layer(busybox_entries()), layer([Entry("app", data=label.encode())])],
                 label=label, arch=arch)


def files(root: Path) -> dict[str, bytes]:
    """Every file of a repository (for "left as before"), links as their targets."""
    out: dict[str, bytes] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            if name == ".lazypod.lock":
                continue
            if path.is_symlink():
                out[rel] = os.readlink(path).encode()
            elif path.is_file():
                out[rel] = path.read_bytes()
            else:
                out[rel] = b"<dir>"
    return out


def run(root: Path, *names: str, platform: Platform | None = None) -> tuple[list[str], list[str]]:
    """Convert `names` with the sources the CLI uses (the registry is never asked);
    (the names images were published as, the errors)."""
    with FakeRegistry().client() as registry, Sources(registry) as sources:
        report = Converter(DirectoryBackend(root), sources,
                           ConvertOptions(workers=2, platform=platform)).convert(
            [parse_reference(n, allow_wildcard=True) for n in names])
    published = [r.reference.public_name for r in report.images if r.ok]
    errors = [r.error for r in report.images if r.error] + [r.error for r in report.rejected]
    return published, [str(e) for e in errors]


# -- names ----------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "published", "shown"), [
    ("oci:/srv/build/App_1", "localhost/app_1:latest", "oci:/srv/build/App_1"),
    ("oci:/srv/build/app:1.0", "localhost/app:1.0", "oci:/srv/build/app:1.0"),
    ("oci:/srv/x:quay.io/team/app:2", "quay.io/team/app:2", "oci:/srv/x:quay.io/team/app:2"),
    ("oci:/srv/x:team/app", "localhost/team/app:latest", "oci:/srv/x:team/app"),
    ("oci:/srv/x:app:3", "localhost/app:3", "oci:/srv/x:app:3"),
    ("oci-archive:/tmp/my.app.tar", "localhost/my.app:latest", "oci-archive:/tmp/my.app.tar"),
    ("oci-archive:/tmp/x.tar:localhost:5000/a/b:1", "localhost:5000/a/b:1",
     "oci-archive:/tmp/x.tar:localhost:5000/a/b:1"),
    ("containers-storage:app", "localhost/app:latest", "containers-storage:localhost/app:latest"),
    ("containers-storage:docker.io/library/busybox:1", "docker.io/library/busybox:1",
     "containers-storage:docker.io/library/busybox:1"),
])
def test_a_source_reference_is_published_under_a_name_it_gives_alone(text, published, shown):
    ref = parse_reference(text)
    assert ref.public_name == published
    assert ref.podman_name == published
    assert str(ref) == shown
    assert parse_reference("docker://quay.io/team/app:2").source is None  # the registry
    # A registry whose host is named like a transport keeps its images' names.
    assert parse_reference("oci:5000/app:1").podman_name == "oci:5000/app:1"
    assert parse_reference("oci:./5000/app:1").public_name == "localhost/app:1"


@pytest.mark.parametrize(("text", "why"), [
    ("oci:", "needs a directory path"),
    ("oci:/srv/x:", "nothing after the second ':'"),
    ("oci:/srv/x:v*", "wildcards only in recipes"),
    ("oci:/srv/x:Bad Tag", "neither a tag nor an image name"),
    ("oci:/srv/x:docker://quay.io/a:1", "is a URL"),
    ("oci-archive:/tmp/***.tar", "cannot name the image"),
    ("containers-storage:[overlay@/var/lib/x]app", "[driver@root]"),
    ("containers-storage:", "give the image's name"),
])
def test_a_malformed_source_reference_is_one_clear_error(text, why):
    with pytest.raises(InvalidReference, match=re.escape(why)):
        parse_reference(text)


def test_a_wildcard_matches_the_layouts_ref_names(tmp_path):
    layout = write_oci_layout(tmp_path / "multi", [
        LayoutEntry(app_image("one"), "v1"), LayoutEntry(app_image("two"), "v2"),
        LayoutEntry(app_image("other"), "other")])
    ref = parse_reference(f"oci:{layout}:v*", allow_wildcard=True)
    expanded = LayoutSource().expand(ref)
    assert [r.public_name for r in expanded] == ["localhost/multi:v1", "localhost/multi:v2"]
    assert [str(r) for r in expanded] == [f"oci:{layout}:v1", f"oci:{layout}:v2"]


def test_a_recipe_finds_a_relative_layout_beside_itself(tmp_path):
    recipe = tmp_path / "wishlist.yaml"
    recipe.write_text("version: 1\ninput:\n  - 'oci:build/app:1'\n  - 'oci-archive:/abs.tar'\n"
                      "  - 'docker.io/library/busybox:1'\n")
    images = load_recipe(recipe).images
    assert [str(i) for i in images] == [f"oci:{tmp_path}/build/app:1", "oci-archive:/abs.tar",
                                        "docker.io/library/busybox:1"]
    assert images[0].public_name == "localhost/app:1"


# -- layouts --------------------------------------------------------------------------

def test_an_oci_layout_converts_as_the_same_image_from_a_registry(tmp_path):
    img = app_image()
    layout = write_oci_layout(tmp_path / "layout", [LayoutEntry(img, "quay.io/team/app:1")])
    published, errors = run(tmp_path / "from-layout", f"oci:{layout}")
    assert errors == [] and published == ["quay.io/team/app:1"]

    registry = FakeRegistry()
    registry.push("team/app", "1", img)
    convert(registry, tmp_path / "from-registry", "registry.test/team/app:1")

    for blob in img.layers:
        rel = Path(".layers", blob.digest[7:9], blob.digest[7:], "layerfs")
        from_layout = tree(tmp_path / "from-layout" / rel)
        assert from_layout == tree(tmp_path / "from-registry" / rel)
        assert from_layout  # not two empty trees
    meta = tmp_path / "from-layout/.metadata/quay.io/team/app:1"
    assert (meta / "manifest.json").read_bytes() == img.manifest
    assert (meta / "config.json").read_bytes() == img.config.data
    link = tmp_path / "from-layout/quay.io/team/app:1"
    assert (link / "app").read_text() == "app"


def test_a_layout_without_ref_publishes_its_only_image_by_its_annotation_or_its_own_name(
        tmp_path):
    named = write_oci_layout(tmp_path / "named", [LayoutEntry(app_image(), "localhost/x:7")])
    unnamed = write_oci_layout(tmp_path / "Unnamed", [LayoutEntry(app_image("u"))])
    tagged = write_oci_layout(tmp_path / "tagged", [LayoutEntry(app_image("t"), "2.0")])
    published, errors = run(tmp_path / "repo", f"oci:{named}", f"oci:{unnamed}",
                            f"oci:{tagged}")
    assert errors == []
    assert published == ["localhost/x:7", "localhost/unnamed:latest", "localhost/tagged:2.0"]


def test_a_rerun_reads_nothing_but_the_index(tmp_path):
    layout = write_oci_layout(tmp_path / "layout", [LayoutEntry(app_image(), "1")])
    run(tmp_path / "repo", f"oci:{layout}:1")
    before = files(tmp_path / "repo")
    for blob in (tmp_path / "layout/blobs/sha256").iterdir():
        blob.write_bytes(b"")  # a rerun that read any blob would fail its digest
        blob.chmod(0)  # (or, not as root, fail to open it)
    published, errors = run(tmp_path / "repo", f"oci:{layout}:1")
    assert errors == [] and published == ["localhost/layout:1"]
    assert files(tmp_path / "repo") == before


def test_two_sources_of_one_name_in_a_run_convert_the_first_and_reject_the_second(tmp_path):
    first = write_oci_layout(tmp_path / "a" / "app", [LayoutEntry(app_image("first"))])
    second = write_oci_layout(tmp_path / "b" / "app", [LayoutEntry(app_image("second"))])
    published, errors = run(tmp_path / "repo", f"oci:{first}", f"oci:{second}", f"oci:{first}")
    assert published == ["localhost/app:latest"]
    assert errors == [f"oci:{second} would be published as localhost/app:latest, as "
                      f"oci:{first} is: give one of them another name (REF)"]
    assert (tmp_path / "repo/localhost/app:latest/app").read_text() == "first"


def test_platforms_are_chosen_in_a_nested_index_and_in_index_json_itself(tmp_path):
    amd, arm = app_image("amd64"), app_image("arm64", arch="arm64")
    nested = write_oci_layout(tmp_path / "nested", [LayoutEntry(
        ref_name="1", children=[(amd, "linux", "amd64", None), (arm, "linux", "arm64", "v8")])])
    flat = write_oci_layout(tmp_path / "flat", [
        LayoutEntry(amd, "1", platform=("linux", "amd64")),
        LayoutEntry(arm, "1", platform=("linux", "arm64"))])
    source = LayoutSource()
    for layout in (nested, flat):
        for platform, img in ((AMD64, amd), (Platform("linux", "arm64"), arm)):
            index, manifest = source.resolve_manifest(parse_reference(f"oci:{layout}:1"),
                                                      platform)
            assert manifest.raw == img.manifest
            assert (index is not None) == (layout == nested)
    _, errors = run(tmp_path / "repo", f"oci:{nested}:1", platform=Platform("linux", "arm64"))
    assert errors == []
    assert (tmp_path / "repo/localhost/nested:1/app").read_text() == "arm64"
    assert json.loads((tmp_path / "repo/.metadata/localhost/nested:1/index.json").read_text())


def test_an_oci_archive_is_read_in_place_and_converts_as_its_directory(tmp_path):
    img = app_image()
    layout = write_oci_layout(tmp_path / "layout", [LayoutEntry(img, "quay.io/team/app:1")])
    archive = archive_oci_layout(layout, tmp_path / "app.tar")
    published, errors = run(tmp_path / "repo", f"oci-archive:{archive}")
    assert errors == [] and published == ["quay.io/team/app:1"]
    assert (tmp_path / "repo/quay.io/team/app:1/app").read_text() == "app"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.tar", "layout", "repo"]

    source = LayoutSource()
    ref = parse_reference(f"oci-archive:{archive}:quay.io/team/app:1")
    _, manifest = source.resolve_manifest(ref, AMD64)
    with source.open_blob(ref, manifest.layers[1]) as blob:
        data = blob.read(-1)
        blob.drain()
    assert data == img.layers[1].data
    assert source.head_digest(ref) is not None and str(source.head_digest(ref)) == \
        img.manifest_digest
    source.close()


# -- bad input: one error, the repository as before ---------------------------------

def corrupt_blob(layout: Path, digest: str) -> None:
    path = layout / "blobs/sha256" / digest[7:]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def hostile(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = 4
    return info


def bad_inputs(tmp_path: Path) -> list[tuple[str, str]]:
    img = app_image("bad")
    good = write_oci_layout(tmp_path / "good", [LayoutEntry(img, "1")])
    two = write_oci_layout(tmp_path / "two", [LayoutEntry(app_image("a"), "a"),
                                              LayoutEntry(app_image("b"), "b")])
    corrupt = write_oci_layout(tmp_path / "corrupt", [LayoutEntry(img, "1")])
    corrupt_blob(corrupt, img.config_digest)  # a layer would fail its gzip CRC first
    missing = write_oci_layout(tmp_path / "missing", [LayoutEntry(img, "1")])
    (missing / "blobs/sha256" / img.layers[1].digest[7:]).unlink()  # [0]: the seed has it
    archive = archive_oci_layout(good, tmp_path / "good.tar")
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(archive.read_bytes()[:len(archive.read_bytes()) // 2])
    (tmp_path / "plain").mkdir()
    (tmp_path / "notatar.tar").write_bytes(b"hello" * 1000)
    return [
        (f"oci:{tmp_path}/nowhere", "no such directory"),
        (f"oci:{tmp_path}/plain", "not an OCI image layout"),
        (f"oci:{good}:2", "no image named '2'"),
        (f"oci:{two}", "holds 2 images: name one as oci:"),
        (f"oci:{corrupt}:1", "does not match its digest"),
        (f"oci:{missing}:1", "is missing from the layout"),
        (f"oci-archive:{tmp_path}/nowhere.tar", "no such file"),
        (f"oci-archive:{truncated}", "truncated"),
        (f"oci-archive:{tmp_path}/notatar.tar", "not a tar archive"),
        (f"oci-archive:{archive_oci_layout(good, tmp_path / 'dotdot.tar', [hostile('../../x')])}",
         "member named '../../x'"),
        (f"oci-archive:{archive_oci_layout(good, tmp_path / 'abs.tar', [hostile('/etc/x')])}",
         "member named '/etc/x'"),
    ]


def test_bad_input_is_one_error_and_leaves_the_repository_as_before(tmp_path):
    repo = tmp_path / "repo"
    seed = write_oci_layout(tmp_path / "seed", [LayoutEntry(app_image("seed"), "1")])
    assert run(repo, f"oci:{seed}:1")[1] == []
    before = files(repo)
    for text, message in bad_inputs(tmp_path):
        published, errors = run(repo, text)
        assert published == [] and len(errors) == 1, (text, errors)
        assert message in errors[0], (text, errors)
        assert "\n" not in errors[0]
        assert files(repo) == before, text
    assert not (tmp_path / "x").exists() and not Path("/etc/x").exists()


def test_a_blob_that_is_not_what_its_descriptor_says_is_refused_when_read(tmp_path):
    img = app_image()
    layout = write_oci_layout(tmp_path / "layout", [LayoutEntry(img, "1")])
    source = LayoutSource()
    ref = parse_reference(f"oci:{layout}:1")
    _, manifest = source.resolve_manifest(ref, AMD64)
    corrupt_blob(layout, img.layers[0].digest)
    with pytest.raises(IntegrityError, match=f"oci:{layout} is damaged"), \
            source.open_blob(ref, manifest.layers[0]) as blob:
        blob.drain()
    # A manifest whose bytes do not match the index's descriptor is never parsed.
    corrupt_blob(layout, img.manifest_digest)
    with pytest.raises(IntegrityError):
        LayoutSource().resolve_manifest(ref, AMD64)


def test_a_fifo_planted_as_a_blob_is_refused_not_waited_for(tmp_path):
    img = app_image()
    layout = write_oci_layout(tmp_path / "layout", [LayoutEntry(img, "1")])
    config = layout / "blobs/sha256" / img.config_digest[7:]
    config.unlink()
    os.mkfifo(config)
    published, errors = run(tmp_path / "repo", f"oci:{layout}:1")
    assert published == [] and "is not a regular file" in errors[0]


def test_a_layout_is_not_a_way_to_other_files_of_the_machine(tmp_path):
    img = app_image()
    outside = write_oci_layout(tmp_path / "outside", [LayoutEntry(img, "1")])
    for name, link in (("blob", f"blobs/sha256/{img.config_digest[7:]}"),
                       ("dir", "blobs/sha256")):
        layout = write_oci_layout(tmp_path / name, [LayoutEntry(img, "1")])
        target = layout / link
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()
        target.symlink_to(outside / link)
        published, errors = run(tmp_path / "repo", f"oci:{layout}:1")
        assert published == [] and "symbolic link or not a directory: refused" in errors[0]
    index = json.loads((outside / "index.json").read_text())
    index["manifests"][0]["digest"] = "sha256:../../../../etc/passwd"
    (outside / "index.json").write_text(json.dumps(index))
    published, errors = run(tmp_path / "repo", f"oci:{outside}:1")
    assert published == [] and errors[0].startswith(f"oci:{outside}: index.json: invalid digest")


# -- containers-storage, through a stand-in podman -----------------------------------

STAND_IN = """
import shutil, sys
args = sys.argv[1:]
assert args[:4] == ["image", "save", "--format", "oci-archive"], args
if args[-1] != "localhost/app:latest":
    sys.exit("Error: localhost/nothere:latest: image not known")
shutil.copy(sys.argv[0] + ".tar", args[5])
"""


def test_containers_storage_reads_what_podman_saves_and_cleans_up(tmp_path):
    img = app_image()
    layout = write_oci_layout(tmp_path / "layout", [LayoutEntry(img, "localhost/app:latest")])
    script = tmp_path / "podman.py"
    script.write_text(STAND_IN)
    archive_oci_layout(layout, Path(f"{script}.tar"))
    work = tmp_path / "work"
    work.mkdir()
    source = PodmanStorageSource([sys.executable, str(script)], work_dir=work)
    ref = parse_reference("containers-storage:app")
    _, manifest = source.resolve_manifest(ref, AMD64)
    assert manifest.raw == img.manifest
    assert source.get_config(ref, manifest).raw == img.config.data
    assert len(list(work.iterdir())) == 1
    with pytest.raises(SourceError, match="podman could not save it: localhost/nothere"):
        source.resolve_manifest(parse_reference("containers-storage:nothere"), AMD64)
    source.close()
    assert list(work.iterdir()) == []
    missing = PodmanStorageSource([str(tmp_path / "no-podman")], work_dir=work)
    with pytest.raises(SourceError, match="podman is not installed"):
        missing.resolve_manifest(ref, AMD64)
    missing.close()


# -- the registry client: a registry image only, httpx's errors translated ----------

def test_the_registry_client_refuses_a_reference_that_is_not_a_registry_image():
    with FakeRegistry().client() as client, pytest.raises(UnsupportedImage,
                                                          match="not a registry image"):
        client.resolve(parse_reference("oci:/srv/x:1"))


def redirect_loop(request: httpx.Request) -> httpx.Response | None:
    if "/manifests/" in request.url.path:
        return httpx.Response(302, headers={"Location": str(request.url)})
    return None


def bad_realm(request: httpx.Request) -> httpx.Response | None:
    return httpx.Response(401, headers={"WWW-Authenticate":
                                        'Bearer realm="http://[::1/token"'})


def bad_link(request: httpx.Request) -> httpx.Response | None:
    if request.url.path.endswith("/tags/list") and "last" not in str(request.url):
        return respond(200, b'{"tags": ["1"]}',
                       {"Link": '<https://registry.test/v2/team/app/tags/list?last=\x01>; '
                                'rel="next"'})
    return None


@pytest.mark.parametrize("fault", [redirect_loop, bad_realm, bad_link])
def test_httpx_errors_become_registry_errors(fault):
    registry = FakeRegistry()
    registry.push("team/app", "1", app_image())
    registry.faults.append(fault)
    ref = parse_reference("registry.test/team/app:1")
    with registry.client(retry_for=0.1) as client, pytest.raises(RegistryError) as caught:
        if fault is bad_link:
            client.list_tags(ref)
        else:
            client.resolve(ref)
    assert ("\n" not in str(caught.value) and "registry.test" in str(caught.value)) or \
        "realm" in str(caught.value)


def test_sources_send_registry_references_to_the_registry(tmp_path):
    registry = FakeRegistry()
    img = app_image()
    registry.push("team/app", "1", img)
    with registry.client() as client, Sources(client) as sources:
        _, manifest = sources.resolve_manifest(parse_reference("registry.test/team/app:1"))
    assert manifest.raw == img.manifest
    assert hashlib.sha256(manifest.raw).hexdigest() == img.manifest_digest[7:]
