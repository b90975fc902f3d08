"""Correspondences as flow: conventions, agreement with the hard transfer, grid_sample warping."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ttsr.model.flow import decode_index, flow_from_index, upsample_flow, warp
from ttsr.model.search_transfer import transfer


def test_flow_is_dx_then_dy_in_relu3_1_pixels():
    # Reference 3x4: index 6 is (row 1, col 2); index 11 is (row 2, col 3).
    index = torch.tensor([[[6, 11], [0, 6]]])
    flow = flow_from_index(index, (3, 4))
    assert flow.shape == (1, 2, 2, 2) and flow.dtype == torch.float32
    # flow[b, :, y, x] = (ref_x - x, ref_y - y)
    assert flow[0, :, 0, 0].tolist() == [2.0, 1.0]
    assert flow[0, :, 0, 1].tolist() == [3.0 - 1.0, 2.0]
    assert flow[0, :, 1, 0].tolist() == [0.0, -1.0]
    assert flow[0, :, 1, 1].tolist() == [1.0, 0.0]


def test_several_references_give_flows_in_their_own_grids_and_ids():
    sizes = [(2, 3), (4, 2), (1, 1)]  # 6 + 8 + 1 positions, concatenated
    index = torch.tensor([[[5, 6, 13, 14]]])
    flow, reference_id = flow_from_index(index, sizes, dtype=torch.float64)
    assert reference_id.tolist() == [[[0, 1, 1, 2]]]
    # 5 -> ref 0 (1, 2); 6 -> ref 1 (0, 0); 13 -> ref 1 (3, 1); 14 -> ref 2 (0, 0).
    expected_x = [2 - 0, 0 - 1, 1 - 2, 0 - 3]
    expected_y = [1, 0, 3, 0]
    assert flow[0, 0, 0].tolist() == expected_x
    assert flow[0, 1, 0].tolist() == expected_y
    one_flow, one_id = flow_from_index(index.clamp(max=5), [(2, 3)])
    assert torch.equal(one_flow, flow_from_index(index.clamp(max=5), (2, 3)))
    assert not one_id.any()


def test_decode_index_matches_a_brute_force_decode(generator):
    grids = [(3, 5), (1, 1), (4, 2), (2, 7)]
    brute = [(i, y, x) for i, (h, w) in enumerate(grids) for y in range(h) for x in range(w)]
    index = torch.randint(0, len(brute), (2, 6, 9), generator=generator)
    reference_id, row, column = decode_index(index, grids)
    decoded = torch.stack((reference_id, row, column), -1).view(-1, 3).tolist()
    assert decoded == [list(brute[i]) for i in index.view(-1).tolist()]
    every = torch.stack(decode_index(torch.arange(len(brute)), grids), 1)
    assert every.tolist() == [list(b) for b in brute]


def test_index_out_of_range_raises():
    with pytest.raises(ValueError, match="out of range"):
        flow_from_index(torch.tensor([[[12]]]), (3, 4))
    with pytest.raises(ValueError, match="out of range"):
        decode_index(torch.tensor([-1]), [(3, 4)])


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_upsampled_flow_is_scaled_and_replicated_per_cell(factor, generator):
    flow = torch.randint(-5, 6, (2, 2, 3, 4), generator=generator).double()
    fine = upsample_flow(flow, factor)
    assert fine.shape == (2, 2, 3 * factor, 4 * factor)
    for y in range(3 * factor):
        for x in range(4 * factor):
            assert torch.equal(fine[:, :, y, x], factor * flow[:, :, y // factor, x // factor])


def random_case(generator, dtype=torch.float64, grid=(5, 6), ref_grid=(4, 7)):
    batch, channels = 2, 3
    index = torch.randint(0, ref_grid[0] * ref_grid[1], (batch, *grid), generator=generator)
    refs = {
        s: torch.randn(batch, channels, s * ref_grid[0], s * ref_grid[1], generator=generator)
        for s in (1, 2, 4)
    }
    return index, {s: r.to(dtype) for s, r in refs.items()}


def gather_positions(features: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """``features[b, :, ys[b], xs[b]]`` for ``[B, H, W]`` integer positions (all inside)."""
    flat = ys * features.size(-1) + xs
    picked = torch.gather(
        features.flatten(2), 2, flat.flatten(1).unsqueeze(1).expand(-1, features.size(1), -1)
    )
    return picked.view(*features.shape[:2], *ys.shape[-2:])


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_warp_with_integer_flow_is_the_index_gather(factor, generator):
    index, refs = random_case(generator)
    ref_width = refs[1].size(-1)
    fine_index = index.repeat_interleave(factor, 1).repeat_interleave(factor, 2)
    ys = torch.arange(fine_index.size(1)).view(1, -1, 1) % factor
    xs = torch.arange(fine_index.size(2)).view(1, 1, -1) % factor
    # Fine pixel q of cell c reads f * ref(c) + q % f: the interior of the central patch.
    expected = gather_positions(
        refs[factor],
        factor * (fine_index // ref_width) + ys,
        factor * (fine_index % ref_width) + xs,
    )
    flow = upsample_flow(flow_from_index(index, refs[1].shape[-2:], torch.float64), factor)
    torch.testing.assert_close(warp(refs[factor], flow), expected, rtol=0, atol=1e-12)
    # float32: the grid normalisation rounds; equal up to ~1e-7 relative.
    warped32 = warp(refs[factor].float(), flow.float())
    torch.testing.assert_close(warped32, expected.float(), rtol=1e-5, atol=1e-5)


def test_warp_equals_hard_transfer_of_1x1_patches_at_relu3_1(generator):
    index, refs = random_case(generator)
    flow = flow_from_index(index, refs[1].shape[-2:], torch.float64)
    # The 1x1-patch hard transfer: unfold (kernel 1), gather, fold: a plain index gather.
    unfolded = F.unfold(refs[1], kernel_size=1)
    picked = torch.gather(unfolded, 2, index.flatten(1).unsqueeze(1).expand(-1, 3, -1))
    expected = F.fold(picked, output_size=index.shape[-2:], kernel_size=1)
    torch.testing.assert_close(warp(refs[1], flow), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_uniform_correspondence_matches_the_hard_transfer_in_the_interior(factor, generator):
    # Every LR cell matched with the same displacement: all nine overlapping patches agree, so
    # the 3x3-patch hard transfer (fold average) equals the warp by the upsampled flow wherever
    # every patch stays inside the reference.
    height, width, ref_h, ref_w, dy, dx = 4, 5, 9, 10, 3, 2
    ys = torch.arange(height).view(height, 1) + dy
    xs = torch.arange(width).view(1, width) + dx
    index = (ys * ref_w + xs).unsqueeze(0)
    ref = torch.randn(1, 2, factor * ref_h, factor * ref_w, generator=generator).double()
    hard = transfer(ref, index.flatten(1), (height, width), factor)
    flow = upsample_flow(flow_from_index(index, (ref_h, ref_w), torch.float64), factor)
    torch.testing.assert_close(warp(ref, flow), hard, rtol=0, atol=1e-12)


def test_warp_reads_zero_outside_and_handles_single_pixel_sides():
    features = torch.arange(1.0, 7.0, dtype=torch.float64).view(1, 1, 2, 3)
    flow = torch.zeros(1, 2, 2, 3, dtype=torch.float64)
    flow[:, 0] = 1.0  # dx = +1: the last column reads outside
    out = warp(features, flow)
    assert out[0, 0, :, 2].tolist() == [0.0, 0.0]
    assert out[0, 0, :, :2].tolist() == [[2.0, 3.0], [5.0, 6.0]]
    single = torch.full((1, 4, 1, 1), 7.0, dtype=torch.float64)
    index = torch.zeros(1, 2, 2, dtype=torch.long)
    warped = warp(single, flow_from_index(index, (1, 1), torch.float64))
    assert torch.equal(warped, torch.full((1, 4, 2, 2), 7.0, dtype=torch.float64))
    outside = warp(single, torch.ones(1, 2, 1, 1, dtype=torch.float64))  # (0, 0) -> (1, 1)
    assert not outside.any()


def test_warp_is_differentiable_wrt_flow_and_features(generator):
    features = torch.randn(1, 2, 4, 5, generator=generator, dtype=torch.float64)
    # Non-integer flows, away from the kinks of bilinear interpolation.
    flow = torch.rand(1, 2, 3, 3, generator=generator, dtype=torch.float64) * 0.8 + 0.1
    flow = flow + torch.tensor([0.0, 1.0], dtype=torch.float64).view(1, 2, 1, 1)
    features.requires_grad_(True)
    flow.requires_grad_(True)
    assert torch.autograd.gradcheck(warp, (features, flow), eps=1e-6, atol=1e-7)
