"""Exact 3x3-patch cosine search in bounded memory, from per-pixel correlations.

The dot product of two 3x3 patches is the sum, over the 9 aligned offsets, of per-pixel feature
dot products. So one matmul of the (zero-padded) query pixels of a few LR rows with every
(zero-padded) reference pixel, followed by sums along the 3x3 diagonals (shifted adds), gives the
relevance of those rows to every reference patch at about ``C + 9`` multiply-adds per pair instead
of ``9C``. The diagonal sums are taken on the flat padded layout, where every shift is a plain
offset: the horizontal sum of one padded query row is kept in a small ring (it serves three output
rows), so memory is ``O(rows x M)``, never ``O(N x M)``.

Screening (float32 inputs on a CPU with fast bfloat16 matmul): the per-pixel correlations are
computed in bfloat16, with a rigorous bound on their error. Every reference patch whose screened
score is within twice that bound of the best screened score is a candidate; the true (float32)
best is always among them, and candidates are rescored exactly in float32. Most queries have a
single candidate. A row with too many candidates (flat, near-identical regions) is recomputed
exactly in float32 instead, so the result never depends on the screening.

Positions: a query ``n = y * W + x``; a reference position ``m`` is row-major over the relu3_1 grid
of each reference, references concatenated in order (as in :func:`ttsr.model.search_transfer.search`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

#: ``F.normalize``'s epsilon: patch norms below it are clamped, as in the straightforward search.
NORM_EPS = 1e-12
#: Unit roundoff of bfloat16 (8 significant bits, round to nearest).
BFLOAT16_UNIT_ROUNDOFF = 2.0**-8
#: Unit roundoff of float32.
FLOAT32_UNIT_ROUNDOFF = 2.0**-24
#: Extra margin on the screening bound, for float32 rounding of norms, sums and comparisons.
SCREENING_SLACK = 1e-4
#: Relevance entries (``rows x W x M``) computed per step: a few MB, to stay cache friendly.
DEFAULT_STEP_ELEMENTS = 1 << 21
#: A step whose multi-candidate queries have more candidates than this many per query (on average
#: over the step's queries) is recomputed exactly instead of rescoring candidate by candidate.
MAX_CANDIDATES_PER_QUERY = 64
#: Candidate pairs rescored per chunk (bounds the gathered ``[pairs, C]`` buffers).
RESCORE_CHUNK = 1 << 14

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


def box_sum_3x3(values: Tensor) -> Tensor:
    """Sum over each 3x3 window with zero padding: ``[..., H, W]`` -> ``[..., H, W]``."""
    padded = torch.nn.functional.pad(values, (1, 1, 1, 1))
    rows = padded[..., :-2, :] + padded[..., 1:-1, :] + padded[..., 2:, :]
    return rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]


def patch_norms(features: Tensor) -> Tensor:
    """L2 norm of every zero-padded 3x3 patch: ``[..., C, H, W]`` -> ``[..., H, W]``.

    Equal to the norm of the columns of ``F.unfold(features, 3, padding=1)``.
    """
    return box_sum_3x3(features.pow(2).sum(-3)).sqrt()


def padded_pixel_table(features: Tensor) -> Tensor:
    """Zero-pad by one pixel and lay out channels last: ``[C, H, W]`` -> ``[(H+2)*(W+2), C]``."""
    padded = torch.nn.functional.pad(features, (1, 1, 1, 1))
    return padded.permute(1, 2, 0).reshape(-1, features.size(0))


@dataclass(frozen=True)
class PatchGrid:
    """Geometry of one feature map's 3x3 patches on its zero-padded flat pixel table.

    ``centre`` (a patch position ``[H*W]`` -> its top-left pixel in the padded table, plus
    ``table_offset`` for tables of several maps concatenated) and ``row_length = W + 2``.
    """

    height: int
    width: int
    table_offset: int = 0

    @property
    def row_length(self) -> int:
        return self.width + 2

    @property
    def table_size(self) -> int:
        return (self.height + 2) * (self.width + 2)

    def top_left(self, positions: Tensor) -> Tensor:
        """Padded-table index of the top-left pixel of the patches at ``positions`` (row-major)."""
        rows = torch.div(positions, self.width, rounding_mode="floor")
        cols = positions - rows * self.width
        return self.table_offset + rows * self.row_length + cols


def pair_relevance(
    query_table: Tensor,
    key_table: Tensor,
    query_top_left: Tensor,
    key_top_left: Tensor,
    query_row_length: int,
    key_row_length: Tensor | int,
    query_norm: Tensor,
    key_norm: Tensor,
) -> Tensor:
    """Cosine similarity of given (query patch, key patch) pairs, from channels-last pixel tables.

    Args:
        query_table, key_table: ``[pixels, C]`` zero-padded pixel tables.
        query_top_left, key_top_left: ``[P]`` table index of each patch's top-left pixel.
        query_row_length, key_row_length: row length of the padded grid (per pair for keys of
            several references).
        query_norm, key_norm: ``[P]`` patch norms.
    Returns:
        ``[P]`` relevance ``<q, k> / (max(|q|, eps) * max(|k|, eps))``.
    """
    dot = torch.zeros(query_top_left.shape, dtype=query_table.dtype, device=query_table.device)
    for dy, dx in PATCH_OFFSETS:
        query_pixels = query_table.index_select(0, query_top_left + (dy * query_row_length + dx))
        key_pixels = key_table.index_select(0, key_top_left + (dy * key_row_length + dx))
        dot += (query_pixels * key_pixels).sum(1)
    return dot / (query_norm.clamp_min(NORM_EPS) * key_norm.clamp_min(NORM_EPS))


class RowRelevance:
    """Relevance of the patches of consecutive LR rows to every patch of one reference.

    Each :meth:`next_rows` call returns ``[rows * W, (Hr+2) * (Wr+2)]`` float32: entry ``[n, p]`` is
    ``<query patch n, key patch at p> / max(|key patch|, eps)`` (not divided by the query norm),
    where ``p = r * (Wr+2) + c`` for the key patch centred at ``(r, c)``; entries with ``r >= Hr`` or
    ``c >= Wr`` are ``-inf``. The returned tensor is a buffer reused by the next call.

    Args:
        query: ``[C, H, W]``; key: ``[C, Hr, Wr]`` (cast to ``dtype`` for the matmul).
        inverse_key_norm: ``[Hr, Wr]`` float32 ``1 / max(|key patch|, eps)``.
        dtype: matmul dtype (bfloat16 for screening, else the input dtype).
        rows_per_step: output rows per call.
        first_row: first output row.
    """

    def __init__(
        self,
        query: Tensor,
        key: Tensor,
        inverse_key_norm: Tensor,
        dtype: torch.dtype,
        rows_per_step: int,
        first_row: int = 0,
    ) -> None:
        channels, self.height, self.width = query.shape
        key_height, key_width = key.shape[-2:]
        self.rows_per_step = rows_per_step
        self.next_row = first_row
        self.key_row_length = key_width + 2
        self.key_size = (key_height + 2) * self.key_row_length
        accumulate = torch.float32 if dtype == torch.bfloat16 else dtype
        device = query.device
        # Padded query pixels, one padded row after another: [(H+2) * (W+2), C].
        self.query_table = padded_pixel_table(query.to(dtype))
        self.key_matrix = torch.nn.functional.pad(key.to(dtype), (1, 1, 1, 1)).reshape(channels, -1)
        scale = torch.zeros(key_height + 2, self.key_row_length, dtype=accumulate, device=device)
        scale[:key_height, :key_width] = inverse_key_norm
        mask = torch.full_like(scale, float("-inf"))
        mask[:key_height, :key_width] = 0
        self.scale, self.mask = scale.view(-1), mask.view(-1)

        rows, padded_width = rows_per_step, self.width + 2
        self.row_elements = self.width * self.key_size  # one output row of relevance
        self.correlation_row = padded_width * self.key_size
        # Per-pixel correlations of `rows` padded query rows (+2 so shifted views stay in bounds).
        self.correlation = torch.zeros(rows * self.correlation_row + 2, dtype=dtype, device=device)
        # Horizontal 3-sums of rows+2 padded query rows (+2 key rows so vertical shifts fit).
        slack = 2 * self.key_row_length
        self.horizontal = torch.zeros(
            rows + 2, self.row_elements + slack, dtype=accumulate, device=device
        )
        self.relevance = torch.empty(rows, self.row_elements, dtype=accumulate, device=device)
        self.filled = 0  # padded query rows held in `horizontal`, from padded row `next_row`

    def _horizontal_sums(self, first_padded_row: int, count: int, into: int) -> None:
        """Fill ``horizontal[into : into + count]`` for padded query rows from ``first_padded_row``."""
        padded_width = self.width + 2
        rows = self.query_table[first_padded_row * padded_width : (first_padded_row + count) * padded_width]
        correlation = self.correlation[: count * self.correlation_row].view(-1, self.key_size)
        torch.matmul(rows, self.key_matrix, out=correlation)
        target = self.horizontal[into : into + count, : self.row_elements]
        for dx in range(3):
            shifted = self.correlation.as_strided(
                (count, self.row_elements), (self.correlation_row, 1), dx * (self.key_size + 1)
            )
            if dx == 0:
                target.copy_(shifted)
            else:
                target.add_(shifted)

    def next_rows(self) -> Tensor:
        """Relevance of the next ``rows`` output rows (fewer at the bottom): ``[rows * W, M_pad]``."""
        first = self.next_row
        rows = min(self.rows_per_step, self.height - first)
        if rows <= 0:
            raise IndexError("no LR rows left")
        # Output rows first..first+rows-1 need padded query rows first..first+rows+1.
        if self.filled == 0:
            self._horizontal_sums(first, rows + 2, 0)
        else:  # the last two padded rows of the previous step are this step's first two
            self.horizontal[:2].copy_(self.horizontal[self.filled - 2 : self.filled].clone())
            self._horizontal_sums(first + 2, rows, 2)
        self.filled = rows + 2
        length, stride = self.row_elements, self.key_row_length
        relevance = self.relevance[:rows]
        torch.add(
            self.horizontal[:rows, :length],
            self.horizontal[1 : rows + 1, stride : stride + length],
            out=relevance,
        )
        relevance.add_(self.horizontal[2 : rows + 2, 2 * stride : 2 * stride + length])
        relevance = relevance.view(rows * self.width, self.key_size)
        torch.addcmul(self.mask, relevance, self.scale, out=relevance)
        self.next_row = first + rows
        return relevance

    def key_positions(self, padded_positions: Tensor, key_width: int) -> Tensor:
        """Padded flat positions ``p`` -> row-major key positions ``r * Wr + c``."""
        rows = torch.div(padded_positions, self.key_row_length, rounding_mode="floor")
        return rows * key_width + (padded_positions - rows * self.key_row_length)


@dataclass
class _Reference:
    """One reference of one batch element, as the search needs it."""

    features: Tensor  # [C, Hr, Wr]
    grid: PatchGrid
    norm: Tensor  # [Hr, Wr]
    position_offset: int  # of its first patch in the concatenated reference positions


def _rows_per_step(width: int, key_sizes: Sequence[int], step_elements: int, height: int) -> int:
    per_row = width * sum(key_sizes)
    return max(1, min(height, step_elements // max(per_row, 1)))


def _best_over_references(
    relevance_rows: Sequence[Tensor], references: Sequence[_Reference], correlators: Sequence
) -> tuple[Tensor, Tensor]:
    """Best (value, position) over several references' relevance rows; ties go to the first."""
    best_value: Tensor | None = None
    best_position: Tensor | None = None
    for rows, reference, correlator in zip(relevance_rows, references, correlators, strict=True):
        value, padded = rows.max(1)
        position = reference.position_offset + correlator.key_positions(
            padded, reference.grid.width
        )
        if best_value is None or best_position is None:
            best_value, best_position = value, position
        else:
            better = value > best_value
            best_value = torch.where(better, value, best_value)
            best_position = torch.where(better, position, best_position)
    assert best_value is not None and best_position is not None
    return best_value, best_position


