"""Peak-memory estimate of one TTSR run from its sizes, and the memory budget it must fit.

The estimate adds what lives for the whole run (weights, whole-image buffers, reference features)
to the largest transient of one tile: the texture extractor on the tile's LR-up, the search and
transfer, or the generator. Coefficients are bytes per LR pixel of the (padded) tile, per reference
pixel or per relu3_1 reference position, measured as peak RSS growth on CPU (``scripts/
calibrate_memory.py``, which reads ``/proc/self/status`` VmHWM after resetting it) and rounded up
by about 20%; :data:`SLACK` covers allocator overhead.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ttsr.imaging import InputError
from ttsr.model.fast_search_transfer import FastSearchTransfer

#: Bytes per LR pixel of whole-image buffers: LR / LR-up / SR as uint8 arrays, float tensors and
#: PIL images, soft attention, hard attention and the correspondence arrays (~700 B counted).
WHOLE_IMAGE_BYTES_PER_LR_PIXEL = 1024

#: Bytes per reference pixel kept for the whole run: relu1_1, relu2_1, relu3_1 of the reference and
#: relu3_1 of its down-up version (64 + 128/4 + 256/16 + 256/16 floats = 512 B) plus the images.
REFERENCE_BYTES_PER_PIXEL = 640

#: Transient bytes per reference pixel while its features are extracted (measured ~600-1100).
REFERENCE_EXTRACTION_BYTES_PER_PIXEL = 1280

#: Bytes per LR pixel of the tile while relu3_1 of its LR-up is extracted (measured 14 KiB).
LRUP_EXTRACTION_BYTES_PER_LR_PIXEL = 17 * 1024

#: Bytes per LR pixel of the textures t_lv3, t_lv2, t_lv1 (256 + 128 * 4 + 64 * 16 floats) and S.
TEXTURE_BYTES_PER_LR_PIXEL = (256 + 128 * 4 + 64 * 16 + 1) * 4

#: Generator activations per LR pixel, in x4-resolution feature maps of ``n_feats`` channels, plus
#: a constant number of x4 channels. The Upscaler runs the generator's lean inference path (no
#: concatenations, in place, texture maps freed once fused): with the released block counts its
#: peak grows by 4.5 maps of 64 channels per LR pixel between LR 128x128 and 192x192 (5.1-6.0 maps
#: per pixel overall, a constant included; the plain path took ~13.2 maps + 70 channels).
GENERATOR_MAPS_PER_FEATURE = 6.0
GENERATOR_EXTRA_CHANNELS = 32

#: Straightforward search: unfolded, concatenated and normalised reference keys (2304 floats per
#: reference position, twice), normalised queries, and the ``[M, N]`` relevance matrix.
SEARCH_BYTES_PER_REFERENCE_POSITION = 2 * 2304 * 4
SEARCH_BYTES_PER_QUERY = 2 * 2304 * 4
RELEVANCE_BYTES = 4

#: Straightforward transfer at relu1_1: the reference unfolded in 12x12 patches (9216 floats per
#: reference position) exists twice while concatenated; the gathered copy costs 9216 per query.
TRANSFER_BYTES_PER_REFERENCE_POSITION = 9216 * 4
TRANSFER_BYTES_PER_QUERY = (9216 + 1024) * 4

#: Multiplier and constant for allocator overhead and what is not modelled.
SLACK = 1.15
SLACK_BYTES = 64 * 2**20

#: Default budget: this fraction of the memory available when the run starts.
DEFAULT_BUDGET_FRACTION = 0.5


class MemoryBudgetError(InputError):
    """A run that cannot fit the memory budget even in the smallest tiles."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak bytes of a run: ``fixed`` for the whole run plus the largest ``transient``."""

    fixed: int
    transient: int
    reference_features: int

    @property
    def peak(self) -> int:
        return int((self.fixed + self.transient) * SLACK) + SLACK_BYTES


def texture_stage_bytes(implementation: str, queries: int, reference_positions: int) -> int:
    """Peak bytes of search + transfer for ``queries`` LR positions and ``reference_positions``."""
    if implementation == "fast":
        return int(FastSearchTransfer.estimate_peak_bytes(queries, reference_positions))
    search = (
        SEARCH_BYTES_PER_REFERENCE_POSITION * reference_positions
        + SEARCH_BYTES_PER_QUERY * queries
        + RELEVANCE_BYTES * reference_positions * queries
    )
    unfolded = TRANSFER_BYTES_PER_REFERENCE_POSITION * reference_positions
    transfer = unfolded + max(unfolded, TRANSFER_BYTES_PER_QUERY * queries)
    return max(search, transfer)


