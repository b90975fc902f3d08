"""Reading images from disk into ``HxWx3`` uint8 RGB arrays, with clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageError(ValueError):
    """An input image that cannot be used; the message says what is wrong and what to do."""


def load_rgb(path: str | Path) -> np.ndarray:
    """Read ``path`` as an ``HxWx3`` uint8 RGB array (EXIF orientation applied, modes converted)."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_dir():
        raise ImageError(f"{path} is a directory, not an image file")
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            return np.asarray(image.convert("RGB"))
    except UnidentifiedImageError as error:
        raise ImageError(f"{path} is not an image PIL can read") from error
    except OSError as error:
        raise ImageError(f"{path} could not be decoded (truncated or corrupt?): {error}") from error
