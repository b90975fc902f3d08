"""Regenerate the bundled demo pair: ``python -m ttsr.assets.make_demo_pair`` (deterministic).

A procedurally drawn scene (bricks, stripes, lettering, tiles, wood grain, rings) is viewed twice:
``demo_lr.png`` is one view taken down x4 with PIL bicubic (the input to upscale), ``demo_ref.png``
a second, shifted and enlarged view at full resolution (the reference), ``demo_hr.png`` the first
view at full resolution (the ground truth). Everything is drawn here from numbers; no photograph or
font file is used.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
WORLD_SIZE = (640, 448)  # width, height
LR_VIEW = (96, 56, 480, 312)  # left, top, right, bottom: 384x256 -> LR 96x64
REF_VIEW = (160, 24, 496, 276)  # 336x252, enlarged x1.25 -> 420x315 (cropped to 420x312)
REF_ZOOM = 1.25

# 5x7 glyphs, one string of 7 rows of 5 pixels each.
GLYPHS = {
    "T": "11111 00100 00100 00100 00100 00100 00100",
    "E": "11111 10000 10000 11110 10000 10000 11111",
    "X": "10001 10001 01010 00100 01010 10001 10001",
    "U": "10001 10001 10001 10001 10001 10001 01110",
    "R": "11110 10001 10001 11110 10100 10010 10001",
    "S": "01111 10000 10000 01110 00001 00001 11110",
    "D": "11110 10001 10001 10001 10001 10001 11110",
    "M": "10001 11011 10101 10101 10001 10001 10001",
    "O": "01110 10001 10001 10001 10001 10001 01110",
    "F": "11111 10000 10000 11110 10000 10000 10000",
    "A": "01110 10001 10001 11111 10001 10001 10001",
    "N": "10001 11001 10101 10011 10001 10001 10001",
    " ": "00000 00000 00000 00000 00000 00000 00000",
}


def glyph(letter: str) -> np.ndarray:
    return np.array([[c == "1" for c in row] for row in GLYPHS[letter].split()], bool)


def bricks(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Running-bond brick wall with mortar, per-brick colour and grain."""
    brick_h, brick_w, mortar = 14, 34, 3
    rows, cols = np.mgrid[0:height, 0:width]
    course = rows // brick_h
    shifted = cols + (course % 2) * (brick_w // 2)
    brick_id = course * 1000 + shifted // brick_w
    in_mortar = (rows % brick_h < mortar) | (shifted % brick_w < mortar)
    tint = rng.uniform(0.75, 1.15, size=brick_id.max() + 1)[brick_id]
    base = np.stack([150 * tint, 70 * tint, 50 * tint], axis=-1)
    base += rng.normal(0, 10, size=base.shape)
    base[in_mortar] = [200, 195, 185] + rng.normal(0, 6, size=(in_mortar.sum(), 3))
    return base


def stripes(height: int, width: int) -> np.ndarray:
    """Diagonal stripes whose period grows from left to right."""
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    period = 5 + 10 * cols / width
    phase = np.sin(2 * np.pi * (rows + cols) / period)
    value = 128 + 110 * np.sign(phase) * np.abs(phase) ** 0.3
    return np.stack([value, value * 0.9 + 20, 255 - value * 0.6], axis=-1)


def lettering(height: int, width: int, text: str, scale: int) -> np.ndarray:
    """Dark lettering on a light sign."""
    sign = np.full((height, width, 3), (235.0, 225.0, 180.0))
    left, top = 8, (height - 7 * scale) // 2
    for letter in text:
        mask = np.kron(glyph(letter), np.ones((scale, scale), bool))
        h, w = mask.shape
        if left + w > width:
            break
        region = sign[top : top + h, left : left + w]
        region[mask] = (30, 30, 60)
        left += w + scale
    return sign


def tiles(height: int, width: int) -> np.ndarray:
    """Blue and white checkerboard tiles with thin grout."""
    rows, cols = np.mgrid[0:height, 0:width]
    check = ((rows // 12) + (cols // 12)) % 2 == 0
    image = np.where(check[..., None], (40.0, 80.0, 170.0), (240.0, 240.0, 235.0))
    grout = (rows % 12 == 0) | (cols % 12 == 0)
    image[grout] = (120, 120, 120)
    return image


def wood(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Wood grain: distorted rings around an off-image centre."""
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    wobble = 3 * np.sin(rows / 9.0) + rng.normal(0, 0.4, size=rows.shape)
    rings = np.sin(np.hypot(rows + 200, (cols - width / 2) * 0.35) / 2.2 + wobble)
    value = 0.5 + 0.5 * rings
    return np.stack([120 + 80 * value, 75 + 55 * value, 35 + 30 * value], axis=-1)


def rings(height: int, width: int) -> np.ndarray:
    """Concentric rings (a zone plate) in grey."""
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    radius2 = (rows - height / 2) ** 2 + (cols - width / 2) ** 2
    value = 128 + 120 * np.cos(radius2 / 90.0)
    return np.repeat(value[..., None], 3, axis=2)


def world(seed: int = 2020) -> np.ndarray:
    """The whole scene, ``HxWx3`` uint8."""
    rng = np.random.default_rng(seed)
    width, height = WORLD_SIZE
    canvas = np.zeros((height, width, 3))
    canvas[:, :] = bricks(height, width, rng)
    canvas[40:120, 60:600] = lettering(80, 540, "TEXTURE TRANSFER", 4)
    canvas[150:300, 40:250] = stripes(150, 210)
    canvas[150:300, 270:430] = tiles(150, 160)
    canvas[150:300, 450:620] = rings(150, 170)
    canvas[320:430, 40:620] = wood(110, 580, rng)
    canvas[440:448] = 60
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def make_pair() -> tuple[Image.Image, Image.Image, Image.Image]:
    """``(lr, ref, hr)`` images of the demo pair."""
    scene = Image.fromarray(world())
    hr = scene.crop(LR_VIEW)
    lr = hr.resize((hr.width // 4, hr.height // 4), Image.BICUBIC)
    ref_view = scene.crop(REF_VIEW)
    size = (round(ref_view.width * REF_ZOOM), round(ref_view.height * REF_ZOOM))
    ref = ref_view.resize(size, Image.BICUBIC)
    ref = ref.crop((0, 0, ref.width // 4 * 4, ref.height // 4 * 4))
    return lr, ref, hr


def main() -> None:
    lr, ref, hr = make_pair()
    lr.save(HERE / "demo_lr.png", optimize=True)
    ref.save(HERE / "demo_ref.png", optimize=True)
    hr.save(HERE / "demo_hr.png", optimize=True)


if __name__ == "__main__":
    main()
