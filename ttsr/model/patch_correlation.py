"""Exact 3x3-patch cosine search in bounded memory, from per-pixel correlations.

The dot product of two 3x3 patches is the sum, over the 9 aligned offsets, of per-pixel feature
dot products. One matmul of the zero-padded pixels of an LR row with the zero-padded pixels of a
few reference rows, then sums along the 3x3 diagonals (shifted adds: 3 horizontal, then 3
vertical), gives the relevance of those LR patches to those reference patches at about ``C + 6``
multiply-adds per pair instead of ``9C``, with the same argmax.

Work is blocked for the cache: the reference is cut into chunks of a few relu3_1 rows; for each
chunk the LR rows are swept in order, and the horizontal sums of each padded LR row stay in a
small ring, since each serves three output rows. Memory is ``O(rows x chunk)``, never
``O(N x M)``. Chunks are work items for the caller's runtime (:mod:`ttsr.runtime`: worker
threads, or the calling thread).

Float32 input on a CPU with fast bfloat16 matmul is screened in bfloat16 first, then rescored
exactly (:mod:`ttsr.model.screening`): the result never depends on the screening.

Positions: a query ``n = y * W + x``; a reference position ``m`` is row-major over the relu3_1
grid of each reference, references concatenated in order (as in ``search_transfer.search``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ttsr.model.flow import ReferenceGrids
from ttsr.model.screening import Screening, resolve_screening, screened_search
from ttsr.runtime import PLAIN, Runtime, StepBuffers

#: ``F.normalize``'s epsilon: patch norms below it are clamped, as in the straightforward search.
NORM_EPS = 1e-12
#: Relevance entries per step (batch x LR rows x W x reference rows x Wr): with the ring and the
#: products, about 20 MB per worker. Fewer make more, smaller steps (Python overhead, more halo
#: rows); more help little.
DEFAULT_STEP_ELEMENTS = 1 << 20
#: Fewest reference rows per chunk: each chunk recomputes 2 halo rows.
MIN_KEY_ROWS = 8
#: Work items per worker thread, so that the workers finish at about the same time.
ITEMS_PER_WORKER = 2
#: Fewest LR rows per work item (each item recomputes 2 halo rows).
MIN_ROWS_PER_ITEM = 8
#: Patch pairs scored at a time by :func:`pair_dot` (bounds its ``[pairs, C]`` buffers).
PAIR_CHUNK = 1 << 8

#: The 9 offsets of a 3x3 patch, row-major, as (dy, dx) in {0, 1, 2} on the zero-padded grid.
PATCH_OFFSETS: tuple[tuple[int, int], ...] = tuple((dy, dx) for dy in range(3) for dx in range(3))


def padded_pixel_table(features: Tensor, runtime: Runtime = PLAIN) -> Tensor:
    """Zero-pad by one pixel, channels last: ``[B, C, H, W]`` -> ``[B, (H+2) * (W+2), C]``
    (memory from ``runtime``)."""
    batch, channels, height, width = features.shape
    shape = (batch, height + 2, width + 2, channels)
    table = runtime.allocate(shape, features.dtype, features.device)
    for border in (table[:, 0], table[:, -1], table[:, 1:-1, 0], table[:, 1:-1, -1]):
        border.zero_()
    table[:, 1:-1, 1:-1].copy_(features.permute(0, 2, 3, 1))  # one pass, any memory format
    return table.view(batch, -1, channels)


def table_patch_norms(table: Tensor, height: int, width: int) -> Tensor:
    """Norms of the 3x3 patches of a padded pixel table: ``[B, (H+2)*(W+2), C]`` -> ``[B, H, W]``.

    Equal to the norms of the columns of ``F.unfold(features, 3, padding=1)``.
    """
    squared = torch.linalg.vector_norm(table, dim=-1).square().view(-1, height + 2, width + 2)
    rows = squared[:, :-2] + squared[:, 1:-1] + squared[:, 2:]
    return (rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]).sqrt()


def patch_norms(features: Tensor) -> Tensor:
    """Norms of the zero-padded 3x3 patches: ``[B, C, H, W]`` -> ``[B, H, W]``."""
    return table_patch_norms(padded_pixel_table(features), *features.shape[-2:])


def pixel_windows(pixels: Tensor) -> Tensor:
    """Overlapping windows of 3 consecutive table rows: ``[P, C]`` -> ``[P - 2, 3C]`` (a view)."""
    channels = pixels.size(1)
    pixels = pixels.contiguous()
    return pixels.as_strided((pixels.size(0) - 2, 3 * channels), (channels, 1))


def pair_dot(
    query_pixels: Tensor,
    key_pixels: Tensor,
    query_top_left: Tensor,
    key_top_left: Tensor,
    query_row_length: int,
    key_row_length: Tensor,
    buffers: StepBuffers | None = None,
) -> Tensor:
    """Dot products of 3x3 patch pairs, ``[P]``, from channels-last pixel tables.

    Each patch row is 3 consecutive table rows, so a patch is 3 gathers of ``3C`` values.

    Args:
        query_pixels, key_pixels: ``[pixels, C]`` zero-padded pixel tables (flattened).
        query_top_left, key_top_left: ``[P]`` table row of each patch's top-left pixel.
        query_row_length: padded row length of the query grid; ``key_row_length`` ``[P]``
            the one of each pair's reference.
    """
    buffers = buffers or StepBuffers()
    query_windows, key_windows = pixel_windows(query_pixels), pixel_windows(key_pixels)
    out = query_pixels.new_empty(query_top_left.shape)
    for start in range(0, query_top_left.numel(), PAIR_CHUNK):
        chunk = slice(start, start + PAIR_CHUNK)
        query_base, key_base = query_top_left[chunk], key_top_left[chunk]
        key_rows = key_row_length[chunk]
        shape = (query_base.numel(), query_windows.size(1))
        products = buffers.get("pair_products", shape, query_pixels, query_pixels.dtype)
        gathered = buffers.get("pair_query", shape, query_pixels, query_pixels.dtype)
        keys = buffers.get("pair_key", shape, query_pixels, query_pixels.dtype)
        for dy in range(3):
            target = products if dy == 0 else gathered
            torch.index_select(query_windows, 0, query_base + dy * query_row_length, out=target)
            torch.index_select(key_windows, 0, key_base + dy * key_rows, out=keys)
            if dy == 0:
                products.mul_(keys)
            else:
                products.addcmul_(gathered, keys)
        torch.sum(products, 1, out=out[chunk])
    return out


class PatchTables:
    """Channels-last padded pixel tables of a batch of queries and references, and their geometry.

    Args:
        query_table: ``[B, (H+2)*(W+2), C]``; query_size: ``(H, W)``.
        key_tables: per reference ``[B, (Hr+2)*(Wr+2), C]``; key_sizes: their ``(Hr, Wr)``.
    """

    def __init__(
        self,
        query_table: Tensor,
        query_size: tuple[int, int],
        key_tables: Sequence[Tensor],
        key_sizes: Sequence[tuple[int, int]],
    ) -> None:
        batch, _, channels = query_table.shape
        device = query_table.device
        self.height, self.width = query_size
        self.key_sizes = list(key_sizes)
        self.query_table = query_table
        self.key_tables = list(key_tables)
        self.query_pixels = query_table.size(1)
        self.query_norm = table_patch_norms(query_table, *query_size).view(batch, -1)
        self.key_norms = [
            table_patch_norms(t, h, w) for t, (h, w) in zip(key_tables, key_sizes, strict=True)
        ]
        self.key_norm = torch.cat([n.view(batch, -1) for n in self.key_norms], 1)  # [B, M]
        self.key_pixels = sum(t.size(1) for t in key_tables)
        starts, offsets = [0], [0]
        for (h, w), table in zip(key_sizes, key_tables, strict=True):
            starts.append(starts[-1] + h * w)
            offsets.append(offsets[-1] + table.size(1))
        self.position_offsets = starts[:-1]
        self.key_grids = ReferenceGrids(key_sizes, device)
        self.table_offsets = torch.tensor(offsets[:-1], device=device)
        self._flat_keys: Tensor | None = None
        del channels

    @classmethod
    def of(cls, query: Tensor, keys: Sequence[Tensor], runtime: Runtime = PLAIN) -> PatchTables:
        """Tables of ``query`` ``[B, C, H, W]`` and references, each ``[B, C, Hr, Wr]`` (memory
        from ``runtime``: valid until its next phase)."""
        return cls(
            padded_pixel_table(query, runtime),
            (query.size(2), query.size(3)),
            [padded_pixel_table(key, runtime) for key in keys],
            [(k.size(2), k.size(3)) for k in keys],
        )

    @property
    def flat_query_pixels(self) -> Tensor:
        """All query tables stacked: ``[B * (H+2)*(W+2), C]``."""
        return self.query_table.reshape(-1, self.query_table.size(2))

    @property
    def flat_key_pixels(self) -> Tensor:
        """Batch-major: batch element b's references follow each other, ``[B * pixels, C]``."""
        if self._flat_keys is None:
            channels = self.query_table.size(2)
            tables = self.key_tables
            joined = tables[0] if len(tables) == 1 else torch.cat(tables, 1)
            self._flat_keys = joined.reshape(-1, channels)
        return self._flat_keys

    def query_top_left(self, batch_index: Tensor, queries: Tensor) -> Tensor:
        """Flat table row of the top-left pixel of query patches (row-major positions)."""
        rows = torch.div(queries, self.width, rounding_mode="floor")
        columns = queries - rows * self.width
        return batch_index * self.query_pixels + rows * (self.width + 2) + columns

    def key_top_left(self, batch_index: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Flat table row of reference patches' top-left pixels, and their padded row length."""
        which, rows, columns = self.key_grids.decode(positions)
        width = self.key_grids.widths[which]
        base = batch_index * self.key_pixels + self.table_offsets[which]
        return base + rows * (width + 2) + columns, width + 2

    def relevance(
        self,
        batch_index: Tensor,
        queries: Tensor,
        positions: Tensor,
        buffers: StepBuffers | None = None,
    ) -> Tensor:
        """``<q, k> / (max(|q|, eps) max(|k|, eps))`` of patch pairs: ``[P]``."""
        key_top_left, key_row_length = self.key_top_left(batch_index, positions)
        dot = pair_dot(
            self.flat_query_pixels,
            self.flat_key_pixels,
            self.query_top_left(batch_index, queries),
            key_top_left,
            self.width + 2,
            key_row_length,
            buffers,
        )
        query_norm = self.query_norm[batch_index, queries].clamp_min(NORM_EPS)
        return dot / (query_norm * self.key_norm[batch_index, positions].clamp_min(NORM_EPS))

    def relevance_on_workers(
        self,
        batch_index: Tensor,
        queries: Tensor,
        positions: Tensor,
        runtime: Runtime = PLAIN,
    ) -> Tensor:
        """:meth:`relevance` of many pairs, in parts on the runtime's workers."""
        count = queries.numel()
        parts = max(1, min(runtime.workers, count // PAIR_CHUNK))
        bounds = [round(p * count / parts) for p in range(parts + 1)]
        values = self.query_table.new_empty(queries.shape)

        def score(part: int, buffers: StepBuffers) -> None:
            span = slice(bounds[part], bounds[part + 1])
            values[span] = self.relevance(
                batch_index[span], queries[span], positions[span], buffers
            )

        runtime.map(range(parts), score, runtime.step_buffers)
        return values


def relevance_steps(
    query_table: Tensor,
    query_size: tuple[int, int],
    key_table: Tensor,
    key_size: tuple[int, int],
    inverse_key_norm: Tensor,
    rows_per_step: int,
    key_rows: tuple[int, int],
    row_range: tuple[int, int],
    buffers: StepBuffers,
) -> Iterator[tuple[int, Tensor]]:
    """Relevance of LR patches to the patches of some reference rows, from per-pixel products.

    Sweeps the LR rows of ``row_range``, ``rows_per_step`` at a time, and yields ``(first_lr_row,
    relevance)``, ``relevance`` ``[B, rows * W, key_rows * Wr]`` (a buffer that the next step
    reuses): ``<query patch, key patch> / max(|key patch|, eps)``, not divided by the query norm.

    Args:
        query_table: ``[B, (H+2) * (W+2), C]`` padded channels-last LR pixels in the matmul dtype
            (bfloat16 products are summed in float32, others in their own dtype).
        query_size: ``(H, W)``.
        key_table: ``[B, (Hr+2) * (Wr+2), C]`` padded channels-last reference pixels, same dtype.
        key_size: ``(Hr, Wr)``.
        inverse_key_norm: ``[B, Hr, Wr]``, ``1 / max(|key patch|, eps)``, in the summing dtype.
        key_rows: ``(first, stop)`` reference rows (patch centres) of this chunk.
    """
    batch = query_table.size(0)
    height, width = query_size
    key_width = key_size[1]
    row_length = key_width + 2  # padded
    dtype = query_table.dtype
    accumulate = torch.float32 if dtype == torch.bfloat16 else dtype
    first_key_row, stop_key_row = key_rows
    rows_here = stop_key_row - first_key_row
    padded_rows = rows_here + 2
    first_row, stop_row = row_range
    steps = min(rows_per_step, stop_row - first_row)
    # Padded reference rows first_key_row .. stop_key_row + 1 hold the chunk's patches.
    keys = key_table[:, first_key_row * row_length : (stop_key_row + 2) * row_length]
    if batch > 1:  # bmm wants the transposed operand contiguous; copy it once per chunk
        keys_t = buffers.get("keys", (batch, keys.size(2), keys.size(1)), key_table, dtype)
        keys_t.copy_(keys.transpose(1, 2))
    scale = inverse_key_norm[:, None, first_key_row:stop_key_row]
    # A ring of horizontal 3-sums of padded LR rows: each serves three output rows.
    slots = steps + 2
    ring = buffers.get("ring", (slots, batch, width, padded_rows, key_width), key_table, accumulate)
    computed = first_row  # padded LR rows below this one are in the ring
    for first in range(first_row, stop_row, steps):
        rows = min(steps, stop_row - first)
        needed = first + rows + 2  # output rows use padded LR rows first .. first + rows + 1
        new = needed - computed
        pixels = query_table[:, computed * (width + 2) : needed * (width + 2)]
        products = buffers.get(
            "products", (batch, new * (width + 2), padded_rows * row_length), key_table, dtype
        )
        if batch == 1:
            torch.mm(pixels[0], keys[0].T, out=products[0])
        else:
            torch.bmm(pixels, keys_t, out=products)
        shape = (batch, new, width + 2, padded_rows, row_length)
        products = products.view(shape)
        for i in range(new):
            sums = products[:, i]
            if accumulate != dtype:  # one padded row at a time: a small float32 buffer
                sums = buffers.get("sums", sums.shape, key_table, accumulate).copy_(sums)
            target = ring[(computed + i) % slots]
            # LR pixel x + dx meets reference pixel c + dx.
            torch.add(
                sums[:, :width, :, :key_width],
                sums[:, 1 : width + 1, :, 1 : key_width + 1],
                out=target,
            )
            target.add_(sums[:, 2 : width + 2, :, 2 : key_width + 2])
        computed = needed
        relevance = buffers.get(
            "relevance", (batch, rows, width, rows_here, key_width), key_table, accumulate
        )
        for j in range(rows):
            # Padded LR row y + dy meets padded reference row r + dy.
            top, middle, bottom = (ring[(first + j + dy) % slots] for dy in range(3))
            row = relevance[:, j]
            torch.add(top[:, :, :rows_here], middle[:, :, 1 : rows_here + 1], out=row)
            row.add_(bottom[:, :, 2 : rows_here + 2])
            row.mul_(scale)
        yield first, relevance.view(batch, rows * width, rows_here * key_width)


def _block_rows(rows: int, width: int, most: int = 1024) -> int:
    """Largest divisor of ``rows`` whose rows hold at most ``most`` positions (at least 1)."""
    fitting = [d for d in range(1, rows + 1) if rows % d == 0 and d * width <= most]
    return max(fitting, default=1)


class _Block:
    """One step of :func:`relevance_steps`, per query cut into blocks of whole reference rows.

    Covers batch elements ``batch_start ..`` and queries ``query_start .. + Q`` of each;
    ``blocks`` ``[B', Q, blocks, size]``, ``block_max`` ``[B', Q, blocks]``, ``best`` ``[B', Q]``.
    Positions are global.
    """

    def __init__(
        self,
        relevance: Tensor,
        key_width: int,
        first_position: int,
        batch_start: int,
        query_start: int,
        queries_per_batch: int,
    ) -> None:
        batch, queries, entries = relevance.shape
        size = _block_rows(entries // key_width, key_width) * key_width
        self.blocks = relevance.view(batch, queries, entries // size, size)
        self.block_max = self.blocks.amax(3)
        self.best = self.block_max.amax(2)
        self.first_position = first_position
        self.batch_start, self.query_start = batch_start, query_start
        self.queries_per_batch = queries_per_batch

    def span(self, per_query: Tensor) -> Tensor:
        """The view of a ``[B, N]`` per-query tensor that this block covers: ``[B', Q]``."""
        batch, queries = self.best.shape
        rows = per_query[self.batch_start : self.batch_start + batch]
        return rows[:, self.query_start : self.query_start + queries]

    def ids(self, b: Tensor, q: Tensor) -> Tensor:
        """Flat query ids ``b * N + n`` of block queries ``(b, q)``."""
        return (self.batch_start + b) * self.queries_per_batch + self.query_start + q

    def at_least(self, threshold: Tensor, buffers: StepBuffers) -> tuple[Tensor, Tensor, Tensor]:
        """Every (query id, position, value) with ``value >= threshold`` ``[B', Q]``."""
        b, q, k = (self.block_max >= threshold[..., None]).nonzero(as_tuple=True)
        _, queries, count, size = self.blocks.shape
        flat = (b * queries + q) * count + k
        values = buffers.get("candidate_blocks", (flat.numel(), size), flat, self.blocks.dtype)
        torch.index_select(self.blocks.view(-1, size), 0, flat, out=values)
        which, entry = (values >= threshold[b, q, None]).nonzero(as_tuple=True)
        positions = self.first_position + k[which] * size + entry
        return self.ids(b[which], q[which]), positions, values[which, entry]

    def first_best(self, b: Tensor, q: Tensor) -> Tensor:
        """Position of the first entry equal to the best, for block queries ``(b, q)``."""
        best = self.best[b, q, None]
        block = (self.block_max[b, q] == best).int().argmax(1)
        entry = (self.blocks[b, q, block] == best).int().argmax(1)
        return self.first_position + block * self.blocks.size(3) + entry


@dataclass(frozen=True)
class WorkItem:
    """A unit of search work: some reference rows of one reference, for some batch elements."""

    reference: int
    key_rows: tuple[int, int]
    batch: tuple[int, int]
    row_range: tuple[int, int]


class _ExactState:
    """A worker's best (value, first position) per query ``[B, N]``, in the input dtype."""

    def __init__(self, like: Tensor, buffers: StepBuffers) -> None:
        self.best = torch.full_like(like, float("-inf"))
        self.position = torch.zeros(like.shape, dtype=torch.long, device=like.device)
        self.buffers = buffers

    def merge(self, other: _ExactState) -> None:
        """Keep the higher value; equal values keep the smaller position."""
        better = (other.best > self.best) | (
            (other.best == self.best) & (other.position < self.position)
        )
        self.best = torch.where(better, other.best, self.best)
        self.position = torch.where(better, other.position, self.position)


class TiledSearch:
    """Best reference position of every query patch of a batch (:func:`search_with_tables`)."""

    def __init__(
        self,
        tables: PatchTables,
        rows_per_step: int,
        key_rows_per_chunk: int,
        runtime: Runtime = PLAIN,
    ) -> None:
        self.runtime = runtime  # workers; memory for the matmul-dtype tables and step buffers
        self.batch = tables.query_table.size(0)
        self.height, self.width = tables.height, tables.width
        self.key_sizes = tables.key_sizes
        self.queries = self.batch * self.height * self.width
        self.rows_per_step, self.key_rows_per_chunk = rows_per_step, key_rows_per_chunk
        self.workers = runtime.workers
        self.device = tables.query_table.device
        self.tables = tables  # in the input dtype
        self.query_norm = self.tables.query_norm.reshape(-1)  # [B * N]
        self.inverse_key_norms = [n.clamp_min(NORM_EPS).reciprocal() for n in self.tables.key_norms]
        self.matmul_tables: tuple[Tensor, list[Tensor], list[Tensor]] | None = None

    def items(self, row_range: tuple[int, int]) -> list[WorkItem]:
        """Chunks of reference rows, split further by batch elements, then by LR rows, until
        there are :data:`ITEMS_PER_WORKER` items per worker (so that the workers end together;
        each LR split recomputes 2 halo rows)."""
        chunks = [
            (i, (start, min(start + self.key_rows_per_chunk, height)))
            for i, (height, _) in enumerate(self.key_sizes)
            for start in range(0, height, self.key_rows_per_chunk)
        ]
        wanted = ITEMS_PER_WORKER * self.workers if self.workers > 1 else 1
        groups = min(self.batch, -(-wanted // len(chunks)))
        first, stop = row_range
        most_parts = max(1, (stop - first) // MIN_ROWS_PER_ITEM)
        parts = min(most_parts, -(-wanted // (len(chunks) * groups)))
        batch_bounds = [round(g * self.batch / groups) for g in range(groups + 1)]
        row_bounds = [first + round(p * (stop - first) / parts) for p in range(parts + 1)]
        return [
            WorkItem(
                i, rows, (batch_bounds[g], batch_bounds[g + 1]), (row_bounds[p], row_bounds[p + 1])
            )
            for i, rows in chunks
            for g in range(groups)
            for p in range(parts)
        ]

    def prepare(self, dtype: torch.dtype) -> None:
        """Pixel tables in the matmul dtype, and key scales in the summing dtype."""
        tables = self.tables
        scale_dtype = torch.float32 if dtype == torch.bfloat16 else dtype

        def converted(table: Tensor) -> Tensor:
            if table.dtype == dtype:
                return table
            return self.runtime.allocate(table.shape, dtype, table.device).copy_(table)

        self.matmul_tables = (
            converted(tables.query_table),
            [converted(t) for t in tables.key_tables],
            [s.to(scale_dtype) for s in self.inverse_key_norms],
        )

    def blocks(self, item: WorkItem, buffers: StepBuffers) -> Iterator[_Block]:
        """The relevance blocks of a work item, step by step (after :meth:`prepare`)."""
        assert self.matmul_tables is not None
        query_table, key_tables, scales = self.matmul_tables
        b0, b1 = item.batch
        key_size = self.key_sizes[item.reference]
        first_position = (
            self.tables.position_offsets[item.reference] + item.key_rows[0] * key_size[1]
        )
        steps = relevance_steps(
            query_table[b0:b1],
            (self.height, self.width),
            key_tables[item.reference][b0:b1],
            key_size,
            scales[item.reference][b0:b1],
            self.rows_per_step,
            item.key_rows,
            item.row_range,
            buffers,
        )
        count = self.height * self.width
        for first, relevance in steps:
            yield _Block(relevance, key_size[1], first_position, b0, first * self.width, count)

    def exact(self, row_range: tuple[int, int] | None = None) -> Tensor:
        """Best positions ``[B * N]`` in the input dtype, ties to the smallest position. Only the
        queries of LR rows ``row_range`` (default all) are searched; the others are 0."""
        self.prepare(self.tables.query_table.dtype)

        def process(item: WorkItem, state: _ExactState) -> None:
            for block in self.blocks(item, state.buffers):
                best = block.span(state.best)
                better = (block.best > best).nonzero(as_tuple=True)
                if better[0].numel():
                    best[better] = block.best[better]
                    block.span(state.position)[better] = block.first_best(*better)

        states = self.runtime.map(
            self.items(row_range or (0, self.height)),
            process,
            lambda: _ExactState(self.tables.query_norm, self.runtime.step_buffers()),
        )
        for other in states[1:]:
            states[0].merge(other)
        position = states[0].position.view(-1)
        del states
        return position


def step_sizes(
    batch: int, width: int, key_sizes: Sequence[tuple[int, int]], step_elements: int
) -> tuple[int, int]:
    """(LR rows per step, reference rows per chunk) for about ``step_elements`` per step.

    Two LR rows per step keep the matmul efficient; the chunk takes what the budget leaves, at
    least :data:`MIN_KEY_ROWS` (each chunk recomputes 2 halo rows), and small references get more
    LR rows per step instead.
    """
    widest = max(w for _, w in key_sizes)
    tallest = max(h for h, _ in key_sizes)
    per_key_row = max(batch * width * widest, 1)
    key_rows = min(tallest, max(MIN_KEY_ROWS, step_elements // (2 * per_key_row)))
    rows = max(2, step_elements // (per_key_row * key_rows))
    return rows, key_rows


@torch.no_grad()
def search_with_tables(
    query_lv3: Tensor,
    keys_lv3: Sequence[Tensor],
    screening: Screening = "auto",
    rows_per_step: int | None = None,
    key_rows_per_chunk: int | None = None,
    step_elements: int = DEFAULT_STEP_ELEMENTS,
    runtime: Runtime = PLAIN,
) -> tuple[Tensor, PatchTables]:
    """Best reference position of every 3x3 query patch, and the inputs' pixel tables.

    Args:
        query_lv3: relu3_1 of the upsampled LR, ``[B, C, H, W]``.
        keys_lv3: relu3_1 of the down-up-sampled references, each ``[B, C, Hr_i, Wr_i]``.
        screening: ``"auto"`` (bfloat16 screening for float32 input on a CPU with fast bfloat16),
            ``"bfloat16"`` (force it for float32 input) or ``"off"`` (input dtype throughout).
        rows_per_step, key_rows_per_chunk: the tiling (LR rows per step, reference rows per
            chunk); by default chosen for about ``step_elements`` relevance entries per step.
            Working memory is a few times that per worker; the result does not depend on it.
        runtime: runs the work items and gives the memory of the pixel tables, their
            matmul-dtype copies and the step buffers (:mod:`ttsr.runtime`); a new phase of it
            starts here, and the returned tables are valid until its next one.
    Returns:
        ``[B, H*W]`` int64 indices into the concatenated reference positions, and the float
        :class:`PatchTables` of the inputs (reusable for their relevance).
    """
    batch, _, height, width = query_lv3.shape
    keys = [k.detach() for k in keys_lv3]
    rows, key_rows = step_sizes(batch, width, [(k.size(2), k.size(3)) for k in keys], step_elements)
    screen = resolve_screening(screening, query_lv3)

    def run() -> tuple[Tensor, PatchTables]:
        runtime.next_phase()
        search = TiledSearch(
            PatchTables.of(query_lv3.detach(), keys, runtime),
            rows_per_step or rows,
            key_rows_per_chunk or key_rows,
            runtime,
        )
        found = screened_search(search) if screen else search.exact()
        return found.view(batch, height * width), search.tables

    # Tables, norms and bounds are many small operations too: the whole search is one serial
    # phase of the runtime (one intra-op thread), its work items go to the runtime's workers.
    return runtime.serial(run)


def search_best_positions(
    query_lv3: Tensor, keys_lv3: Sequence[Tensor], *args: Any, **kwargs: Any
) -> Tensor:
    """Best reference position of every 3x3 query patch (the hard attention), in bounded memory:
    ``[B, H*W]`` int64 indices into the concatenated reference positions. Same arguments as
    :func:`search_with_tables`; the result never depends on the tiling, the screening or the
    runtime."""
    return search_with_tables(query_lv3, keys_lv3, *args, **kwargs)[0]
