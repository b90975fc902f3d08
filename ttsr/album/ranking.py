"""Scores of album photos against a low-resolution image, with the model's own texture extractor.

Two stages:

- **global**: a descriptor per photo, the mean and the standard deviation over positions of the
  extractor's relu3_1 on the photo shrunk to a long side of :data:`DESCRIPTOR_SIDE` pixels (each
  half L2-normalised); photos are ranked by the cosine similarity of their descriptor to the LR's.
- **fine**: TTSR's own relu3_1 patch search (the model's search module) at reduced resolution,
  the LR-up and the reference's down-up version both shrunk by ``reduction`` (4: the LR itself
  against the reference down x4). The score is the share of LR patches whose best match has a
  cosine relevance of at least :data:`CLOSE_MATCH`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ttsr.data.degradation import SCALE, bicubic_resize, to_tensor
from ttsr.imaging import ImageError, load_rgb_reduced
from ttsr.model.ttsr import TTSR, at_least_float32, full_precision

#: Long side (pixels) of the images the global descriptors are computed on.
DESCRIPTOR_SIDE = 128
#: Bump when the descriptor's definition changes (cached indexes are rebuilt).
DESCRIPTOR_VERSION = 1
#: Default shrink factor of the fine stage (4: the LR against the reference down x4).
DEFAULT_REDUCTION = 4
#: Cosine relevance from which an LR patch counts as having a close match in a photo.
CLOSE_MATCH = 0.7
#: Smallest side (pixels) of an image worth describing or searching at reduced size.
MIN_REDUCED_SIDE = 8


def _device(model: TTSR) -> torch.device:
    return next(model.extractor.parameters()).device


@contextmanager
def quiet_image_notes() -> Iterator[None]:
    """Silence the notes on converted colour modes while many photos are read."""
    imaging_logger = logging.getLogger("ttsr.imaging")
    previous = imaging_logger.level
    imaging_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        imaging_logger.setLevel(previous)


def descriptor_fingerprint(model: TTSR) -> str:
    """A hash of the extractor's weights and the descriptor's settings: the index's validity."""
    digest = hashlib.sha256(f"v{DESCRIPTOR_VERSION}:{DESCRIPTOR_SIDE}".encode())
    for name, tensor in model.extractor.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return digest.hexdigest()


def _relu3_1(model: TTSR, image: np.ndarray) -> Tensor:
    """relu3_1 ``[1, 256, H/4, W/4]`` of an ``HxWx3`` uint8 image, in float32."""
    batch = (to_tensor(image)[None].to(_device(model)) + 1.0) / 2.0
    return at_least_float32(model.extractor(batch)[2])[0]  # type: ignore[return-value]


def _fit_long_side(image: np.ndarray, side: int) -> np.ndarray:
    height, width = image.shape[:2]
    factor = side / max(height, width)
    size = (
        max(MIN_REDUCED_SIDE, round(width * factor)),
        max(MIN_REDUCED_SIDE, round(height * factor)),
    )
    return bicubic_resize(image, *size)


@torch.inference_mode()
def global_descriptor(model: TTSR, image: np.ndarray) -> np.ndarray:
    """The global descriptor ``[512]`` float32 of an image (any size; it is resized here)."""
    features = _relu3_1(model, _fit_long_side(image, DESCRIPTOR_SIDE))[0].flatten(1)
    mean = F.normalize(features.mean(1), dim=0)
    spread = F.normalize(features.std(1, correction=0), dim=0)
    return (torch.cat([mean, spread]) / 2**0.5).cpu().numpy().astype(np.float32)


def describe_photo(model: TTSR, path: Path) -> tuple[np.ndarray, tuple[int, int]]:
    """Descriptor and full ``(height, width)`` of an album photo, read at reduced size."""
    rgb, size = load_rgb_reduced(path, long_side=DESCRIPTOR_SIDE)
    if min(size) < SCALE:
        raise ImageError(f"{size[1]}x{size[0]} is too small for a reference")
    return global_descriptor(model, rgb), size


def _lr_scale_to_reduced(image: np.ndarray, reduction: int) -> np.ndarray:
    """An image at LR scale enlarged ``4 / reduction`` times: the LR-up scale shrunk by
    ``reduction`` (1: the LR-up scale itself; 4: unchanged)."""
    height, width = image.shape[:2]
    size = (
        max(MIN_REDUCED_SIDE, width * SCALE // reduction),
        max(MIN_REDUCED_SIDE, height * SCALE // reduction),
    )
    return image if size == (width, height) else bicubic_resize(image, *size)


@torch.inference_mode()
def query_features(model: TTSR, lr: np.ndarray, reduction: int = DEFAULT_REDUCTION) -> Tensor:
    """relu3_1 ``[1, 256, h, w]`` of the LR-up shrunk by ``reduction``."""
    return _relu3_1(model, _lr_scale_to_reduced(lr, reduction))


@torch.inference_mode()
def reference_features(model: TTSR, path: Path, reduction: int = DEFAULT_REDUCTION) -> Tensor:
    """relu3_1 of a photo's down-up version shrunk by ``reduction``: the photo down x4, then
    enlarged ``4 / reduction`` times (as blurred as the LR-up at that scale)."""
    down, _ = load_rgb_reduced(path, divisor=SCALE)
    return _relu3_1(model, _lr_scale_to_reduced(down, reduction))


@torch.inference_mode()
def patch_relevance(model: TTSR, query: Tensor, key: Tensor) -> Tensor:
    """Best cosine relevance of every query patch in ``key``: ``[h, w]``, TTSR's search."""
    with full_precision(query.device):
        soft_attention, _ = model.search_transfer.search_only(query, [key])
    return soft_attention[0, 0].float().cpu()
