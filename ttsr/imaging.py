"""Image files in and out: ``HxWx3`` uint8 RGB arrays, clear errors, atomic writes.

Every reader of user images (inference, evaluation, the CLIs) goes through :func:`load_rgb`, so
colour modes, EXIF rotation, truncated files and decompression bombs are handled once. Convertible
modes (greyscale, palette, RGBA, CMYK, 16-bit...) are converted with a note on the ``ttsr`` logger
(the CLIs print it on stderr); anything unusable raises :class:`ImageError`.
"""

from __future__ import annotations

import io
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ttsr.files import atomic_write

logger = logging.getLogger(__name__)

#: What a user may pass as an image: a path, a PIL image or an ``HxWx3`` uint8 array.
ImageSource = str | os.PathLike | Image.Image | np.ndarray

#: Largest image accepted (pixels), checked from the header before decoding: PIL's own
#: decompression-bomb threshold, enforced as an error rather than a warning.
MAX_IMAGE_PIXELS = int(Image.MAX_IMAGE_PIXELS or 89_478_485)

#: File name suffixes treated as images when a folder is given.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

_EXIF_ORIENTATION = 0x0112


class InputError(ValueError):
    """Unusable input or output (file, image, size, memory budget); the message says what to do."""


class ImageError(InputError):
    """An input image that cannot be used; the message says what is wrong and what to do."""


class OutputError(InputError):
    """An output file that cannot be written."""


def describe(source: ImageSource) -> str:
    """A short name for messages: the path, or the kind of in-memory image."""
    if isinstance(source, Image.Image):
        return f"PIL image {source.size[0]}x{source.size[1]} ({source.mode})"
    if isinstance(source, np.ndarray):
        return f"array {source.shape} {source.dtype}"
    return str(source)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ImageError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise ImageError(f"{path} is a directory, but an image file is expected here")


