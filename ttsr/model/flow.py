"""Correspondences as displacement fields ("flow"), and warping by ``grid_sample``.

Conventions, used everywhere in ttsr:

- A flow is ``[B, 2, H, W]`` on the **query grid**: channel 0 is ``dx`` (along the width),
  channel 1 is ``dy`` (along the height), in **pixels of the grid it is given at**. The query pixel
  ``(y, x)`` corresponds to the reference pixel ``(y + dy, x + dx)``.
- :func:`decode_index` turns the search's flat index (row-major over the references' relu3_1
  grids, concatenated in order) into ``(reference_id, row, column)``; every decoder uses it.
- :func:`flow_from_index` gives it at the relu3_1 grid, from the hard attention: the query grid is
  the relu3_1 grid of the upsampled LR image and the reference pixel is on the relu3_1 grid of the
  reference that holds the match (``flow[b, :, y, x] = (ref_x - x, ref_y - y)``).
- :func:`upsample_flow` moves it to relu2_1 (``factor=2``) or relu1_1 (``factor=4``) exactly as
  the hard transfer copies patches there (see its docstring).
- :func:`warp` samples features at ``position + flow`` with ``grid_sample`` (bilinear, zeros
  outside, ``align_corners=True`` so that pixel centres are the integer coordinates).

Note that ``torchvision.ops.deform_conv2d`` orders its offsets the other way round, ``(dy, dx)``;
:mod:`ttsr.model.deformable_transfer` does the swap.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import overload

import torch
import torch.nn.functional as F
from torch import Tensor

Size = tuple[int, int]


def _reference_sizes(ref_size: Size | Sequence[Size]) -> tuple[list[Size], bool]:
    """``([(Hr, Wr), ...], several)`` from one size or a sequence of sizes."""
    first = ref_size[0]
    if isinstance(first, int):
        height, width = ref_size
        return [(int(height), int(width))], False
    sizes = [(int(h), int(w)) for h, w in ref_size]
    if not sizes:
        raise ValueError("give at least one reference size")
    return sizes, True


class ReferenceGrids:
    """The relu3_1 grids ``(Hr_i, Wr_i)`` of references searched together, as tensors on
    ``device``, to decode flat positions (built once where positions are decoded often)."""

    def __init__(self, sizes: Sequence[Size], device: torch.device | str | None = None) -> None:
        self.sizes = [(int(h), int(w)) for h, w in sizes]
        starts = [0]
        for height, width in self.sizes:
            starts.append(starts[-1] + height * width)
        #: Positions in all the grids together.
        self.total = starts[-1]
        self.starts = torch.tensor(starts[:-1], device=device)
        self.heights = torch.tensor([h for h, _ in self.sizes], device=device)
        self.widths = torch.tensor([w for _, w in self.sizes], device=device)

    def decode(self, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(reference_id, row, column)`` of in-range flat positions ``index`` (any shape)."""
        reference_id = torch.searchsorted(self.starts, index, right=True) - 1
        local = index - self.starts[reference_id]
        width = self.widths[reference_id]
        row = torch.div(local, width, rounding_mode="floor")
        return reference_id, row, local - row * width


def decode_index(index: Tensor, grids: Sequence[Size]) -> tuple[Tensor, Tensor, Tensor]:
    """``(reference_id, row, column)`` of the search's flat ``index`` (int64, any shape):
    row-major over the relu3_1 ``grids`` ``[(Hr_i, Wr_i), ...]``, concatenated in order.
    ``ValueError`` for a position outside them."""
    decoder = ReferenceGrids(grids, index.device)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= decoder.total):
        raise ValueError(f"index out of range for reference sizes {decoder.sizes}")
    return decoder.decode(index)


@overload
def flow_from_index(index: Tensor, ref_size: Size, dtype: torch.dtype = ...) -> Tensor: ...


@overload
def flow_from_index(
    index: Tensor, ref_size: Sequence[Size], dtype: torch.dtype = ...
) -> tuple[Tensor, Tensor]: ...


