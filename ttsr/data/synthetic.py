"""Synthetic references: a training pair (HR crop, reference crop) cut from one photo.

Public data sets of single photos have no reference images, so TTSR's training pairs are made
from one photo:

1. The HR crop is a random ``hr_size`` square of the photo.
2. The reference is a ``ref_size`` square seen through a random *similarity transform* of the
   same photo: magnified by ``scale`` (log-uniform in ``scale_range``; ``scale > 1`` shows the
   content larger than in the HR crop), rotated by up to ``max_rotation`` degrees, and centred so
   that its footprint covers only part of the HR crop (``overlap_range``: the fraction of the HR
   crop that also appears in the reference). The reference therefore shares content and
   texture with the HR crop without being aligned to it, like a second photo of the same scene.
3. With probability ``aligned_probability`` the transform is a pure shift by a multiple of 4
   pixels (scale 1, no rotation): the shared part then matches the HR crop exactly on the
   4-pixel grid of the texture search, like a reference that is the HR image itself.
4. The reference's colours are jittered (brightness, contrast, saturation factors in
   ``[1 - color_jitter, 1 + color_jitter]``) and it is mirrored with ``flip_probability``.
5. Harder references, all off by default (the research recipes): a perspective warp (corners
   moved by up to ``perspective`` of the side), another exposure (``exposure`` stops either
   way), gamma (``gamma_range``), white balance (per-channel gains within ``white_balance``),
   blur of the reference, a partial occlusion by a patch of elsewhere in the photo, and a light
   JPEG of its own. They stand for another viewpoint, another day and another camera.
   ``harder_probability`` is the share of references that get them (the others stay exact
   views of the photo, so that the model keeps learning to copy what matches).

Shrinking (``scale < 1``) first resizes the photo with PIL's antialiased bicubic filter; the
rotation and any magnification are then one bicubic ``cv2.warpAffine``. Footprints that leave
the photo are kept inside it where the scale allows; otherwise the border is mirrored.

Everything random is drawn from the ``numpy.random.Generator`` passed in: the same seed gives
the same pair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from ttsr.data.degradation import bicubic_resize
from ttsr.data.option_checks import check_jpeg_quality_range, check_probabilities, check_ranges
from ttsr.data.real_degradation import gaussian_blur, jpeg

#: Attempts at placing the reference footprint within ``overlap_range`` before taking the best.
PLACEMENT_ATTEMPTS = 32
#: Luma weights for the saturation jitter.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class SyntheticOptions:
    """How synthetic references are drawn (see the module docstring)."""

    scale_range: tuple[float, float] = (0.5, 2.0)
    max_rotation: float = 30.0
    overlap_range: tuple[float, float] = (0.2, 0.8)
    aligned_probability: float = 0.2
    color_jitter: float = 0.1
    flip_probability: float = 0.5
    perspective: float = 0.0
    exposure: float = 0.0
    gamma_range: tuple[float, float] = (1.0, 1.0)
    white_balance: float = 0.0
    blur_probability: float = 0.0
    blur_sigma_range: tuple[float, float] = (0.3, 1.5)
    occlusion_probability: float = 0.0
    occlusion_max_area: float = 0.3
    jpeg_probability: float = 0.0
    jpeg_quality_range: tuple[int, int] = (70, 95)
    harder_probability: float = 1.0

    def __post_init__(self) -> None:
        check_ranges(self, ("scale_range", "gamma_range", "blur_sigma_range"), positive=True)
        low, high = self.overlap_range
        if not 0 < low <= high < 1:
            raise ValueError(f"overlap_range must be 0 < low <= high < 1, got {self.overlap_range}")
        check_probabilities(
            self,
            (
                "aligned_probability",
                "flip_probability",
                "blur_probability",
                "occlusion_probability",
                "jpeg_probability",
                "occlusion_max_area",
                "harder_probability",
            ),
        )
        for name in ("color_jitter", "white_balance", "perspective"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.exposure < 0:
            raise ValueError(f"exposure must be >= 0 stops, got {self.exposure}")
        check_jpeg_quality_range(self.jpeg_quality_range)


@dataclass(frozen=True)
class SyntheticPair:
    """An HR crop, its synthetic reference, and how the reference was made.

    ``hr`` ``hr_size x hr_size x 3`` and ``ref`` ``ref_size x ref_size x 3`` uint8; ``overlap``:
    fraction of the HR crop inside the reference's footprint; ``scale``, ``rotation`` (degrees):
    the similarity transform; ``hr_box`` ``(top, left, size)`` and ``ref_center`` ``(y, x)`` in
    photo pixels; ``flipped``: the reference was mirrored.
    """

    hr: np.ndarray
    ref: np.ndarray
    overlap: float
    scale: float
    rotation: float
    hr_box: tuple[int, int, int]
    ref_center: tuple[float, float]
    flipped: bool


def rotation_matrix(degrees: float) -> np.ndarray:
    """2x2 rotation acting on ``(x, y)`` column vectors."""
    angle = math.radians(degrees)
    return np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])


def footprint_overlap(
    hr_box: tuple[int, int, int],
    ref_center: tuple[float, float],
    ref_size: int,
    scale: float,
    rotation: float,
) -> float:
    """Fraction of the HR crop that lies inside the reference's footprint in the photo.

    Measured on the HR crop's pixel centres (every second pixel): a point ``p`` of the photo is
    in the reference when ``scale * R(-rotation) (p - ref_center)`` is within ``ref_size / 2``.
    """
    top, left, size = hr_box
    steps = np.arange(0.5, size, 2.0)
    ys, xs = np.meshgrid(top + steps, left + steps, indexing="ij")
    offsets = np.stack([xs.ravel() - ref_center[1], ys.ravel() - ref_center[0]])
    in_reference = scale * (rotation_matrix(rotation).T @ offsets)
    inside = np.all(np.abs(in_reference) < ref_size / 2.0, axis=0)
    return float(inside.mean())


def _center_range(extent: int, half_footprint: float) -> tuple[float, float]:
    """Centres along one axis that keep the footprint inside the photo (mid-point if none)."""
    if 2 * half_footprint > extent:
        return extent / 2.0, extent / 2.0
    return half_footprint, extent - half_footprint


def _place_reference(
    photo_shape: tuple[int, int],
    hr_box: tuple[int, int, int],
    ref_size: int,
    scale: float,
    rotation: float,
    aligned: bool,
    options: SyntheticOptions,
    rng: np.random.Generator,
) -> tuple[tuple[float, float], float]:
    """Draw the reference centre so that its footprint overlaps the HR crop partly."""
    height, width = photo_shape
    top, left, size = hr_box
    angle = math.radians(rotation)
    half = ref_size / scale * (abs(math.cos(angle)) + abs(math.sin(angle))) / 2.0
    y_low, y_high = _center_range(height, half)
    x_low, x_high = _center_range(width, half)
    hr_y, hr_x = top + size / 2.0, left + size / 2.0
    reach = size / 2.0 + half  # beyond this distance there is no overlap
    y_low, y_high = max(y_low, hr_y - reach), min(y_high, hr_y + reach)
    x_low, x_high = max(x_low, hr_x - reach), min(x_high, hr_x + reach)
    low, high = options.overlap_range
    best: tuple[float, tuple[float, float], float] | None = None
    for _ in range(PLACEMENT_ATTEMPTS):
        center_y = rng.uniform(y_low, y_high) if y_high > y_low else y_low
        center_x = rng.uniform(x_low, x_high) if x_high > x_low else x_low
        if aligned:  # reference top-left on the HR crop's 4-pixel grid
            center_y = top + 4 * round((center_y - ref_size / 2 - top) / 4) + ref_size / 2
            center_x = left + 4 * round((center_x - ref_size / 2 - left) / 4) + ref_size / 2
        center = (center_y, center_x)
        overlap = footprint_overlap(hr_box, center, ref_size, scale, rotation)
        if low <= overlap <= high:
            return center, overlap
        miss = low - overlap if overlap < low else overlap - high
        if 0 < overlap < 1 and (best is None or miss < best[0]):
            best = (miss, center, overlap)
    if best is not None:
        return best[1], best[2]
    # Degenerate photo (about the size of the crop): shift by half a crop; the mirrored border
    # fills what leaves the photo.
    center = (hr_y, hr_x + size / 2.0)
    return center, footprint_overlap(hr_box, center, ref_size, scale, rotation)


def warp_reference(
    photo: np.ndarray, center: tuple[float, float], ref_size: int, scale: float, rotation: float
) -> np.ndarray:
    """Cut the ``ref_size`` square around ``center`` (photo pixels) magnified by ``scale`` and
    rotated by ``rotation`` degrees; ``HxWx3`` uint8 -> ``ref_size x ref_size x 3`` uint8."""
    height, width = photo.shape[:2]
    source = photo
    stretch = np.eye(2) / scale  # reference offset -> source offset
    if scale < 1.0:  # antialiased shrink first, then the warp only rotates
        new_width, new_height = max(1, round(width * scale)), max(1, round(height * scale))
        source = bicubic_resize(photo, new_width, new_height)
        stretch = np.diag([new_width / width, new_height / height]) / scale
    factors = np.array([source.shape[1] / width, source.shape[0] / height])
    center_xy = np.array([center[1], center[0]]) * factors
    affine = stretch @ rotation_matrix(rotation)
    # Continuous coordinates (pixel i covers [i, i+1)): src = c + A (dst + 0.5 - n/2) - 0.5.
    shift = center_xy - 0.5 + affine @ np.full(2, 0.5 - ref_size / 2.0)
    matrix = np.hstack([affine, shift[:, None]]).astype(np.float64)
    return cv2.warpAffine(
        np.ascontiguousarray(source),
        matrix,
        (ref_size, ref_size),
        flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REFLECT_101,
    )


def jitter_colors(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Random brightness, contrast and saturation factors in ``[1 - strength, 1 + strength]``."""
    if strength == 0:
        return image
    brightness, contrast, saturation = rng.uniform(1 - strength, 1 + strength, size=3)
    values = image.astype(np.float32) * brightness
    values = values.mean() + (values - values.mean()) * contrast
    luma = (values @ _LUMA)[..., None]
    values = luma + (values - luma) * saturation
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def warp_perspective(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Move each corner by up to ``strength`` of the side (uniform in x and y) and warp the
    square onto itself: a view from another angle. The border is mirrored."""
    if strength == 0:
        return image
    size_y, size_x = image.shape[:2]
    corners = np.array([[0, 0], [size_x, 0], [size_x, size_y], [0, size_y]], dtype=np.float32)
    moves = rng.uniform(-strength, strength, size=(4, 2)) * np.array([size_x, size_y])
    matrix = cv2.getPerspectiveTransform(corners, (corners + moves).astype(np.float32))
    return cv2.warpPerspective(
        np.ascontiguousarray(image),
        matrix,
        (size_x, size_y),
        flags=cv2.INTER_CUBIC,
        borderMode=cv2.BORDER_REFLECT_101,
    )


def change_photometry(
    image: np.ndarray, options: SyntheticOptions, rng: np.random.Generator
) -> np.ndarray:
    """Another exposure (``2 ** stops``), white balance (per-channel gains) and gamma."""
    if options.exposure == 0 and options.white_balance == 0 and options.gamma_range == (1.0, 1.0):
        return image
    gain = 2.0 ** rng.uniform(-options.exposure, options.exposure)
    balance = rng.uniform(1 - options.white_balance, 1 + options.white_balance, size=3)
    gamma = math.exp(rng.uniform(*np.log(options.gamma_range)))
    values = np.clip(image.astype(np.float32) / 255.0 * gain * balance, 0.0, 1.0) ** gamma
    return np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)


def occlude(image: np.ndarray, photo: np.ndarray, max_area: float, rng: np.random.Generator):
    """Cover a random rectangle of up to ``max_area`` of ``image`` with a piece of ``photo``
    from elsewhere (an occluder with a texture of its own)."""
    size_y, size_x = image.shape[:2]
    area = rng.uniform(0.05, max(0.05, max_area)) * size_y * size_x
    aspect = math.exp(rng.uniform(math.log(0.33), math.log(3.0)))
    height = int(min(size_y, max(4, round(math.sqrt(area * aspect)))))
    width = int(min(size_x, max(4, round(area / height))))
    top, left = int(rng.integers(0, size_y - height + 1)), int(rng.integers(0, size_x - width + 1))
    source_top = int(rng.integers(0, photo.shape[0] - height + 1))
    source_left = int(rng.integers(0, photo.shape[1] - width + 1))
    occluded = image.copy()
    patch = photo[source_top : source_top + height, source_left : source_left + width]
    occluded[top : top + height, left : left + width] = patch[::-1, ::-1]
    return occluded


def make_harder(
    ref: np.ndarray, photo: np.ndarray, options: SyntheticOptions, rng: np.random.Generator
) -> np.ndarray:
    """The harder-reference steps of the module docstring (item 5), in the order a second
    photograph would meet them: viewpoint, light, lens, occluder, file."""
    ref = warp_perspective(ref, options.perspective, rng)
    ref = change_photometry(ref, options, rng)
    if options.blur_probability and rng.random() < options.blur_probability:
        ref = gaussian_blur(ref, float(rng.uniform(*options.blur_sigma_range)))
    if options.occlusion_probability and rng.random() < options.occlusion_probability:
        ref = occlude(ref, photo, options.occlusion_max_area, rng)
    if options.jpeg_probability and rng.random() < options.jpeg_probability:
        ref = jpeg(
            ref, int(rng.integers(options.jpeg_quality_range[0], options.jpeg_quality_range[1] + 1))
        )
    return ref


def synthesize_pair(
    photo: np.ndarray,
    hr_size: int,
    ref_size: int,
    rng: np.random.Generator,
    options: SyntheticOptions | None = None,
) -> SyntheticPair:
    """Cut an HR crop and a partly overlapping, transformed reference from ``photo``.

    Args:
        photo: ``HxWx3`` uint8, at least ``hr_size`` on each side.
        hr_size: side of the HR crop.
        ref_size: side of the reference.
        rng: the only source of randomness.
        options: the transform's ranges (defaults: :class:`SyntheticOptions`).
    """
    options = options or SyntheticOptions()
    height, width = photo.shape[:2]
    if min(height, width) < hr_size:
        raise ValueError(f"photo {width}x{height} is smaller than the {hr_size}-pixel HR crop")
    top = int(rng.integers(0, height - hr_size + 1))
    left = int(rng.integers(0, width - hr_size + 1))
    hr_box = (top, left, hr_size)
    aligned = rng.random() < options.aligned_probability
    if aligned:
        scale, rotation = 1.0, 0.0
    else:
        low, high = options.scale_range
        scale = float(math.exp(rng.uniform(math.log(low), math.log(high))))
        rotation = float(rng.uniform(-options.max_rotation, options.max_rotation))
        # Magnify at least enough for the footprint to fit the photo, within the scale range.
        spread = abs(math.cos(math.radians(rotation))) + abs(math.sin(math.radians(rotation)))
        scale = max(scale, min(high, ref_size * spread / min(height, width)))
    center, overlap = _place_reference(
        (height, width), hr_box, ref_size, scale, rotation, aligned, options, rng
    )
    ref = warp_reference(photo, center, ref_size, scale, rotation)
    ref = jitter_colors(ref, options.color_jitter, rng)
    if options.harder_probability == 1 or rng.random() < options.harder_probability:
        ref = make_harder(ref, photo, options, rng)
    flipped = bool(rng.random() < options.flip_probability)
    if flipped:
        ref = ref[:, ::-1]
    return SyntheticPair(
        hr=np.ascontiguousarray(photo[top : top + hr_size, left : left + hr_size]),
        ref=np.ascontiguousarray(ref),
        overlap=overlap,
        scale=scale,
        rotation=rotation,
        hr_box=hr_box,
        ref_center=center,
        flipped=flipped,
    )