def _check_pixels(width: int, height: int, name: str, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageError(
            f"{name} is {width}x{height} = {width * height / 1e6:.0f} megapixels, more than the "
            f"{max_pixels / 1e6:.0f}-megapixel limit (decompression-bomb guard); downscale or "
            "crop it"
        )


def _open(path: Path, max_pixels: int) -> Image.Image:
    """Open ``path`` lazily (header only), refusing non-images and oversized images."""
    _check_file(path)
    try:
        with warnings.catch_warnings():  # oversized images are refused below, not warned about
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except UnidentifiedImageError as error:
        raise ImageError(f"{path} is not an image file ttsr can read (PNG, JPEG, ...)") from error
    except Image.DecompressionBombError as error:
        raise ImageError(
            f"{path} is too large to decode safely (decompression-bomb guard): {error}"
        ) from error
    except OSError as error:
        raise ImageError(f"{path} could not be opened: {error}") from error
    width, height = image.size
    _check_pixels(width, height, str(path), max_pixels)
    return image


def _header_orientation(image: Image.Image) -> int:
    """EXIF orientation known without decoding (a PNG may store it after the pixels: 1 then)."""
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    return int(image.getexif().get(_EXIF_ORIENTATION, 1))


def _oriented_size(image: Image.Image) -> tuple[int, int]:
    """``(height, width)`` after EXIF rotation (orientations 5..8 swap the sides)."""
    width, height = image.size
    orientation = _header_orientation(image)
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def image_size(
    source: ImageSource, max_pixels: int = MAX_IMAGE_PIXELS, *, verify: bool = False
) -> tuple[int, int]:
    """``(height, width)`` of an image as :func:`load_rgb` will return it, without decoding.

    Exact except for a PNG whose EXIF orientation tag follows the pixel data (sides may swap).
    ``verify``: also check a file's data (PIL ``verify``), for loaders that decode it later.
    """
    if isinstance(source, np.ndarray):
        return int(source.shape[0]), int(source.shape[1])
    if isinstance(source, Image.Image):
        return _oriented_size(source)
    with _open(Path(source), max_pixels) as image:
        size = _oriented_size(image)
        if verify:
            try:
                image.verify()
            except (OSError, SyntaxError, ValueError) as error:
                raise ImageError(f"{source}: unreadable image ({error})") from error
        return size


def _wide_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """16/32-bit integer or float pixels -> uint8 (16-bit scaled by 1/257, floats from [0, 1])."""
    values = values.astype(np.float64)
    if mode == "F":
        peak = 1.0 if values.max(initial=0.0) <= 1.0 else 255.0
    elif mode.startswith("I;16") or values.max(initial=0.0) > 255:
        peak = 65535.0
    else:
        peak = 255.0
    return np.clip(np.rint(values * (255.0 / peak)), 0, 255).astype(np.uint8)


def pil_to_rgb(image: Image.Image, name: str) -> np.ndarray:
    """Decode and convert a PIL image to ``HxWx3`` uint8 RGB, noting any conversion."""
    if getattr(image, "n_frames", 1) > 1:
        logger.info("%s has %d frames; using the first", name, image.n_frames)
    try:
        image.load()
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
        if orientation not in (1, None):
            image = ImageOps.exif_transpose(image)
            logger.info(
                "%s: rotated/flipped upright as its EXIF orientation tag (%s) says",
                name,
                orientation,
            )
        mode = image.mode
        if mode == "RGB":
            return np.array(image)
        if mode.startswith("I") or mode == "F":
            grey = _wide_to_uint8(np.asarray(image), mode)
            logger.info("%s is %s (high bit depth greyscale); converted to 8-bit RGB", name, mode)
            return np.repeat(grey[..., None], 3, axis=2)
        if mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info:
            logger.info("%s is %s with transparency; the alpha channel is ignored", name, mode)
        else:
            logger.info("%s is %s; converted to RGB", name, mode)
        return np.array(image.convert("RGB"))
    except (OSError, SyntaxError) as error:
        raise ImageError(f"{name} could not be decoded (truncated or corrupt?): {error}") from error
    except ValueError as error:
        raise ImageError(
            f"{name}: colour mode {image.mode} cannot be converted to RGB ({error}); "
            "save it as an RGB PNG or JPEG"
        ) from error


def load_rgb(source: ImageSource, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Read a path, PIL image or array as ``HxWx3`` uint8 RGB (EXIF orientation applied).

    Greyscale, palette, alpha, CMYK and high-bit-depth images are converted (a note is logged);
    missing files, directories, non-images, truncated files and images over ``max_pixels`` raise
    :class:`ImageError`.
    """
    if isinstance(source, np.ndarray):
        return array_to_rgb(source)
    if isinstance(source, Image.Image):
        _check_pixels(*source.size, describe(source), max_pixels)
        return pil_to_rgb(source, describe(source))
    path = Path(source)
    with _open(path, max_pixels) as image:
        return pil_to_rgb(image, str(path))


def load_rgb_reduced(
    path: str | os.PathLike,
    divisor: float | None = None,
    long_side: int | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> tuple[np.ndarray, tuple[int, int]]:
    """An image file shrunk (PIL bicubic) by ``divisor`` or to a ``long_side``, never enlarged,
    and its full ``(height, width)``.

    Like :func:`load_rgb` but cheaper for large photos: a JPEG is decoded at the smallest of its
    built-in reduced scales that is still large enough (``draft``).
    """
    path = Path(path)
    with _open(path, max_pixels) as image:
        height, width = _oriented_size(image)
        if divisor is None:
            divisor = max(height, width) / long_side if long_side else 1.0
        divisor = max(1.0, divisor)
        target = (max(1, round(width / divisor)), max(1, round(height / divisor)))
        if image.format == "JPEG":
            image.draft(None, (max(target), max(target)))  # both sides stay >= the target
        rgb = pil_to_rgb(image, str(path))
    if rgb.shape[:2] != (target[1], target[0]):
        rgb = np.asarray(Image.fromarray(rgb).resize(target, Image.BICUBIC))
    return rgb, (height, width)


def array_to_rgb(array: np.ndarray) -> np.ndarray:
    """Validate an in-memory image: ``HxWx3`` uint8 (``HxW`` greyscale is converted)."""
    if array.dtype != np.uint8:
        raise ImageError(f"image arrays must be uint8, got {array.dtype}; scale them to 0..255")
    if array.ndim == 2:
        logger.info("greyscale array %s converted to RGB", array.shape)
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ImageError(f"image arrays must be HxWx3 (RGB), got shape {array.shape}")
    return np.ascontiguousarray(array)


def require_min_side(shape: Sequence[int], minimum: int, name: str, role: str) -> None:
    """Raise :class:`ImageError` if either side of ``shape`` (H, W, ...) is below ``minimum``."""
    height, width = int(shape[0]), int(shape[1])
    if min(height, width) < minimum:
        raise ImageError(
            f"{name} is {width}x{height}: too small for a {role}, which needs at least "
            f"{minimum}x{minimum} pixels"
        )


# --- writing ------------------------------------------------------------------------------------


def image_format_for(path: Path) -> str:
    """PIL format name for ``path``'s suffix, or :class:`OutputError` if it is not an image type."""
    format_name = Image.registered_extensions().get(path.suffix.lower())
    if format_name is None or format_name not in Image.SAVE:
        raise OutputError(
            f"{path}: cannot tell which image format to write from the suffix "
            f"{path.suffix or '(none)'!r}; use .png (lossless) or .jpg"
        )
    return format_name


def check_writable(path: str | os.PathLike, image: bool = True) -> Path:
    """Fail early (:class:`OutputError`) if ``path`` cannot be written; creates missing parents."""
    path = Path(path)
    if image:
        image_format_for(path)
    if path.is_dir():
        raise OutputError(f"{path} is a directory; give a file name for the output")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error.strerror or error}") from error
    return path


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    try:
        atomic_write(path, lambda stream: stream.write(data))
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error.strerror or error}") from error


