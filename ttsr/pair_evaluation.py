"""Evaluation on real reference pairs: bicubic, the LR as its own reference, and the real reference.

A pairs folder holds one sub-folder per pair, ``NAME/target.png`` (the HR ground truth) and
``NAME/ref.png`` (another photograph of the scene: a stereo view, another video frame, a photo
from elsewhere). The target is taken down x4 as in :mod:`ttsr.evaluation` (optionally corrupted,
:class:`~ttsr.data.real_degradation.LRCorruption`), then upscaled three ways: PIL bicubic, the
model with the LR as its own reference (what the model does without a reference), and the model
with the real reference. Scores are Y-PSNR / SSIM (BT.601), no border crop unless asked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ttsr import visualize
from ttsr.data.layouts import PairItem
from ttsr.evaluation import (
    BicubicImages,
    BicubicRow,
    Corruption,
    EvalItem,
    EvalTable,
    check_item,
    degraded_lr,
    score_each,
)
from ttsr.imaging import InputError, load_rgb
from ttsr.inference import Upscaler
from ttsr.metrics import psnr_y, ssim_y
from ttsr.reference_alignment import Alignment


@dataclass(frozen=True)
class PairRow(BicubicRow):
    """Scores of one pair (model columns ``None`` when only bicubic is measured)."""

    lr_ref_psnr: float | None = None
    lr_ref_ssim: float | None = None
    ref_psnr: float | None = None
    ref_ssim: float | None = None
    aligned_ref_psnr: float | None = None
    aligned_ref_ssim: float | None = None


@dataclass(frozen=True)
class PairImages(BicubicImages):
    """What one evaluated pair looked like, for comparison grids."""

    lr_ref_sr: np.ndarray | None
    ref_sr: np.ndarray | None
    aligned_ref_sr: np.ndarray | None
    reference: np.ndarray


class PairTable(EvalTable):
    """Per-pair rows of bicubic, LR-as-reference and real-reference scores, and their mean."""

    COLUMNS = (
        "bicubic_psnr",
        "bicubic_ssim",
        "lr_ref_psnr",
        "lr_ref_ssim",
        "ref_psnr",
        "ref_ssim",
        "aligned_ref_psnr",
        "aligned_ref_ssim",
    )
    LABELS = {
        "bicubic": "bicubic",
        "lr_ref": "LR as reference",
        "ref": "reference",
        "aligned_ref": "aligned reference",
    }


def check_pair(item: PairItem, upscaler: Upscaler | None, border: int = 0) -> None:
    """Sizes and, with a model, the memory budget of both runs, from the image headers only."""
    check_item(EvalItem(item.name, item.target, "lr"), upscaler, border)
    check_item(EvalItem(item.name, item.target, "files", (item.reference,)), upscaler, border)


def evaluate_pair(
    item: PairItem, upscaler: Upscaler | None, border: int = 0, corrupt: Corruption | None = None
) -> tuple[PairRow, PairImages]:
    """Score bicubic, and with a model the LR as reference and the real reference, on one pair.

    When the upscaler aligns references (``reference_alignment`` other than ``"none"``), the real
    reference is scored both without alignment (``ref``) and with it (``aligned_ref``); the LR as
    its own reference is never aligned.
    """
    hr, lr, bicubic = degraded_lr(load_rgb(item.target), corrupt)
    reference = load_rgb(item.reference)
    scores: list[float | None] = [psnr_y(hr, bicubic, border), ssim_y(hr, bicubic, border)]
    outputs: list[np.ndarray | None] = [None, None, None]
    if upscaler is not None:
        runs: list[tuple[np.ndarray, Alignment]] = [(lr, "none"), (reference, "none")]
        if upscaler.reference_alignment != "none":
            runs.append((reference, upscaler.reference_alignment))
        for index, (ref, alignment) in enumerate(runs):
            sr = np.asarray(upscaler.upscale(lr, [ref], alignment=alignment).sr)
            outputs[index] = sr
            scores += [psnr_y(hr, sr, border), ssim_y(hr, sr, border)]
    row = PairRow(item.name, *scores)  # type: ignore[arg-type]
    return row, PairImages(hr, bicubic, *outputs, reference=reference)


def evaluate_pairs(
    items: Sequence[PairItem],
    upscaler: Upscaler | None,
    border: int = 0,
    corrupt: Corruption | None = None,
    on_pair: Callable[[PairRow, PairImages], None] | None = None,
) -> PairTable:
    """Score every pair; ``on_pair`` sees each row and its images (for grids, progress)."""
    if border < 0:
        raise InputError(f"border must be >= 0, got {border}")
    score = lambda item: evaluate_pair(item, upscaler, border, corrupt)  # noqa: E731
    return PairTable(rows=score_each(items, score, on_pair))


def pair_grid(row: PairRow, images: PairImages) -> Image.Image:
    """HR | bicubic | LR as reference | real reference (| aligned) | the reference, labelled."""
    panels = [images.hr, images.bicubic]
    labels = [row.image, f"bicubic {row.bicubic_psnr:.2f} dB"]
    if images.lr_ref_sr is not None and images.ref_sr is not None:
        panels += [images.lr_ref_sr, images.ref_sr]
        labels += [f"LR as reference {row.lr_ref_psnr:.2f} dB", f"reference {row.ref_psnr:.2f} dB"]
    if images.aligned_ref_sr is not None:
        panels.append(images.aligned_ref_sr)
        labels.append(f"aligned reference {row.aligned_ref_psnr:.2f} dB")
    panels.append(images.reference)
    labels.append("reference")
    height = images.hr.shape[0]
    return visualize.side_by_side([visualize.fit_height(p, height) for p in panels], labels)
