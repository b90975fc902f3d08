"""bfloat16 screening for the exact search of :mod:`ttsr.model.patch_correlation`.

For float32 input on a CPU with fast bfloat16 matmul, the per-pixel products are computed in
bfloat16 (float32 accumulation, bfloat16 result), and :func:`screening_error_bound` bounds the
error of the screened relevance of every query. Every reference patch whose screened relevance is
within twice that bound of the best screened one is a candidate: the exact best is always among
them. Queries with several candidates have them rescored exactly in float32 (most have one);
LR rows with very many (flat, near-identical regions) are searched again exactly. So the result
never depends on the screening.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from ttsr.runtime import StepBuffers

if TYPE_CHECKING:
    from ttsr.model.patch_correlation import PatchTables, TiledSearch, WorkItem

#: Unit roundoff of bfloat16 (8 significant bits, round to nearest).
BFLOAT16_UNIT_ROUNDOFF = 2.0**-8
#: Unit roundoff of float32.
FLOAT32_UNIT_ROUNDOFF = 2.0**-24
#: Extra margin on the screening bound, for float32 rounding of norms, sums and comparisons.
SCREENING_SLACK = 1e-4
#: Rescoring a candidate (two gathers of 9 pixels) costs about as much as this many relevance
#: entries of an exact float32 search. An LR row whose queries with several candidates have more
#: than ``W * M / EXACT_ENTRIES_PER_CANDIDATE`` in all is searched again exactly instead
#: (flat, near-identical regions; or random features, where every cosine is alike).
EXACT_ENTRIES_PER_CANDIDATE = 400
#: Stored candidates per worker beyond which they are pruned to the current thresholds.
CANDIDATE_STORE_LIMIT = 1 << 22

Screening = Literal["auto", "bfloat16", "off"]


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


def _rounding_ratio(table: Tensor, rounded: Tensor, norm: Tensor, size: tuple[int, int]) -> Tensor:
    """``|x - x16| / |x|`` per 3x3 patch of a padded table and its bfloat16 rounding: ``[B, N]``."""
    squared = torch.empty(table.shape[:2], dtype=table.dtype, device=table.device)
    step = 1 << 12  # a slice at a time: no full-size temporary
    buffers = StepBuffers()
    for start in range(0, table.size(1), step):
        rows = slice(start, start + step)
        part = table[:, rows]
        residual = buffers.get("residual", part.shape, part, part.dtype)
        torch.sub(part, rounded[:, rows], out=residual)
        torch.linalg.vector_norm(residual, dim=-1, out=squared[:, rows]).square_()
    squared = squared.view(-1, size[0] + 2, size[1] + 2)
    rows_sum = squared[:, :-2] + squared[:, 1:-1] + squared[:, 2:]
    residual_norm = (rows_sum[..., :-2] + rows_sum[..., 1:-1] + rows_sum[..., 2:]).sqrt()
    return torch.where(norm > 0, residual_norm / norm, 0.0).reshape(table.size(0), -1)


def screening_error_bound(
    tables: PatchTables, rounded_query: Tensor, rounded_keys: Sequence[Tensor]
) -> Tensor:
    """Bound on |screened - exact| relevance, times the query patch norm: ``[B, N]``.

    With ``x = x16 + x_lo`` the bfloat16 rounding of the pixels, per patch
    ``|<q, k> - <q16, k16>| <= (rho_q + rho_k + 3 rho_q rho_k) |q| |k|`` with ``rho = |x_lo| / |x|``
    (Cauchy-Schwarz on the 9C-vectors); rounding each per-pixel product sum (accumulated in
    float32) to bfloat16 adds at most ``(u + gamma_C) (1 + rho_q) (1 + rho_k) |q| |k|``. Screened
    values are divided by ``max(|k|, eps) >= |k|``, so the bound is ``|q|`` times that factor,
    with ``rho_k`` the largest over the batch element's reference patches.

    Args:
        tables: the float32 pixel tables; rounded_query, rounded_keys: their bfloat16 roundings.
    """
    channels = tables.query_table.size(2)
    query_size = (tables.height, tables.width)
    query_norm = tables.query_norm.view(-1, *query_size)
    rho_query = _rounding_ratio(tables.query_table, rounded_query, query_norm, query_size)
    rho_key = torch.stack(
        [
            _rounding_ratio(table, rounded, norm, size).amax(1)
            for table, rounded, norm, size in zip(
                tables.key_tables, rounded_keys, tables.key_norms, tables.key_sizes, strict=True
            )
        ]
    ).amax(0)[:, None]
    rounding = BFLOAT16_UNIT_ROUNDOFF + (channels + 16) * FLOAT32_UNIT_ROUNDOFF
    factor = (
        rho_query
        + rho_key
        + 3 * rho_query * rho_key
        + rounding * (1 + rho_query) * (1 + rho_key)
        + SCREENING_SLACK
    )
    return tables.query_norm * factor


class _ScreenedState:
    """A worker's running best screened value per query ``[B, N]``, and candidates near it.

    ``crowded_rows`` ``[B * H]``: LR rows given up for rescoring (searched again exactly).
    """

    def __init__(self, like: Tensor, width: int, row_limit: int, buffers: StepBuffers) -> None:
        self.best = torch.full(like.shape, float("-inf"), device=like.device)
        self.width, self.row_limit = width, row_limit
        self.parts: list[tuple[Tensor, Tensor, Tensor]] = []
        self.size = 0
        self.crowded_rows = torch.zeros(like.numel() // width, dtype=torch.bool, device=like.device)
        self.buffers = buffers

    def add(self, ids: Tensor, positions: Tensor, values: Tensor) -> None:
        self.parts.append((ids, positions, values))
        self.size += ids.numel()

    def candidates(self, threshold: Tensor) -> tuple[Tensor, Tensor]:
        """Stored (id, position) whose value reaches ``threshold[id]``, outside crowded rows."""
        if not self.parts:
            empty = threshold.new_empty(0, dtype=torch.long)
            return empty, empty
        ids, positions, values = (torch.cat(column) for column in zip(*self.parts, strict=True))
        keep = (values >= threshold.view(-1)[ids]) & ~self.crowded_rows[ids // self.width]
        self.parts = [(ids[keep], positions[keep], values[keep])]
        self.size = self.parts[0][0].numel()
        return self.parts[0][0], self.parts[0][1]

    def prune(self, margin: Tensor) -> None:
        """Over the store limit, drop candidates below the current thresholds, and give up the
        rows that still have too many."""
        if self.size <= CANDIDATE_STORE_LIMIT:
            return
        ids, _ = self.candidates(self.best - margin)
        per_row = torch.bincount(ids // self.width, minlength=self.crowded_rows.numel())
        self.crowded_rows |= per_row > self.row_limit
        self.candidates(self.best - margin)


def screened_search(search: TiledSearch) -> Tensor:
    """Best positions ``[B * N]`` of ``search`` by bfloat16 screening and exact float32
    rescoring; equal to ``search.exact()``."""
    search.prepare(torch.bfloat16)
    assert search.matmul_tables is not None
    margin = 2.0 * screening_error_bound(search.tables, *search.matmul_tables[:2])
    # A zero query patch has relevance 0 everywhere and no candidate: the first position
    # wins, as in the straightforward search.
    margin = margin.masked_fill(search.tables.query_norm == 0, float("-inf"))
    width = search.width
    total_positions = sum(h * w for h, w in search.key_sizes)
    row_limit = max(1, width * total_positions // EXACT_ENTRIES_PER_CANDIDATE)

    def process(item: WorkItem, state: _ScreenedState) -> None:
        for block in search.blocks(item, state.buffers):
            best = block.span(state.best)
            torch.maximum(best, block.best, out=best)
            state.add(*block.at_least(best - block.span(margin), state.buffers))
        state.prune(margin)

    states = search.runtime.map(
        search.items((0, search.height)),
        process,
        lambda: _ScreenedState(
            search.tables.query_norm, width, row_limit, search.runtime.step_buffers()
        ),
    )
    threshold = torch.stack([s.best for s in states]).amax(0) - margin
    crowded_rows = torch.stack([s.crowded_rows for s in states]).any(0)
    for state in states:
        state.crowded_rows = crowded_rows
        state.buffers = StepBuffers()
    found = [s.candidates(threshold) for s in states]
    ids, positions = (torch.cat(column) for column in zip(*found, strict=True))
    counts = torch.bincount(ids, minlength=search.queries)[ids]
    index = torch.zeros(search.queries, dtype=torch.long, device=search.device)
    index[ids[counts == 1]] = positions[counts == 1]
    several = counts > 1
    rescored = torch.bincount(ids[several] // width, minlength=crowded_rows.numel())
    crowded_rows |= rescored > row_limit
    several &= ~crowded_rows[ids // width]
    if bool(several.any()):
        index = rescore(search, ids[several], positions[several], index)
    if bool(crowded_rows.any()):
        search_again(search, crowded_rows.view(search.batch, search.height).any(0), index)
    return index


def rescore(search: TiledSearch, ids: Tensor, positions: Tensor, index: Tensor) -> Tensor:
    """Exact best among each query's candidates ``(ids, positions)``, into ``index`` where a
    query has some; ties go to the smallest position."""
    count = search.height * search.width
    batch_index = torch.div(ids, count, rounding_mode="floor")
    # Sorted by reference position, the reference rows are gathered nearly in order.
    order = torch.argsort(positions + batch_index * search.tables.key_norm.size(1))
    ids, positions, batch_index = ids[order], positions[order], batch_index[order]
    values = search.tables.relevance_on_workers(
        batch_index, ids - batch_index * count, positions, search.runtime
    )
    best = torch.full(index.shape, float("-inf"), dtype=values.dtype, device=values.device)
    best.scatter_reduce_(0, ids, values, "amax")
    is_best = values == best[ids]
    chosen = torch.full_like(index, torch.iinfo(torch.long).max)
    chosen.scatter_reduce_(0, ids[is_best], positions[is_best], "amin")
    return torch.where(chosen == torch.iinfo(torch.long).max, index, chosen)


def search_again(search: TiledSearch, rows: Tensor, index: Tensor) -> None:
    """Exact search of LR rows ``rows`` ``[H]`` (bool), for every batch element, into ``index``."""
    runs: list[list[int]] = []
    for row in rows.nonzero().squeeze(1).tolist():
        if runs and row - runs[-1][1] <= 2:  # close runs are searched as one
            runs[-1][1] = row + 1
        else:
            runs.append([row, row + 1])
    found = index.view(search.batch, search.height * search.width)
    for start, stop in runs:
        exact = search.exact((start, stop)).view(search.batch, -1)
        span = slice(start * search.width, stop * search.width)
        found[:, span] = exact[:, span]