def generator_bytes_per_lr_pixel(n_feats: int, activation_bytes: int = 4) -> int:
    """Peak generator activation bytes per LR pixel (x4 maps hold 16 values per LR pixel)."""
    channels = GENERATOR_MAPS_PER_FEATURE * n_feats + GENERATOR_EXTRA_CHANNELS
    return int(channels * 16 * activation_bytes)


def estimate_peak(
    lr_size: tuple[int, int],
    tile_size: tuple[int, int],
    reference_sizes: Sequence[tuple[int, int]],
    n_feats: int,
    weight_bytes: int,
    use_texture: bool = True,
    implementation: str = "straightforward",
    activation_bytes: int = 4,
) -> MemoryEstimate:
    """Peak-memory estimate of upscaling ``lr_size`` in padded tiles of ``tile_size`` (H, W).

    ``reference_sizes`` are the references' (H, W) after cropping to multiples of 4.
    ``activation_bytes``: 2 for bfloat16/float16 inference (:meth:`ttsr.model.TTSR.set_precision`):
    the extractor's and the generator's activations and the fused textures take half the
    memory, while the reference features, the search and the transfer stay float32.
    """
    ratio = activation_bytes / 4
    lr_pixels = lr_size[0] * lr_size[1]
    tile_pixels = tile_size[0] * tile_size[1]
    reference_pixels = [h * w for h, w in reference_sizes] if use_texture else []
    features = REFERENCE_BYTES_PER_PIXEL * sum(reference_pixels)
    fixed = weight_bytes + WHOLE_IMAGE_BYTES_PER_LR_PIXEL * lr_pixels + features
    generator = generator_bytes_per_lr_pixel(n_feats, activation_bytes) * tile_pixels
    transients = [generator]
    if use_texture:
        positions = sum(reference_pixels) // 16
        textures = TEXTURE_BYTES_PER_LR_PIXEL * tile_pixels
        reduced = textures * ratio if activation_bytes < 4 else 0  # copies made from float32
        lrup = LRUP_EXTRACTION_BYTES_PER_LR_PIXEL * ratio + (1024 if activation_bytes < 4 else 0)
        transients += [
            REFERENCE_EXTRACTION_BYTES_PER_PIXEL * ratio * max(reference_pixels, default=0),
            lrup * tile_pixels,
            texture_stage_bytes(implementation, tile_pixels, positions) + textures,
            textures + reduced,
            generator + textures * ratio,
        ]
    return MemoryEstimate(fixed=fixed, transient=int(max(transients)), reference_features=features)


# --- budgets -------------------------------------------------------------------------------------


def available_memory(device: torch.device) -> int:
    """Bytes available now: free GPU memory for CUDA, ``MemAvailable`` of the host otherwise."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as meminfo:
            match = re.search(r"MemAvailable:\s+(\d+) kB", meminfo.read())
        if match:
            return int(match.group(1)) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_budget(device: torch.device) -> int:
    """The default ``max_memory``: half of what is available on ``device``."""
    return int(available_memory(device) * DEFAULT_BUDGET_FRACTION)


_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str | int) -> int:
    """``"4GB"``, ``"512M"``, ``"1.5GiB"``, ``"2e9"`` or an int -> bytes (binary multiples)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not match:
        raise InputError(f"cannot read {text!r} as a memory size; write e.g. 4GB, 512MB or 2.5G")
    value = float(match.group(1)) * _UNITS[match.group(2)]
    if not math.isfinite(value) or value <= 0:
        raise InputError(f"memory size must be positive, got {text!r}")
    return int(value)


def format_size(size: float) -> str:
    """Bytes as a short human-readable string (``"1.5 GB"``, binary multiples)."""
    for unit, factor in (("TB", 2**40), ("GB", 2**30), ("MB", 2**20), ("kB", 2**10)):
        if abs(size) >= factor:
            return f"{size / factor:.1f} {unit}"
    return f"{int(size)} B"
