"""Deformable transfer head: exact hard start, residual layout, gradients, model, checkpoints."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from ttsr import TTSR
from ttsr.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from ttsr.model.config import TTSRConfig
from ttsr.model.deformable_transfer import (
    DeformableTransfer,
    build_canvas,
    deform_transfer,
    identity_taps,
    plan_taps,
)
from ttsr.model.search_transfer import transfer
from ttsr.model.ttsr import build_search_transfer

CHANNELS = {1: 256, 2: 128, 4: 64}


def references(sizes, generator, batch=2, dtype=torch.float64):
    """Per scale, one ``[B, C_s, s*h, s*w]`` tensor per reference of relu3_1 size ``(h, w)``."""
    return {
        s: [torch.randn(batch, c, s * h, s * w, generator=generator, dtype=dtype) for h, w in sizes]
        for s, c in CHANNELS.items()
    }


def lr_features(grid, generator, batch=2, dtype=torch.float64):
    height, width = grid
    return {
        s: torch.randn(batch, c, s * height, s * width, generator=generator, dtype=dtype)
        for s, c in CHANNELS.items()
    }


def run_head(head, index, lr, refs):
    return head(index, lr[4], lr[2], lr[1], refs[4], refs[2], refs[1])


@pytest.mark.parametrize("divisor", ["overlap", "constant"])
@pytest.mark.parametrize(
    ("grid", "sizes"),
    [
        ((5, 6), [(4, 7)]),  # one reference, LR taller and narrower than it
        ((1, 1), [(3, 3)]),  # a single LR cell
        ((3, 8), [(2, 3), (5, 1), (1, 1)]),  # several references of different sizes
    ],
)
def test_zero_residual_start_is_exactly_the_hard_transfer(divisor, grid, sizes, generator):
    batch = 2
    positions = sum(h * w for h, w in sizes)
    index = torch.randint(0, positions, (batch, *grid), generator=generator)
    refs = references(sizes, generator, batch)
    lr = lr_features(grid, generator, batch)
    head = DeformableTransfer(offset_groups=4, divisor=divisor).double()
    t_lv3, t_lv2, t_lv1 = run_head(head, index, lr, refs)
    for scale, texture in ((1, t_lv3), (2, t_lv2), (4, t_lv1)):
        hard = transfer(refs[scale], index.flatten(1), grid, scale, divisor)
        assert texture.shape == hard.shape
        # Every pixel, borders included; only the summation order differs (w*v vs sum(v)/n).
        torch.testing.assert_close(texture, hard, rtol=0, atol=1e-12)


def test_averaging_weight_with_one_neighbour_per_tap_is_the_fold_average_inside(generator):
    # The textbook form: taps each pick one neighbour's match, the weight divides by 9, no mask.
    # Equal to the overlap-averaged fold wherever all nine patches are valid.
    grid, sizes = (6, 7), [(5, 5)]
    index = torch.randint(0, 25, (1, *grid), generator=generator)
    refs = references(sizes, generator, batch=1)
    plan = plan_taps(index, sizes, "overlap", torch.float64)
    interior = (plan.tap_weight > 0).all(1)  # [1, H, W]
    assert interior.any()
    unmasked = replace(plan, tap_weight=torch.ones_like(plan.tap_weight))
    for scale, channels in CHANNELS.items():
        weight = identity_taps(channels).double() / 9.0
        out = deform_transfer(build_canvas(refs[scale], scale), unmasked, scale, weight)
        hard = transfer(refs[scale], index.flatten(1), grid, scale, "overlap")
        inside = interior.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        inside = inside.unsqueeze(1).expand_as(hard)
        torch.testing.assert_close(out[inside], hard[inside], rtol=0, atol=1e-12)


@pytest.mark.parametrize("scale", [1, 2, 4])
def test_residual_offsets_are_dy_dx_in_fine_pixels_and_mask_logits_per_group(scale, generator):
    grid, sizes, groups = (4, 5), [(4, 6)], 2
    index = torch.randint(0, 24, (1, *grid), generator=generator)
    ref = references(sizes, generator, batch=1)[scale][0][:, :8]
    plan = plan_taps(index, sizes, "overlap", torch.float64)
    out_size = (scale * grid[0], scale * grid[1])
    residual = torch.zeros(1, groups, 9, 2, *out_size, dtype=torch.float64)
    residual[:, :, :, 1] = 1.0  # dx = +1 fine pixel at every tap, both groups
    logits = torch.zeros(1, groups, 9, *out_size, dtype=torch.float64)
    logits[:, 1] = -1e4  # group 1 (channels 4..7) switched off
    out = deform_transfer(
        ref,
        plan,
        scale,
        identity_taps(8).double(),
        residual.view(1, -1, *out_size),
        logits.view(1, -1, *out_size),
    )
    shifted_left = F.pad(ref[..., 1:], (0, 1))  # reading x + 1 == reading the shifted reference
    hard = transfer(shifted_left, index.flatten(1), grid, scale, "overlap")
    torch.testing.assert_close(out[:, :4], hard[:, :4], rtol=0, atol=1e-12)
    assert not out[:, 4:].any()


def test_gradients_reach_the_offset_predictors(generator):
    grid, sizes = (3, 4), [(3, 3), (2, 2)]
    index = torch.randint(0, 13, (1, *grid), generator=generator)
    refs = references(sizes, generator, batch=1, dtype=torch.float32)
    lr = lr_features(grid, generator, batch=1, dtype=torch.float32)
    head = DeformableTransfer(offset_groups=2)
    textures = run_head(head, index, lr, refs)
    sum((t * torch.randn_like(t)).sum() for t in textures).backward()
    for level in (head.lv3, head.lv2, head.lv1):
        last = level.offset_head[-1]
        offset_grad = last.weight.grad[: 18 * 2]
        logit_grad = last.weight.grad[18 * 2 :]
        assert offset_grad.abs().sum() > 0 and logit_grad.abs().sum() > 0
        assert torch.isfinite(last.weight.grad).all()
        assert level.weight.grad.abs().sum() > 0
    # Once the last layer is not zero, the gradient flows into the first layer too.
    head.zero_grad()
    with torch.no_grad():
        for level in (head.lv3, head.lv2, head.lv1):
            level.offset_head[-1].weight.normal_(0, 1e-3)
    textures = run_head(head, index, lr, refs)
    sum((t * torch.randn_like(t)).sum() for t in textures).backward()
    for level in (head.lv3, head.lv2, head.lv1):
        assert level.offset_head[0].weight.grad.abs().sum() > 0


def test_offset_groups_must_divide_every_level():
    single = DeformableTransfer(offset_groups=1)
    for level in (single.lv1, single.lv2, single.lv3):  # 18 offsets and 9 mask logits per group
        assert level.offset_groups == 1 and level.offset_head[-1].out_channels == 27
    with pytest.raises(ValueError, match="offset_groups"):
        DeformableTransfer(offset_groups=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_head_gives_the_same_textures_on_gpu(generator):
    grid, sizes = (5, 6), [(4, 7), (2, 3)]
    index = torch.randint(0, 34, (2, *grid), generator=generator)
    refs = references(sizes, generator, dtype=torch.float32)
    lr = lr_features(grid, generator, dtype=torch.float32)
    head = DeformableTransfer()
    with torch.no_grad():
        for level in (head.lv3, head.lv2, head.lv1):
            level.offset_head[-1].weight.normal_(0, 1e-2)
        cpu = run_head(head, index, lr, refs)
        cuda = run_head(
            head.cuda(),
            index.cuda(),
            {s: t.cuda() for s, t in lr.items()},
            {s: [r.cuda() for r in rs] for s, rs in refs.items()},
        )
    for a, b in zip(cpu, cuda, strict=True):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-4)


# --- the TTSR model and checkpoints ---------------------------------------------------------


def small_model(**config) -> TTSR:
    torch.manual_seed(0)
    return TTSR(TTSRConfig(num_res_blocks=(1, 1, 1, 1), n_feats=8, **config))


def model_inputs():
    generator = torch.Generator().manual_seed(1)
    lr = torch.rand(1, 3, 5, 6, generator=generator) * 2 - 1
    lrsr = F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False).clamp(-1, 1)
    refs = [torch.rand(1, 3, h, w, generator=generator) * 2 - 1 for h, w in ((16, 20), (8, 12))]
    return lr, lrsr, refs, [r.clone() for r in refs]


def test_deformable_model_starts_as_the_hard_model():
    hard = small_model().eval()
    deformable = small_model(transfer="deformable").eval()
    missing, unexpected = deformable.load_state_dict(hard.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("deformable_transfer.") for k in missing)
    with torch.no_grad():
        expected, out = hard(*model_inputs()), deformable(*model_inputs())
    assert torch.equal(out.index, expected.index)
    assert torch.equal(out.soft_attention, expected.soft_attention)
    for name in ("t_lv3", "t_lv2", "t_lv1", "sr"):
        torch.testing.assert_close(getattr(out, name), getattr(expected, name))


def test_deformable_model_saves_and_loads_through_checkpoints(tmp_path):
    model = small_model(transfer="deformable", divisor="constant").eval()
    with torch.no_grad():  # move away from the start so that the head's weights matter
        model.deformable_transfer.lv2.offset_head[-1].weight.normal_(0, 1e-2)
    assert model.config.transfer == "deformable"
    save_checkpoint(model, tmp_path / "deformable.pt")
    loaded = load_checkpoint(tmp_path / "deformable.pt").eval()
    assert loaded.config.transfer == "deformable" and loaded.config.divisor == "constant"
    with torch.no_grad():
        torch.testing.assert_close(loaded(*model_inputs()).sr, model(*model_inputs()).sr)


def test_hard_checkpoints_record_the_transfer_and_older_ones_still_load(tmp_path):
    model = small_model()
    assert model.config.transfer == "hard"
    save_checkpoint(model, tmp_path / "hard.pt")
    content = torch.load(tmp_path / "hard.pt", weights_only=True)
    del content["config"]["transfer"]  # written before the key existed
    torch.save(content, tmp_path / "older.pt")
    loaded = load_checkpoint(tmp_path / "older.pt")
    assert loaded.config.transfer == "hard" and loaded.deformable_transfer is None


def test_offset_groups_are_recorded_and_restored(tmp_path):
    model = small_model(transfer="deformable", offset_groups=4)
    head = model.deformable_transfer.lv1
    assert head.offset_groups == 4 and head.offset_head[-1].out_channels == 27 * 4
    assert model.config.offset_groups == 4
    save_checkpoint(model, tmp_path / "groups4.pt")
    assert load_checkpoint(tmp_path / "groups4.pt").deformable_transfer.lv3.offset_groups == 4
    content = torch.load(tmp_path / "groups4.pt", weights_only=True)
    content["config"]["offset_groups"] = 8  # the weights no longer fit: refused, not guessed
    torch.save(content, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="mis-shaped"):
        load_checkpoint(tmp_path / "mismatch.pt")


def test_deformable_model_searches_without_building_hard_textures(monkeypatch):
    model = small_model(transfer="deformable").eval()

    def no_hard_transfer(*args, **kwargs):
        raise AssertionError("the deformable model must not build the hard textures")

    monkeypatch.setattr(model.search_transfer, "search_and_transfer", no_hard_transfer)
    with torch.no_grad():
        out = model(*model_inputs())
    assert out.sr.shape == (1, 3, 20, 24) and out.index.shape == (1, 5, 6)


def test_search_only_matches_the_search_of_search_and_transfer():
    generator = torch.Generator().manual_seed(3)
    query = torch.randn(2, 8, 5, 7, generator=generator)
    keys = [
        torch.randn(2, 8, 4, 6, generator=generator),
        torch.randn(2, 8, 3, 3, generator=generator),
    ]
    levels = [
        [torch.randn(2, 4, s * k.size(2), s * k.size(3), generator=generator) for k in keys]
        for s in (4, 2, 1)
    ]
    for implementation in ("straightforward", "fast"):
        module = build_search_transfer(implementation, "overlap")
        full = module.search_and_transfer(query, keys, *levels)
        soft_attention, index = module.search_only(query, keys)
        assert torch.equal(index, full.index)
        torch.testing.assert_close(soft_attention, full.soft_attention)


def test_unknown_transfer_raises():
    with pytest.raises(ValueError, match="transfer"):
        small_model(transfer="soft")
