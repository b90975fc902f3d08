"""Y-channel PSNR and SSIM (ITU-R BT.601, 8-bit), the protocol of TTSR's evaluation.

Both take ``HxWx3`` uint8 (or integer-valued float) RGB arrays. ``border`` pixels are cropped on
every side before measuring (TTSR: 0).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

# BT.601 studio-swing luma from 8-bit RGB: Y = 16 + (65.738 R + 129.057 G + 25.064 B) / 256.
_Y_WEIGHTS = np.array([65.738, 129.057, 25.064]) / 256.0


def rgb_to_y(image: np.ndarray) -> np.ndarray:
    """``HxWx3`` RGB in [0, 255] -> ``HxW`` float64 luma in [16, 235]."""
    return image.astype(np.float64) @ _Y_WEIGHTS + 16.0


def _prepare(a: np.ndarray, b: np.ndarray, border: int) -> tuple[np.ndarray, np.ndarray]:
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    ya, yb = rgb_to_y(a), rgb_to_y(b)
    if border:
        ya, yb = ya[border:-border, border:-border], yb[border:-border, border:-border]
    if ya.size == 0:
        raise ValueError("nothing left to measure after the border crop")
    return ya, yb


def psnr_y(a: np.ndarray, b: np.ndarray, border: int = 0) -> float:
    """PSNR in dB of the BT.601 luma (peak 255); ``inf`` for identical images."""
    ya, yb = _prepare(a, b, border)
    mse = float(np.mean((ya - yb) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def ssim_y(a: np.ndarray, b: np.ndarray, border: int = 0) -> float:
    """SSIM of the BT.601 luma: 11x11 Gaussian window (sigma 1.5), 'valid' region, as MATLAB."""
    ya, yb = _prepare(a, b, border)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    kernel = cv2.getGaussianKernel(11, 1.5)
    window = kernel @ kernel.T

    def filtered(x: np.ndarray) -> np.ndarray:
        return cv2.filter2D(x, -1, window)[5:-5, 5:-5]

    mu_a, mu_b = filtered(ya), filtered(yb)
    var_a = filtered(ya * ya) - mu_a**2
    var_b = filtered(yb * yb) - mu_b**2
    cov = filtered(ya * yb) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return float(ssim_map.mean())
