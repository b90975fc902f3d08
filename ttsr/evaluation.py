"""Dataset evaluation with TTSR's protocol: Y-PSNR / SSIM of bicubic and the model against HR.

Each HR image is cropped to a multiple of 4 and taken down x4 with PIL bicubic
(:func:`ttsr.data.degradation.lr_from_hr`); the bicubic row measures the PIL bicubic x4 of that LR,
the model row the :class:`~ttsr.inference.Upscaler` output. References come from:

- a CUFED5-layout folder (``NNN_0.png`` HR, ``NNN_1.png`` .. ``NNN_5.png`` references, level 1 the
  most similar): one level, or all five searched jointly;
- ``ref_mode="lr"``: the LR image is its own reference (TTSR's protocol for sets without
  references); ``ref_mode="hr"``: the HR image itself (an upper bound);
- a reference folder matched by file stem (``NAME.png``, ``NAME_1.png`` ...);
- explicit files (one HR and its references, e.g. a stereo pair).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
from PIL import Image

from ttsr import visualize
from ttsr.data.degradation import SCALE, lr_from_hr, upsample
from ttsr.data.layouts import CUFED5_LEVELS, cufed5_entries
from ttsr.imaging import (
    InputError,
    image_size,
    list_images,
    load_rgb,
    match_references,
    require_min_side,
)
from ttsr.inference import MIN_LR_SIDE, Upscaler
from ttsr.metrics import psnr_y, ssim_y
from ttsr.model.ttsr import MIN_REFERENCE_SIDE

RefMode = Literal["cufed", "lr", "hr", "dir", "files"]
#: A corruption of the LR after the bicubic downscale (e.g. ``LRCorruption(jpeg=75)``).
Corruption = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class EvalItem:
    """One HR image and where its references come from (``references`` for dir/files/cufed)."""

    name: str
    hr: Path
    ref_mode: RefMode
    references: tuple[Path, ...] = ()


@dataclass(frozen=True)
class BicubicRow:
    """The scores every evaluation has: the image's name and bicubic's Y-PSNR and SSIM."""

    image: str
    bicubic_psnr: float
    bicubic_ssim: float


@dataclass(frozen=True)
class EvalRow(BicubicRow):
    """Scores of one image (model scores ``None`` when only bicubic is measured)."""

    ttsr_psnr: float | None = None
    ttsr_ssim: float | None = None


@dataclass(frozen=True)
class BicubicImages:
    """The images every evaluation has: the HR target and the bicubic x4 of its LR."""

    hr: np.ndarray
    bicubic: np.ndarray


@dataclass(frozen=True)
class EvalImages(BicubicImages):
    """What one evaluated image looked like, for comparison grids."""

    sr: np.ndarray | None
    references: tuple[np.ndarray, ...]


def cufed_items(folder: Path, level: int | Literal["all"] = 1) -> list[EvalItem]:
    """Items of a CUFED5 folder with reference ``level`` (1..5) or ``"all"`` five jointly."""
    levels = CUFED5_LEVELS if level == "all" else (int(level),)
    return [EvalItem(e.name, e.hr, "cufed", e.references) for e in cufed5_entries(folder, levels)]


def folder_items(
    folder: Path, ref_mode: Literal["lr", "hr", "dir"], ref_dir: Path | None = None
) -> list[EvalItem]:
    """Items of an HR folder with the LR or HR as reference, or references from ``ref_dir``."""
    images = list_images(folder, nonempty=True)
    if ref_mode != "dir":
        return [EvalItem(p.stem, p, ref_mode) for p in images]
    if ref_dir is None:
        raise InputError("give the folder of references (--ref-dir)")
    matched = match_references([p.stem for p in images], list_images(ref_dir))
    missing = [p.stem for p in images if not matched[p.stem]]
    if missing:
        raise InputError(
            f"no reference in {ref_dir} for {len(missing)} of {len(images)} images "
            f"(first: {missing[0]}); name them NAME.png or NAME_1.png ... after the HR image"
        )
    return [EvalItem(p.stem, p, "dir", tuple(matched[p.stem])) for p in images]


def pair_items(hr: Path, references: Sequence[Path]) -> list[EvalItem]:
    """One HR file with explicit reference files (e.g. the two views of a stereo pair)."""
    if not references:
        raise InputError("give at least one reference file with the HR file")
    return [EvalItem(Path(hr).stem, Path(hr), "files", tuple(Path(r) for r in references))]


#: SSIM's Gaussian window: the measured region must be at least this large.
SSIM_WINDOW = 11


def check_item(item: EvalItem, upscaler: Upscaler | None, border: int = 0) -> None:
    """Check sizes (and, with a model, the memory budget) from the image headers only."""
    height, width = image_size(item.hr)
    smallest = max(SCALE * MIN_LR_SIDE, SCALE * math.ceil((2 * border + SSIM_WINDOW) / SCALE))
    role = f"HR image (SSIM with border {border})" if border else "HR image"
    require_min_side((height, width), smallest, str(item.hr), role)
    lr_size = (height // SCALE, width // SCALE)
    if item.ref_mode == "lr":
        reference_sizes = [lr_size]
    elif item.ref_mode == "hr":
        reference_sizes = [(lr_size[0] * SCALE, lr_size[1] * SCALE)]
    else:
        reference_sizes = []
        for reference in item.references:
            size = image_size(reference)
            require_min_side(size, MIN_REFERENCE_SIDE, str(reference), "reference")
            reference_sizes.append((size[0] // SCALE * SCALE, size[1] // SCALE * SCALE))
    if upscaler is not None:
        upscaler.plan(
            lr_size, [(h // SCALE * SCALE, w // SCALE * SCALE) for h, w in reference_sizes]
        )


def degraded_lr(
    hr: np.ndarray, corrupt: Corruption | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(hr_cropped, lr, lrsr)`` as :func:`~ttsr.data.degradation.lr_from_hr`, the LR then
    corrupted by ``corrupt`` (if given) and the bicubic LR-up made from the corrupted LR."""
    hr, lr, lrsr = lr_from_hr(hr)
    if corrupt is None:
        return hr, lr, lrsr
    lr = corrupt(lr)
    return hr, lr, upsample(lr)


