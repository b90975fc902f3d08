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
    return box_sum_3x3(features.pow(2).sum(-3)).sqrt()


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


def relevance_steps(
    query: Tensor,
    key: Tensor,
    inverse_key_norm: Tensor,
    dtype: torch.dtype,
    rows_per_step: int,
    key_rows_per_chunk: int,
    row_range: tuple[int, int] | None = None,
) -> Iterator[tuple[int, int, Tensor]]:
    """Relevance of LR patches to reference patches, a block at a time, from per-pixel products.

    For every chunk of ``key_rows_per_chunk`` reference rows, sweeps the LR rows (``row_range``,
    default all) ``rows_per_step`` at a time and yields ``(first_lr_row, first_key_row,
    relevance)``, ``relevance`` ``[B, rows * W, key_rows * Wr]`` (a buffer reused by the next
    step): ``<query patch, key patch> / max(|key patch|, eps)``, not divided by the query norm.

    Args:
        query: ``[B, C, H, W]``; key: ``[B, C, Hr, Wr]``; both cast to ``dtype`` for the matmul,
            whose products are summed in float32 for bfloat16, else in ``dtype``.
        inverse_key_norm: ``[B, Hr, Wr]``, ``1 / max(|key patch|, eps)``.
    """
    batch, channels, height, width = query.shape
    key_height, key_width = key.shape[-2:]
    first_row, stop_row = row_range or (0, height)
    accumulate = torch.float32 if dtype == torch.bfloat16 else dtype
    device = query.device
    row_length = key_width + 2  # padded
    query_table = padded_pixel_table(query.to(dtype)).view(batch, -1, channels)
    key_padded = F.pad(key.to(dtype), (1, 1, 1, 1))  # [B, C, Hr+2, Wr+2]

    chunk_rows = min(key_rows_per_chunk, key_height)
    steps = min(rows_per_step, stop_row - first_row)
    # Padded LR rows: per-pixel products (matmul dtype, then summing dtype) and a sliding window
    # of horizontal 3-sums; the window slides (copying two rows) only when it is full.
    window = steps + 2 + max(steps, 4)
    most = batch * (steps + 2) * (width + 2) * (chunk_rows + 2) * row_length
    products = torch.empty(most, dtype=dtype, device=device)
    summing = torch.empty(most, dtype=accumulate, device=device) if dtype != accumulate else None
    horizontal = torch.empty(
        batch, window, width, chunk_rows + 2, key_width, dtype=accumulate, device=device
    )
    relevance = torch.empty(
        batch * steps * width * chunk_rows * key_width, dtype=accumulate, device=device
    )

    for first_key_row in range(0, key_height, chunk_rows):
        rows_here = min(chunk_rows, key_height - first_key_row)
        padded_rows = rows_here + 2
        keys = key_padded[:, :, first_key_row : first_key_row + padded_rows]
        keys = keys.reshape(batch, channels, padded_rows * row_length)
        scale = inverse_key_norm[:, None, None, first_key_row : first_key_row + rows_here]
        window_start = first_row  # padded LR row held in window slot 0
        window_end = first_row  # first padded LR row not yet in the window
        for first in range(first_row, stop_row, steps):
            rows = min(steps, stop_row - first)
            needed_end = first + rows + 2  # output rows use padded rows first .. first+rows+1
            if needed_end - window_start > window:  # slide: keep the last two rows
                for slot in range(2):
                    horizontal[:, slot].copy_(horizontal[:, window_end - 2 - window_start + slot])
                window_start = window_end - 2
            new = needed_end - window_end
            pixels = query_table[:, window_end * (width + 2) : needed_end * (width + 2)]
            shape = (batch, new, width + 2, padded_rows, row_length)
            out = products[: batch * new * (width + 2) * padded_rows * row_length]
            torch.matmul(pixels, keys, out=out.view(batch, new * (width + 2), -1))
            sums = out.view(shape)
            if summing is not None:
                sums = summing[: out.numel()].view(shape)
                sums.copy_(out.view(shape))
            target = horizontal[
                :, window_end - window_start : needed_end - window_start, :, :padded_rows
            ]
            # Query pixel x + dx meets key pixel c + dx.
            torch.add(
                sums[:, :, :width, :, :key_width],
                sums[:, :, 1 : width + 1, :, 1 : key_width + 1],
                out=target,
            )
            target.add_(sums[:, :, 2 : width + 2, :, 2 : key_width + 2])
            window_end = needed_end
            # Padded LR row y + dy meets padded key row r + dy.
            base = first - window_start
            out_rows = relevance[: batch * rows * width * rows_here * key_width]
            out_rows = out_rows.view(batch, rows, width, rows_here, key_width)
            torch.add(
                horizontal[:, base : base + rows, :, :rows_here],
                horizontal[:, base + 1 : base + rows + 1, :, 1 : rows_here + 1],
                out=out_rows,
            )
            out_rows.add_(horizontal[:, base + 2 : base + rows + 2, :, 2 : rows_here + 2])
            out_rows.mul_(scale)
            yield first, first_key_row, out_rows.view(batch, rows * width, -1)


