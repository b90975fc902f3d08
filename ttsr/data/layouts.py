"""Dataset folder layouts, recognised in one place for training, validation and evaluation.

- CUFED5 (test): ``NNN_0.png`` is an HR image, ``NNN_1.png`` .. ``NNN_5.png`` its references from
  most (1) to least (5) similar (any image suffix).
- CUFED (training): ``root/input/NAME.png`` HR images with ``root/ref/NAME.*`` references.
- Real pairs: sub-folders ``NAME/`` with ``target.png`` (HR) and ``ref.png`` (its reference).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ttsr.imaging import IMAGE_SUFFIXES, InputError, list_images

#: CUFED5 reference levels, most similar first.
CUFED5_LEVELS = (1, 2, 3, 4, 5)
_CUFED5_HR = re.compile(r"^(\d+)_0$")
TARGET_STEM = "target"
REFERENCE_STEM = "ref"


@dataclass(frozen=True)
class LayoutEntry:
    """One HR image of a layout and its references."""

    name: str
    hr: Path
    references: tuple[Path, ...]


def is_cufed5_layout(folder: str | Path) -> bool:
    """Whether ``folder`` holds CUFED5-style ``NNN_0.png`` HR images."""
    return any(_CUFED5_HR.match(p.stem) for p in list_images(folder))


def cufed5_entries(folder: str | Path, levels: Sequence[int] = (1,)) -> list[LayoutEntry]:
    """The HR images of a CUFED5 folder, each with its references at ``levels`` (in order);
    :class:`~ttsr.imaging.InputError` if one is missing or there is no HR image."""
    for level in levels:
        if level not in CUFED5_LEVELS:
            raise InputError(f"CUFED5 reference levels are 1..5, got {level}")
    images = {p.stem: p for p in list_images(folder)}
    entries = []
    for stem in sorted(images):
        match = _CUFED5_HR.match(stem)
        if not match:
            continue
        name = match.group(1)
        missing = [f"{name}_{level}" for level in levels if f"{name}_{level}" not in images]
        if missing:
            raise InputError(f"{folder}: reference {missing[0]} of {stem} is missing")
        references = tuple(images[f"{name}_{level}"] for level in levels)
        entries.append(LayoutEntry(name, images[stem], references))
    if not entries:
        raise InputError(f"{folder} holds no CUFED5-style NNN_0.png images")
    return entries


def cufed_train_entries(root: str | Path) -> list[LayoutEntry]:
    """The HR images of a CUFED training root (``input/``), each with its ``ref/`` image."""
    root = Path(root)
    entries = []
    for path in list_images(root / "input", nonempty=True):
        matches = sorted(
            p for p in (root / "ref").glob(path.stem + ".*") if p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not matches:
            raise InputError(f"{path}: no reference {root / 'ref' / path.stem}.* for it")
        entries.append(LayoutEntry(path.stem, path, (matches[0],)))
    return entries


@dataclass(frozen=True)
class PairItem:
    """One pair: its name, the HR target and the real reference."""

    name: str
    target: Path
    reference: Path


def _find(folder: Path, stem: str) -> Path | None:
    found = [p for p in folder.iterdir() if p.stem == stem and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found)[0] if found else None


def is_pairs_layout(folder: Path) -> bool:
    """Whether ``folder`` has a sub-folder holding a ``target`` image."""
    return any(p.is_dir() and _find(p, TARGET_STEM) for p in Path(folder).iterdir())


def pairs_folder_items(folder: Path) -> list[PairItem]:
    """The pairs of ``folder`` (sub-folders with ``target.png`` and ``ref.png``), by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder of pairs (NAME/target.png + NAME/ref.png)")
    items = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        target, reference = _find(sub, TARGET_STEM), _find(sub, REFERENCE_STEM)
        if target is None and reference is None:
            continue  # not a pair (e.g. a folder of notes)
        if target is None or reference is None:
            missing = f"{TARGET_STEM}.png" if target is None else f"{REFERENCE_STEM}.png"
            raise InputError(f"{sub} has no {missing}: each pair needs target.png and ref.png")
        items.append(PairItem(sub.name, target, reference))
    if not items:
        raise InputError(
            f"{folder} holds no pairs: expected sub-folders NAME/ with target.png and ref.png"
        )
    return items