def evaluate_item(
    item: EvalItem, upscaler: Upscaler | None, border: int = 0, corrupt: Corruption | None = None
) -> tuple[EvalRow, EvalImages]:
    """Score bicubic (and the model, if given) on one item, its LR corrupted by ``corrupt``."""
    hr, lr, bicubic = degraded_lr(load_rgb(item.hr), corrupt)
    if item.ref_mode == "lr":
        references: tuple[np.ndarray, ...] = (lr,)
    elif item.ref_mode == "hr":
        references = (hr,)
    else:
        references = tuple(load_rgb(r) for r in item.references)
    row = EvalRow(item.name, psnr_y(hr, bicubic, border), ssim_y(hr, bicubic, border))
    sr = None
    if upscaler is not None:
        sr = np.asarray(upscaler.upscale(lr, list(references)).sr)
        row = EvalRow(
            item.name,
            row.bicubic_psnr,
            row.bicubic_ssim,
            psnr_y(hr, sr, border),
            ssim_y(hr, sr, border),
        )
    return row, EvalImages(hr, bicubic, sr, references)


@dataclass
class EvalTable:
    """Per-image rows and their mean; renders as text, JSON and CSV."""

    rows: list[EvalRow] = field(default_factory=list)
    settings: dict[str, object] = field(default_factory=dict)

    COLUMNS = ("bicubic_psnr", "bicubic_ssim", "ttsr_psnr", "ttsr_ssim")
    #: Names of the methods whose ``<method>_psnr`` columns the summary chart shows.
    LABELS = {"bicubic": "bicubic", "ttsr": "TTSR"}

    def columns(self) -> tuple[str, ...]:
        """The columns measured (model columns are left out when only bicubic was)."""
        return tuple(c for c in self.COLUMNS if any(getattr(r, c) is not None for r in self.rows))

    def mean(self) -> dict[str, float]:
        """Mean of every column over the images (PSNR of identical images is ``inf``)."""
        return {c: float(np.mean([getattr(r, c) for r in self.rows])) for c in self.columns()}

    def format(self) -> str:
        """A plain-text table with a mean row."""
        columns = self.columns()
        name_width = max([len("mean"), *(len(r.image) for r in self.rows)])
        header = f"{'image':<{name_width}}  " + "  ".join(f"{c:>12}" for c in columns)
        lines = [header, "-" * len(header)]
        for row in self.rows:
            values = "  ".join(f"{_fmt(getattr(row, c), c):>12}" for c in columns)
            lines.append(f"{row.image:<{name_width}}  {values}")
        lines.append("-" * len(header))
        mean = self.mean()
        values = "  ".join(f"{_fmt(mean[c], c):>12}" for c in columns)
        lines.append(f"{'mean':<{name_width}}  {values}")
        return "\n".join(lines)

    def to_json(self) -> str:
        """Settings, rows and mean as JSON (``inf`` written as ``null``)."""
        document = {
            "settings": self.settings,
            "rows": [{k: _finite(v) for k, v in asdict(r).items()} for r in self.rows],
            "mean": {k: _finite(v) for k, v in self.mean().items()},
            "images": len(self.rows),
        }
        return json.dumps(document, indent=2) + "\n"

    def to_csv(self) -> str:
        """One line per image and a final ``mean`` line."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        columns = self.columns()
        writer.writerow(["image", *columns])
        for row in self.rows:
            writer.writerow([row.image, *(f"{getattr(row, c):.6f}" for c in columns)])
        mean = self.mean()
        writer.writerow(["mean", *(f"{mean[c]:.6f}" for c in columns)])
        return buffer.getvalue()


def _fmt(value: float | None, column: str) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if column.endswith("psnr") else f"{value:.4f}"


def _finite(value: object) -> object:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def evaluate(
    items: Sequence[EvalItem],
    upscaler: Upscaler | None,
    border: int = 0,
    on_image: Callable[[EvalRow, EvalImages], None] | None = None,
    corrupt: Corruption | None = None,
) -> EvalTable:
    """Score every item; ``on_image`` sees each row and its images (for grids, progress)."""
    if border < 0:
        raise InputError(f"border must be >= 0, got {border}")
    score = lambda item: evaluate_item(item, upscaler, border, corrupt)  # noqa: E731
    return EvalTable(rows=score_each(items, score, on_image))


Item = TypeVar("Item")
Row = TypeVar("Row")
Images = TypeVar("Images")


def score_each(
    items: Sequence[Item],
    score: Callable[[Item], tuple[Row, Images]],
    on_row: Callable[[Row, Images], None] | None = None,
) -> list[Row]:
    """The rows of ``score(item)`` in order; ``on_row`` sees each row and its images."""
    rows = []
    for item in items:
        row, images = score(item)
        rows.append(row)
        if on_row is not None:
            on_row(row, images)
    return rows


def comparison_grid(row: EvalRow, images: EvalImages) -> Image.Image:
    """HR | bicubic | TTSR | reference(s), labelled with the scores."""
    panels = [images.hr, images.bicubic]
    labels = [row.image, f"bicubic {row.bicubic_psnr:.2f} dB / {row.bicubic_ssim:.3f}"]
    if images.sr is not None and row.ttsr_psnr is not None and row.ttsr_ssim is not None:
        panels.append(images.sr)
        labels.append(f"TTSR {row.ttsr_psnr:.2f} dB / {row.ttsr_ssim:.3f}")
    panels.append(visualize.stack_vertically(images.references, images.hr.shape[0]))
    labels.append("reference" + "s" * (len(images.references) > 1))
    return visualize.side_by_side(panels, labels)


def summary_chart(table: EvalTable, title: str) -> Image.Image:
    """Per-image Y-PSNR of each method measured, and their means, as a bar chart."""
    names = [r.image for r in table.rows] + ["mean"]
    mean = table.mean()
    series = {}
    for method, label in table.LABELS.items():
        column = f"{method}_psnr"
        if column in mean:
            values = [getattr(r, column) for r in table.rows]
            series[label] = [math.nan if v is None else v for v in values] + [mean[column]]
    return visualize.bar_chart(names, series, title)
