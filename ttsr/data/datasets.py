"""Datasets: CUFED training pairs, CUFED5 test sets, photos with synthetic references, and
validation folders. Every sample is a dict of ``[3, H, W]`` tensors in [-1, 1] made by
:mod:`ttsr.data.degradation`: ``lr``, ``lrsr`` (LR bicubic x4 up), ``hr``, ``ref``, ``refsr``
(reference down-up); evaluation samples add ``name`` (the HR file's stem) and ``reference`` (how
the reference was chosen: ``"lr"``, ``"hr"``, ``"ref"`` or ``"level1"`` .. ``"level5"``).

Files are checked when a dataset is built: a missing folder or an unreadable image raises a
``ValueError`` that names the path, before any worker starts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ttsr.data.degradation import (
    SCALE,
    crop_to_multiple,
    lr_from_hr,
    reference_pair,
    to_tensor,
    upsample,
)
from ttsr.data.real_degradation import DegradationOptions, LRCorruption, degrade
from ttsr.data.synthetic import SyntheticOptions, synthesize_pair
from ttsr.imaging import IMAGE_SUFFIXES, image_size, list_images, load_rgb

log = logging.getLogger(__name__)

#: Smallest HR side for evaluation: the LR-as-reference needs a 4-pixel LR.
MIN_EVAL_SIDE = 4 * SCALE
#: Reference modes of :class:`ValidationDataset` besides a folder of references.
REFERENCE_MODES = ("lr", "hr")

Sample = dict[str, Tensor]


def sample_rng() -> np.random.Generator:
    """A numpy generator seeded from torch's RNG, which DataLoader seeds in every worker."""
    return np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))


def random_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random ``size x size`` crop of an ``HxWxC`` array at least that large."""
    height, width = image.shape[:2]
    top = int(rng.integers(0, height - size + 1))
    left = int(rng.integers(0, width - size + 1))
    return image[top : top + size, left : left + size]


def fit_to_square(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Random crop to ``size x size``, mirroring the border where the image is smaller."""
    height, width = image.shape[:2]
    pad_y, pad_x = max(0, size - height), max(0, size - width)
    if pad_y or pad_x:
        image = np.pad(image, ((0, pad_y), (0, pad_x), (0, 0)), mode="symmetric")
    return random_crop(image, size, rng)


def augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random horizontal and vertical flips and a random multiple of 90 degrees of rotation."""
    if rng.random() < 0.5:
        image = image[:, ::-1]
    if rng.random() < 0.5:
        image = image[::-1]
    return np.ascontiguousarray(np.rot90(image, int(rng.integers(0, 4))))


def make_sample(
    hr: np.ndarray,
    ref: np.ndarray,
    degradation: DegradationOptions | None = None,
    rng: np.random.Generator | None = None,
) -> Sample:
    """Degrade ``hr`` and ``ref`` (``HxWx3`` uint8) into a TTSR sample.

    Without ``degradation`` the LR is the research protocol's PIL bicubic x4; with it, a random
    real-world degradation (:func:`ttsr.data.real_degradation.degrade`, drawn from ``rng``).
    The reference side is always the protocol's (its own degradations are made with it).
    """
    if degradation is None:
        hr, lr, lrsr = lr_from_hr(hr)
    else:
        if rng is None:
            raise ValueError("a random degradation needs its rng")
        hr = crop_to_multiple(hr)
        lr = degrade(hr, degradation, rng)
        lrsr = upsample(lr)
    ref, refsr = reference_pair(ref)
    return {
        "lr": to_tensor(lr),
        "lrsr": to_tensor(lrsr),
        "hr": to_tensor(hr),
        "ref": to_tensor(ref),
        "refsr": to_tensor(refsr),
    }


def _check_patch_size(patch_size: int) -> None:
    if patch_size <= 0 or patch_size % (4 * SCALE):
        raise ValueError(
            f"patch_size must be a positive multiple of {4 * SCALE} (LR patches then have sides "
            f"that are multiples of 4), got {patch_size}"
        )


class CufedTrainDataset(Dataset):
    """CUFED training layout: ``root/input/NAME.png`` (HR) with ``root/ref/NAME.png``.

    HR images are cropped at random to ``patch_size`` (CUFED's are 160x160); references are
    cropped or border-mirrored to ``patch_size`` so that a batch stacks. With ``augment``, the
    (LR, LR-up, HR) group and the (Ref, Ref-down-up) group get independent random flips and
    90-degree rotations.
    """

    def __init__(
        self,
        root: str | Path,
        patch_size: int = 160,
        augment: bool = True,
        degradation: DegradationOptions | None = None,
    ) -> None:
        _check_patch_size(patch_size)
        root = Path(root)
        self.patch_size = patch_size
        self.augment = augment
        self.degradation = degradation
        self.inputs = list_images(root / "input", nonempty=True)
        self.refs = []
        for path in self.inputs:
            matches = [
                p
                for p in (root / "ref").glob(path.stem + ".*")
                if p.suffix.lower() in IMAGE_SUFFIXES
            ]
            if not matches:
                raise ValueError(f"{path}: no reference {root / 'ref' / path.stem}.* for it")
            self.refs.append(matches[0])
        for path in self.inputs:
            height, width = image_size(path, verify=True)
            if min(width, height) < patch_size:
                raise ValueError(
                    f"{path}: {width}x{height} is smaller than patch_size {patch_size}"
                )
        for path in self.refs:
            image_size(path, verify=True)

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> Sample:
        rng = sample_rng()
        hr = random_crop(load_rgb(self.inputs[index]), self.patch_size, rng)
        ref = fit_to_square(load_rgb(self.refs[index]), self.patch_size, rng)
        if self.augment:
            hr, ref = augment(hr, rng), augment(ref, rng)
        return make_sample(hr, ref, self.degradation, rng)


class SyntheticReferenceDataset(Dataset):
    """Photos from one or more folders, each sample with a synthetic reference.

    Every item draws a fresh HR patch and reference (:func:`ttsr.data.synthetic.synthesize_pair`,
    reference side = ``patch_size``), then augments both independently. ``repeats`` visits each
    photo that many times per epoch. Photos smaller than ``patch_size`` are skipped with a
    warning. ``degradation``: a random real-world LR degradation instead of PIL bicubic x4.
    """

    def __init__(
        self,
        folders: str | Path | Sequence[str | Path],
        patch_size: int = 96,
        options: SyntheticOptions | None = None,
        repeats: int = 1,
        augment: bool = True,
        degradation: DegradationOptions | None = None,
    ) -> None:
        _check_patch_size(patch_size)
        if repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {repeats}")
        folders = [folders] if isinstance(folders, str | Path) else list(folders)
        if not folders:
            raise ValueError("no training folders given")
        self.patch_size = patch_size
        self.options = options or SyntheticOptions()
        self.repeats = repeats
        self.augment = augment
        self.degradation = degradation
        self.photos: list[Path] = []
        skipped: list[str] = []
        for folder in folders:
            for path in list_images(folder, nonempty=True):
                height, width = image_size(path, verify=True)
                if min(width, height) < patch_size:
                    skipped.append(path.name)
                else:
                    self.photos.append(path)
        if skipped:
            log.warning(
                "skipped %d photo(s) smaller than patch_size %d: %s",
                len(skipped),
                patch_size,
                ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""),
            )
        if not self.photos:
            raise ValueError(f"no photo of at least {patch_size}x{patch_size} in {folders}")

    def __len__(self) -> int:
        return len(self.photos) * self.repeats

    def __getitem__(self, index: int) -> Sample:
        rng = sample_rng()
        photo = load_rgb(self.photos[index % len(self.photos)])
        pair = synthesize_pair(photo, self.patch_size, self.patch_size, rng, self.options)
        hr, ref = pair.hr, pair.ref
        if self.augment:
            hr, ref = augment(hr, rng), augment(ref, rng)
        return make_sample(hr, ref, self.degradation, rng)


def _evaluation_sample(
    hr: np.ndarray,
    ref: np.ndarray | None,
    name: str,
    reference: str,
    corruption: LRCorruption | None = None,
) -> dict:
    """A full-image sample; ``ref=None`` makes the LR image its own reference. ``corruption``
    is applied to the LR after the bicubic downscale (and so to the LR as reference)."""
    hr, lr, lrsr = lr_from_hr(hr)
    if corruption is not None and not corruption.is_identity:
        lr = corruption(lr)
        lrsr = upsample(lr)
        reference = f"{reference}_{corruption.tag}"
    ref, refsr = reference_pair(lr if ref is None else ref)
    return {
        "lr": to_tensor(lr),
        "lrsr": to_tensor(lrsr),
        "hr": to_tensor(hr),
        "ref": to_tensor(ref),
        "refsr": to_tensor(refsr),
        "name": name,
        "reference": reference,
    }


def _check_evaluation_image(path: Path) -> None:
    height, width = image_size(path, verify=True)
    if min(width, height) < MIN_EVAL_SIDE:
        raise ValueError(f"{path}: {width}x{height} is too small (each side >= {MIN_EVAL_SIDE})")


class ValidationDataset(Dataset):
    """Whole HR images from one or more folders, with a reference chosen by ``reference``.

    ``reference``: ``"lr"`` (the LR image is its own reference, TTSR's Urban100/Manga109
    protocol), ``"hr"`` (the HR image itself: an upper bound) or a folder holding one reference
    per HR image with the same file stem (any image suffix). ``limit`` keeps the first images
    by name. ``corruption``: applied to every LR after the downscale; the samples' ``reference``
    then carries its tag (``"lr_jpeg75"``).
    """

    def __init__(
        self,
        folders: str | Path | Sequence[str | Path],
        reference: str = "lr",
        limit: int | None = None,
        corruption: LRCorruption | None = None,
    ) -> None:
        self.corruption = corruption
        folders = [folders] if isinstance(folders, str | Path) else list(folders)
        self.images = sorted(
            (p for f in folders for p in list_images(f, nonempty=True)), key=lambda p: p.name
        )
        if limit is not None:
            if limit < 1:
                raise ValueError(f"limit must be at least 1, got {limit}")
            self.images = self.images[:limit]
        self.mode = reference if reference in REFERENCE_MODES else "ref"
        self.refs: list[Path] = []
        if self.mode == "ref":
            folder = Path(reference)
            if not folder.is_dir():
                raise ValueError(
                    f"reference {reference!r} is neither one of {REFERENCE_MODES} nor a directory"
                )
            by_stem = {p.stem: p for p in list_images(folder, nonempty=True)}
            missing = [p.name for p in self.images if p.stem not in by_stem]
            if missing:
                raise ValueError(f"{folder}: no reference for {', '.join(missing[:5])}")
            self.refs = [by_stem[p.stem] for p in self.images]
        for path in [*self.images, *self.refs]:
            _check_evaluation_image(path)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        path = self.images[index]
        hr = load_rgb(path)
        if self.mode == "lr":
            ref = None
        elif self.mode == "hr":
            ref = hr
        else:
            ref = load_rgb(self.refs[index])
        return _evaluation_sample(hr, ref, path.stem, self.mode, self.corruption)


class Cufed5Dataset(Dataset):
    """CUFED5 test layout: ``NNN_0.png`` is an HR image, ``NNN_1.png`` .. ``NNN_5.png`` its
    references from most (1) to least (5) similar; ``level`` picks one of them."""

    def __init__(self, root: str | Path, level: int = 1) -> None:
        if level not in range(1, 6):
            raise ValueError(f"CUFED5 reference level must be 1..5, got {level}")
        root = Path(root)
        self.level = level
        self.images = [p for p in list_images(root, nonempty=True) if p.stem.endswith("_0")]
        if not self.images:
            raise ValueError(f"{root}: no CUFED5 HR images (NNN_0.png)")
        self.refs = []
        for path in self.images:
            ref = path.with_name(f"{path.stem[:-2]}_{level}{path.suffix}")
            if not ref.is_file():
                raise ValueError(f"{path}: its level-{level} reference {ref.name} is missing")
            self.refs.append(ref)
        for path in [*self.images, *self.refs]:
            _check_evaluation_image(path)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        path = self.images[index]
        hr, ref = load_rgb(path), load_rgb(self.refs[index])
        return _evaluation_sample(hr, ref, path.stem[:-2], f"level{self.level}")
