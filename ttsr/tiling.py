"""Tiles of the LR image whose margins cover TTSR's receptive field.

A tile is run on its core plus a margin of LR pixels on every side (clipped at the image border)
and only its core is kept. With a margin at least :func:`receptive_radius`, every kept output pixel
sees exactly the inputs it sees in a whole-image run, so tiling changes nothing but float rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

# Reach in LR pixels of one layer of each kind, at stream scale 1, 2 or 4 (upper bounds).
_CONV3 = {1: 1.0, 2: 0.5, 4: 0.25}  # 3x3 convolution, stride 1
_STRIDE2 = {2: 1.0, 4: 0.5}  # 3x3 stride-2 convolution from scale s to s / 2
_BICUBIC = {1: 2.0, 2: 1.0}  # bicubic upsampling reads up to 2 source pixels away
_SHUFFLE = {1: 0.5, 2: 0.25}  # pixel shuffle from scale s to 2s

#: Reach of the texture path (LR pixels): relu3_1 of the LR-up reads 2.5 LR pixels beyond its own
#: 4x4 block (VGG to relu3_1 spans 24 pixels), the 3x3 patch search adds 1, the fold of the
#: transferred patches at most 1.75 and the bicubic upsampling of the soft attention 2.
TEXTURE_REACH = 3 + 1 + 2

#: Reach of the deformable transfer head (LR pixels): its offset predictor (two 3x3 convolutions,
#: at most 2 relu3_1 cells) reads the reference warped by the matches of cells up to 2 away, each
#: match reaching 3 + 1; each tap reads a neighbouring cell's match (1 more, counted on top to
#: stay an upper bound); the soft attention's bicubic upsampling as for the hard transfer.
DEFORMABLE_REACH = 3 + 1 + 2 + 1

#: Receptive-field radius (LR pixels) of the released model's generator ``(16, 16, 8, 4)``.
RELEASED_RADIUS = 102


def _blocks(count: int, scale: int) -> float:
    return 2 * count * _CONV3[scale]


def receptive_radius(
    num_res_blocks: Sequence[int], use_texture: bool = True, transfer: str = "hard"
) -> int:
    """Largest distance (LR pixels) from an output pixel to an LR pixel that can change it.

    Follows :class:`ttsr.model.generator.Generator` stream by stream: a residual block adds two
    3x3 convolutions, a fusion ``x + conv(cat(x, T)) * S`` adds the texture path's reach (that of
    the ``transfer`` head, ``"hard"`` or ``"deformable"``), cross-scale integration takes the
    farthest of its inputs. An upper bound (every layer is counted at its full reach), ~102 for
    the released ``(16, 16, 8, 4)``.
    """
    sfe, stage1, stage2, stage3 = (int(n) for n in num_res_blocks)
    reach = DEFORMABLE_REACH if transfer == "deformable" else TEXTURE_REACH
    texture = float(reach) if use_texture else 0.0

    def fused(reach: float, scale: int) -> float:
        return max(reach, texture) + _CONV3[scale] if use_texture else reach

    x1 = _CONV3[1] + _blocks(sfe, 1) + _CONV3[1]  # SFE: head, blocks, tail
    x1 = fused(x1, 1)
    x1 += _blocks(stage1, 1) + _CONV3[1]  # RB11, conv11_tail
    x2 = fused(x1 + _CONV3[1] + _SHUFFLE[1], 2)  # conv12, pixel shuffle, conv22_head

    merge1 = max(x1, x2 + _STRIDE2[2]) + _CONV3[1]  # CSFI2
    merge2 = max(x2, x1 + _BICUBIC[1]) + _CONV3[2]
    x1 = max(x1, merge1 + _blocks(stage2, 1) + _CONV3[1])
    x2 = max(x2, merge2 + _blocks(stage2, 2) + _CONV3[2])
    x4 = fused(x2 + _CONV3[2] + _SHUFFLE[2], 4)  # conv23, pixel shuffle, conv33_head

    merge1 = max(x1, x2 + _STRIDE2[2], x4 + _STRIDE2[4] + _STRIDE2[2]) + _CONV3[1]  # CSFI3
    merge2 = max(x2, x1 + _BICUBIC[1], x4 + _STRIDE2[4]) + _CONV3[2]
    merge4 = max(x4, x1 + _BICUBIC[1], x2 + _BICUBIC[2]) + _CONV3[4]
    x1 = max(x1, merge1 + _blocks(stage3, 1) + _CONV3[1])
    x2 = max(x2, merge2 + _blocks(stage3, 2) + _CONV3[2])
    x4 = max(x4, merge4 + _blocks(stage3, 4) + _CONV3[4])

    tail = max(x4, x1 + _BICUBIC[1], x2 + _BICUBIC[2]) + 2 * _CONV3[4]  # merge, conv_tail1
    return math.ceil(tail)


@dataclass(frozen=True)
class Tile:
    """One tile in LR pixels: the ``core`` it produces and the ``padded`` region it reads.

    Both are ``(top, bottom, left, right)`` with exclusive ends.
    """

    core: tuple[int, int, int, int]
    padded: tuple[int, int, int, int]

    @property
    def core_in_padded(self) -> tuple[slice, slice]:
        """Rows and columns of the core inside the padded tile."""
        top, bottom, left, right = self.core
        return slice(top - self.padded[0], bottom - self.padded[0]), slice(
            left - self.padded[2], right - self.padded[2]
        )


def _split(length: int, core: int) -> list[tuple[int, int]]:
    """Split ``range(length)`` into ``ceil(length / core)`` nearly equal intervals."""
    count = max(1, math.ceil(length / core))
    bounds = [round(i * length / count) for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def tile_grid(height: int, width: int, core: int, margin: int) -> list[Tile]:
    """Tiles covering an ``height x width`` LR image with cores of at most ``core`` pixels."""
    if core < 1 or margin < 0:
        raise ValueError(f"core must be >= 1 and margin >= 0, got {core}, {margin}")
    tiles = []
    for top, bottom in _split(height, core):
        for left, right in _split(width, core):
            padded = (
                max(0, top - margin),
                min(height, bottom + margin),
                max(0, left - margin),
                min(width, right + margin),
            )
            tiles.append(Tile(core=(top, bottom, left, right), padded=padded))
    return tiles


def padded_extent(length: int, core: int, margin: int) -> int:
    """Largest padded tile side along an axis of ``length`` with cores of ``core`` pixels."""
    return min(length, max(b - a for a, b in _split(length, core)) + 2 * margin)
