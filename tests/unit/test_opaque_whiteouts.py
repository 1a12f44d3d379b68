"""Which whiteouts make an opaque directory opaque without a marker (views.opaque)."""

from __future__ import annotations

import stat

from lazypod.digest import Digest
from lazypod.views.flat_tree import FlatTree, LayerScan, Node, merge_layers
from lazypod.views.opaque import missing_whiteouts

D = Digest("sha256", "0" * 64)


def scan(*entries: tuple[str, str], whiteouts: tuple[str, ...] = (),
         opaque: tuple[str, ...] = ()) -> LayerScan:
    nodes = []
    for path, kind in entries:
        mode = stat.S_IFDIR | 0o755 if kind == "dir" else stat.S_IFREG | 0o644
        nodes.append(Node(mode, layer="0" * 64, path=path.encode()))
    return LayerScan(D, nodes, [w.encode() for w in whiteouts], [o.encode() for o in opaque])


def lower(*scans: LayerScan) -> FlatTree:
    return merge_layers(list(scans), FlatTree({}, {}))


def test_every_name_below_an_opaque_directory_is_whited_out():
    below = lower(scan(("opt", "dir"), ("opt/a", "file"), ("opt/b", "dir"), ("opt/b/c", "file"),
                       ("etc", "dir"), ("etc/x", "file")))
    upper = scan(("opt", "dir"), ("opt/new", "file"), opaque=("opt",))
    assert missing_whiteouts(below, upper, (b"opt",)) == {b"opt/a", b"opt/b"}


def test_directories_on_both_sides_are_completed_inside():
    below = lower(scan(("opt", "dir"), ("opt/b", "dir"), ("opt/b/c", "file"),
                       ("opt/b/d", "dir"), ("opt/b/d/e", "file"), ("opt/f", "file")))
    upper = scan(("opt", "dir"), ("opt/b", "dir"), ("opt/b/mine", "file"), ("opt/f", "dir"),
                 opaque=("opt",))
    # opt/b merges with the lower opt/b: hide what only lies below; opt/f replaces a
    # file with a directory (no merge): nothing to hide inside it.
    assert missing_whiteouts(below, upper, (b"opt",)) == {b"opt/b/c", b"opt/b/d"}


def test_names_already_whited_out_or_from_several_lower_layers():
    below = lower(scan(("opt", "dir"), ("opt/a", "file")),
                  scan(("opt", "dir"), ("opt/z", "file"), whiteouts=("opt/a",)))
    upper = scan(("opt", "dir"), whiteouts=("opt/z",), opaque=("opt",))
    assert missing_whiteouts(below, upper, (b"opt",)) == set()


def test_an_opaque_layer_root_hides_the_whole_lower_tree():
    below = lower(scan(("bin", "dir"), ("bin/sh", "file"), ("etc", "dir")))
    upper = scan(("etc", "dir"), opaque=("",))
    assert missing_whiteouts(below, upper, (b"",)) == {b"bin"}
