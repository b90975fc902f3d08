"""Exact 3x3-patch cosine search in bounded memory, from per-pixel correlations.

The dot product of two 3x3 patches is the sum, over the 9 aligned offsets, of per-pixel feature
dot products. One matmul of the zero-padded query pixels of an LR row with the zero-padded pixels
of a few reference rows, then sums along the 3x3 diagonals (shifted adds: 3 horizontal, then 3
vertical), gives the relevance of those LR patches to those reference patches at about ``C + 6``
multiply-adds per pair instead of ``9C``, with the same argmax.

Work is blocked for the cache: the reference is split into chunks of a few relu3_1 rows; for each
chunk, the LR rows are swept in order, and the horizontal sums of a padded LR row are kept in a
small ring, since each one serves three output rows. Memory is ``O(rows x chunk)``, never
``O(N x M)``.

Screening (float32 input on a CPU with fast bfloat16 matmul): the per-pixel correlations are
computed in bfloat16 with float32 accumulation, and a rigorous bound on the error of the screened
relevance is known per query (:func:`screening_error_bound`). Every reference patch whose screened
relevance is within twice that bound of the best screened one is a candidate; the true best is
always among them. Candidates of queries that have more than one are rescored exactly in float32
(most queries have one). Queries with very many candidates (flat, near-identical regions) are
searched again exactly in float32, so the result never depends on the screening.

Positions: a query ``n = y * W + x``; a reference position ``m`` is row-major over the relu3_1 grid
of each reference, references concatenated in order (as in ``search_transfer.search``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ttsr.model.cpu_workers import run_items, worker_count

#: ``F.normalize``'s epsilon: patch norms below it are clamped, as in the straightforward search.
NORM_EPS = 1e-12
#: Unit roundoff of bfloat16 (8 significant bits, round to nearest).
BFLOAT16_UNIT_ROUNDOFF = 2.0**-8
#: Unit roundoff of float32.
FLOAT32_UNIT_ROUNDOFF = 2.0**-24
#: Extra margin on the screening bound, for float32 rounding of norms, sums and comparisons.
SCREENING_SLACK = 1e-4
#: Relevance entries per step (batch x LR rows x W x reference rows x Wr): a few MB of working
#: memory, which stays in the cache.
DEFAULT_STEP_ELEMENTS = 1 << 18
#: Fewest reference rows per chunk: each chunk recomputes 2 halo rows.
MIN_KEY_ROWS = 8
#: Queries with more candidates than this are searched again exactly.
MAX_CANDIDATES_PER_QUERY = 64
#: Stored candidates beyond which the store is pruned to the current thresholds.
CANDIDATE_STORE_LIMIT = 1 << 22
#: Patch pairs scored per chunk in :func:`pair_dot` (bounds its ``[pairs, C]`` buffers).
PAIR_CHUNK = 1 << 12

Screening = Literal["auto", "bfloat16", "off"]

#: The 9 offsets of a 3x3 patch, row-major, as (dy, dx) in {0, 1, 2} on the zero-padded grid.
PATCH_OFFSETS: tuple[tuple[int, int], ...] = tuple((dy, dx) for dy in range(3) for dx in range(3))


def bfloat16_screening_available(device: torch.device) -> bool:
    """Whether bfloat16 matmul is fast here and accumulates in float32 (CPU with AVX512-BF16/AMX).

    On CUDA, cuBLAS may reduce bfloat16 products in reduced precision, which would break the
    screening bound, so screening is CPU-only.
    """
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_screening(screening: Screening, query: Tensor) -> bool:
    """Whether to screen in bfloat16: ``"auto"`` does for float32 where it is fast and exact."""
    if screening not in ("auto", "bfloat16", "off"):
        raise ValueError(f"screening must be 'auto', 'bfloat16' or 'off', not {screening!r}")
    if screening == "off" or query.dtype != torch.float32:
        return False
    return screening == "bfloat16" or bfloat16_screening_available(query.device)


def box_sum_3x3(values: Tensor) -> Tensor:
    """Sum over each 3x3 window with zero padding: ``[..., H, W]`` -> ``[..., H, W]``."""
    padded = F.pad(values, (1, 1, 1, 1))
    rows = padded[..., :-2, :] + padded[..., 1:-1, :] + padded[..., 2:, :]
    return rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]


def patch_norms(features: Tensor) -> Tensor:
    """L2 norm of every zero-padded 3x3 patch: ``[..., C, H, W]`` -> ``[..., H, W]``.

    Equal to the norm of the columns of ``F.unfold(features, 3, padding=1)``.
    """
    return box_sum_3x3((features * features).sum(-3)).sqrt()


def padded_pixel_table(features: Tensor) -> Tensor:
    """Zero-pad by one pixel, channels last: ``[..., C, H, W]`` -> ``[... * (H+2) * (W+2), C]``."""
    padded = F.pad(features, (1, 1, 1, 1))
    return padded.movedim(-3, -1).reshape(-1, features.size(-3))


class PatchTables:
    """Zero-padded, channels-last pixel tables of a batch of queries and references.

    Patch dot products then are 9 row gathers (:func:`pair_dot`); nothing is unfolded.

    Args:
        query: ``[B, C, H, W]``; keys: references, each ``[B, C, Hr_i, Wr_i]``.
    """

    def __init__(self, query: Tensor, keys: Sequence[Tensor]) -> None:
        batch, channels, self.height, self.width = query.shape
        device = query.device
        self.query_table = padded_pixel_table(query)  # [B * (H+2) * (W+2), C]
        self.query_pixels = (self.height + 2) * (self.width + 2)
        shapes = [tuple(k.shape[-2:]) for k in keys]
        padded = [(h + 2) * (w + 2) for h, w in shapes]
        self.key_pixels = sum(padded)
        tables = [padded_pixel_table(k).view(batch, -1, channels) for k in keys]
        self.key_table = torch.cat(tables, 1).view(-1, channels)  # batch-major
        self.query_norm = patch_norms(query).reshape(batch, -1)
        self.key_norm = torch.cat([patch_norms(k).reshape(batch, -1) for k in keys], 1)
        starts = [sum(h * w for h, w in shapes[:i]) for i in range(len(shapes))]
        self.position_starts = torch.tensor(starts, device=device)
        self.table_offsets = torch.tensor(
            [sum(padded[:i]) for i in range(len(shapes))], device=device
        )
        self.key_widths = torch.tensor([w for _, w in shapes], device=device)

    def query_top_left(self, batch_index: Tensor, queries: Tensor) -> Tensor:
        """Table row of the top-left pixel of query patches (row-major positions)."""
        rows = torch.div(queries, self.width, rounding_mode="floor")
        columns = queries - rows * self.width
        return batch_index * self.query_pixels + rows * (self.width + 2) + columns

    def key_top_left(self, batch_index: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Table row of the top-left pixel of reference patches, and their padded row length."""
        which = torch.searchsorted(self.position_starts, positions, right=True) - 1
        local = positions - self.position_starts[which]
        width = self.key_widths[which]
        rows = torch.div(local, width, rounding_mode="floor")
        columns = local - rows * width
        base = batch_index * self.key_pixels + self.table_offsets[which]
        return base + rows * (width + 2) + columns, width + 2

    def relevance(self, batch_index: Tensor, queries: Tensor, positions: Tensor) -> Tensor:
        """``<q, k> / (max(|q|, eps) max(|k|, eps))`` of patch pairs: ``[P]``."""
        key_top_left, key_row_length = self.key_top_left(batch_index, positions)
        dot = pair_dot(
            self.query_table,
            self.key_table,
            self.query_top_left(batch_index, queries),
            key_top_left,
            self.width + 2,
            key_row_length,
        )
        query_norm = self.query_norm[batch_index, queries].clamp_min(NORM_EPS)
        return dot / (query_norm * self.key_norm[batch_index, positions].clamp_min(NORM_EPS))


