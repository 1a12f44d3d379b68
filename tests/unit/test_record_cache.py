"""The record cache (record_cache.py): a second read of a repository parses only the
records whose files changed, and nothing the cache holds is used unless `stat`
confirms it and the cache is the user's own."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import FakeRegistry, convert

from lazypod import IntegrityError, Layout, Platform, record_cache
from lazypod import repository as repository_module
from lazypod.repository import RepositoryState
from lazypod.views.podman_store import build_store_model
from support.images import Entry, image, index, layer

BASE = layer([Entry("etc/", "dir"), Entry("etc/os-release", data=b"ID=test\n")])


pytestmark = pytest.mark.usefixtures("private_cache")  # (conftest.py)


def repository(root: Path) -> tuple[str, str]:
    registry = FakeRegistry()
    a = registry.push("library/a", "1", image([BASE, layer([Entry("a", data=b"a")])]))
    b = registry.push("library/b", "1", image([BASE, layer([Entry("b", data=b"b")])]))
    convert(registry, root, a, b)
    time.sleep(0.02)  # past the clock tick of the last write
    return a, b


class Reads:
    """Counts the record files a load parses."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.images: list[str] = []
        self.layers: list[str] = []
        read_layer = repository_module.read_layer_record

        def counted_read(path: str) -> bytes:
            if path.endswith("manifest.json"):
                self.images.append(path)
            with open(path, "rb") as file:
                return file.read()

        def counted_layer(layer_dir, digest):  # type: ignore[no-untyped-def]
            self.layers.append(str(layer_dir))
            return read_layer(layer_dir, digest)

        monkeypatch.setattr(repository_module, "_read", counted_read)
        monkeypatch.setattr(repository_module, "read_layer_record", counted_layer)


def load(root: Path) -> RepositoryState:
    return RepositoryState.load(Layout(root))


def summary(state: RepositoryState) -> list[tuple[str, str, str | None, tuple[str, ...]]]:
    return [(i.public_name, str(i.manifest.digest),
             str(i.config.digest) if i.config else None,
             tuple(str(b.digest) for b in i.manifest.layers)) for i in state.images]


def test_a_second_read_parses_no_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        private_cache: Path) -> None:
    repository(tmp_path)
    first = load(tmp_path)
    assert list(private_cache.glob("records-*"))
    reads = Reads(monkeypatch)
    second = load(tmp_path)
    assert reads.images == [] and reads.layers == []
    assert summary(second) == summary(first)
    assert second.layers == first.layers
    # The raw documents are read from the repository when needed, whole and verified.
    for cached, parsed in zip(second.images, first.images, strict=True):
        assert cached.manifest.raw == parsed.manifest.raw
        assert cached.config is not None and parsed.config is not None
        assert cached.config.raw == parsed.config.raw
        assert cached.config == parsed.config or cached.config.env == parsed.config.env


def test_the_store_model_is_the_same_from_the_cache(tmp_path: Path) -> None:
    repository(tmp_path)
    parsed = build_store_model(load(tmp_path), lambda message: None)
    cached = build_store_model(load(tmp_path), lambda message: None)
    assert [i.entry() for i in cached.images.values()] == \
        [i.entry() for i in parsed.images.values()]


def fields(record: Any) -> tuple[Any, ...]:
    """What a record says, identity first (answered before its build when deferred)."""
    ident = (record.public_name, record.reference, record.podman_name, record.has_config,
             record.image_id, record.manifest_digest, record.layer_digests, record.diff_ids,
             record.record_files)
    m, c, i = record.manifest, record.config, record.index
    return (*ident, m.digest, m.media_type, m.config, m.layers, m.size,
            c and (c.digest, c.diff_ids, c.created, c.env, c.entrypoint, c.cmd,
                   c.working_dir, c.labels, c.size),
            i and (i.digest, i.media_type, i.manifests, i.size))


def test_a_record_from_the_cache_says_what_the_parsed_one_says(tmp_path: Path) -> None:
    # An image of a multi-platform index (index.json), one without layers, and plain
    # ones: identity from the entry's head, the rest from its body.
    registry = FakeRegistry()
    host = Platform.host()
    multi = image([BASE, layer([Entry("m", data=b"m")])], arch=host.architecture)
    names = [registry.push_index("library/multi", "1", index(
        [(multi, "linux", host.architecture, host.variant)]), [multi]),
        registry.push("library/empty", "1", image([])),
        registry.push("library/a", "1", image([BASE]))]
    convert(registry, tmp_path, *names)
    time.sleep(0.02)
    parsed = load(tmp_path)
    cached = load(tmp_path)
    assert all(not i.from_record_cache for i in parsed.images)
    assert all(i.from_record_cache for i in cached.images)
    assert any(i.index is not None for i in parsed.images)
    assert [fields(i) for i in cached.images] == [fields(i) for i in parsed.images]


