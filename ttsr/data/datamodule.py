"""The Lightning DataModule: training, validation and test data from folders."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from ttsr.data.datasets import (
    Cufed5Dataset,
    CufedTrainDataset,
    Sample,
    SyntheticReferenceDataset,
    ValidationDataset,
)
from ttsr.data.degradation import reference_pair, to_tensor, to_uint8
from ttsr.data.real_degradation import DegradationOptions, LRCorruption
from ttsr.data.synthetic import SyntheticOptions


def lr_as_reference(sample: Sample) -> Sample:
    """The sample with its own LR patch as the reference (``ref`` ``[3, h, w]`` = ``lr``)."""
    ref, refsr = reference_pair(to_uint8(sample["lr"]))
    return {**sample, "ref": to_tensor(ref), "refsr": to_tensor(refsr)}


def evaluation_dataset(
    layout: Literal["folder", "cufed5"],
    dirs: Sequence[str],
    reference: str,
    limit: int | None = None,
    corruption: LRCorruption | None = None,
) -> Dataset:
    """One evaluation set. ``"folder"``: HR images in ``dirs`` with ``reference`` as
    :class:`ValidationDataset` takes it; ``"cufed5"``: one folder in CUFED5's layout, ``reference``
    the level ``"1"`` .. ``"5"`` (no ``corruption``). ``limit``: the first images only."""
    if layout == "folder":
        return ValidationDataset(dirs, reference, limit, corruption)
    if layout != "cufed5":
        raise ValueError(f"evaluation layouts are 'folder' and 'cufed5', not {layout!r}")
    if len(dirs) != 1 or not str(reference).isdigit():
        raise ValueError(
            "the cufed5 layout takes one folder and a level 1..5 as its reference, got "
            f"{list(dirs)} and {reference!r}"
        )
    dataset = Cufed5Dataset(dirs[0], int(reference))
    return dataset if limit is None else Subset(dataset, range(min(limit, len(dataset))))


class TrainingCollate:
    """Stack training samples; with ``lr_reference_probability`` a whole batch instead uses each
    sample's LR patch as its reference.

    That is the validation protocol's "LR as its own reference" (a reference a quarter of the HR
    scale). It is decided per batch because a batch needs references of one size: synthetic
    references are ``patch_size`` square, LR patches ``patch_size / 4``. Torch's RNG decides, which
    the DataLoader seeds in every worker.
    """

    def __init__(self, lr_reference_probability: float = 0.0) -> None:
        if not 0 <= lr_reference_probability <= 1:
            raise ValueError(
                f"lr_reference_probability must be in [0, 1], got {lr_reference_probability}"
            )
        self.lr_reference_probability = lr_reference_probability

    def __call__(self, samples: list[Sample]) -> dict[str, Any]:
        if self.lr_reference_probability and (
            torch.rand(()).item() < self.lr_reference_probability
        ):
            samples = [lr_as_reference(s) for s in samples]
        return default_collate(samples)


class TTSRDataModule(L.LightningDataModule):
    """Training, validation and test data for TTSR.

    Args:
        train_layout: ``"synthetic"``: ``train_dirs`` are folders of photos and each sample gets
            a synthetic reference (:mod:`ttsr.data.synthetic`); ``"cufed"``: ``train_dirs`` are
            CUFED training roots holding ``input/`` and ``ref/``.
        train_dirs: training folders (see ``train_layout``).
        patch_size: HR training patch side (multiple of 16); references have the same side.
        synthetic: how synthetic references are drawn.
        repeats: visits of each synthetic-layout photo per epoch (an epoch's length).
        degradation: a random real-world LR degradation for training samples
            (:mod:`ttsr.data.real_degradation`); ``None``: the research protocol's PIL bicubic x4.
        lr_reference_probability: share of training batches whose reference is their own LR
            patch (see :class:`TrainingCollate`).
        val_layout: ``"folder"``: ``val_dirs`` hold HR images; ``"cufed5"``: ``val_dirs`` is one
            folder in CUFED5's layout.
        val_dirs: validation folders (see ``val_layout``).
        val_references: one validation set per entry. ``"folder"`` layout: ``"lr"`` (LR as its
            own reference), ``"hr"`` (HR as reference) or a folder of references named like the
            HR images; ``"cufed5"`` layout: reference levels ``"1"`` .. ``"5"``.
        val_limit: use only the first ``val_limit`` validation images (by name).
        val_corruption: also validate every ``"folder"``-layout set with this corruption of the
            LR (metrics named after its tag, e.g. ``val_lr_jpeg75/psnr``).
        test_layout: ``"cufed5"`` (``test_dir`` in CUFED5's layout) or ``"folder"`` (HR images
            with ``test_reference`` as in ``val_references``).
        test_dir: the test folder.
        test_level: CUFED5 reference level, 1 (most similar) .. 5.
        test_reference: reference of the ``"folder"`` layout.
        batch_size: training batch size (evaluation runs one image at a time).
        num_workers: DataLoader worker processes for training (evaluation uses at most 2).
    """

    def __init__(
        self,
        train_layout: Literal["synthetic", "cufed"] = "synthetic",
        train_dirs: Sequence[str] = (),
        patch_size: int = 160,
        synthetic: SyntheticOptions | None = None,
        repeats: int = 1,
        degradation: DegradationOptions | None = None,
        lr_reference_probability: float = 0.0,
        val_layout: Literal["folder", "cufed5"] = "folder",
        val_dirs: Sequence[str] = (),
        val_references: Sequence[str] = ("lr",),
        val_limit: int | None = None,
        val_corruption: LRCorruption | None = None,
        test_layout: Literal["cufed5", "folder"] = "cufed5",
        test_dir: str | None = None,
        test_level: int = 1,
        test_reference: str = "lr",
        batch_size: int = 9,
        num_workers: int = 4,
    ) -> None:
        super().__init__()
        self.train_layout = train_layout
        self.train_dirs = list(train_dirs)
        self.patch_size = patch_size
        self.synthetic = synthetic or SyntheticOptions()
        self.repeats = repeats
        self.degradation = degradation
        self.collate = TrainingCollate(lr_reference_probability)
        self.val_layout = val_layout
        self.val_dirs = list(val_dirs)
        self.val_references = list(val_references)
        self.val_limit = val_limit
        self.val_corruption = val_corruption
        self.test_layout = test_layout
        self.test_dir = test_dir
        self.test_level = test_level
        self.test_reference = test_reference
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_set: Dataset | None = None
        self.val_sets: list[Dataset] = []
        self.test_set: Dataset | None = None

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.train_set is None:
            self.train_set = self._train_dataset()
        if stage in ("fit", "validate") and not self.val_sets and self.val_dirs:
            self.val_sets = [self._val_dataset(reference) for reference in self.val_references]
            if self.val_corruption is not None and self.val_layout == "folder":
                self.val_sets += [
                    evaluation_dataset(
                        "folder", self.val_dirs, reference, self.val_limit, self.val_corruption
                    )
                    for reference in self.val_references
                ]
        if stage == "validate" and not self.val_dirs:
            raise ValueError("validate needs data.val_dirs")
        if stage == "test" and self.test_set is None:
            self.test_set = self._test_dataset()

    def _train_dataset(self) -> Dataset:
        if not self.train_dirs:
            raise ValueError("fit needs data.train_dirs (folders of training images)")
        if self.train_layout == "synthetic":
            return SyntheticReferenceDataset(
                self.train_dirs,
                self.patch_size,
                self.synthetic,
                self.repeats,
                degradation=self.degradation,
            )
        if len(self.train_dirs) != 1:
            raise ValueError("the cufed layout takes one train_dirs entry: the CUFED train root")
        return CufedTrainDataset(self.train_dirs[0], self.patch_size, degradation=self.degradation)

    def _val_dataset(self, reference: str) -> Dataset:
        return evaluation_dataset(self.val_layout, self.val_dirs, reference, self.val_limit)

    def _test_dataset(self) -> Dataset:
        if self.test_dir is None:
            raise ValueError("test needs data.test_dir")
        cufed5 = self.test_layout == "cufed5"
        reference = str(self.test_level) if cufed5 else self.test_reference
        return evaluation_dataset(self.test_layout, [self.test_dir], reference)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collate,
        )

    def _evaluation_loader(self, dataset: Dataset) -> DataLoader:
        workers = min(self.num_workers, 2)
        return DataLoader(dataset, batch_size=1, num_workers=workers)

    def val_dataloader(self) -> list[DataLoader]:
        return [self._evaluation_loader(d) for d in self.val_sets]

    def test_dataloader(self) -> DataLoader:
        return self._evaluation_loader(self.test_set)
