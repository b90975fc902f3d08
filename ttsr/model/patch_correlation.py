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
#: Relevance entries (``rows x W x M_pad``) computed per step (at least one LR row). The working
#: memory is about 20 bytes per entry; a few LR rows per step keep the matmul efficient.
DEFAULT_STEP_ELEMENTS = 1 << 23
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
    """Zero-pad by one pixel, channels last: ``[..., C, H, W]`` -> ``[... * (H+2) * (W+2), C]``."""
    padded = torch.nn.functional.pad(features, (1, 1, 1, 1))
    return padded.movedim(-3, -1).reshape(-1, features.size(-3))


class PatchTables:
    """Zero-padded, channels-last pixel tables of a batch of queries and references.

    Gives the table index of the top-left pixel of any query or reference patch, so that patch
    dot products are 9 row gathers (:func:`pair_dot`), without unfolding anything.

    Args:
        query: ``[B, C, H, W]``; keys: references, each ``[B, C, Hr_i, Wr_i]``.
    """

    def __init__(self, query: Tensor, keys: Sequence[Tensor]) -> None:
        batch, channels, self.height, self.width = query.shape
        device = query.device
        self.query_table = padded_pixel_table(query)  # [B * (H+2) * (W+2), C]
        self.query_pixels = (self.height + 2) * (self.width + 2)
        self.key_shapes = [tuple(k.shape[-2:]) for k in keys]
        tables = [padded_pixel_table(k) for k in keys]  # each [B * padded_i, C]
        padded = [(h + 2) * (w + 2) for h, w in self.key_shapes]
        self.key_pixels = sum(padded)
        # Batch-major: batch element b's references follow each other.
        self.key_table = torch.cat([t.view(batch, -1, channels) for t in tables], dim=1).reshape(
            -1, channels
        )
        self.query_norm = patch_norms(query).reshape(batch, -1)
        self.key_norm = torch.cat([patch_norms(k).reshape(batch, -1) for k in keys], 1)
        starts, table_offsets, position = [], [], 0
        offset = 0
        for (h, w), size in zip(self.key_shapes, padded, strict=True):
            starts.append(position)
            table_offsets.append(offset)
            position += h * w
            offset += size
        self.position_starts = torch.tensor(starts, device=device)
        self.table_offsets = torch.tensor(table_offsets, device=device)
        self.key_widths = torch.tensor([w for _, w in self.key_shapes], device=device)

    def query_top_left(self, batch_index: Tensor, queries: Tensor) -> Tensor:
        """Table index of the top-left pixel of query patches (row-major positions)."""
        rows = torch.div(queries, self.width, rounding_mode="floor")
        columns = queries - rows * self.width
        return batch_index * self.query_pixels + rows * (self.width + 2) + columns

    def key_top_left(self, batch_index: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Table index of the top-left pixel of reference patches, and their padded row length."""
        which = torch.searchsorted(self.position_starts, positions, right=True) - 1
        local = positions - self.position_starts[which]
        width = self.key_widths[which]
        rows = torch.div(local, width, rounding_mode="floor")
        columns = local - rows * width
        base = batch_index * self.key_pixels + self.table_offsets[which]
        return base + rows * (width + 2) + columns, width + 2


def pair_dot(
    query_table: Tensor,
    key_table: Tensor,
    query_top_left: Tensor,
    key_top_left: Tensor,
    query_row_length: int,
    key_row_length: Tensor,
) -> Tensor:
    """Dot products of 3x3 patch pairs ``[P]`` as 9 gathers of pixel rows of channels-last tables."""
    dot = query_table.new_zeros(query_top_left.shape)
    for dy, dx in PATCH_OFFSETS:
        query_pixels = query_table.index_select(0, query_top_left + (dy * query_row_length + dx))
        key_pixels = key_table.index_select(0, key_top_left + (dy * key_row_length + dx))
        dot += (query_pixels * key_pixels).sum(1)
    return dot


def pair_relevance(
    tables: PatchTables, batch_index: Tensor, queries: Tensor, positions: Tensor
) -> Tensor:
    """Relevance ``<q, k> / (max(|q|, eps) max(|k|, eps))`` of patch pairs, in chunks: ``[P]``."""
    out = tables.query_table.new_empty(queries.shape)
    for start in range(0, queries.numel(), RESCORE_CHUNK):
        chunk = slice(start, start + RESCORE_CHUNK)
        b, n, m = batch_index[chunk], queries[chunk], positions[chunk]
        key_top_left, key_row_length = tables.key_top_left(b, m)
        dot = pair_dot(
            tables.query_table,
            tables.key_table,
            tables.query_top_left(b, n),
            key_top_left,
            tables.width + 2,
            key_row_length,
        )
        norms = tables.query_norm[b, n].clamp_min(NORM_EPS) * tables.key_norm[b, m].clamp_min(
            NORM_EPS
        )
        out[chunk] = dot / norms
    return out


class RowRelevance:
    """Relevance of the patches of consecutive LR rows to every patch of one reference.

    Each :meth:`next_rows` call returns ``[rows * W, (Hr+2) * (Wr+2)]``: entry ``[n, p]`` is
    ``<query patch n, key patch p> / max(|key patch p|, eps)`` (not divided by the query norm),
    for the key patch centred at ``(r, c)`` with ``p = r * (Wr+2) + c``; entries with
    ``r >= Hr`` or ``c >= Wr`` are ``-inf``. The returned tensor is reused by the next call.

    The horizontal 3-sums of each padded query row (``W x M_pad``) live in a ring of
    ``rows + 2`` slots: each serves three output rows and is computed once.

    Args:
        query: ``[C, H, W]``; key: ``[C, Hr, Wr]`` (cast to ``dtype`` for the matmul).
        inverse_key_norm: ``[Hr, Wr]``, ``1 / max(|key patch|, eps)``.
        dtype: matmul dtype (bfloat16 for screening, else the input dtype). Sums are float32
            for bfloat16, else in ``dtype``.
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
        self.next_padded_row = first_row  # first padded query row not yet in the ring
        self.key_width = key_width
        self.key_row_length = key_width + 2
        self.key_size = (key_height + 2) * self.key_row_length
        accumulate = torch.float32 if dtype == torch.bfloat16 else dtype
        device = query.device
        self.query_table = padded_pixel_table(query.to(dtype))  # [(H+2) * (W+2), C]
        self.key_matrix = torch.nn.functional.pad(key.to(dtype), (1, 1, 1, 1)).reshape(channels, -1)
        scale = torch.zeros(key_height + 2, self.key_row_length, dtype=accumulate, device=device)
        scale[:key_height, :key_width] = inverse_key_norm
        mask = torch.full_like(scale, float("-inf"))
        mask[:key_height, :key_width] = 0
        self.scale, self.mask = scale.view(-1), mask.view(-1)

        self.row_elements = self.width * self.key_size  # relevance of one output row
        self.correlation_row = (self.width + 2) * self.key_size  # one padded query row
        most = (rows_per_step + 2) * self.correlation_row
        # Per-pixel correlations of up to rows+2 padded query rows (+2 so shifted views fit),
        # in the matmul dtype and in the accumulation dtype.
        # Only the slack that shifted views read past the written part is zeroed: what they
        # read there meets invalid key positions only, but it has to be finite.
        self.correlation = torch.empty(most + 2, dtype=dtype, device=device)
        self.correlation[most:] = 0
        self.correlation_sums = None
        if dtype != accumulate:
            self.correlation_sums = torch.empty(most + 2, dtype=accumulate, device=device)
            self.correlation_sums[most:] = 0
        # Ring of horizontal sums; +2 key rows of zeros so vertically shifted views fit.
        self.horizontal = torch.empty(
            rows_per_step + 2,
            self.row_elements + 2 * self.key_row_length,
            dtype=accumulate,
            device=device,
        )
        self.horizontal[:, self.row_elements :] = 0
        self.relevance = torch.empty(
            rows_per_step, self.row_elements, dtype=accumulate, device=device
        )

    def _fill_ring(self, first_padded_row: int, count: int) -> None:
        """Horizontal 3-sums of padded query rows ``first_padded_row ..`` into their ring slots."""
        padded_width, length = self.width + 2, self.row_elements
        pixels = self.query_table[
            first_padded_row * padded_width : (first_padded_row + count) * padded_width
        ]
        used = count * self.correlation_row
        correlation = self.correlation
        torch.matmul(pixels, self.key_matrix, out=correlation[:used].view(-1, self.key_size))
        if self.correlation_sums is not None:
            self.correlation_sums[:used].copy_(correlation[:used])
            correlation = self.correlation_sums
        for i in range(count):
            start = i * self.correlation_row
            target = self.horizontal[(first_padded_row + i) % len(self.horizontal), :length]
            # Query pixel x + dx meets key pixel p + dx: shifts of (W+2) * M_pad + 1 per dx.
            shift = self.key_size + 1
            torch.add(
                correlation[start : start + length],
                correlation[start + shift : start + shift + length],
                out=target,
            )
            target.add_(correlation[start + 2 * shift : start + 2 * shift + length])

    def next_rows(self) -> Tensor:
        """Relevance of the next ``rows`` output rows (fewer at the bottom): ``[rows * W, M_pad]``."""
        first = self.next_row
        rows = min(self.rows_per_step, self.height - first)
        if rows <= 0:
            raise IndexError("no LR rows left")
        # Output rows first .. first+rows-1 use padded query rows first .. first+rows+1.
        start = max(self.next_padded_row, first)
        self._fill_ring(start, first + rows + 2 - start)
        self.next_padded_row = first + rows + 2
        slots, length, stride = len(self.horizontal), self.row_elements, self.key_row_length
        for j in range(rows):
            out = self.relevance[j]
            top, middle, bottom = (self.horizontal[(first + j + dy) % slots] for dy in range(3))
            torch.add(top[:length], middle[stride : stride + length], out=out)
            out.add_(bottom[2 * stride : 2 * stride + length])
        relevance = self.relevance[:rows].view(rows * self.width, self.key_size)
        torch.addcmul(self.mask, relevance, self.scale, out=relevance)
        self.next_row = first + rows
        return relevance

    def candidates(self, relevance: Tensor, threshold: Tensor) -> tuple[Tensor, Tensor]:
        """All ``(query, key position)`` with ``relevance >= threshold[query]``, sorted.

        Looks only inside the key rows whose maximum reaches the threshold. ``relevance`` from
        :meth:`next_rows`, ``threshold`` ``[rows * W]``; key positions are row-major ``r * Wr + c``.
        """
        key_rows = relevance.view(relevance.size(0), -1, self.key_row_length)
        row_max = key_rows.amax(2)  # [queries, Hr + 2]
        query, key_row = (row_max >= threshold[:, None]).nonzero(as_tuple=True)
        picked = key_rows.view(-1, self.key_row_length)[query * key_rows.size(1) + key_row]
        which, column = (picked >= threshold[query, None]).nonzero(as_tuple=True)
        return query[which], key_row[which] * self.key_width + column

    def best(self, relevance: Tensor) -> Tensor:
        """Highest relevance of each query: ``[rows * W]``."""
        key_rows = relevance.view(relevance.size(0), -1, self.key_row_length)
        return key_rows.amax(2).amax(1)


@dataclass(frozen=True)
class _Reference:
    """One reference of one batch element: features ``[C, Hr, Wr]``, patch norms ``[Hr, Wr]``."""

    features: Tensor
    norm: Tensor
    position_offset: int  # of its first patch among the concatenated reference positions


def _references(keys: Sequence[Tensor]) -> list[_Reference]:
    references, positions = [], 0
    for key in keys:
        references.append(_Reference(key, patch_norms(key), positions))
        positions += key.size(1) * key.size(2)
    return references


def screening_error_bound(
    query: Tensor, references: Sequence[_Reference], query_norm: Tensor
) -> Tensor:
    """Bound on |screened - exact| relevance (times the query patch norm): ``[H, W]``.

    With ``x = x16 + x_lo`` the bfloat16 rounding of the pixels, per patch
    ``|<q, k> - <q16, k16>| <= (rho_q + rho_k + 3 rho_q rho_k) |q| |k|`` with ``rho = |x_lo| / |x|``
    (Cauchy-Schwarz on the 9C-vectors); rounding each per-pixel product sum (accumulated in
    float32) to bfloat16 adds at most ``(u + gamma_C) (1 + rho_q) (1 + rho_k) |q| |k|``. Screened
    scores are divided by ``max(|k|, eps) >= |k|``, so the bound is ``|q|`` times that factor.
    """
    query_residual = patch_norms(query - query.to(torch.bfloat16).to(query.dtype))
    rho_query = torch.where(query_norm > 0, query_residual / query_norm, 0.0)
    rho_key = query.new_zeros(())
    for reference in references:
        key = reference.features
        residual = patch_norms(key - key.to(torch.bfloat16).to(key.dtype))
        ratio = torch.where(reference.norm > 0, residual / reference.norm, 0.0)
        rho_key = torch.maximum(rho_key, ratio.max())
    channels = query.size(0)
    rounding = BFLOAT16_UNIT_ROUNDOFF + (channels + 16) * FLOAT32_UNIT_ROUNDOFF
    factor = (
        rho_query
        + rho_key
        + 3 * rho_query * rho_key
        + rounding * (1 + rho_query) * (1 + rho_key)
        + SCREENING_SLACK
    )
    return query_norm * factor


class _OneBatchSearch:
    """The search for one batch element: step through LR rows, keep every query's best."""

    def __init__(self, query: Tensor, keys: Sequence[Tensor], step_elements: int) -> None:
        self.query = query  # [C, H, W]
        self.keys = keys
        self.references = _references(keys)
        self.height, self.width = query.shape[1:]
        per_row = self.width * sum((k.size(1) + 2) * (k.size(2) + 2) for k in keys)
        self.rows_per_step = max(1, min(self.height, step_elements // per_row))
        self.query_norm = patch_norms(query).reshape(-1)
        self.tables: PatchTables | None = None

    def correlators(self, dtype: torch.dtype, first_row: int = 0) -> list[RowRelevance]:
        scale_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
        return [
            RowRelevance(
                self.query,
                r.features,
                r.norm.clamp_min(NORM_EPS).reciprocal().to(scale_dtype),
                dtype,
                self.rows_per_step,
                first_row,
            )
            for r in self.references
        ]

    def step_candidates(
        self, correlators: Sequence[RowRelevance], margin: Tensor | None, span: slice
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Next rows: per query its best relevance, and every (query, position) within ``margin``.

        Zero query patches (relevance 0 everywhere; the first position wins, as in the
        straightforward search) get no candidate. Returns ``(queries, positions, counts)``, query
        indices local to the step.
        """
        relevance = [c.next_rows() for c in correlators]
        best = torch.stack([c.best(r) for c, r in zip(correlators, relevance, strict=True)])
        threshold = best.amax(0)
        if margin is not None:
            threshold = threshold - margin[span]
        threshold = threshold.masked_fill(self.query_norm[span] == 0, float("inf"))
        queries, positions = [], []
        for correlator, rows, reference in zip(
            correlators, relevance, self.references, strict=True
        ):
            local, position = correlator.candidates(rows, threshold)
            queries.append(local)
            positions.append(position + reference.position_offset)
        query, position = torch.cat(queries), torch.cat(positions)
        counts = torch.bincount(query, minlength=threshold.numel())
        return query, position, counts

    def exact_rows(self, first_row: int, rows: int) -> Tensor:
        """Best positions of ``rows`` LR rows from ``first_row``, in the input dtype: ``[rows * W]``."""
        correlators = self.correlators(self.query.dtype, first_row)
        found = []
        for step_first in range(first_row, first_row + rows, self.rows_per_step):
            count = min(self.rows_per_step, first_row + rows - step_first) * self.width
            span = slice(step_first * self.width, step_first * self.width + count)
            query, position, _ = self.step_candidates(correlators, None, span)
            # Every candidate ties with the best: the smallest position wins.
            best = torch.zeros(count, dtype=torch.long, device=position.device)
            best.fill_(torch.iinfo(torch.long).max)
            best.scatter_reduce_(0, query, position, "amin")
            found.append(best.masked_fill_(best == torch.iinfo(torch.long).max, 0))
        return torch.cat(found)

    def screened(self) -> Tensor:
        """Best positions ``[H * W]``: bfloat16 screening, exact float32 rescoring of candidates."""
        margin = 2.0 * screening_error_bound(
            self.query, self.references, self.query_norm.view(self.height, self.width)
        )
        margin = margin.reshape(-1)
        correlators = self.correlators(torch.bfloat16)
        index = torch.zeros(self.height * self.width, dtype=torch.long, device=self.query.device)
        for first_row in range(0, self.height, self.rows_per_step):
            rows = min(self.rows_per_step, self.height - first_row)
            span = slice(first_row * self.width, (first_row + rows) * self.width)
            query, position, counts = self.step_candidates(correlators, margin, span)
            found = index[span]
            single = counts[query] == 1
            found[query[single]] = position[single]
            several = ~single
            if not bool(several.any()):
                continue
            if int(several.sum()) > MAX_CANDIDATES_PER_QUERY * found.numel():
                found.copy_(self.exact_rows(first_row, rows))
                continue
            found.copy_(self.rescore(query[several], position[several], span.start, found))
        return index

    def rescore(self, query: Tensor, position: Tensor, first_query: int, found: Tensor) -> Tensor:
        """Exact best among candidate pairs for the queries that have them (ties: smallest)."""
        if self.tables is None:
            self.tables = PatchTables(self.query[None], [k[None] for k in self.keys])
        batch_index = torch.zeros_like(query)
        values = pair_relevance(self.tables, batch_index, query + first_query, position)
        best = torch.full(found.shape, float("-inf"), dtype=values.dtype, device=values.device)
        best.scatter_reduce_(0, query, values, "amax")
        is_best = values == best[query]
        chosen = torch.full_like(found, torch.iinfo(torch.long).max)
        chosen.scatter_reduce_(0, query[is_best], position[is_best], "amin")
        return torch.where(chosen == torch.iinfo(torch.long).max, found, chosen)


def resolve_screening(screening: Screening, query: Tensor) -> bool:
    """Whether to screen in bfloat16: ``"auto"`` does for float32 where it is fast and exact."""
    if screening not in ("auto", "bfloat16", "off"):
        raise ValueError(f"screening must be 'auto', 'bfloat16' or 'off', not {screening!r}")
    if screening == "off" or query.dtype != torch.float32:
        return False
    return screening == "bfloat16" or bfloat16_screening_available(query.device)


@torch.no_grad()
def search_best_positions(
    query_lv3: Tensor,
    keys_lv3: Sequence[Tensor],
    screening: Screening = "auto",
    step_elements: int = DEFAULT_STEP_ELEMENTS,
) -> Tensor:
    """Best reference position of every 3x3 query patch (the hard attention), in bounded memory.

    Args:
        query_lv3: relu3_1 of the upsampled LR, ``[B, C, H, W]``.
        keys_lv3: relu3_1 of the down-up-sampled references, each ``[B, C, Hr_i, Wr_i]``.
        screening: ``"auto"`` (bfloat16 screening for float32 input on a CPU with fast bfloat16),
            ``"bfloat16"`` (force it for float32 input) or ``"off"`` (input dtype throughout).
        step_elements: relevance entries per step (LR rows x W x padded reference pixels); the
            working memory is about 20 bytes per entry (at least one LR row).
    Returns:
        ``[B, H*W]`` int64 indices into the concatenated reference positions.
    """
    batch, _, height, width = query_lv3.shape
    screen = resolve_screening(screening, query_lv3)
    index = torch.empty(batch, height * width, dtype=torch.long, device=query_lv3.device)
    for b in range(batch):
        search = _OneBatchSearch(query_lv3[b], [k[b] for k in keys_lv3], step_elements)
        index[b] = search.screened() if screen else search.exact_rows(0, height)
    return index
