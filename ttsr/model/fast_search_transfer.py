"""SearchTransfer in bounded memory, with gather/scatter gradients: same result, much faster.

- Search: :func:`ttsr.model.patch_correlation.search_best_positions` (exact hard attention from
  per-pixel correlations, tiled, bfloat16-screened where that is exact).
- Soft attention: the relevance of each LR patch to its best reference patch, computed from the
  9 pixel pairs of that patch pair only. ``S`` is a max, so its gradient reaches one reference
  patch per query: :class:`BestPatchRelevance` back-propagates by gathers and scatter-adds.
- Transfer: gather-then-fold of unfolded reference patches equals, for every output pixel, a
  weighted sum over the 9 neighbouring queries of one reference pixel each (the neighbour's best
  patch, shifted by the neighbour's offset). :class:`TextureGather` computes it as an
  ``embedding_bag`` over a channels-last table of the reference features, with weights
  ``1 / overlap_count`` (or ``1 / 9``), and back-propagates by scatter-adds. Nothing is unfolded:
  the straightforward module's ``9216 x Hr*Wr`` unfolded relu1_1 never exists.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from ttsr.model.flow import ReferenceGrids
from ttsr.model.patch_correlation import (
    DEFAULT_STEP_ELEMENTS,
    NORM_EPS,
    PATCH_OFFSETS,
    PatchTables,
    Screening,
    search_with_tables,
)
from ttsr.model.search_transfer import (
    CONSTANT_OVERLAP,
    Divisor,
    SearchTransfer,
    Size,
    as_reference_list,
    check_level_sizes,
)
from ttsr.runtime import PLAIN, Runtime, StepBuffers

#: Patch pairs per chunk in the soft-attention backward (bounds its ``[pairs, C]`` buffers).
BACKWARD_CHUNK = 1 << 12


def _pairs(index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Flat (batch index, query, position) of every query's best patch pair, from ``[B, N]``."""
    batch, count = index.shape
    batch_index = torch.arange(batch, device=index.device).repeat_interleave(count)
    queries = torch.arange(count, device=index.device).repeat(batch)
    return batch_index, queries, index.reshape(-1)


def _unpad(table: Tensor, height: int, width: int) -> Tensor:
    """Padded channels-last table ``[B, (H+2)*(W+2), C]`` -> ``[B, C, H, W]``."""
    batch, _, channels = table.shape
    grid = table.view(batch, height + 2, width + 2, channels)[:, 1:-1, 1:-1]
    return grid.permute(0, 3, 1, 2).contiguous()


