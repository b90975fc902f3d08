"""FastSearchTransfer against the straightforward SearchTransfer, its definition.

Same hard attention on inputs without ties, soft attention and textures within 1e-5 (float32),
same gradients for all five inputs; custom autograd Functions pass gradcheck; the tiling, the
screening and its fallbacks never change the result.
"""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F

import ttsr.model.patch_correlation as patch_correlation
import ttsr.model.screening as screening_module
from ttsr import TTSR, TTSRConfig
from ttsr.model.fast_search_transfer import (
    BestPatchRelevance,
    FastSearchTransfer,
    TextureGather,
    fast_transfer,
    level_table,
    transfer_plan,
)
from ttsr.model.patch_correlation import (
    PatchTables,
    padded_pixel_table,
    patch_norms,
    relevance_steps,
    search_best_positions,
)
from ttsr.model.screening import screening_error_bound
from ttsr.model.search_transfer import SearchTransfer, search, transfer
from ttsr.runtime import PLAIN, CPURuntime, ScratchArena, StepBuffers

TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def features(generator, batch, channels, lr_grid, ref_grids, dtype=torch.float32):
    """(lrsr_lv3, refsr_lv3 list, ref_lv1 list, ref_lv2 list, ref_lv3 list), random in [0, 1)."""

    def rand(*shape):
        return torch.rand(*shape, generator=generator, dtype=dtype)

    return (
        rand(batch, channels, *lr_grid),
        [rand(batch, channels, h, w) for h, w in ref_grids],
        [rand(batch, 3, 4 * h, 4 * w) for h, w in ref_grids],
        [rand(batch, 4, 2 * h, 2 * w) for h, w in ref_grids],
        [rand(batch, channels, h, w) for h, w in ref_grids],
    )


CASES = {
    "one reference": (1, (5, 7), [(6, 4)]),
    "batch of three": (3, (6, 5), [(5, 6)]),
    "larger reference": (2, (4, 6), [(9, 11)]),
    "several references": (2, (7, 5), [(4, 6), (3, 3), (6, 5)]),
    "single row": (2, (1, 6), [(1, 4), (2, 2)]),
}


