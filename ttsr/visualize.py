"""Pictures of what TTSR did: soft-attention heat maps, correspondence maps, side-by-side views.

All functions take and return ``HxWx3`` uint8 RGB arrays or PIL images; maps computed at LR
resolution are enlarged x4 (nearest) so that they line up with the SR output.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

GAP = 4
BACKGROUND = (255, 255, 255)
LABEL_HEIGHT = 18


def enlarge(image: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour enlargement of an ``HxW[xC]`` array by an integer factor."""
    return np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)


def attention_heatmap(soft_attention: np.ndarray, scale: int = 4) -> Image.Image:
    """Soft attention ``[H, W]`` (relevance in [0, 1]) as an inferno heat map, enlarged x``scale``.

    Bright: the reference holds a close match of this patch; dark: little was transferred.
    """
    levels = np.clip(np.rint(np.clip(soft_attention, 0.0, 1.0) * 255), 0, 255).astype(np.uint8)
    coloured = cv2.applyColorMap(levels, cv2.COLORMAP_INFERNO)[..., ::-1]
    return Image.fromarray(np.ascontiguousarray(enlarge(coloured, scale)))


def colour_wheel(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """2D colour code of positions ``u`` (left..right) and ``v`` (top..bottom) in [0, 1].

    Hue is the direction from the centre, saturation the distance: white in the middle, saturated
    at the edges, so every position has its own colour. Returns ``HxWx3`` uint8.
    """
    du, dv = np.asarray(u, np.float32) - 0.5, np.asarray(v, np.float32) - 0.5
    hue = (np.degrees(np.arctan2(dv, du)) + 360.0) % 360.0
    saturation = np.clip(np.hypot(du, dv) / np.sqrt(0.5), 0.0, 1.0)
    hsv = np.stack([hue, saturation, np.ones_like(hue)], axis=-1).astype(np.float32)
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8)


def _canvas_coordinates(
    reference_id: np.ndarray, y: np.ndarray, x: np.ndarray, sizes: Sequence[tuple[int, int]]
) -> tuple[np.ndarray, np.ndarray]:
    """Reference positions -> (u, v) on a canvas with the references side by side, left to right."""
    heights = np.array([h for h, _ in sizes], np.float32)[reference_id]
    widths = np.array([w for _, w in sizes], np.float32)[reference_id]
    u = (reference_id + x / widths) / len(sizes)
    return u, y / heights


def correspondence_map(
    reference_id: np.ndarray,
    y: np.ndarray,
    x: np.ndarray,
    reference_sizes: Sequence[tuple[int, int]],
    scale: int = 4,
) -> Image.Image:
    """Colour each output patch by the reference position its texture came from.

    ``reference_id``, ``y``, ``x`` are ``[H, W]`` (pixel coordinates in each reference). With
    several references the colour code spans them side by side; :func:`correspondence_key` shows it.
    """
    u, v = _canvas_coordinates(reference_id, y, x, reference_sizes)
    return Image.fromarray(enlarge(colour_wheel(u, v), scale))


def correspondence_key(references: Sequence[np.ndarray], opacity: float = 0.6) -> Image.Image:
    """The references overlaid with their colour code (side by side): the legend of the map."""
    sizes = [r.shape[:2] for r in references]
    panels = []
    for index, reference in enumerate(references):
        height, width = reference.shape[:2]
        rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
        ids = np.full((height, width), index)
        u, v = _canvas_coordinates(ids, rows + 0.5, cols + 0.5, sizes)
        code = colour_wheel(u, v).astype(np.float32)
        blended = opacity * code + (1.0 - opacity) * reference.astype(np.float32)
        panels.append(Image.fromarray(np.rint(blended).astype(np.uint8)))
    return side_by_side(panels)


def _as_pil(image: Image.Image | np.ndarray) -> Image.Image:
    return image if isinstance(image, Image.Image) else Image.fromarray(image)


