"""Colour and exposure alignment of a reference to the low-resolution input, before the search.

A reference from another day, camera or light differs from the LR in exposure and white balance;
TTSR's VGG features (and the textures they carry) are not invariant to that. Each method maps the
reference's colours in CIE Lab so that their statistics match the LR's, measured on the reference
taken down x4 (PIL bicubic) so that both are compared at the LR's resolution:

- ``"meanstd"``: per-channel mean and standard deviation (Reinhard et al. 2001), the scale
  bounded to [1/2, 2] so that a reference of other content is not stretched wildly;
- ``"histogram"``: per-channel histogram (quantile) matching.

Both are global: where the reference shows other content than the LR (partial overlap), the
statistics are only roughly those of the shared part.
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np

from ttsr.data.degradation import SCALE, bicubic_resize

Alignment = Literal["none", "meanstd", "histogram"]
ALIGNMENTS: tuple[str, ...] = ("none", "meanstd", "histogram")

#: Bounds of the per-channel scale of ``"meanstd"``.
MAX_SCALE = 2.0
#: Quantiles sampled by ``"histogram"``.
QUANTILES = 256


def to_lab(image: np.ndarray) -> np.ndarray:
    """``HxWx3`` uint8 RGB -> float32 Lab (L in [0, 100])."""
    return cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)


def from_lab(lab: np.ndarray) -> np.ndarray:
    """float32 Lab -> ``HxWx3`` uint8 RGB (clipped)."""
    rgb = cv2.cvtColor(lab.astype(np.float32), cv2.COLOR_Lab2RGB)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def _at_lr_scale(reference: np.ndarray) -> np.ndarray:
    height, width = reference.shape[:2]
    return bicubic_resize(reference, max(1, width // SCALE), max(1, height // SCALE))


def _match_mean_std(values: np.ndarray, source: np.ndarray, target: np.ndarray) -> np.ndarray:
    scale = np.clip(target.std() / max(float(source.std()), 1e-6), 1 / MAX_SCALE, MAX_SCALE)
    return (values - source.mean()) * scale + target.mean()


def _match_histogram(values: np.ndarray, source: np.ndarray, target: np.ndarray) -> np.ndarray:
    levels = np.linspace(0.0, 1.0, QUANTILES)
    source_q = np.quantile(source, levels) + levels * 1e-6  # strictly increasing, for interp
    target_q = np.quantile(target, levels)
    return np.interp(values, source_q, target_q)


def align_reference(reference: np.ndarray, lr: np.ndarray, method: Alignment) -> np.ndarray:
    """``reference`` (``HxWx3`` uint8) with its Lab statistics matched to those of ``lr``."""
    if method == "none":
        return reference
    if method not in ALIGNMENTS:
        raise ValueError(f"unknown reference alignment {method!r}; use one of {ALIGNMENTS}")
    match = _match_mean_std if method == "meanstd" else _match_histogram
    reference_lab = to_lab(reference)
    source_lab = to_lab(_at_lr_scale(reference))
    target_lab = to_lab(lr)
    aligned = np.empty_like(reference_lab)
    for channel in range(3):
        aligned[..., channel] = match(
            reference_lab[..., channel],
            source_lab[..., channel].ravel(),
            target_lab[..., channel].ravel(),
        )
    return from_lab(aligned)