@pytest.mark.parametrize("screening", ["off", "bfloat16"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_search_finds_the_same_positions(case, screening, generator):
    batch, lr_grid, ref_grids = case
    query, keys, *_ = features(generator, batch, 16, lr_grid, ref_grids)
    expected = search(query, keys).index
    assert torch.equal(search_best_positions(query, keys, screening), expected)


@pytest.mark.parametrize("tiling", [(1, 1), (1, 2), (2, 3), (3, 1), (100, 100)])
@pytest.mark.parametrize("screening", ["off", "bfloat16"])
def test_tiling_does_not_change_the_result(tiling, screening, generator):
    query, keys, *_ = features(generator, 2, 8, (7, 6), [(5, 8), (4, 3)])
    expected = search(query, keys).index
    found = search_best_positions(query, keys, screening, *tiling)
    assert torch.equal(found, expected)


@pytest.mark.parametrize("divisor", ["overlap", "constant"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_fast_matches_straightforward_with_gradients(case, divisor, generator):
    batch, lr_grid, ref_grids = case
    query, keys, lv1, lv2, lv3 = features(generator, batch, 16, lr_grid, ref_grids)
    leaves = [query, *keys, *lv1, *lv2, *lv3]
    weights = [torch.rand(batch, 1, *lr_grid, generator=generator)]
    results, gradients = [], []
    for module in (SearchTransfer(divisor), FastSearchTransfer(divisor)):
        inputs = [x.detach().requires_grad_() for x in leaves]
        n = len(keys)
        split = (inputs[0], inputs[1 : 1 + n], inputs[1 + n : 1 + 2 * n])
        split += (inputs[1 + 2 * n : 1 + 3 * n], inputs[1 + 3 * n :])
        result = module.search_and_transfer(*split)
        loss = (result.soft_attention * weights[0]).sum() + result.t_lv3.square().sum()
        loss = loss + result.t_lv2.sin().sum() + (result.t_lv1 * 0.5).sum()
        results.append(result)
        gradients.append(torch.autograd.grad(loss, inputs))
    expected, found = results
    assert torch.equal(found.index, expected.index)
    for name in ("soft_attention", "t_lv3", "t_lv2", "t_lv1"):
        torch.testing.assert_close(getattr(found, name), getattr(expected, name), **TOLERANCE)
    for fast_grad, grad in zip(*reversed(gradients), strict=True):
        torch.testing.assert_close(fast_grad, grad, **TOLERANCE)


def test_forward_returns_what_search_and_transfer_does(generator):
    query, keys, lv1, lv2, lv3 = features(generator, 1, 8, (4, 5), [(5, 5)])
    module = FastSearchTransfer()
    result = module.search_and_transfer(query, keys[0], lv1[0], lv2[0], lv3[0])
    outputs = module(query, keys[0], lv1[0], lv2[0], lv3[0])
    for output, name in zip(outputs, ("soft_attention", "t_lv3", "t_lv2", "t_lv1"), strict=True):
        assert torch.equal(output, getattr(result, name))
    assert outputs[3].shape == (1, 3, 16, 20)


def test_float64_exact_search_and_textures(generator):
    query, keys, lv1, lv2, lv3 = features(generator, 2, 6, (5, 4), [(4, 7)], torch.float64)
    expected = SearchTransfer().search_and_transfer(query, keys, lv1, lv2, lv3)
    found = FastSearchTransfer().search_and_transfer(query, keys, lv1, lv2, lv3)
    assert torch.equal(found.index, expected.index)
    torch.testing.assert_close(found.soft_attention, expected.soft_attention)
    torch.testing.assert_close(found.t_lv1, expected.t_lv1)


def test_zero_query_patches_take_the_first_position(generator):
    query, keys, *_ = features(generator, 1, 8, (6, 6), [(5, 5)])
    query[..., :3, :3] = 0  # the patch centred at (0, 0) is all zeros
    expected = search(query, keys).index
    for screening in ("off", "bfloat16"):
        found = search_best_positions(query, keys, screening)
        assert found[0, 0] == 0
        assert torch.equal(found, expected)


def test_crowded_rows_are_searched_again_exactly(generator, monkeypatch):
    # Every row with two candidate pairs in all counts as crowded; a tiny store limit also
    # makes the workers prune and give up rows on the way.
    monkeypatch.setattr(screening_module, "EXACT_ENTRIES_PER_CANDIDATE", 10**9)
    monkeypatch.setattr(screening_module, "CANDIDATE_STORE_LIMIT", 8)
    searched_again = []
    original = screening_module.search_again

    def spy(search, rows, index):
        searched_again.append(rows.clone())
        original(search, rows, index)

    monkeypatch.setattr(screening_module, "search_again", spy)
    query, keys, *_ = features(generator, 2, 32, (6, 7), [(6, 6)])
    expected = search(query, keys).index
    assert torch.equal(search_best_positions(query, keys, "bfloat16", 1, 2), expected)
    assert searched_again and bool(searched_again[0].any())


def test_screened_relevance_stays_within_the_bound(generator):
    query, keys, *_ = features(generator, 1, 64, (6, 5), [(7, 6)])
    tables = PatchTables.of(query, keys)
    rounded = padded_pixel_table(query).bfloat16(), [padded_pixel_table(keys[0]).bfloat16()]
    bound = screening_error_bound(tables, *rounded)[0].view(6, 5)
    inverse = patch_norms(keys[0]).clamp_min(1e-12).reciprocal()
    steps = relevance_steps(
        padded_pixel_table(query).bfloat16(),
        (6, 5),
        padded_pixel_table(keys[0]).bfloat16(),
        (7, 6),
        inverse,
        6,
        (0, 7),
        (0, 6),
        StepBuffers(),
    )
    (_, screened), *_ = list(steps)
    exact_unfolded = F.unfold(query, 3, padding=1)[0].T @ F.unfold(keys[0], 3, padding=1)[0]
    exact = exact_unfolded * inverse.view(1, -1)  # not divided by the query norm, like screened
    error = (screened[0] - exact).abs()
    assert bool((error <= bound.view(-1, 1)).all())
    assert error.max() > 0  # the screening is really in bfloat16


def test_transfer_plan_weights_are_the_overlap_average(generator):
    index = torch.randint(0, 12, (2, 15), generator=generator)
    rows, valid, scale = transfer_plan(index, (3, 5), [(3, 4)], 2, "overlap")
    assert rows.shape == valid.shape == (2 * 6 * 5, 9)  # segments of 2 output pixels
    torch.testing.assert_close(scale * valid.sum(1), torch.ones(60))
    _, _, constant = transfer_plan(index, (3, 5), [(3, 4)], 2, "constant")
    torch.testing.assert_close(constant, torch.full((60,), 1 / 9))


@pytest.mark.parametrize("scale", [1, 2, 4])
@pytest.mark.parametrize("divisor", ["overlap", "constant"])
def test_fast_transfer_equals_gather_then_fold(scale, divisor, generator):
    references = [torch.rand(2, 3, 3 * scale, 4 * scale, generator=generator) for _ in range(2)]
    index = torch.randint(0, 24, (2, 20), generator=generator)
    expected = transfer(references, index, (4, 5), scale, divisor)
    found = fast_transfer(references, index, (4, 5), [(3, 4)] * 2, scale, divisor)
    torch.testing.assert_close(found, expected, **TOLERANCE)


def test_gradcheck_best_patch_relevance(generator):
    query, keys, *_ = features(generator, 2, 3, (3, 4), [(3, 3), (2, 4)], torch.float64)
    index = search_best_positions(query, keys)
    query.requires_grad_()
    for key in keys:
        key.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda q, *k: BestPatchRelevance.apply(q, index, None, PLAIN, *k), (query, *keys)
    )


def test_gradcheck_texture_gather(generator):
    table = torch.rand(10, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 10, (6, 9), generator=generator)
    valid = torch.rand(6, 9, generator=generator) > 0.3
    scale = torch.rand(6, generator=generator, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: TextureGather.apply(t, index, valid, scale), table)


def test_gradcheck_fast_transfer_through_the_features(generator):
    references = [
        torch.rand(1, 2, 4, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    ]
    index = torch.randint(0, 6, (1, 6), generator=generator)
    assert torch.autograd.gradcheck(
        lambda r: fast_transfer([r], index, (2, 3), [(2, 3)], 2, "overlap"), references
    )


def test_search_restores_the_thread_count(generator):
    query, keys, *_ = features(generator, 1, 8, (4, 4), [(4, 4)])
    threads = torch.get_num_threads()
    search_best_positions(query, keys)
    assert torch.get_num_threads() == threads


def test_model_with_fast_search_gives_the_same_image(generator):
    torch.manual_seed(0)
    model = TTSR(TTSRConfig(num_res_blocks=(1, 1, 1, 1), n_feats=8), search="straightforward")
    model.eval()
    lr = torch.rand(2, 3, 10, 12, generator=generator) * 2 - 1
    lrsr = F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False)
    ref = torch.rand(2, 3, 36, 44, generator=generator) * 2 - 1
    runtime = CPURuntime(workers=2)
    threads = torch.get_num_threads()
    with torch.no_grad():
        expected = model(lr, lrsr, ref, ref.clone())
        model.set_search("fast")
        found = model(lr, lrsr, ref, ref.clone(), runtime=runtime)
        plain = model(lr, lrsr, ref, ref.clone())
    # The search's scratch is given back before the generator runs (the model's memory peak).
    assert runtime.arena is not None and runtime.arena.buffer is None
    assert torch.get_num_threads() == threads  # nothing process-wide changed
    for result in (found, plain):
        assert torch.equal(result.index, expected.index)
        torch.testing.assert_close(result.sr, expected.sr, **TOLERANCE)


def test_inference_mode_with_worker_threads(generator):
    query, keys, lv1, lv2, lv3 = features(generator, 2, 16, (6, 7), [(5, 6), (4, 4)])
    expected = SearchTransfer().search_and_transfer(query, keys, lv1, lv2, lv3)
    with torch.inference_mode():
        found = FastSearchTransfer().search_and_transfer(
            query, keys, lv1, lv2, lv3, runtime=CPURuntime(workers=2)
        )
    assert torch.equal(found.index, expected.index)
    torch.testing.assert_close(found.t_lv1, expected.t_lv1, **TOLERANCE)


@pytest.mark.parametrize("screening", ["off", "bfloat16"])
def test_worker_threads_keep_nothing_of_a_finished_search(screening):
    generator = torch.Generator().manual_seed(5)
    query = torch.randn(1, 16, 9, 11, generator=generator)
    keys = [torch.randn(1, 16, 12, 10, generator=generator)]
    index, tables = patch_correlation.search_with_tables(
        query, keys, screening, rows_per_step=2, runtime=CPURuntime(workers=2)
    )
    released = weakref.ref(tables)
    del tables
    assert released() is None  # no pool thread holds the search (and its tables) any more
    assert index.shape == (1, 99)


def test_scratch_arena_hands_out_disjoint_aligned_pieces_and_grows_to_the_largest_phase():
    arena = ScratchArena()
    cpu = torch.device("cpu")
    arena.reset()
    first = arena.take((3, 5), torch.float32, cpu)  # no buffer yet: served freshly
    assert first.shape == (3, 5) and first.dtype == torch.float32
    arena.reset()
    arena.take((100,), torch.bfloat16, cpu)  # a larger phase, still served freshly
    arena.reset()  # the next piece comes from a buffer as large as the largest phase seen
    a = arena.take((7,), torch.float32, cpu)
    assert arena.buffer is not None and arena.buffer.numel() >= 200
    b = arena.take((2, 3), torch.bfloat16, cpu)
    base = arena.buffer.data_ptr()
    assert a.data_ptr() == base  # from the buffer, not fresh
    assert b.data_ptr() >= a.data_ptr() + 7 * 4
    assert b.data_ptr() % ScratchArena.ALIGNMENT == base % ScratchArena.ALIGNMENT
    a.fill_(1.0)
    b.fill_(2.0)
    assert bool((a == 1.0).all()) and bool((b == 2.0).all())  # the pieces do not overlap
    too_big = arena.take((1000,), torch.float32, cpu)  # does not fit: fresh, counted for later
    assert not (base <= too_big.data_ptr() < base + arena.buffer.numel())
    arena.reset()
    arena.take((1,), torch.float32, cpu)
    assert arena.buffer.numel() >= 4000 + 64
    arena.release()
    assert arena.buffer is None
    arena.take((1,), torch.float32, cpu)
    assert arena.buffer.numel() >= 4000 + 64  # the size it learned is kept
    arena.LIMIT_BYTES = 8000
    arena.take((3000,), torch.float32, cpu)  # a phase over the limit
    arena.reset()
    arena.take((1,), torch.float32, cpu)
    assert arena.buffer.numel() < 8000  # not kept


def test_inference_reuses_scratch_without_touching_earlier_results(generator):
    query, keys, lv1, lv2, lv3 = features(generator, 2, 16, (6, 7), [(5, 6), (4, 4)])
    other = features(generator, 2, 16, (6, 7), [(5, 6), (4, 4)])
    module = FastSearchTransfer()
    runtime = CPURuntime(workers=2)
    with torch.no_grad():
        results = [
            module.search_and_transfer(query, keys, lv1, lv2, lv3, runtime=runtime)
            for _ in range(2)
        ]
        kept = [t.clone() for t in (results[0].soft_attention, results[0].t_lv1, results[0].t_lv3)]
        module.search_and_transfer(*other, runtime=runtime)  # overwrites every scratch buffer
    expected = SearchTransfer().search_and_transfer(query, keys, lv1, lv2, lv3)
    for found in results:
        assert torch.equal(found.index, expected.index)
        torch.testing.assert_close(found.t_lv1, expected.t_lv1, **TOLERANCE)
        torch.testing.assert_close(found.t_lv2, expected.t_lv2, **TOLERANCE)
        torch.testing.assert_close(found.soft_attention, expected.soft_attention, **TOLERANCE)
    now = (results[0].soft_attention, results[0].t_lv1, results[0].t_lv3)
    for before, after in zip(kept, now, strict=True):
        assert torch.equal(before, after)  # outputs never live in the scratch arena


def test_level_table_of_a_channels_last_reference_is_a_view(generator):
    reference = torch.rand(2, 4, 5, 6, generator=generator)
    last = reference.contiguous(memory_format=torch.channels_last)
    table = level_table([last])
    assert table.data_ptr() == last.data_ptr()
    torch.testing.assert_close(table, level_table([reference]))
    runtime = CPURuntime()
    for _ in range(2):  # the second call is served from the runtime's scratch buffer
        runtime.next_phase()
        in_arena = level_table([reference, reference[..., :3]], runtime)
    buffer = runtime.arena.buffer if runtime.arena is not None else None
    assert buffer is not None and in_arena.data_ptr() == buffer.data_ptr()
    expected = torch.cat(
        [r.permute(0, 2, 3, 1).reshape(2, -1, 4) for r in (reference, reference[..., :3])], 1
    )
    torch.testing.assert_close(in_arena, expected.reshape(-1, 4))