def save_image(image: Image.Image | np.ndarray, path: str | os.PathLike) -> Path:
    """Save an image atomically (never a partial or empty file); the suffix picks the format."""
    path = Path(path)
    format_name = image_format_for(path)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if format_name == "JPEG":
        image = image.convert("RGB")
    buffer = io.BytesIO()
    options = {"quality": 95} if format_name in ("JPEG", "WEBP") else {}
    image.save(buffer, format=format_name, **options)
    write_atomic(path, buffer.getvalue())
    return path


# --- folders ------------------------------------------------------------------------------------


def list_images(folder: str | os.PathLike, *, nonempty: bool = False) -> list[Path]:
    """Image files (by suffix) directly in ``folder``, sorted by name; ``nonempty``: an
    :class:`ImageError` if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"{folder} is not a folder")
    images = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if nonempty and not images:
        raise ImageError(f"{folder} holds no images (.png, .jpg, ...)")
    return images


def match_references(stems: Iterable[str], candidates: Sequence[Path]) -> dict[str, list[Path]]:
    """References of each stem among ``candidates``: ``STEM.*`` and ``STEM_<number>.*``.

    A candidate named ``a_1`` belongs to ``a`` unless ``a_1`` is itself one of the stems.
    Stems without a reference map to an empty list.
    """
    stems = list(stems)
    own = set(stems)
    matches: dict[str, list[Path]] = {stem: [] for stem in stems}
    for candidate in sorted(candidates):
        if candidate.stem in own:
            matches[candidate.stem].append(candidate)
            continue
        numbered = re.fullmatch(r"(.+)_(\d+)", candidate.stem)
        if numbered and numbered.group(1) in own:
            matches[numbered.group(1)].append(candidate)
    return matches