class BestPatchRelevance(torch.autograd.Function):
    """Relevance of each query patch to the reference patch ``index`` picks: ``[B, N]``.

    ``forward(query [B, C, H, W], index [B, N], tables, runtime, *keys [B, C, Hr_i, Wr_i])``:
    ``index`` is non-differentiable; ``tables`` are their :class:`PatchTables` if at hand, else
    ``None``; ``runtime`` runs the gathers (:mod:`ttsr.runtime`).
    Equal to the straightforward search's maximum, and so is its gradient:
    ``d S / d q = k / (|q| |k|) - S q / |q|^2`` (the last term only where ``|q| >= eps``, as for
    ``F.normalize``), likewise for ``k``, scattered onto the pixels of the two patches.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        query: Tensor,
        index: Tensor,
        tables: PatchTables | None,
        runtime: Runtime,
        *keys: Tensor,
    ) -> Tensor:
        known = tables if tables is not None else PatchTables.of(query, keys)
        relevance = known.relevance_on_workers(*_pairs(index), runtime).view(index.shape)
        ctx.save_for_backward(query, index, relevance, *keys)
        ctx.tables = known  # the backward gathers from the same tables
        ctx.runtime = runtime
        return relevance

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        query, index, relevance, *keys = ctx.saved_tensors
        tables: PatchTables = ctx.tables
        wanted_query = ctx.needs_input_grad[0]
        wanted_keys = any(ctx.needs_input_grad[4:])
        grad_query, grad_keys = ctx.runtime.serial(
            lambda: _relevance_backward(tables, index, relevance, grad.contiguous())
        )
        key_grads, start = [], 0
        for size in tables.key_sizes:
            pixels = (size[0] + 2) * (size[1] + 2)
            key_grads.append(_unpad(grad_keys[:, start : start + pixels], *size))
            start += pixels
        return (
            _unpad(grad_query, tables.height, tables.width) if wanted_query else None,
            None,
            None,
            None,
            *(key_grads if wanted_keys else [None] * len(keys)),
        )


def _relevance_backward(
    tables: PatchTables, index: Tensor, relevance: Tensor, grad: Tensor
) -> tuple[Tensor, Tensor]:
    """Gradients of :class:`BestPatchRelevance` on the padded pixel tables: query
    ``[B, (H+2)*(W+2), C]`` and keys ``[B, sum_i (Hr_i+2)*(Wr_i+2), C]`` (batch-major)."""
    batch, _, channels = tables.query_table.shape
    query_pixels, key_pixels = tables.flat_query_pixels, tables.flat_key_pixels
    grad_query = torch.zeros_like(query_pixels)
    grad_key = torch.zeros_like(key_pixels)
    batch_index, queries, positions = _pairs(index)
    query_norm = tables.query_norm[batch_index, queries]
    key_norm = tables.key_norm[batch_index, positions]
    clamped_query, clamped_key = query_norm.clamp_min(NORM_EPS), key_norm.clamp_min(NORM_EPS)
    query_top_left = tables.query_top_left(batch_index, queries)
    key_top_left, key_row_length = tables.key_top_left(batch_index, positions)
    relevance = relevance.reshape(-1)
    g = grad.reshape(-1)
    # d S / d q = a k - b_q q and d S / d k = a q - b_k k, per pair.
    cross = g / (clamped_query * clamped_key)
    self_query = g * relevance / clamped_query.square() * (query_norm >= NORM_EPS)
    self_key = g * relevance / clamped_key.square() * (key_norm >= NORM_EPS)
    buffers = StepBuffers()
    for start in range(0, g.numel(), BACKWARD_CHUNK):
        chunk = slice(start, start + BACKWARD_CHUNK)
        shape = (g[chunk].numel(), channels)
        a, bq, bk = cross[chunk, None], self_query[chunk, None], self_key[chunk, None]
        q = buffers.get("q", shape, query_pixels, query_pixels.dtype)
        k = buffers.get("k", shape, query_pixels, query_pixels.dtype)
        update = buffers.get("update", shape, query_pixels, query_pixels.dtype)
        for dy, dx in PATCH_OFFSETS:
            query_rows = query_top_left[chunk] + (dy * (tables.width + 2) + dx)
            key_rows = key_top_left[chunk] + (dy * key_row_length[chunk] + dx)
            torch.index_select(query_pixels, 0, query_rows, out=q)
            torch.index_select(key_pixels, 0, key_rows, out=k)
            torch.mul(q, bq, out=update)  # a k - b_q q
            grad_query.index_add_(0, query_rows, torch.addcmul(update.neg_(), a, k, out=update))
            torch.mul(k, bk, out=update)  # a q - b_k k
            grad_key.index_add_(0, key_rows, torch.addcmul(update.neg_(), a, q, out=update))
    return grad_query.view(batch, -1, channels), grad_key.view(batch, -1, channels)


class TextureGather(torch.autograd.Function):
    """``out[p] = scale[p] * sum_j valid[p, j] * table[index[p, j]]``: ``[P, C]`` from ``[T, C]``.

    ``index`` ``[P, 9]`` (rows of the table), ``valid`` ``[P, 9]`` (bool) and ``scale`` ``[P]``
    are constants. The forward is one ``embedding_bag``; the backward scatter-adds
    ``scale * grad`` onto the table rows, 9 times (no dense matrix anywhere).
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx, table: Tensor, index: Tensor, valid: Tensor, scale: Tensor
    ) -> Tensor:
        ctx.save_for_backward(index, valid, scale)
        ctx.table_rows = table.size(0)
        weight = valid.to(table.dtype) * scale[:, None].to(table.dtype)
        return F.embedding_bag(index, table, mode="sum", per_sample_weights=weight)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        index, valid, scale = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        rows = ctx.table_rows
        scaled = grad * scale[:, None].to(grad.dtype)
        # Invalid entries go to an extra row, dropped at the end.
        grad_table = grad.new_zeros(rows + 1, grad.size(1))
        for j in range(index.size(1)):
            grad_table.index_add_(0, torch.where(valid[:, j], index[:, j], rows), scaled)
        return grad_table[:rows], None, None, None