def pair_dot(
    query_table: Tensor,
    key_table: Tensor,
    query_top_left: Tensor,
    key_top_left: Tensor,
    query_row_length: int,
    key_row_length: Tensor,
) -> Tensor:
    """Dot products of 3x3 patch pairs ``[P]`` from channels-last pixel tables, in chunks."""
    out = query_table.new_empty(query_top_left.shape)
    for start in range(0, query_top_left.numel(), PAIR_CHUNK):
        chunk = slice(start, start + PAIR_CHUNK)
        query_base, key_base = query_top_left[chunk], key_top_left[chunk]
        key_rows = key_row_length[chunk] if key_row_length.dim() else key_row_length
        products = None
        for dy, dx in PATCH_OFFSETS:
            query_pixels = query_table.index_select(0, query_base + (dy * query_row_length + dx))
            key_pixels = key_table.index_select(0, key_base + (dy * key_rows + dx))
            if products is None:
                products = query_pixels.mul_(key_pixels)
            else:
                products.addcmul_(query_pixels, key_pixels)
        assert products is not None
        out[chunk] = products.sum(1)
    return out


class Workspace:
    """Flat scratch buffers reused from step to step (one per worker), grown on demand."""

    def __init__(self) -> None:
        self.buffers: dict[str, Tensor] = {}

    def get(self, name: str, shape: Sequence[int], like: Tensor, dtype: torch.dtype) -> Tensor:
        """A contiguous ``shape`` view of buffer ``name`` (contents undefined)."""
        numel = 1
        for size in shape:
            numel *= size
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype:
            buffer = torch.empty(numel, dtype=dtype, device=like.device)
            self.buffers[name] = buffer
        return buffer[:numel].view(*shape)


