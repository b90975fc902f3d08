"""SearchTransfer against its definition: unfold/fold identities, a direct loop, gather indexing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ttsr import SearchTransfer
from ttsr.model.search_transfer import (
    TRANSFER_GEOMETRY,
    fold_patches,
    gather_blocks,
    unfold_patches,
)


@pytest.mark.parametrize("scale", [1, 2, 4])
@pytest.mark.parametrize("grid", [(5, 7), (6, 6), (1, 3)])
def test_fold_of_unfold_divided_by_overlap_is_identity(scale, grid, generator):
    height, width = grid[0] * scale, grid[1] * scale
    x = torch.randn(3, 4, height, width, generator=generator, dtype=torch.float64)
    blocks = unfold_patches(x, scale)
    assert blocks.shape[-1] == grid[0] * grid[1]  # one block per relu3_1 position
    overlap_count = fold_patches(unfold_patches(torch.ones_like(x), scale), (height, width), scale)
    restored = fold_patches(blocks, (height, width), scale) / overlap_count
    torch.testing.assert_close(restored, x, rtol=0, atol=1e-12)


def test_interior_overlap_is_nine_at_every_scale():
    for scale, (kernel, stride, _) in TRANSFER_GEOMETRY.items():
        size = 8 * scale
        ones = torch.ones(1, 1, size, size)
        count = fold_patches(unfold_patches(ones, scale), (size, size), scale)
        assert (kernel // stride) ** 2 == 9
        assert count[0, 0, size // 2, size // 2].item() == 9


def test_gather_blocks_picks_columns_for_every_patch_row():
    unfolded = torch.arange(2 * 3 * 4).view(2, 3, 4)
    index = torch.tensor([[3, 0], [1, 1]])
    picked = gather_blocks(unfolded, index)
    expected = torch.stack([unfolded[b][:, index[b]] for b in range(2)])
    assert torch.equal(picked, expected)


def _loop_search_transfer(lrsr_lv3, refsr_lv3, ref_lv1, ref_lv2, ref_lv3, divisor):
    """Definition by loops (float64): best normalised 3x3 patch, then paste-and-average."""
    _, channels, height, width = lrsr_lv3.shape
    _, _, ref_height, ref_width = refsr_lv3.shape
    query = F.pad(lrsr_lv3[0], (1, 1, 1, 1))
    keys = F.pad(refsr_lv3[0], (1, 1, 1, 1))
    index = torch.zeros(height, width, dtype=torch.long)
    attention = torch.zeros(height, width, dtype=lrsr_lv3.dtype)
    for y in range(height):
        for x in range(width):
            q = query[:, y : y + 3, x : x + 3].flatten()
            q = q / q.norm().clamp_min(1e-12)
            best, best_pos = -2.0, 0
            for ry in range(ref_height):
                for rx in range(ref_width):
                    k = keys[:, ry : ry + 3, rx : rx + 3].flatten()
                    value = float(q @ (k / k.norm().clamp_min(1e-12)))
                    if value > best:
                        best, best_pos = value, ry * ref_width + rx
            index[y, x], attention[y, x] = best_pos, best
    textures = []
    for scale, ref in ((1, ref_lv3), (2, ref_lv2), (4, ref_lv1)):
        kernel, stride, padding = TRANSFER_GEOMETRY[scale]
        padded = F.pad(ref[0], (padding,) * 4)
        valid = F.pad(torch.ones_like(ref[0][:1]), (padding,) * 4)
        total = torch.zeros(
            ref.size(1), height * scale + 2 * padding, width * scale + 2 * padding, dtype=ref.dtype
        )
        count = torch.zeros_like(total[:1])
        for y in range(height):
            for x in range(width):
                ry, rx = divmod(int(index[y, x]), ref_width)
                source = (
                    slice(None),
                    slice(ry * stride, ry * stride + kernel),
                    slice(rx * stride, rx * stride + kernel),
                )
                target = (
                    slice(None),
                    slice(y * stride, y * stride + kernel),
                    slice(x * stride, x * stride + kernel),
                )
                total[target] += padded[source]
                count[target] += valid[source]
        total = total[:, padding:-padding, padding:-padding]
        count = count[:, padding:-padding, padding:-padding]
        textures.append(total / (count if divisor == "overlap" else 9.0))
    del channels
    return index, attention, textures


def _features(generator, height, width, ref_height, ref_width, channels=5):
    def rand(*shape):
        return torch.rand(*shape, generator=generator, dtype=torch.float64)

    return (
        rand(1, channels, height, width),
        rand(1, channels, ref_height, ref_width),
        rand(1, 2, ref_height * 4, ref_width * 4),
        rand(1, 3, ref_height * 2, ref_width * 2),
        rand(1, channels, ref_height, ref_width),
    )


@pytest.mark.parametrize("divisor", ["overlap", "constant"])
@pytest.mark.parametrize("ref_grid", [(4, 5), (6, 3)])
def test_search_transfer_matches_loop_definition(divisor, ref_grid, generator):
    inputs = _features(generator, 4, 3, *ref_grid)
    result = SearchTransfer(divisor).search_and_transfer(*inputs)
    index, attention, (t_lv3, t_lv2, t_lv1) = _loop_search_transfer(*inputs, divisor)
    assert torch.equal(result.index[0], index)
    torch.testing.assert_close(result.soft_attention[0, 0], attention)
    torch.testing.assert_close(result.t_lv3[0], t_lv3)
    torch.testing.assert_close(result.t_lv2[0], t_lv2)
    torch.testing.assert_close(result.t_lv1[0], t_lv1)


def test_reference_equal_to_input_gives_identity(generator):
    features = torch.rand(2, 8, 5, 6, generator=generator, dtype=torch.float64)
    lv1 = torch.rand(2, 3, 20, 24, generator=generator, dtype=torch.float64)
    lv2 = torch.rand(2, 4, 10, 12, generator=generator, dtype=torch.float64)
    result = SearchTransfer().search_and_transfer(features, features, lv1, lv2, features)
    identity = torch.arange(30).view(1, 5, 6).expand(2, -1, -1)
    assert torch.equal(result.index, identity)
    torch.testing.assert_close(result.soft_attention, torch.ones(2, 1, 5, 6, dtype=torch.float64))
    torch.testing.assert_close(result.t_lv3, features)
    torch.testing.assert_close(result.t_lv2, lv2)
    torch.testing.assert_close(result.t_lv1, lv1)


def test_forward_returns_soft_attention_and_three_texture_scales(generator):
    inputs = [t.float() for t in _features(generator, 7, 5, 3, 9)]
    soft_attention, t_lv3, t_lv2, t_lv1 = SearchTransfer()(*inputs)
    assert soft_attention.shape == (1, 1, 7, 5)
    assert t_lv3.shape == (1, 5, 7, 5)
    assert t_lv2.shape == (1, 3, 14, 10)
    assert t_lv1.shape == (1, 2, 28, 20)


def test_several_references_are_searched_jointly(generator):
    query, ref_a, lv1_a, lv2_a, _ = _features(generator, 3, 4, 3, 3)
    _, ref_b, lv1_b, lv2_b, _ = _features(generator, 3, 4, 2, 5)
    module = SearchTransfer()
    joint = module.search_and_transfer(
        query, [ref_a, ref_b], [lv1_a, lv1_b], [lv2_a, lv2_b], [ref_a, ref_b]
    )
    only_a = module.search_and_transfer(query, ref_a, lv1_a, lv2_a, ref_a)
    only_b = module.search_and_transfer(query, ref_b, lv1_b, lv2_b, ref_b)
    best = torch.maximum(only_a.soft_attention, only_b.soft_attention)
    torch.testing.assert_close(joint.soft_attention, best)
    from_b = only_b.soft_attention > only_a.soft_attention
    expected_index = torch.where(from_b[:, 0], only_b.index + 9, only_a.index)
    assert torch.equal(joint.index, expected_index)


def test_unknown_divisor_is_refused():
    with pytest.raises(ValueError, match="divisor"):
        SearchTransfer("median")
