"""Datasets: CUFED training pairs, CUFED5 test sets, photos with synthetic references, and
validation folders (folder layouts: :mod:`ttsr.data.layouts`). Every sample is a dict of
``[3, H, W]`` tensors in [-1, 1] made by :mod:`ttsr.data.degradation`: ``lr``, ``lrsr`` (LR
bicubic x4 up), ``hr``, ``ref``, ``refsr``
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
from ttsr.data.layouts import cufed5_entries, cufed_train_entries
from ttsr.data.real_degradation import DegradationOptions, LRCorruption, degrade
from ttsr.data.synthetic import SyntheticOptions, synthesize_pair
from ttsr.imaging import image_size, list_images, load_rgb

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


def _tensors(lr: np.ndarray, lrsr: np.ndarray, hr: np.ndarray, ref: np.ndarray) -> Sample:
    """The sample's tensors, the reference's down-up copy made here."""
    ref, refsr = reference_pair(ref)
    images = {"lr": lr, "lrsr": lrsr, "hr": hr, "ref": ref, "refsr": refsr}
    return {key: to_tensor(image) for key, image in images.items()}


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
    return _tensors(lr, lrsr, hr, ref)


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
        self.patch_size = patch_size
        self.augment = augment
        self.degradation = degradation
        entries = cufed_train_entries(root)
        self.inputs = [e.hr for e in entries]
        self.refs = [e.references[0] for e in entries]
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
    return {
        **_tensors(lr, lrsr, hr, lr if ref is None else ref),
        "name": name,
        "reference": reference,
    }


def _check_evaluation_image(path: Path) -> None:
    height, width = image_size(path, verify=True)
    if min(width, height) < MIN_EVAL_SIDE:
        raise ValueError(f"{path}: {width}x{height} is too small (each side >= {MIN_EVAL_SIDE})")


class _WholeImageDataset(Dataset):
    """Whole HR images ``images``, each with reference ``refs[i]`` (``mode`` ``"ref"``) or its
    own LR (``"lr"``) or HR (``"hr"``); samples are named ``names[i]`` and tagged ``tag``."""

    def __init__(
        self,
        images: Sequence[Path],
        refs: Sequence[Path],
        names: Sequence[str],
        mode: str,
        tag: str,
        corruption: LRCorruption | None = None,
    ) -> None:
        self.images, self.refs, self.names = list(images), list(refs), list(names)
        self.mode, self.tag, self.corruption = mode, tag, corruption
        for path in [*self.images, *self.refs]:
            _check_evaluation_image(path)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        hr = load_rgb(self.images[index])
        if self.mode == "lr":
            ref = None
        elif self.mode == "hr":
            ref = hr
        else:
            ref = load_rgb(self.refs[index])
        return _evaluation_sample(hr, ref, self.names[index], self.tag, self.corruption)


class ValidationDataset(_WholeImageDataset):
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
        folders = [folders] if isinstance(folders, str | Path) else list(folders)
        images = sorted(
            (p for f in folders for p in list_images(f, nonempty=True)), key=lambda p: p.name
        )
        if limit is not None:
            if limit < 1:
                raise ValueError(f"limit must be at least 1, got {limit}")
            images = images[:limit]
        mode = reference if reference in REFERENCE_MODES else "ref"
        refs: list[Path] = []
        if mode == "ref":
            folder = Path(reference)
            if not folder.is_dir():
                raise ValueError(
                    f"reference {reference!r} is neither one of {REFERENCE_MODES} nor a directory"
                )
            by_stem = {p.stem: p for p in list_images(folder, nonempty=True)}
            missing = [p.name for p in images if p.stem not in by_stem]
            if missing:
                raise ValueError(f"{folder}: no reference for {', '.join(missing[:5])}")
            refs = [by_stem[p.stem] for p in images]
        super().__init__(images, refs, [p.stem for p in images], mode, mode, corruption)


class Cufed5Dataset(_WholeImageDataset):
    """CUFED5 test layout (:mod:`ttsr.data.layouts`): ``NNN_0.png`` HR images; ``level`` (1..5)
    picks which of their references ``NNN_1.png`` (most similar) .. ``NNN_5.png`` is used."""

    def __init__(self, root: str | Path, level: int = 1) -> None:
        entries = cufed5_entries(root, (level,))
        self.level = level
        super().__init__(
            [e.hr for e in entries],
            [e.references[0] for e in entries],
            [e.name for e in entries],
            "ref",
            f"level{level}",
        )