class _ExactTables:
    """Float32 (or input-dtype) padded pixel tables of one batch element, for exact rescoring."""

    def __init__(self, query: Tensor, references: Sequence[_Reference]) -> None:
        self.query_grid = PatchGrid(query.size(1), query.size(2))
        self.query_table = padded_pixel_table(query)
        self.key_table = torch.cat([padded_pixel_table(r.features) for r in references])
        self.references = references
        starts = torch.tensor([r.position_offset for r in references], device=query.device)
        self.position_starts = starts
        self.key_norm = torch.cat([r.norm.reshape(-1) for r in references])

    def key_geometry(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Global reference positions -> (padded-table top-left index, padded row length)."""
        which = torch.searchsorted(self.position_starts, positions, right=True) - 1
        widths = torch.tensor([r.grid.width for r in self.references], device=positions.device)
        offsets = torch.tensor([r.grid.table_offset for r in self.references], device=positions.device)
        local = positions - self.position_starts[which]
        width = widths[which]
        rows = torch.div(local, width, rounding_mode="floor")
        top_left = offsets[which] + rows * (width + 2) + (local - rows * width)
        return top_left, width + 2

    def relevance(self, queries: Tensor, positions: Tensor, query_norm: Tensor) -> Tensor:
        """Exact relevance of query patches ``[P]`` (row-major) to reference positions ``[P]``."""
        out = torch.empty(queries.shape, dtype=self.query_table.dtype, device=queries.device)
        for start in range(0, queries.numel(), RESCORE_CHUNK):
            chunk = slice(start, start + RESCORE_CHUNK)
            key_top_left, key_row_length = self.key_geometry(positions[chunk])
            out[chunk] = pair_relevance(
                self.query_table,
                self.key_table,
                self.query_grid.top_left(queries[chunk]),
                key_top_left,
                self.query_grid.row_length,
                key_row_length,
                query_norm[queries[chunk]],
                self.key_norm[positions[chunk]],
            )
        return out


def _best_of_candidates(
    tables: _ExactTables, queries: Tensor, positions: Tensor, query_norm: Tensor, count: int
) -> tuple[Tensor, Tensor]:
    """Exact best position per query among candidate pairs (ties: smallest position).

    ``queries`` are indices ``0..count-1`` into the returned ``[count]`` (queries without a
    candidate get position -1).
    """
    values = tables.relevance(queries, positions, query_norm)
    best = torch.full((count,), float("-inf"), dtype=values.dtype, device=values.device)
    best.scatter_reduce_(0, queries, values, "amax")
    is_best = values == best[queries]
    chosen = torch.full((count,), torch.iinfo(torch.long).max, device=values.device)
    chosen.scatter_reduce_(0, queries[is_best], positions[is_best], "amin")
    return chosen, best


def _search_one(
    query: Tensor,
    references: list[_Reference],
    screening: bool,
    step_elements: int,
) -> Tensor:
    """Best reference position ``[H*W]`` for every query patch of one batch element."""
    channels, height, width = query.shape
    query_norm = patch_norms(query)  # [H, W]
    matmul_dtype = torch.bfloat16 if screening else query.dtype
    rows_per_step = _rows_per_step(
        width, [r.grid.table_size for r in references], step_elements, height
    )

    def correlators_from(first_row: int, dtype: torch.dtype, rows: int) -> list[RowRelevance]:
        return [
            RowRelevance(
                query,
                r.features,
                r.norm.clamp_min(NORM_EPS).reciprocal().to(torch.float32 if dtype == torch.bfloat16 else dtype),
                dtype,
                rows,
                first_row,
            )
            for r in references
        ]

    correlators = correlators_from(0, matmul_dtype, rows_per_step)
    index = torch.empty(height * width, dtype=torch.long, device=query.device)
    if not screening:
        for first in range(0, height, rows_per_step):
            rows = [c.next_rows() for c in correlators]
            _, position = _best_over_references(rows, references, correlators)
            index[first * width : first * width + position.numel()] = position
        return index

    tables = _ExactTables(query, references)
    flat_query_norm = query_norm.reshape(-1)
    error_bound = _screening_error_bound(query, references, query_norm)  # [H, W]
    for first in range(0, height, rows_per_step):
        rows = [c.next_rows() for c in correlators]
        queries_here = rows[0].size(0)
        span = slice(first * width, first * width + queries_here)
        best, position = _best_over_references(rows, references, correlators)
        threshold = best - 2.0 * error_bound.reshape(-1)[span]
        zero = flat_query_norm[span] == 0  # relevance 0 everywhere: the first position wins
        threshold = threshold.masked_fill(zero, float("inf"))
        masks = [r >= threshold[:, None] for r in rows]
        counts = torch.stack([m.sum(1) for m in masks]).sum(0)
        position = position.masked_fill(zero, 0)
        several = (counts > 1).nonzero().squeeze(1)
        if several.numel() > 0:
            total = int(counts[several].sum())
            if total > MAX_CANDIDATES_PER_QUERY * queries_here:
                exact = correlators_from(first, query.dtype, queries_here // width)
                _, position = _best_over_references(
                    [c.next_rows() for c in exact], references, exact
                )
            else:
                cand_queries, cand_positions = [], []
                for mask, reference, correlator in zip(masks, references, correlators, strict=True):
                    local_query, padded = mask.index_select(0, several).nonzero(as_tuple=True)
                    cand_queries.append(local_query)
                    cand_positions.append(
                        reference.position_offset
                        + correlator.key_positions(padded, reference.grid.width)
                    )
                local = torch.cat(cand_queries)
                chosen, _ = _best_of_candidates(
                    tables,
                    several[local] + span.start,
                    torch.cat(cand_positions),
                    flat_query_norm,
                    0,
                ) if False else _rescore(tables, several, span.start, torch.cat(cand_queries), torch.cat(cand_positions), flat_query_norm)
                position[several] = chosen
        index[span] = position
    return index