def flow_from_index(
    index: Tensor, ref_size: Size | Sequence[Size], dtype: torch.dtype = torch.float32
) -> Tensor | tuple[Tensor, Tensor]:
    """Displacement field of the hard attention, at the relu3_1 grid.

    Args:
        index: ``[B, H, W]`` int64, row-major into the relu3_1 grid of the reference, references
            concatenated in order (as :class:`~ttsr.model.search_transfer.TransferResult`).
        ref_size: ``(Hr, Wr)`` of the reference's relu3_1 grid, or a sequence of such sizes,
            one per reference, in the order they were searched.
        dtype: floating dtype of the flow.
    Returns:
        With one size: the flow ``[B, 2, H, W]`` (``dx, dy`` in relu3_1 pixels, relative to the
        reference holding the match). With a sequence of sizes: ``(flow, reference_id)``,
        ``reference_id`` ``[B, H, W]`` int64 saying which reference each flow points into
        (also for a sequence of one).
    """
    if index.dim() != 3:
        raise ValueError(f"index must be [B, H, W], got {tuple(index.shape)}")
    sizes, several = _reference_sizes(ref_size)
    reference_id, ref_y, ref_x = decode_index(index, sizes)
    _, height, width = index.shape
    grid_y = torch.arange(height, device=index.device).view(1, height, 1)
    grid_x = torch.arange(width, device=index.device).view(1, 1, width)
    flow = torch.stack((ref_x - grid_x, ref_y - grid_y), dim=1).to(dtype)
    return (flow, reference_id) if several else flow


def upsample_flow(flow: Tensor, factor: int) -> Tensor:
    """Flow ``[B, 2, H, W]`` at relu3_1 -> ``[B, 2, factor*H, factor*W]`` at ``factor`` (2 or 4).

    The hard transfer at scale ``f`` copies the reference patch of cell ``r`` (pixels
    ``f*r - f .. f*r + 2f - 1``) onto the patch of query cell ``c`` (``f*c - f .. f*c + 2f - 1``),
    so every pixel of the patch moves by exactly ``f * (r - c)``. The fine pixel ``q`` lies in cell
    ``q // f``, whose own (central) patch maps it to ``f*r + q % f``: the upsampled flow is the
    cell's flow times ``f``, replicated over the cell's ``f x f`` pixels (nearest neighbour, no
    interpolation). The eight neighbouring patches that also cover ``q`` use their own cells'
    flows; :mod:`ttsr.model.deformable_transfer` handles those taps. Reference ids, when there
    are several references, replicate the same way (``repeat_interleave`` on both axes).
    """
    if factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor}")
    replicated = flow.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    return replicated * factor


def flow_to_grid(flow: Tensor, input_size: Size) -> Tensor:
    """Flow ``[B, 2, H, W]`` -> ``grid_sample`` grid ``[B, H, W, 2]`` for an input of that size.

    Normalised for ``align_corners=True``: ``-1`` and ``+1`` are the centres of the first and last
    input pixels. Both sides of ``input_size`` must be at least 2 (see :func:`warp`).
    """
    height, width = flow.shape[-2:]
    grid_y = torch.arange(height, device=flow.device, dtype=flow.dtype).view(height, 1)
    grid_x = torch.arange(width, device=flow.device, dtype=flow.dtype).view(1, width)
    sample_x = grid_x + flow[:, 0]
    sample_y = grid_y + flow[:, 1]
    in_height, in_width = input_size
    return torch.stack(
        (2.0 * sample_x / (in_width - 1) - 1.0, 2.0 * sample_y / (in_height - 1) - 1.0), dim=-1
    )


def warp(features: Tensor, flow: Tensor) -> Tensor:
    """Sample ``features`` ``[B, C, Hr, Wr]`` at each query position plus ``flow`` ``[B, 2, H, W]``.

    Bilinear, zeros outside the features, ``align_corners=True``; differentiable w.r.t. both
    arguments. Returns ``[B, C, H, W]``. For integer flows the result is the plain gather
    ``features[..., y + dy, x + dx]`` (up to the float rounding of the grid normalisation, about
    ``1e-7`` relative in float32). A side of length 1 is padded with one zero pixel first, because
    ``align_corners=True`` cannot address a single pixel (its normalised range is degenerate).
    """
    if flow.dim() != 4 or flow.size(1) != 2 or flow.size(0) != features.size(0):
        raise ValueError(
            f"flow must be [B, 2, H, W] with B={features.size(0)}, got {tuple(flow.shape)}"
        )
    pad_bottom = 1 if features.size(-2) == 1 else 0
    pad_right = 1 if features.size(-1) == 1 else 0
    if pad_bottom or pad_right:
        features = F.pad(features, (0, pad_right, 0, pad_bottom))
    grid = flow_to_grid(flow.to(features.dtype), features.shape[-2:])
    return F.grid_sample(features, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
