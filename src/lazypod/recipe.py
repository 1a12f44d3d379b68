"""DUCC recipes (wishlists), version 1, parsed unchanged.

    version: 1
    user: smosciat
    cvmfs_repo: unpacked.cern.ch
    output_format: '$(scheme)://registry.gitlab.cern.ch/thin/$(image)'
    input:
      - 'https://registry.hub.docker.com/library/fedora:latest'
      - 'https://gitlab-registry.cern.ch/some/group/image:*'

Entries may name images outside registries as the command line does
(`oci:DIR[:REF]`, `oci-archive:FILE[:REF]`, `containers-storage:NAME`); a relative
DIR or FILE is relative to the recipe's directory, not to wherever cron runs lazypod.

`output_format` and `user` name DUCC's thin images, which lazypod does not
push; they are accepted and reported, not used. An entry that does not parse is
set aside in `rejected` (DUCC drops it too): one bad line does not stop a wishlist.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import InvalidRecipe, InvalidReference
from .reference import ImageReference, local_reference, parse_reference

__all__ = ["Recipe", "load_recipe"]


@dataclass(frozen=True)
class Recipe:
    path: Path
    version: int
    images: tuple[ImageReference, ...]
    cvmfs_repo: str | None = None
    user: str | None = None
    output_format: str | None = None
    rejected: tuple[tuple[int, str, str], ...] = ()  # (input number, text, why)


def load_recipe(path: Path) -> Recipe:
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise InvalidRecipe(f"cannot read recipe {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise InvalidRecipe(f"recipe {path} is not UTF-8 text (byte {exc.start}): save it "
                            "as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise InvalidRecipe(f"recipe {path} is not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise InvalidRecipe(f"recipe {path} must be a YAML mapping with an 'input' list")
    version = data.get("version", 1)
    if version != 1:
        raise InvalidRecipe(f"recipe {path} has version {version!r}; lazypod reads version 1")
    inputs = data.get("input")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidRecipe(f"recipe {path} needs a non-empty 'input' list of images")
    images = []
    rejected = []
    for number, item in enumerate(inputs, 1):
        if not isinstance(item, str):
            rejected.append((number, str(item), "not a string"))
            continue
        try:
            images.append(_beside(path, parse_reference(item, allow_wildcard=True)))
        except InvalidReference as exc:
            rejected.append((number, item, str(exc)))
    repo = data.get("cvmfs_repo")
    return Recipe(
        path=path,
        version=1,
        images=tuple(images),
        cvmfs_repo=str(repo) if repo else None,
        user=str(data["user"]) if data.get("user") else None,
        output_format=str(data["output_format"]) if data.get("output_format") else None,
        rejected=tuple(rejected),
    )


def _beside(recipe: Path, ref: ImageReference) -> ImageReference:
    """A layout or archive named by a relative path, found beside the recipe."""
    location = ref.source
    if location is None or location.transport not in ("oci", "oci-archive") or \
            Path(location.path).is_absolute():
        return ref
    return local_reference(location.transport, str(recipe.parent / location.path),
                           location.ref)
