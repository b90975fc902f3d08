"""Hard-attention texture search and transfer (TTSR section 3.2), the straightforward way.

The relevance of every LR query patch to every reference patch is one batched matmul of
L2-normalised 3x3 patch vectors; the best reference patch is then copied at three scales by
gather-then-fold. This is the readable definition; :mod:`ttsr.model.fast_search_transfer`
computes the same result in bounded memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ttsr.model.config import Divisor
from ttsr.runtime import PLAIN, Runtime

#: ``(height, width)`` of a grid.
Size = tuple[int, int]

#: (kernel, stride, padding) of the transfer at relu3_1, relu2_1 and relu1_1 (scale 1, 2, 4).
TRANSFER_GEOMETRY: dict[int, tuple[int, int, int]] = {1: (3, 1, 1), 2: (6, 2, 2), 4: (12, 4, 4)}

#: The released TTSR code divides every folded level by this constant.
CONSTANT_OVERLAP = 9.0


@dataclass(frozen=True)
class SearchResult:
    """Outcome of the search: best reference position and its relevance for each LR position.

    ``index``: ``[B, H*W]`` int64 into the reference positions (row-major over the relu3_1 grid of
    each reference, references concatenated in order); ``relevance``: ``[B, H*W]``.
    """

    index: Tensor
    relevance: Tensor


@dataclass
class TransferResult:
    """Soft attention ``[B, 1, H, W]``, textures ``t_lv3`` ``[B, 256, H, W]``, ``t_lv2``
    ``[B, 128, 2H, 2W]``, ``t_lv1`` ``[B, 64, 4H, 4W]``, hard attention ``[B, H, W]``.

    A lean generator forward takes the texture maps out (sets them to ``None``) as it fuses them.
    """

    soft_attention: Tensor
    t_lv3: Tensor | None
    t_lv2: Tensor | None
    t_lv1: Tensor | None
    index: Tensor


def as_reference_list(tensors: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """Normalise one reference tensor or a sequence of them to a list."""
    return [tensors] if isinstance(tensors, Tensor) else list(tensors)


def gather_blocks(unfolded: Tensor, index: Tensor) -> Tensor:
    """Pick columns (blocks) of an unfolded tensor: ``[B, D, M]``, ``[B, N]`` -> ``[B, D, N]``.

    ``out[b, d, n] = unfolded[b, d, index[b, n]]``: the index is expanded over the patch dimension.
    """
    expanded = index.unsqueeze(1).expand(-1, unfolded.size(1), -1)
    return torch.gather(unfolded, 2, expanded)


def unfold_patches(features: Tensor, scale: int) -> Tensor:
    """Unfold ``[B, C, h, w]`` with the transfer geometry of ``scale`` -> ``[B, C*k*k, blocks]``."""
    kernel, stride, padding = TRANSFER_GEOMETRY[scale]
    return F.unfold(features, kernel_size=kernel, stride=stride, padding=padding)


def fold_patches(blocks: Tensor, size: tuple[int, int], scale: int) -> Tensor:
    """Fold ``[B, C*k*k, H*W]`` blocks back to ``[B, C, size]`` (overlaps summed)."""
    kernel, stride, padding = TRANSFER_GEOMETRY[scale]
    return F.fold(blocks, output_size=size, kernel_size=kernel, stride=stride, padding=padding)


def search(query_lv3: Tensor, keys_lv3: Tensor | Sequence[Tensor]) -> SearchResult:
    """Exhaustive cosine-similarity search of 3x3 patches.

    Args:
        query_lv3: relu3_1 of the upsampled LR, ``[B, C, H, W]``.
        keys_lv3: relu3_1 of the down-up-sampled reference(s), each ``[B, C, Hr, Wr]``.
    """
    query = F.normalize(F.unfold(query_lv3, kernel_size=3, padding=1), dim=1)  # [B, 9C, N]
    keys = [F.unfold(k, kernel_size=3, padding=1) for k in as_reference_list(keys_lv3)]
    keys = torch.cat(keys, dim=2)
    keys = F.normalize(keys, dim=1).transpose(1, 2)  # [B, M, 9C]
    relevance = torch.bmm(keys, query)  # [B, M, N]
    best, index = torch.max(relevance, dim=1)
    return SearchResult(index=index, relevance=best)


def transfer(
    references: Tensor | Sequence[Tensor],
    index: Tensor,
    lr_size: tuple[int, int],
    scale: int,
    divisor: Divisor = "overlap",
) -> Tensor:
    """Copy the indexed reference patches at ``scale`` and fold them onto the LR grid.

    Args:
        references: reference features at this scale, each ``[B, C, scale*Hr_i, scale*Wr_i]``.
        index: ``[B, H*W]`` from :func:`search`.
        lr_size: ``(H, W)`` of the relu3_1 query grid.
        scale: 1, 2 or 4 (relu3_1, relu2_1, relu1_1).
        divisor: ``"overlap"`` divides by the number of patches that really cover each output
            pixel; ``"constant"`` divides by 9, as the released TTSR code does.
    Returns:
        ``[B, C, scale*H, scale*W]``.
    """
    references = as_reference_list(references)
    out_size = (lr_size[0] * scale, lr_size[1] * scale)
    unfolded = torch.cat([unfold_patches(r, scale) for r in references], 2)
    folded = fold_patches(gather_blocks(unfolded, index), out_size, scale)
    if divisor == "constant":
        return folded / CONSTANT_OVERLAP
    if divisor != "overlap":
        raise ValueError(f"divisor must be 'overlap' or 'constant', not {divisor!r}")
    ones = torch.cat([unfold_patches(torch.ones_like(r[:, :1]), scale) for r in references], 2)
    overlap_count = fold_patches(gather_blocks(ones, index), out_size, scale)
    return folded / overlap_count


class SearchTransfer(nn.Module):
    """TTSR's hard-attention search and texture transfer at three scales: the definition.

    Straightforward and readable (memory ``O(N x M)`` in query and reference patches);
    :class:`~ttsr.model.fast_search_transfer.FastSearchTransfer` is its fast equivalent (same
    result in bounded memory) and what :class:`~ttsr.model.ttsr.TTSR` runs by default.

    ``forward(lrsr_lv3, refsr_lv3, ref_lv1, ref_lv2, ref_lv3) -> (S, T_lv3, T_lv2, T_lv1)``:

    - ``lrsr_lv3``: relu3_1 of LR-up, ``[B, 256, H, W]``;
    - ``refsr_lv3``: relu3_1 of Ref-down-up, ``[B, 256, Hr, Wr]``;
    - ``ref_lv1``, ``ref_lv2``, ``ref_lv3``: relu1_1, relu2_1, relu3_1 of the reference
      (``4Hr x 4Wr``, ``2Hr x 2Wr``, ``Hr x Wr``).

    Every reference argument may also be a list (one entry per reference image, sizes free):
    each LR patch then takes its best match over all references jointly.

    Returns the soft attention ``S`` ``[B, 1, H, W]`` (the best relevance) and the transferred
    textures ``T_lv3`` ``[B, 256, H, W]``, ``T_lv2`` ``[B, 128, 2H, 2W]``, ``T_lv1``
    ``[B, 64, 4H, 4W]``. :meth:`search_and_transfer` also returns the hard attention.
    """

    def __init__(self, divisor: Divisor = "overlap") -> None:
        super().__init__()
        if divisor not in ("overlap", "constant"):
            raise ValueError(f"divisor must be 'overlap' or 'constant', not {divisor!r}")
        self.divisor: Divisor = divisor

    def forward(self, *inputs: Tensor | Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """:meth:`search_and_transfer` without the hard attention: ``(S, T_lv3, T_lv2, T_lv1)``."""
        result = self.search_and_transfer(*inputs)
        return result.soft_attention, result.t_lv3, result.t_lv2, result.t_lv1

    def search_only(
        self,
        lrsr_lv3: Tensor,
        refsr_lv3: Tensor | Sequence[Tensor],
        runtime: Runtime | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The search without the transfer: soft attention ``[B, 1, H, W]`` and hard attention
        (index) ``[B, H, W]``, for transfer heads that sample the references themselves.
        ``runtime``: how the fast equivalent runs its CPU work (:mod:`ttsr.runtime`)."""
        batch, _, height, width = lrsr_lv3.shape
        runtime = (runtime or PLAIN).on(lrsr_lv3.device)
        soft_attention, index = self._search(lrsr_lv3, as_reference_list(refsr_lv3), runtime)
        runtime.finish()
        return soft_attention.view(batch, 1, height, width), index.view(batch, height, width)

    def search_and_transfer(
        self,
        lrsr_lv3: Tensor,
        refsr_lv3: Tensor | Sequence[Tensor],
        ref_lv1: Tensor | Sequence[Tensor],
        ref_lv2: Tensor | Sequence[Tensor],
        ref_lv3: Tensor | Sequence[Tensor],
        runtime: Runtime | None = None,
    ) -> TransferResult:
        """The search and the transfer at the three scales, with the hard attention
        (``runtime`` as for :meth:`search_only`)."""
        keys = as_reference_list(refsr_lv3)
        levels = {4: as_reference_list(ref_lv1), 2: as_reference_list(ref_lv2)}
        levels[1] = as_reference_list(ref_lv3)
        batch, _, height, width = lrsr_lv3.shape
        sizes = [(k.size(2), k.size(3)) for k in keys]
        for scale, references in levels.items():
            check_level_sizes(references, sizes, scale)
        runtime = (runtime or PLAIN).on(lrsr_lv3.device)
        soft_attention, index = self._search(lrsr_lv3, keys, runtime)
        textures = self._transfer(index, levels, (height, width), runtime)
        runtime.finish()  # its scratch is dead: given back before the generator runs
        return TransferResult(
            soft_attention=soft_attention.view(batch, 1, height, width),
            t_lv3=textures[1],
            t_lv2=textures[2],
            t_lv1=textures[4],
            index=index.view(batch, height, width),
        )

    def _search(
        self, lrsr_lv3: Tensor, keys: list[Tensor], runtime: Runtime
    ) -> tuple[Tensor, Tensor]:
        """Soft attention (the best relevance) ``[B, H*W]`` and hard attention ``[B, H*W]``."""
        found = search(lrsr_lv3, keys)
        return found.relevance, found.index

    def _transfer(
        self, index: Tensor, levels: dict[int, list[Tensor]], lr_size: Size, runtime: Runtime
    ) -> dict[int, Tensor]:
        """The textures of each scale (1, 2, 4) of ``levels``."""
        return {s: transfer(levels[s], index, lr_size, s, self.divisor) for s in levels}


def check_level_sizes(
    references: Sequence[Tensor], reference_sizes: Sequence[tuple[int, int]], scale: int
) -> None:
    """Raise ``ValueError`` unless each reference's level is ``scale`` times its relu3_1 size."""
    for reference, (h, w) in zip(references, reference_sizes, strict=True):
        if tuple(reference.shape[-2:]) != (h * scale, w * scale):
            raise ValueError(
                f"reference features at scale {scale} must be {(h * scale, w * scale)}, "
                f"got {tuple(reference.shape[-2:])}"
            )
