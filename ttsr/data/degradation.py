"""TTSR's degradation and value conventions: PIL bicubic x4, images in [-1, 1].

Every path through ttsr (training, validation, inference, evaluation) prepares its inputs here so
that a converted released checkpoint sees exactly what the released code fed it.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor

SCALE = 4


def bicubic_resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize an ``HxWx3`` uint8 array with PIL's bicubic filter (antialiased when shrinking)."""
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC))


def crop_to_multiple(image: np.ndarray, multiple: int = SCALE) -> np.ndarray:
    """Crop an ``HxWxC`` array at the bottom/right so both sides divide by ``multiple``."""
    height, width = image.shape[:2]
    return image[: height // multiple * multiple, : width // multiple * multiple]


def downsample(image: np.ndarray, scale: int = SCALE) -> np.ndarray:
    """PIL bicubic down by ``scale`` (the image should already be a multiple of ``scale``)."""
    height, width = image.shape[:2]
    return bicubic_resize(image, width // scale, height // scale)


def upsample(image: np.ndarray, scale: int = SCALE) -> np.ndarray:
    """PIL bicubic up by ``scale``."""
    height, width = image.shape[:2]
    return bicubic_resize(image, width * scale, height * scale)


def lr_from_hr(hr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(hr_cropped, lr, lrsr)``: HR cropped to a multiple of 4, its x4 bicubic LR and LR-up."""
    hr = crop_to_multiple(hr)
    lr = downsample(hr)
    return hr, lr, upsample(lr)


def reference_pair(ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(ref_cropped, refsr)``: reference cropped to a multiple of 4 and its down-up version."""
    ref = crop_to_multiple(ref)
    return ref, upsample(downsample(ref))


def to_tensor(image: np.ndarray) -> Tensor:
    """``HxWx3`` uint8 -> ``[3, H, W]`` float32 in [-1, 1] (x / 127.5 - 1, as the released code)."""
    array = np.ascontiguousarray(image, dtype=np.float32).transpose(2, 0, 1)
    return torch.from_numpy(array / 127.5 - 1.0)


def to_uint8(tensor: Tensor) -> np.ndarray:
    """``[3, H, W]`` in [-1, 1] -> ``HxWx3`` uint8, rounding as the released ``test()`` does."""
    values = ((tensor.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round()
    return values.to(torch.uint8).permute(1, 2, 0).numpy()