def relevance_steps(
    query_table: Tensor,
    query_size: tuple[int, int],
    key: Tensor,
    inverse_key_norm: Tensor,
    rows_per_step: int,
    key_rows: tuple[int, int],
    row_range: tuple[int, int],
    workspace: Workspace,
) -> Iterator[tuple[int, Tensor]]:
    """Relevance of LR patches to the patches of some reference rows, from per-pixel products.

    Sweeps the LR rows of ``row_range`` ``rows_per_step`` at a time and yields ``(first_lr_row,
    relevance)``, ``relevance`` ``[B, rows * W, key_rows * Wr]`` (a buffer that the next step
    reuses): ``<query patch, key patch> / max(|key patch|, eps)``, not divided by the query norm.

    Args:
        query_table: ``[B, (H+2) * (W+2), C]`` zero-padded channels-last query pixels, in the
            matmul dtype (bfloat16 products are summed in float32, others in their dtype).
        query_size: ``(H, W)``.
        key: ``[B, C, Hr+2, Wr+2]`` zero-padded reference pixels, in the matmul dtype.
        inverse_key_norm: ``[B, Hr, Wr]``, ``1 / max(|key patch|, eps)``.
        key_rows: ``(first, stop)`` reference rows (patch centres) of this chunk.
    """
    batch, channels = key.shape[:2]
    height, width = query_size
    key_width = key.size(3) - 2
    row_length = key_width + 2  # padded
    dtype = query_table.dtype
    accumulate = torch.float32 if dtype == torch.bfloat16 else dtype
    first_key_row, stop_key_row = key_rows
    rows_here = stop_key_row - first_key_row
    padded_rows = rows_here + 2
    first_row, stop_row = row_range
    steps = min(rows_per_step, stop_row - first_row)
    # Padded reference rows first_key_row .. stop_key_row + 1 hold the chunk's patches.
    keys = workspace.get("keys", (batch, channels, padded_rows * row_length), key, dtype)
    keys.view(batch, channels, padded_rows, row_length).copy_(
        key[:, :, first_key_row : stop_key_row + 2]
    )
    scale = inverse_key_norm[:, None, first_key_row:stop_key_row]
    # A ring of horizontal 3-sums of padded LR rows: each serves three output rows.
    slots = steps + 2
    ring = workspace.get("ring", (slots, batch, width, padded_rows, key_width), key, accumulate)
    relevance = workspace.get(
        "relevance", (batch, steps, width, rows_here, key_width), key, accumulate
    )
    computed = first_row  # padded LR rows below this are in the ring
    for first in range(first_row, stop_row, steps):
        rows = min(steps, stop_row - first)
        needed = first + rows + 2  # output rows use padded LR rows first .. first+rows+1
        new = needed - computed
        pixels = query_table[:, computed * (width + 2) : needed * (width + 2)]
        shape = (batch, new, width + 2, padded_rows, row_length)
        products = workspace.get(
            "products", (batch, new * (width + 2), padded_rows * row_length), key, dtype
        )
        if batch == 1:
            torch.mm(pixels[0], keys[0], out=products[0])
        else:
            torch.bmm(pixels, keys, out=products)
        sums = products.view(shape)
        if accumulate != dtype:
            sums = workspace.get("sums", shape, key, accumulate).copy_(sums)
        for i in range(new):
            target = ring[(computed + i) % slots]
            # LR pixel x + dx meets reference pixel c + dx.
            torch.add(
                sums[:, i, :width, :, :key_width],
                sums[:, i, 1 : width + 1, :, 1 : key_width + 1],
                out=target,
            )
            target.add_(sums[:, i, 2 : width + 2, :, 2 : key_width + 2])
        computed = needed
        out = relevance[:, :rows] if rows < steps else relevance
        for j in range(rows):
            # Padded LR row y + dy meets padded reference row r + dy.
            top, middle, bottom = (ring[(first + j + dy) % slots] for dy in range(3))
            row = out[:, j]
            torch.add(top[:, :, :rows_here], middle[:, :, 1 : rows_here + 1], out=row)
            row.add_(bottom[:, :, 2 : rows_here + 2])
            row.mul_(scale)
        yield first, out.reshape(batch, rows * width, rows_here * key_width)