def transfer_plan(
    index: Tensor,
    lr_size: tuple[int, int],
    reference_sizes: Sequence[tuple[int, int]],
    scale: int,
    divisor: Divisor,
    neighbours: Neighbours | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Which reference pixels, with which weights, make each output pixel of one level.

    Output pixel ``(a*s + r, b*s + t)`` takes, from each neighbouring query ``(a+da, b+db)``
    inside the LR grid whose best patch is ``(c, d)``, reference pixel
    ``((c-da)*s + r, (d-db)*s + t)`` when it lies inside that reference. Its weight is
    ``1 / overlap_count`` (the number of such pixels, "overlap") or ``1 / 9`` ("constant").

    The ``s`` output pixels ``t = 0 .. s-1`` of a block row take ``s`` consecutive reference
    pixels with the same weight, so the plan works on segments of ``s`` pixels: row
    ``(b, a*s + r, b')`` of the output, row ``R * Wr + d'`` of the reference (``s`` pixels from
    ``(R, d'*s)``), both tables seen as ``[pixels / s, s * C]``.

    Args:
        index: ``[B, H*W]`` best positions (references concatenated).
        lr_size: ``(H, W)``; reference_sizes: relu3_1 size ``(Hr_i, Wr_i)`` of each reference.
        scale: 1, 2 or 4; the level's reference pixels are ``(s*Hr_i, s*Wr_i)``.
        neighbours: :func:`plan_neighbours` of the same inputs, when already computed.
    Returns:
        For the output segments (row-major): ``[B*sH*W, 9]`` segment rows of the level's table
        (batch-major, each batch element's references in order, channels last; 0 where
        invalid), ``[B*sH*W, 9]`` validity and ``[B*sH*W]`` weights.
    """
    if divisor not in ("overlap", "constant"):
        raise ValueError(f"divisor must be 'overlap' or 'constant', not {divisor!r}")
    if neighbours is None:
        neighbours = plan_neighbours(index, lr_size, reference_sizes)
    batch = index.size(0)
    height, width = lr_size
    device = index.device
    widths = torch.tensor([w for _, w in reference_sizes], device=device)
    level_segments = [h * w * scale for h, w in reference_sizes]  # segments of s pixels
    table_offsets = torch.tensor(
        [sum(level_segments[:i]) for i in range(len(level_segments))], device=device
    )
    per_batch = sum(level_segments)
    sub_rows = torch.arange(scale, device=device)[None, None, :, None]
    segments = batch * height * scale * width
    # int32 rows where they fit (half the memory of int64; embedding_bag takes either).
    row_dtype = torch.int32 if batch * per_batch < 2**31 else torch.long
    row_index = torch.empty(segments, 9, dtype=row_dtype, device=device)
    valid = torch.empty(segments, 9, dtype=torch.bool, device=device)
    batch_offsets = torch.arange(batch, device=device)[:, None, None] * per_batch
    for j, (which, c, d, inside) in enumerate(neighbours):
        ref_width = widths[which]
        base = (batch_offsets + table_offsets[which] + c * scale * ref_width + d) * inside
        # [B, H, s, W]: block row r of block (a, b) is output segment (a*s + r, b).
        rows = row_index[:, j].view(batch, height, scale, width)
        rows.copy_(base[:, :, None] + sub_rows * (ref_width * inside)[:, :, None])
        valid[:, j].view(batch, height, scale, width).copy_(
            inside[:, :, None].expand(-1, -1, scale, -1)
        )
    if divisor == "constant":
        weight = torch.full((segments,), 1.0 / CONSTANT_OVERLAP, device=device)
    else:
        weight = 1.0 / valid.sum(1).to(torch.float32)  # 1 / overlap_count
    return row_index, valid, weight


#: Per neighbour ``(da, db)`` of a query: which reference, patch row ``c`` and column ``d`` of
#: the reference pixel block it contributes, and whether it lies inside (all ``[B, H, W]``).
Neighbours = list[tuple[Tensor, Tensor, Tensor, Tensor]]


def plan_neighbours(
    index: Tensor, lr_size: tuple[int, int], reference_sizes: Sequence[tuple[int, int]]
) -> Neighbours:
    """The part of :func:`transfer_plan` that does not depend on the level: computed once for
    the three levels. For each of the 9 neighbours ``(da, db)`` (row-major), the reference
    holding the neighbour's best patch, the block ``(c, d) = match - (da, db)`` it gives this
    query, and whether that block lies inside the LR grid and the reference."""
    batch = index.size(0)
    height, width = lr_size
    grids = ReferenceGrids(reference_sizes, index.device)
    grid = F.pad(index.view(batch, 1, height, width), (1, 1, 1, 1), value=-1)[:, 0]
    neighbours = []
    for da, db in ((da, db) for da in (-1, 0, 1) for db in (-1, 0, 1)):
        neighbour = grid[:, 1 + da : 1 + da + height, 1 + db : 1 + db + width]
        inside_lr = neighbour >= 0
        which, row, column = grids.decode(neighbour.clamp_min(0))
        c, d = row - da, column - db
        inside = inside_lr & (c >= 0) & (c < grids.heights[which])
        inside &= (d >= 0) & (d < grids.widths[which])
        neighbours.append((which, c, d, inside))
    return neighbours


def level_table(references: Sequence[Tensor], runtime: Runtime = PLAIN) -> Tensor:
    """Channels-last table of one level's reference features: ``[B * sum_i h_i*w_i, C]``.

    A view where a single reference already is channels-last; else a copy in ``runtime``'s
    memory (valid until its next phase, which is the caller's to start; the gather's backward
    needs only the table's shape).
    """
    batch, channels = references[0].shape[:2]
    if len(references) == 1 and references[0].is_contiguous(memory_format=torch.channels_last):
        return references[0].permute(0, 2, 3, 1).reshape(-1, channels)  # a view
    pixels = sum(r.size(2) * r.size(3) for r in references)
    table = runtime.allocate((batch, pixels, channels), references[0].dtype, references[0].device)
    start = 0
    for reference in references:
        count = reference.size(2) * reference.size(3)
        grid = table[:, start : start + count].view(batch, *reference.shape[2:], channels)
        grid.copy_(reference.permute(0, 2, 3, 1))
        start += count
    return table.view(-1, channels)


def gather_textures(
    references: Sequence[Tensor],
    plan: tuple[Tensor, Tensor, Tensor],
    lr_size: tuple[int, int],
    scale: int,
    runtime: Runtime = PLAIN,
) -> Tensor:
    """Apply a :func:`transfer_plan` to one level's features: ``[B, C, sH, sW]``.

    The result is in ``torch.channels_last`` memory format (the gather's natural layout).
    ``runtime``: memory for the channels-last reference table (see :func:`level_table`).
    """
    batch, channels = references[0].shape[:2]
    segments = level_table(references, runtime).view(-1, scale * channels)
    out = TextureGather.apply(segments, *plan)
    height, width = lr_size[0] * scale, lr_size[1] * scale
    return out.view(batch, height, width, channels).permute(0, 3, 1, 2)


def fast_transfer(
    references: Tensor | Sequence[Tensor],
    index: Tensor,
    lr_size: tuple[int, int],
    reference_sizes: Sequence[tuple[int, int]],
    scale: int,
    divisor: Divisor = "overlap",
) -> Tensor:
    """:func:`ttsr.model.search_transfer.transfer` without unfolding: ``[B, C, sH, sW]``."""
    references = as_reference_list(references)
    check_level_sizes(references, reference_sizes, scale)
    plan = transfer_plan(index, lr_size, reference_sizes, scale, divisor)
    return gather_textures(references, plan, lr_size, scale)


class FastSearchTransfer(SearchTransfer):
    """The fast equivalent of :class:`~ttsr.model.search_transfer.SearchTransfer`, the definition.

    A drop-in (its search and transfer steps replaced; the runtime it is given runs their CPU
    work, :mod:`ttsr.runtime`): same result (identical indices without ties, ``S`` and ``T``
    within 1e-5, equal gradients), fast and in bounded memory; what
    :class:`~ttsr.model.ttsr.TTSR` runs by default (``search="fast"``).

    Args:
        divisor: ``"overlap"`` or ``"constant"`` (as :class:`SearchTransfer`).
        screening: bfloat16 screening of the search (``"auto"``, ``"bfloat16"``, ``"off"``); the
            result is the same either way.
        step_elements: working-set size of the search (see
            :func:`ttsr.model.patch_correlation.search_best_positions`).
    """

    def __init__(
        self,
        divisor: Divisor = "overlap",
        screening: Screening = "auto",
        step_elements: int = DEFAULT_STEP_ELEMENTS,
    ) -> None:
        super().__init__(divisor)
        self.screening: Screening = screening
        self.step_elements = step_elements

    #: Working memory per LR query, per reference position and per search worker, in bytes:
    #: padded float32 and bfloat16 pixel tables, the relu1_1 transfer plan and gather weights,
    #: the channels-last copy of a reference's relu1_1; measured at CUFED5 size (the returned
    #: textures, 7 KB per query, are not included) and rounded up about twice.
    BYTES_PER_QUERY = 3 * 1024
    BYTES_PER_REFERENCE_POSITION = 6 * 1024
    BYTES_PER_WORKER = 32 * 2**20

    @classmethod
    def estimate_peak_bytes(cls, queries: int, reference_positions: int) -> int:
        """Peak bytes of a forward beyond its inputs and outputs (``ttsr.memory`` uses it)."""
        workers = max(1, torch.get_num_threads())
        return (
            cls.BYTES_PER_QUERY * queries
            + cls.BYTES_PER_REFERENCE_POSITION * reference_positions
            + cls.BYTES_PER_WORKER * (workers + 1)
        )

    def _search(
        self, lrsr_lv3: Tensor, keys: list[Tensor], runtime: Runtime
    ) -> tuple[Tensor, Tensor]:
        """Relevance ``[B, H*W]`` (differentiable, gather/scatter backward) and flat index.

        The search tables live in the runtime's scratch memory unless autograd keeps them."""
        kept = torch.is_grad_enabled() and any(x.requires_grad for x in (lrsr_lv3, *keys))
        tables_runtime = runtime.on(lrsr_lv3.device, scratch=not kept)
        index, tables = search_with_tables(
            lrsr_lv3, keys, self.screening, step_elements=self.step_elements, runtime=tables_runtime
        )
        soft_attention = BestPatchRelevance.apply(lrsr_lv3, index, tables, tables_runtime, *keys)
        del tables
        return soft_attention, index

    def _transfer(
        self, index: Tensor, levels: dict[int, list[Tensor]], lr_size: Size, runtime: Runtime
    ) -> dict[int, Tensor]:
        """Gathers by one plan per scale (the largest first, while little else is held)."""
        reference_sizes = [(r.size(2), r.size(3)) for r in levels[1]]
        neighbours = runtime.serial(lambda: plan_neighbours(index, lr_size, reference_sizes))
        textures = {}
        for scale in sorted(levels, reverse=True):
            plan = runtime.serial(
                lambda s=scale: transfer_plan(
                    index, lr_size, reference_sizes, s, self.divisor, neighbours
                )
            )
            kept = torch.is_grad_enabled() and any(r.requires_grad for r in levels[scale])
            level_runtime = runtime.on(index.device, scratch=not kept)
            level_runtime.next_phase()  # the search tables and earlier level tables are dead
            textures[scale] = gather_textures(levels[scale], plan, lr_size, scale, level_runtime)
            del plan
        return textures
