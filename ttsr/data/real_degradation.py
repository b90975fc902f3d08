"""Real-world degradations of the LR side: blur, several downscaling kernels, noise and JPEG.

TTSR's research protocol makes the LR with PIL bicubic x4 alone (:mod:`ttsr.data.degradation`).
Photos that people bring were blurred by a lens, downscaled by unknown software, carry sensor
noise and were saved as JPEG. :func:`degrade` draws such a chain at random, in the spirit of
Real-ESRGAN's and BSRGAN's training degradations; :class:`LRCorruption` is a fixed chain applied
after the bicubic downscale, for evaluating a model on a stated corruption (``ttsr-eval --jpeg``).

All functions take and return ``HxWx3`` uint8 arrays; randomness comes only from the
``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from ttsr.data.degradation import SCALE, bicubic_resize
from ttsr.data.option_checks import check_jpeg_quality_range, check_probabilities, check_ranges

#: Downscaling kernels of :func:`resize` (PIL filters; ``area`` is PIL's box filter).
RESIZE_KERNELS = {
    "bicubic": Image.BICUBIC,
    "bilinear": Image.BILINEAR,
    "area": Image.BOX,
    "lanczos": Image.LANCZOS,
}
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def gaussian_kernel(sigma_x: float, sigma_y: float | None = None, angle: float = 0.0) -> np.ndarray:
    """A normalised 2-D Gaussian kernel, anisotropic when ``sigma_y`` differs from ``sigma_x``.

    ``angle`` (degrees) rotates the ``sigma_x`` axis. The side covers three sigmas each way.
    """
    sigma_y = sigma_x if sigma_y is None else sigma_y
    if sigma_x <= 0 or sigma_y <= 0:
        raise ValueError(f"blur sigmas must be positive, got {sigma_x}, {sigma_y}")
    radius = max(1, math.ceil(3 * max(sigma_x, sigma_y)))
    steps = np.arange(-radius, radius + 1, dtype=np.float64)
    xs, ys = np.meshgrid(steps, steps)
    theta = math.radians(angle)
    along = xs * math.cos(theta) + ys * math.sin(theta)
    across = -xs * math.sin(theta) + ys * math.cos(theta)
    kernel = np.exp(-0.5 * ((along / sigma_x) ** 2 + (across / sigma_y) ** 2))
    return (kernel / kernel.sum()).astype(np.float32)


def gaussian_blur(
    image: np.ndarray, sigma: float, sigma_y: float | None = None, angle: float = 0.0
) -> np.ndarray:
    """Blur with :func:`gaussian_kernel` (borders mirrored); ``sigma == 0`` returns the image."""
    if sigma == 0 and not sigma_y:
        return image
    kernel = gaussian_kernel(sigma, sigma_y, angle)
    blurred = cv2.filter2D(image.astype(np.float32), -1, kernel, borderType=cv2.BORDER_REFLECT_101)
    return _to_uint8(blurred)


def resize(image: np.ndarray, width: int, height: int, kernel: str = "bicubic") -> np.ndarray:
    """Resize with one of :data:`RESIZE_KERNELS` (PIL, antialiased when shrinking)."""
    if kernel not in RESIZE_KERNELS:
        raise ValueError(f"unknown resize kernel {kernel!r}; choose from {sorted(RESIZE_KERNELS)}")
    if kernel == "bicubic":
        return bicubic_resize(image, width, height)
    return np.asarray(Image.fromarray(image).resize((width, height), RESIZE_KERNELS[kernel]))


def add_gaussian_noise(
    image: np.ndarray, sigma: float, rng: np.random.Generator, grey: bool = False
) -> np.ndarray:
    """Add zero-mean Gaussian noise of standard deviation ``sigma`` (in 0-255 units).

    ``grey``: one noise value per pixel for all three channels (luminance noise); else colour
    noise, independent per channel.
    """
    if sigma < 0:
        raise ValueError(f"noise sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return image
    shape = (*image.shape[:2], 1) if grey else image.shape
    noise = rng.normal(0.0, sigma, size=shape).astype(np.float32)
    return _to_uint8(image.astype(np.float32) + noise)


def add_poisson_noise(
    image: np.ndarray, scale: float, rng: np.random.Generator, grey: bool = False
) -> np.ndarray:
    """Add shot noise: Poisson photon counts at 8-bit levels, the deviation scaled by ``scale``.

    The noise grows with brightness (standard deviation ``scale * sqrt(value)`` in 0-255 units).
    ``grey``: the noise is drawn on the luma and added to every channel.
    """
    if scale < 0:
        raise ValueError(f"poisson scale must be >= 0, got {scale}")
    if scale == 0:
        return image
    values = image.astype(np.float32)
    base = (values @ _LUMA)[..., None] if grey else values
    noise = (rng.poisson(np.maximum(base, 0.0)) - base).astype(np.float32)
    return _to_uint8(values + scale * noise)


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """Encode as JPEG at ``quality`` (PIL, 4:2:0 chroma, as a browser or phone saves) and decode."""
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"))


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class LRCorruption:
    """A fixed corruption of the LR image after the bicubic x4 downscale, for evaluation.

    Applied in the order of a camera and a web upload: Gaussian blur (``blur`` sigma, LR pixels),
    Gaussian colour noise (``noise`` sigma, 0-255 units; drawn from ``seed``), then JPEG at
    ``jpeg`` quality. Zero / ``None`` skips a step.
    """

    blur: float = 0.0
    noise: float = 0.0
    jpeg: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.blur < 0:
            raise ValueError(f"blur sigma must be >= 0, got {self.blur}")
        if self.noise < 0:
            raise ValueError(f"noise sigma must be >= 0, got {self.noise}")
        if self.jpeg is not None and not 1 <= self.jpeg <= 100:
            raise ValueError(f"JPEG quality must be in 1..100, got {self.jpeg}")

    @property
    def is_identity(self) -> bool:
        return self.blur == 0 and self.noise == 0 and self.jpeg is None

    @property
    def tag(self) -> str:
        """A short name for tables and metric keys (``"blur1_noise5_jpeg75"``; ``""`` if none)."""
        parts = []
        if self.blur:
            parts.append(f"blur{self.blur:g}")
        if self.noise:
            parts.append(f"noise{self.noise:g}")
        if self.jpeg is not None:
            parts.append(f"jpeg{self.jpeg}")
        return "_".join(parts)

    def __call__(self, lr: np.ndarray) -> np.ndarray:
        """The corrupted ``lr`` (``HxWx3`` uint8); the same input gives the same output."""
        if self.blur:
            lr = gaussian_blur(lr, self.blur)
        if self.noise:
            lr = add_gaussian_noise(lr, self.noise, np.random.default_rng(self.seed))
        if self.jpeg is not None:
            lr = jpeg(lr, self.jpeg)
        return lr


@dataclass(frozen=True)
class DegradationOptions:
    """Ranges of the random LR degradation of :func:`degrade` (every one a config entry).

    One stage is: blur, downscale, noise, JPEG; with ``shuffle_probability`` blur, downscale and
    noise come in a random order (JPEG, the saving of a file, stays last). With
    ``second_stage_probability`` the image goes through two stages, the first downscaling to an
    intermediate size (``intermediate_scale_range`` times the LR size), the second to the LR size.

    Blur sigmas are in pixels of the image being blurred; noise sigmas in 0-255 units.
    """

    blur_probability: float = 0.7
    blur_sigma_range: tuple[float, float] = (0.2, 2.0)
    anisotropic_probability: float = 0.5
    resize_kernels: tuple[str, ...] = ("bicubic", "bilinear", "area")
    noise_probability: float = 0.6
    gaussian_sigma_range: tuple[float, float] = (1.0, 12.0)
    poisson_probability: float = 0.3
    poisson_scale_range: tuple[float, float] = (0.05, 1.0)
    grey_noise_probability: float = 0.4
    jpeg_probability: float = 0.9
    jpeg_quality_range: tuple[int, int] = (30, 95)
    shuffle_probability: float = 0.3
    second_stage_probability: float = 0.3
    intermediate_scale_range: tuple[float, float] = (1.5, 3.0)
    #: Share of samples left clean (PIL bicubic x4 only), so that clean LR stays in the diet.
    clean_probability: float = 0.1

    def __post_init__(self) -> None:
        check_probabilities(
            self,
            (
                "blur_probability",
                "anisotropic_probability",
                "noise_probability",
                "poisson_probability",
                "grey_noise_probability",
                "jpeg_probability",
                "shuffle_probability",
                "second_stage_probability",
                "clean_probability",
            ),
        )
        check_ranges(
            self,
            (
                "blur_sigma_range",
                "gaussian_sigma_range",
                "poisson_scale_range",
                "intermediate_scale_range",
            ),
        )
        check_jpeg_quality_range(self.jpeg_quality_range)
        if self.intermediate_scale_range[0] < 1:
            raise ValueError("intermediate_scale_range must be >= 1 (a size between HR and LR)")
        if not self.resize_kernels or any(k not in RESIZE_KERNELS for k in self.resize_kernels):
            raise ValueError(
                f"resize_kernels must be a non-empty subset of {sorted(RESIZE_KERNELS)}, "
                f"got {self.resize_kernels}"
            )


def _random_blur(image: np.ndarray, options: DegradationOptions, rng: np.random.Generator):
    if rng.random() >= options.blur_probability:
        return image
    sigma_x = float(rng.uniform(*options.blur_sigma_range))
    if rng.random() < options.anisotropic_probability:
        sigma_y = float(rng.uniform(*options.blur_sigma_range))
        angle = float(rng.uniform(0.0, 180.0))
    else:
        sigma_y, angle = sigma_x, 0.0
    if max(sigma_x, sigma_y) == 0:
        return image
    return gaussian_blur(image, max(sigma_x, 1e-3), max(sigma_y, 1e-3), angle)


def _random_noise(image: np.ndarray, options: DegradationOptions, rng: np.random.Generator):
    if rng.random() >= options.noise_probability:
        return image
    grey = bool(rng.random() < options.grey_noise_probability)
    if rng.random() < options.poisson_probability:
        return add_poisson_noise(image, float(rng.uniform(*options.poisson_scale_range)), rng, grey)
    return add_gaussian_noise(image, float(rng.uniform(*options.gaussian_sigma_range)), rng, grey)


def _random_jpeg(image: np.ndarray, options: DegradationOptions, rng: np.random.Generator):
    if rng.random() >= options.jpeg_probability:
        return image
    low, high = options.jpeg_quality_range
    return jpeg(image, int(rng.integers(low, high + 1)))


def _stage(
    image: np.ndarray,
    size: tuple[int, int],
    options: DegradationOptions,
    rng: np.random.Generator,
) -> np.ndarray:
    """One stage: blur, resize to ``size`` ``(width, height)``, noise (maybe shuffled), JPEG."""
    kernel = str(rng.choice(list(options.resize_kernels)))
    steps = ["blur", "resize", "noise"]
    if rng.random() < options.shuffle_probability:
        steps = [steps[i] for i in rng.permutation(3)]
    for step in steps:
        if step == "blur":
            image = _random_blur(image, options, rng)
        elif step == "resize":
            image = resize(image, size[0], size[1], kernel)
        else:
            image = _random_noise(image, options, rng)
    return _random_jpeg(image, options, rng)


def degrade(
    hr: np.ndarray, options: DegradationOptions, rng: np.random.Generator, scale: int = SCALE
) -> np.ndarray:
    """A randomly degraded LR of ``hr`` (``HxWx3`` uint8, sides multiples of ``scale``).

    The result is exactly ``1 / scale`` of the HR size. With ``clean_probability`` it is the
    research protocol's PIL bicubic downscale alone.
    """
    height, width = hr.shape[:2]
    if height % scale or width % scale:
        raise ValueError(f"HR {width}x{height} is not a multiple of {scale}")
    lr_size = (width // scale, height // scale)
    if rng.random() < options.clean_probability:
        return bicubic_resize(hr, *lr_size)
    image = hr
    if rng.random() < options.second_stage_probability:
        factor = float(rng.uniform(*options.intermediate_scale_range))
        middle = (max(1, round(lr_size[0] * factor)), max(1, round(lr_size[1] * factor)))
        image = _stage(image, middle, options, rng)
    return _stage(image, lr_size, options, rng)