def _block_rows(rows: int, width: int, most: int = 1024) -> int:
    """Largest divisor of ``rows`` whose rows hold at most ``most`` positions (at least 1)."""
    fitting = [d for d in range(1, rows + 1) if rows % d == 0 and d * width <= most]
    return max(fitting, default=1)


class _Block:
    """One step of :func:`relevance_steps`: per query, blocks of whole reference rows.

    ``ids`` ``[B, Q]`` flat query ids ``b * N + n``; ``blocks`` ``[B, Q, blocks, size]``;
    ``block_max`` ``[B, Q, blocks]``; ``best`` ``[B, Q]``; positions are global.
    """

    def __init__(self, ids: Tensor, relevance: Tensor, key_width: int, first_position: int):
        batch, queries, entries = relevance.shape
        size = _block_rows(entries // key_width, key_width) * key_width
        self.ids = ids
        self.blocks = relevance.view(batch, queries, entries // size, size)
        self.block_max = self.blocks.amax(3)
        self.best = self.block_max.amax(2)
        self.first_position = first_position

    def at_least(self, threshold: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Every (query id, position, value) with ``value >= threshold`` ``[B, Q]``."""
        b, q, k = (self.block_max >= threshold[..., None]).nonzero(as_tuple=True)
        values = self.blocks[b, q, k]
        which, entry = (values >= threshold[b, q, None]).nonzero(as_tuple=True)
        positions = self.first_position + k[which] * self.blocks.size(3) + entry
        return self.ids[b, q][which], positions, values[which, entry]

    def first_best(self, b: Tensor, q: Tensor) -> Tensor:
        """Position of the first entry equal to the best, for queries ``(b, q)``."""
        best = self.best[b, q, None]
        block = (self.block_max[b, q] == best).int().argmax(1)
        entry = (self.blocks[b, q, block] == best).int().argmax(1)
        return self.first_position + block * self.blocks.size(3) + entry


@dataclass(frozen=True)
class _Item:
    """A unit of search work: some reference rows of one reference, for some batch elements."""

    reference: int
    key_rows: tuple[int, int]
    batch: tuple[int, int]
    row_range: tuple[int, int]


class _ExactState:
    """A worker's best (value, first position) per query, in the input dtype."""

    def __init__(self, queries: int, like: Tensor) -> None:
        self.best = torch.full((queries,), float("-inf"), dtype=like.dtype, device=like.device)
        self.position = torch.zeros(queries, dtype=torch.long, device=like.device)
        self.workspace = Workspace()

    def merge(self, other: _ExactState) -> None:
        """Keep the higher value; equal values keep the smaller position."""
        better = (other.best > self.best) | (
            (other.best == self.best) & (other.position < self.position)
        )
        self.best = torch.where(better, other.best, self.best)
        self.position = torch.where(better, other.position, self.position)


class _ScreenedState:
    """A worker's running best screened value per query and candidates near it."""

    def __init__(self, queries: int, like: Tensor) -> None:
        self.best = torch.full((queries,), float("-inf"), device=like.device)
        self.parts: list[tuple[Tensor, Tensor, Tensor]] = []
        self.size = 0
        self.crowded = torch.zeros(queries, dtype=torch.bool, device=like.device)
        self.workspace = Workspace()

    def add(self, ids: Tensor, positions: Tensor, values: Tensor) -> None:
        self.parts.append((ids, positions, values))
        self.size += ids.numel()

    def candidates(self, threshold: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Stored (id, position, value) with ``value >= threshold[id]``."""
        if not self.parts:
            empty = threshold.new_empty(0, dtype=torch.long)
            return empty, empty, threshold.new_empty(0)
        ids, positions, values = (torch.cat(column) for column in zip(*self.parts, strict=True))
        keep = values >= threshold[ids]
        return ids[keep], positions[keep], values[keep]

    def prune(self, margin: Tensor) -> None:
        """Drop candidates below the current thresholds; over the store limit, give up on the
        queries with the most (they are searched again exactly)."""
        if self.size <= CANDIDATE_STORE_LIMIT:
            return
        ids, positions, values = self.candidates(self.best - margin)
        counts = torch.bincount(ids, minlength=self.best.numel())
        self.crowded |= counts > MAX_CANDIDATES_PER_QUERY
        keep = ~self.crowded[ids]
        self.parts = [(ids[keep], positions[keep], values[keep])]
        self.size = self.parts[0][0].numel()


class _Search:
    """Best reference position of every query patch of a batch; see :func:`search_best_positions`."""

    def __init__(
        self, query: Tensor, keys: Sequence[Tensor], rows_per_step: int, key_rows_per_chunk: int
    ) -> None:
        self.query, self.keys = query, list(keys)
        self.batch, _, self.height, self.width = query.shape
        self.queries = self.batch * self.height * self.width
        self.rows_per_step, self.key_rows_per_chunk = rows_per_step, key_rows_per_chunk
        self.query_norm = patch_norms(query).reshape(-1)  # [B * N]
        self.inverse_key_norms = [patch_norms(k).clamp_min(NORM_EPS).reciprocal() for k in keys]
        self.position_offsets = [0]
        for key in self.keys[:-1]:
            self.position_offsets.append(self.position_offsets[-1] + key.size(2) * key.size(3))
        self.workers = worker_count(query.device)

    def items(self, row_range: tuple[int, int]) -> list[_Item]:
        """Chunks of reference rows; batch groups too when there are few chunks per worker."""
        chunks = [
            (i, (start, min(start + self.key_rows_per_chunk, key.size(2))))
            for i, key in enumerate(self.keys)
            for start in range(0, key.size(2), self.key_rows_per_chunk)
        ]
        groups = min(self.batch, -(-2 * self.workers // len(chunks))) if self.workers > 1 else 1
        bounds = [round(g * self.batch / groups) for g in range(groups + 1)]
        return [
            _Item(i, rows, (bounds[g], bounds[g + 1]), row_range)
            for i, rows in chunks
            for g in range(groups)
        ]

    def prepare(self, dtype: torch.dtype) -> None:
        """Padded pixel tables in the matmul dtype, shared by the workers."""
        batch, channels = self.query.shape[:2]
        self.query_table = padded_pixel_table(self.query.to(dtype)).view(batch, -1, channels)
        self.padded_keys = [F.pad(k.to(dtype), (1, 1, 1, 1)) for k in self.keys]
        scale_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
        self.scales = [s.to(scale_dtype) for s in self.inverse_key_norms]

    def blocks(self, item: _Item, workspace: Workspace) -> Iterator[_Block]:
        """The relevance blocks of a work item, step by step (after :meth:`prepare`)."""
        b0, b1 = item.batch
        key_width = self.keys[item.reference].size(3)
        first_position = self.position_offsets[item.reference] + item.key_rows[0] * key_width
        count = self.height * self.width
        device = self.query.device
        starts = (torch.arange(b0, b1, device=device) * count)[:, None]
        steps = relevance_steps(
            self.query_table[b0:b1],
            (self.height, self.width),
            self.padded_keys[item.reference][b0:b1],
            self.scales[item.reference][b0:b1],
            self.rows_per_step,
            item.key_rows,
            item.row_range,
            workspace,
        )
        for first, relevance in steps:
            ids = starts + first * self.width + torch.arange(relevance.size(1), device=device)
            yield _Block(ids, relevance, key_width, first_position)

    def exact(self, row_range: tuple[int, int] | None = None) -> Tensor:
        """Best positions ``[B * N]`` in the input dtype (ties: smallest position); only the
        queries of ``row_range`` (default all rows) are searched, the others are 0."""
        rows = row_range or (0, self.height)
        self.prepare(self.query.dtype)

        def process(item: _Item, state: _ExactState) -> None:
            for block in self.blocks(item, state.workspace):
                better = (block.best > state.best[block.ids]).nonzero(as_tuple=True)
                if better[0].numel():
                    ids = block.ids[better]
                    state.best[ids] = block.best[better]
                    state.position[ids] = block.first_best(*better)

        states = run_items(
            self.items(rows), process, lambda: _ExactState(self.queries, self.query), self.workers
        )
        for other in states[1:]:
            states[0].merge(other)
        return states[0].position

    def screened(self) -> Tensor:
        """Best positions ``[B * N]`` by bfloat16 screening and exact float32 rescoring."""
        margin = 2.0 * screening_error_bound(self.query, self.keys, self.query_norm)
        zero_query = self.query_norm == 0  # relevance 0 everywhere: the first position wins
        self.prepare(torch.bfloat16)

        def process(item: _Item, state: _ScreenedState) -> None:
            for block in self.blocks(item, state.workspace):
                ids = block.ids
                best = torch.maximum(state.best[ids], block.best)
                state.best[ids] = best
                threshold = (best - margin[ids]).masked_fill(zero_query[ids], float("inf"))
                state.add(*block.at_least(threshold))
            state.prune(margin)

        states = run_items(
            self.items((0, self.height)),
            process,
            lambda: _ScreenedState(self.queries, self.query),
            self.workers,
        )
        best = torch.stack([s.best for s in states]).amax(0)
        found = [s.candidates(best - margin) for s in states]
        ids, positions, _ = (torch.cat(column) for column in zip(*found, strict=True))
        counts = torch.bincount(ids, minlength=self.queries)
        crowded = counts > MAX_CANDIDATES_PER_QUERY
        for state in states:
            crowded |= state.crowded
        index = torch.zeros(self.queries, dtype=torch.long, device=self.query.device)
        single = counts[ids] == 1
        index[ids[single]] = positions[single]
        several = ~single & ~crowded[ids]
        if bool(several.any()):
            index = self._rescore(ids[several], positions[several], index)
        if bool(crowded.any()):
            self._search_again(crowded, index)
        return index

    def _rescore(self, ids: Tensor, positions: Tensor, index: Tensor) -> Tensor:
        """Exact float32 best among each query's candidates; ties to the smallest position."""
        tables = PatchTables(self.query, self.keys)
        count = self.height * self.width
        batch_index = torch.div(ids, count, rounding_mode="floor")
        values = tables.relevance(batch_index, ids - batch_index * count, positions)
        best = torch.full(index.shape, float("-inf"), dtype=values.dtype, device=values.device)
        best.scatter_reduce_(0, ids, values, "amax")
        is_best = values == best[ids]
        chosen = torch.full_like(index, torch.iinfo(torch.long).max)
        chosen.scatter_reduce_(0, ids[is_best], positions[is_best], "amin")
        return torch.where(chosen == torch.iinfo(torch.long).max, index, chosen)

    def _search_again(self, crowded: Tensor, index: Tensor) -> None:
        """Exact search of the LR rows that hold queries with too many candidates."""
        count = self.height * self.width
        rows = torch.unique(torch.remainder(crowded.nonzero().squeeze(1), count) // self.width)
        runs: list[list[int]] = []
        for row in rows.tolist():
            if runs and runs[-1][1] == row:
                runs[-1][1] = row + 1
            else:
                runs.append([row, row + 1])
        for start, stop in runs:
            exact = self.exact((start, stop))
            in_rows = crowded.view(self.batch, self.height, self.width).clone()
            in_rows[:, :start] = False
            in_rows[:, stop:] = False
            index[in_rows.view(-1)] = exact[in_rows.view(-1)]


def screening_error_bound(query: Tensor, keys: Sequence[Tensor], query_norm: Tensor) -> Tensor:
    """Bound on |screened - exact| relevance, times the query patch norm: ``[B * N]``.

    With ``x = x16 + x_lo`` the bfloat16 rounding of the pixels, per patch
    ``|<q, k> - <q16, k16>| <= (rho_q + rho_k + 3 rho_q rho_k) |q| |k|`` with ``rho = |x_lo| / |x|``
    (Cauchy-Schwarz on the 9C-vectors); rounding each per-pixel product sum (accumulated in
    float32) to bfloat16 adds at most ``(u + gamma_C) (1 + rho_q) (1 + rho_k) |q| |k|``. Screened
    values are divided by ``max(|k|, eps) >= |k|``, so the bound is ``|q|`` times that factor;
    ``rho_k`` is the largest over the batch element's reference patches.
    """
    batch, channels = query.shape[:2]

    def rounding_ratio(features: Tensor) -> Tensor:
        norm = patch_norms(features)
        residual = patch_norms(features - features.to(torch.bfloat16).to(features.dtype))
        return torch.where(norm > 0, residual / norm, 0.0).reshape(batch, -1)

    rho_query = rounding_ratio(query)  # [B, N]
    rho_key = torch.stack([rounding_ratio(k).amax(1) for k in keys]).amax(0)[:, None]  # [B, 1]
    rounding = BFLOAT16_UNIT_ROUNDOFF + (channels + 16) * FLOAT32_UNIT_ROUNDOFF
    factor = (
        rho_query
        + rho_key
        + 3 * rho_query * rho_key
        + rounding * (1 + rho_query) * (1 + rho_key)
        + SCREENING_SLACK
    )
    return query_norm * factor.reshape(-1)


def step_sizes(
    batch: int, width: int, key_shapes: Sequence[tuple[int, int]], step_elements: int
) -> tuple[int, int]:
    """(LR rows per step, reference rows per chunk) for about ``step_elements`` per step."""
    widest = max(w for _, w in key_shapes)
    tallest = max(h for h, _ in key_shapes)
    key_rows = max(MIN_KEY_ROWS, step_elements // max(batch * width * widest, 1))
    key_rows = min(key_rows, tallest)
    rows = max(1, step_elements // max(batch * width * widest * key_rows, 1))
    return rows, key_rows


@torch.no_grad()
def search_best_positions(
    query_lv3: Tensor,
    keys_lv3: Sequence[Tensor],
    screening: Screening = "auto",
    rows_per_step: int | None = None,
    key_rows_per_chunk: int | None = None,
    step_elements: int = DEFAULT_STEP_ELEMENTS,
) -> Tensor:
    """Best reference position of every 3x3 query patch (the hard attention), in bounded memory.

    Args:
        query_lv3: relu3_1 of the upsampled LR, ``[B, C, H, W]``.
        keys_lv3: relu3_1 of the down-up-sampled references, each ``[B, C, Hr_i, Wr_i]``.
        screening: ``"auto"`` (bfloat16 screening for float32 input on a CPU with fast bfloat16),
            ``"bfloat16"`` (force it for float32 input) or ``"off"`` (input dtype throughout).
        rows_per_step, key_rows_per_chunk: the tiling (LR rows per step, reference rows per
            chunk); by default chosen for about ``step_elements`` relevance entries per step.
            Working memory is a few times that per worker; the result does not depend on it.
    Returns:
        ``[B, H*W]`` int64 indices into the concatenated reference positions.
    """
    batch, _, height, width = query_lv3.shape
    keys = [k.detach() for k in keys_lv3]
    rows, key_rows = step_sizes(batch, width, [k.shape[-2:] for k in keys], step_elements)
    search = _Search(
        query_lv3.detach(), keys, rows_per_step or rows, key_rows_per_chunk or key_rows
    )
    found = search.screened() if resolve_screening(screening, query_lv3) else search.exact()
    return found.view(batch, height * width)
