"""Running lazypod as the unprivileged test user."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from .podman import ROOTLESS_USER

SRC = Path(__file__).resolve().parents[2] / "src" / "lazypod"


def user_lazypod(lazypod: str, workdir: Path) -> list[str]:
    """A lazypod command the test user can run. The checkout, and its venv, may sit
    under a directory others cannot enter (/root is 0700): then lazypod and what it
    needs at run time are copied where the user can read them, and run with the
    system's Python (the venv's own interpreter)."""
    if subprocess.run(["runuser", "-u", ROOTLESS_USER, "--", "test", "-x", lazypod],
                      check=False).returncode == 0:
        return [lazypod]
    site = workdir / "site"
    for dist in _runtime_distributions():
        for file in dist.files or ():
            # Install records name console scripts ../../../bin/NAME: not needed here
            # (lazypod runs with -c), and they would land outside workdir.
            if ".." in file.parts or "__pycache__" in file.parts:
                continue
            source = Path(str(dist.locate_file(file)))
            if source.is_file():
                target = site / file
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
    shutil.copytree(SRC, site / "lazypod", dirs_exist_ok=True)
    for dirpath, dirnames, filenames in os.walk(workdir):
        for name in dirnames + filenames:
            os.chmod(os.path.join(dirpath, name), 0o755)
    os.chmod(workdir, 0o755)
    python = os.path.realpath(sys.executable)
    code = f"import sys; sys.path.insert(0, {str(site)!r}); from lazypod.cli import main; main()"
    return [python, "-c", code]


def _runtime_distributions() -> list[metadata.Distribution]:
    found: dict[str, metadata.Distribution] = {}
    todo = [req for req in metadata.distribution("lazypod").requires or ()
            if "extra ==" not in req]
    while todo:
        name = re.split(r"[ ;<>=!~\[(]", todo.pop(), maxsplit=1)[0]
        key = name.lower().replace("_", "-")
        if key in found:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # a requirement whose marker excludes this Python
        found[key] = dist
        todo += [req for req in dist.requires or () if "extra ==" not in req]
    return list(found.values())