def fit_height(image: Image.Image | np.ndarray, height: int) -> Image.Image:
    """Resize to ``height`` keeping the aspect ratio (bicubic)."""
    image = _as_pil(image).convert("RGB")
    if image.height == height:
        return image
    width = max(1, round(image.width * height / image.height))
    return image.resize((width, height), Image.BICUBIC)


def stack_vertically(images: Sequence[Image.Image | np.ndarray], height: int) -> Image.Image:
    """Images one above the other, scaled together to a total ``height`` (gaps included)."""
    images = [_as_pil(i).convert("RGB") for i in images]
    available = height - GAP * (len(images) - 1)
    total = sum(i.height for i in images)
    parts = [fit_height(i, max(1, round(i.height * available / total))) for i in images]
    canvas = Image.new("RGB", (max(p.width for p in parts), height), BACKGROUND)
    top = 0
    for part in parts:
        canvas.paste(part, (0, top))
        top += part.height + GAP
    return canvas


def side_by_side(
    images: Sequence[Image.Image | np.ndarray], labels: Sequence[str] | None = None
) -> Image.Image:
    """Panels left to right at the height of the first, with optional labels underneath."""
    height = _as_pil(images[0]).height
    panels = [fit_height(i, height) for i in images]
    width = sum(p.width for p in panels) + GAP * (len(panels) - 1)
    label_band = LABEL_HEIGHT if labels else 0
    canvas = Image.new("RGB", (width, height + label_band), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=12) if labels else None
    left = 0
    for index, panel in enumerate(panels):
        canvas.paste(panel, (left, 0))
        if labels:
            draw.text((left + 2, height + 2), labels[index], fill=(0, 0, 0), font=font)
        left += panel.width + GAP
    return canvas


def comparison(
    bicubic: Image.Image | np.ndarray,
    sr: Image.Image | np.ndarray,
    references: Sequence[Image.Image | np.ndarray],
    labels: Sequence[str] = ("bicubic", "TTSR", "reference"),
) -> Image.Image:
    """LR-up | SR | reference(s) (stacked), at the SR's height, labelled."""
    height = _as_pil(sr).height
    return side_by_side([bicubic, sr, stack_vertically(references, height)], labels)


def bar_chart(
    names: Sequence[str], series: dict[str, Sequence[float]], title: str, unit: str = "dB"
) -> Image.Image:
    """A plain horizontal bar chart (one group of bars per name), for evaluation summaries."""
    colours = [(150, 150, 150), (31, 119, 180), (255, 127, 14), (44, 160, 44)]
    font = ImageFont.load_default(size=12)
    values = [v for column in series.values() for v in column if np.isfinite(v)]
    low = min(min(values, default=0.0), 0.0)
    high = max(max(values, default=1.0), low + 1e-6)
    bar, name_width, plot_width = 8, 160, 480
    group = bar * len(series) + 6
    height = 40 + group * len(names) + 20 * len(series)
    canvas = Image.new("RGB", (name_width + plot_width + 80, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), title, fill=(0, 0, 0), font=font)
    top = 28
    for row, name in enumerate(names):
        draw.text((4, top + row * group), name[:24], fill=(0, 0, 0), font=font)
        for column, column_values in enumerate(series.values()):
            value = column_values[row]
            if not np.isfinite(value):
                continue
            y = top + row * group + column * bar
            x0 = name_width + plot_width * (0 - low) / (high - low)
            x1 = name_width + plot_width * (value - low) / (high - low)
            draw.rectangle((min(x0, x1), y, max(x0, x1), y + bar - 2), fill=colours[column % 4])
            draw.text((max(x0, x1) + 3, y - 3), f"{value:.2f}", fill=(0, 0, 0), font=font)
    legend_top = top + group * len(names) + 4
    for column, label in enumerate(series):
        y = legend_top + 18 * column
        draw.rectangle((4, y + 3, 14, y + 11), fill=colours[column % 4])
        draw.text((20, y), f"{label} ({unit})", fill=(0, 0, 0), font=font)
    return canvas