def test_a_record_rewritten_in_place_is_read_again(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    repository(tmp_path)
    state = load(tmp_path)
    digest, record = next(iter(state.layers.items()))
    path = Layout(tmp_path).layer_dir(digest) / ".metadata" / "layers.json"
    obj = json.loads(path.read_bytes())
    size = str(obj[0]["diff-size"])
    obj[0]["diff-size"] = int(str(int(size[0]) % 9 + 1) + size[1:])  # same length
    text = json.dumps(obj, indent=1).encode() + b"\n"
    assert len(text) == path.stat().st_size
    with open(path, "r+b") as file:  # in place: same inode, same size
        file.write(text)
    reads = Reads(monkeypatch)
    again = load(tmp_path)
    assert again.layers[digest].diff_size == obj[0]["diff-size"] != record.diff_size
    assert reads.layers == [str(Layout(tmp_path).layer_dir(digest))]


def test_added_removed_and_damaged_records_are_seen(tmp_path: Path) -> None:
    a, b = repository(tmp_path)
    load(tmp_path)
    layout = Layout(tmp_path)
    (layout.image_dir(a) / "manifest.json").write_text("{not json")
    removed = next(p for p in (layout.root / ".layers").glob("*/*"))
    (removed / ".metadata" / "layers.json").unlink()
    state = load(tmp_path)
    assert a in state.unreadable and [i.public_name for i in state.images] == [b]
    assert not state.layers[next(d for d in state.layers if d.hex == removed.name)].complete


def test_a_document_changed_after_the_read_is_refused(tmp_path: Path) -> None:
    a, _ = repository(tmp_path)
    load(tmp_path)
    image = load(tmp_path).image(a)
    assert image is not None and image.config is not None
    config = Layout(tmp_path).image_dir(a) / "config.json"
    config.write_bytes(config.read_bytes().replace(b"{", b"{ ", 1))
    with pytest.raises(IntegrityError, match="changed while lazypod was running"):
        image.config.raw  # noqa: B018


def forge(private_cache: Path, diff_size: int) -> None:
    """Change every layer's diff size in the cache, keys left as they are."""
    path = next(private_cache.glob("records-*"))
    lines = path.read_text().split("\n")
    kind = ""
    for i, line in enumerate(lines):
        if line.startswith("@"):
            kind = line[1:]
        elif kind == "layers" and line:
            name, key, payload = line.split("\t")
            data = json.loads(payload)
            data[1] = diff_size
            lines[i] = "\t".join((name, key, json.dumps(data)))
    path.write_text("\n".join(lines))


def test_only_the_users_own_private_cache_is_trusted(tmp_path: Path,
                                                     private_cache: Path) -> None:
    repository(tmp_path)
    load(tmp_path)
    forge(private_cache, 4242)
    # The cache is used (what it says stands while the files are unchanged) ...
    assert {r.diff_size for r in load(tmp_path).layers.values()} == {4242}
    forge(private_cache, 4242)
    cache_file = next(private_cache.glob("records-*"))
    # ... but not when others can write it.
    cache_file.chmod(0o666)
    assert 4242 not in {r.diff_size for r in load(tmp_path).layers.values()}
    cache_file.chmod(0o600)
    private_cache.chmod(0o777)
    forge(private_cache, 4242)
    assert 4242 not in {r.diff_size for r in load(tmp_path).layers.values()}


def test_a_damaged_cache_is_ignored_and_rewritten(tmp_path: Path, private_cache: Path) -> None:
    repository(tmp_path)
    expected = summary(load(tmp_path))
    cache_file = next(private_cache.glob("records-*"))
    whole = cache_file.read_bytes()
    header, _, entries = whole.partition(b"\n")
    damaged = [b"", b"[1]", b'{"format": 5}', b"\xff\xfe", whole[:len(header) + 100],
               header + b"\n@layers\nab\tc\n\t\t\t\n@images\n@x\n",
               header + b"\n" + entries.replace(b"[", b"{")]
    for junk in damaged:
        cache_file.write_bytes(junk)
        assert summary(load(tmp_path)) == expected
        assert json.loads(cache_file.read_bytes().split(b"\n")[0])["format"] == \
            record_cache.FORMAT


def test_the_cache_can_be_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAZYPOD_CACHE_DIR", "off")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    repository(tmp_path / "repo")
    load(tmp_path / "repo")
    assert not (tmp_path / "home").exists()


def test_a_manifest_stored_by_ducc_reads_the_same_from_the_cache(tmp_path: Path) -> None:
    """DUCC re-encodes manifests with Go's field names; lazypod reads its own encoding
    of them, and a cached record must give the same bytes."""
    a, _ = repository(tmp_path)
    path = Layout(tmp_path).image_dir(a) / "manifest.json"
    obj = json.loads(path.read_bytes())

    def upper(value):  # type: ignore[no-untyped-def]
        if isinstance(value, dict):
            return {k[:1].upper() + k[1:]: upper(v) for k, v in value.items()}
        if isinstance(value, list):
            return [upper(v) for v in value]
        return value

    path.write_text(json.dumps(upper(obj)))
    old = os.stat(path).st_mtime_ns - 10**9
    os.utime(path, ns=(old, old))
    time.sleep(0.02)
    parsed = load(tmp_path).image(a)
    cached = load(tmp_path).image(a)
    assert parsed is not None and cached is not None
    assert not isinstance(cached.manifest.body, bytes)  # rebuilt from the cache
    assert cached.manifest.raw == parsed.manifest.raw != path.read_bytes()
    assert cached.manifest.digest == parsed.manifest.digest


def test_check_sees_a_big_data_file_damaged_after_a_clean_check(tmp_path: Path) -> None:
    """`check` hashes the store's big-data files once, then while their `stat` holds."""
    from lazypod.check import check_repository

    repository(tmp_path)
    assert check_repository(tmp_path).ok
    assert check_repository(tmp_path).ok  # from the cache
    config = next((tmp_path / ".podmanStore/overlay-images").glob("*/=*"))
    data = bytearray(config.read_bytes())
    data[-2] ^= 1
    with open(config, "r+b") as file:  # same inode, same size
        file.write(data)
    report = check_repository(tmp_path)
    assert any("big data" in error and "does not match" in error for error in report.errors)


def test_a_command_keeps_the_entries_of_kinds_it_does_not_ask_for(
        tmp_path: Path, private_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ls` reads images and layers only; the file digests `check` keeps survive it."""
    from lazypod.check import check_repository

    a, _ = repository(tmp_path)
    check_repository(tmp_path)

    def digests() -> list[str]:
        text = next(private_cache.glob("records-*")).read_text()
        return [line for line in text.split("\n@digests\n", 1)[1].split("\n") if line]

    kept = digests()
    assert len(kept) >= 4  # big data of two images
    (Layout(tmp_path).image_dir(a) / "config.json").touch()  # ls rewrites the cache
    time.sleep(0.02)
    load(tmp_path)
    assert digests() == kept
    hashed: list[str] = []
    monkeypatch.setattr(record_cache.hashlib, "file_digest",
                        lambda *args: hashed.append("x") or None)  # type: ignore[func-returns-value]
    assert check_repository(tmp_path).ok and hashed == []


def test_a_deep_check_hashes_the_store_files_whatever_the_cache_says(
        tmp_path: Path, private_cache: Path) -> None:
    from lazypod.check import check_repository

    repository(tmp_path)
    assert check_repository(tmp_path).ok
    path = next(private_cache.glob("records-*"))
    head, digests = path.read_text().split("\n@digests\n", 1)
    forged = "\n".join(line[:-64] + "0" * 64 for line in digests.split("\n") if line)
    path.write_text(f"{head}\n@digests\n{forged}")
    assert not check_repository(tmp_path).ok  # the cache is believed while stat holds
    path.write_text(f"{head}\n@digests\n{forged}")
    assert check_repository(tmp_path, deep=True).ok  # --deep hashes again


def test_check_reports_the_same_with_its_store_probes_forked_or_not(tmp_path: Path) -> None:
    """check_repository(parallel=True) forks the podman stores' probes; the report must
    be the one the same checks give in one process, damage included."""
    import shutil

    from lazypod.check import check_repository

    repository(tmp_path)
    store = tmp_path / ".podmanStore"
    big = next((store / "overlay-images").glob("*/manifest"))
    big.write_bytes(big.read_bytes() + b" ")
    next((store / "overlay").glob("*/diff")).unlink()
    next((tmp_path / ".podmanLayers").glob("sha256:*/blob")).unlink()
    images_json = store / "overlay-images/images.json"
    entries = json.loads(images_json.read_text())
    images_json.write_text(json.dumps(entries[:1]))
    shutil.rmtree(Layout(tmp_path).root / ".flat")
    forked = check_repository(tmp_path, parallel=True)
    alone = check_repository(tmp_path, parallel=False)
    assert forked.errors == alone.errors and forked.warnings == alone.warnings
    assert len(forked.errors) >= 5, forked.errors
    assert check_repository(tmp_path, parallel=True).errors == alone.errors  # cached now