def _block_rows(rows: int, width: int, most: int = 2048) -> int:
    """Largest divisor of ``rows`` whose rows hold at most ``most`` positions (at least 1)."""
    fitting = [d for d in range(1, rows + 1) if rows % d == 0 and d * width <= most]
    return max(fitting, default=1)


@dataclass(frozen=True)
class _Block:
    """One step of :func:`relevance_steps` seen as per-query blocks of whole reference rows."""

    ids: Tensor  # [B, Q] flat query ids b * N + n
    blocks: Tensor  # [B, Q, blocks, block_size] relevance
    block_max: Tensor  # [B, Q, blocks]
    best: Tensor  # [B, Q]
    first_position: int  # global position of the block's first entry

    @staticmethod
    def of(
        first_row: int,
        first_key_row: int,
        relevance: Tensor,
        key_width: int,
        height: int,
        width: int,
        position_offset: int,
    ) -> _Block:
        batch, queries, entries = relevance.shape
        block_size = _block_rows(entries // key_width, key_width) * key_width
        blocks = relevance.view(batch, queries, entries // block_size, block_size)
        block_max = blocks.amax(3)
        starts = torch.arange(batch, device=relevance.device)[:, None] * (height * width)
        ids = starts + first_row * width + torch.arange(queries, device=relevance.device)
        return _Block(
            ids, blocks, block_max, block_max.amax(2), position_offset + first_key_row * key_width
        )

    def at_least(self, threshold: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Every (query id, position, value) with ``value >= threshold [B, Q]``."""
        b, q, k = (self.block_max >= threshold[..., None]).nonzero(as_tuple=True)
        values = self.blocks[b, q, k]
        which, entry = (values >= threshold[b, q, None]).nonzero(as_tuple=True)
        block_size = self.blocks.size(3)
        positions = self.first_position + k[which] * block_size + entry
        return self.ids[b, q][which], positions, values[which, entry]

    def first_best(self, queries: tuple[Tensor, Tensor]) -> Tensor:
        """Position of the first entry equal to the best, for the given (b, q) queries."""
        b, q = queries
        best = self.best[b, q, None]
        block = (self.block_max[b, q] == best).int().argmax(1)
        entry = (self.blocks[b, q, block] == best).int().argmax(1)
        return self.first_position + block * self.blocks.size(3) + entry


class _Search:
    """Best reference position of every query patch of a batch (see :func:`search_best_positions`)."""

    def __init__(
        self, query: Tensor, keys: Sequence[Tensor], rows_per_step: int, key_rows_per_chunk: int
    ) -> None:
        self.query, self.keys = query, list(keys)
        self.batch, _, self.height, self.width = query.shape
        self.rows_per_step, self.key_rows_per_chunk = rows_per_step, key_rows_per_chunk
        self.query_norm = patch_norms(query).reshape(-1)  # [B * N]
        self.key_norms = [patch_norms(k) for k in self.keys]  # [B, Hr, Wr]
        offsets = [0]
        for key in self.keys[:-1]:
            offsets.append(offsets[-1] + key.size(2) * key.size(3))
        self.position_offsets = offsets

    def steps(
        self, dtype: torch.dtype, row_range: tuple[int, int] | None = None
    ) -> Iterator[_Block]:
        scale_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
        for key, norm, offset in zip(self.keys, self.key_norms, self.position_offsets, strict=True):
            inverse = norm.clamp_min(NORM_EPS).reciprocal().to(scale_dtype)
            for first, first_key_row, relevance in relevance_steps(
                self.query,
                key,
                inverse,
                dtype,
                self.rows_per_step,
                self.key_rows_per_chunk,
                row_range,
            ):
                yield _Block.of(
                    first, first_key_row, relevance, key.size(3), self.height, self.width, offset
                )

    def exact(self, row_range: tuple[int, int] | None = None) -> Tensor:
        """Best positions in the input dtype, ties to the smallest: ``[B * N]`` (rows outside
        ``row_range`` are 0)."""
        best = torch.full_like(self.query_norm, float("-inf"))
        position = torch.zeros(best.shape, dtype=torch.long, device=best.device)
        for block in self.steps(self.query.dtype, row_range):
            ids = block.ids
            better = (block.best > best[ids]).nonzero(as_tuple=True)
            if better[0].numel():
                best[ids[better]] = block.best[better]
                position[ids[better]] = block.first_best(better)
        return position

    def screened(self) -> Tensor:
        """Best positions ``[B * N]`` by bfloat16 screening and exact float32 rescoring."""
        margin = 2.0 * screening_error_bound(self.query, self.keys, self.query_norm)
        running = torch.full_like(self.query_norm, float("-inf"))
        zero_query = self.query_norm == 0  # relevance 0 everywhere: the first position wins
        store = _CandidateStore(self.query_norm.numel())
        for block in self.steps(torch.bfloat16):
            ids = block.ids
            running[ids] = torch.maximum(running[ids], block.best)
            threshold = (running[ids] - margin[ids]).masked_fill(zero_query[ids], float("inf"))
            store.add(*block.at_least(threshold))
            store.prune(running - margin)
        ids, positions, values = store.final(running - margin)
        counts = torch.bincount(ids, minlength=running.numel())
        index = torch.zeros(running.shape, dtype=torch.long, device=running.device)
        single = counts[ids] == 1
        index[ids[single]] = positions[single]
        overflow = counts > MAX_CANDIDATES_PER_QUERY
        overflow[store.overflow] = True
        several = ~single & ~overflow[ids]
        if bool(several.any()):
            index[...] = self._rescore(ids[several], positions[several], index)
        if bool(overflow.any()):
            self._search_again(overflow, index)
        return index

    def _rescore(self, ids: Tensor, positions: Tensor, index: Tensor) -> Tensor:
        """Exact float32 best among the candidates of each query; ties to the smallest position."""
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

    def _search_again(self, overflow: Tensor, index: Tensor) -> None:
        """Exact search of the LR rows holding queries with too many candidates."""
        rows = torch.unique(
            torch.remainder(overflow.nonzero().squeeze(1), self.height * self.width) // self.width
        )
        runs: list[list[int]] = []
        for row in rows.tolist():
            if runs and runs[-1][1] == row:
                runs[-1][1] = row + 1
            else:
                runs.append([row, row + 1])
        for start, stop in runs:
            exact = self.exact((start, stop))
            index[overflow] = torch.where(overflow, exact, index)[overflow]


class _CandidateStore:
    """(query id, position, screened value) candidates, pruned as thresholds rise."""

    def __init__(self, queries: int) -> None:
        self.parts: list[tuple[Tensor, Tensor, Tensor]] = []
        self.size = 0
        self.queries = queries
        self.overflow = torch.zeros(0, dtype=torch.long)

    def add(self, ids: Tensor, positions: Tensor, values: Tensor) -> None:
        self.parts.append((ids, positions, values))
        self.size += ids.numel()

    def final(self, threshold: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        ids, positions, values = (torch.cat(part) for part in zip(*self.parts, strict=True))
        keep = values >= threshold[ids]
        return ids[keep], positions[keep], values[keep]

    def prune(self, threshold: Tensor) -> None:
        if self.size <= CANDIDATE_STORE_LIMIT:
            return
        ids, positions, values = self.final(threshold)
        counts = torch.bincount(ids, minlength=self.queries)
        crowded = counts > MAX_CANDIDATES_PER_QUERY
        if bool(crowded.any()):
            self.overflow = torch.cat([self.overflow.to(ids.device), crowded.nonzero().squeeze(1)])
            keep = ~crowded[ids]
            ids, positions, values = ids[keep], positions[keep], values[keep]
        self.parts, self.size = [(ids, positions, values)], ids.numel()


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
            Working memory is about 40 bytes per entry; the result does not depend on it.
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
