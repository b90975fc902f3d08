"""The generator's inference path (no autograd: fewer, freed intermediates) against its training
path: the same function to float rounding, in every configuration."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ttsr.model.generator import Generator, conv_of_parts


def inputs(generator: torch.Generator, size=(7, 9)):
    height, width = size
    lr = torch.rand(2, 3, height, width, generator=generator) * 2 - 1
    attention = torch.rand(2, 1, height, width, generator=generator)
    textures = [
        torch.randn(2, channels, scale * height, scale * width, generator=generator)
        for channels, scale in ((256, 1), (128, 2), (64, 4))
    ]
    lrsr = torch.rand(2, 3, 4 * height, 4 * width, generator=generator) * 2 - 1
    return lr, attention, *textures, lrsr


@pytest.mark.parametrize("use_texture", [True, False])
@pytest.mark.parametrize("bicubic_skip", [True, False])
@pytest.mark.parametrize("res_scale", [1.0, 0.5])
@pytest.mark.parametrize("channels_last", [False, True])
def test_inference_path_equals_the_training_path(
    use_texture, bicubic_skip, res_scale, channels_last
):
    torch.manual_seed(0)
    model = Generator((2, 2, 1, 1), 16, res_scale, use_texture, bicubic_skip).eval()
    lr, attention, t_lv3, t_lv2, t_lv1, lrsr = inputs(torch.Generator().manual_seed(1))
    if not use_texture:
        attention = t_lv3 = t_lv2 = t_lv1 = None
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        lr = lr.contiguous(memory_format=torch.channels_last)
    with torch.enable_grad():  # the training path (autograd records it)
        expected = model(lr, attention, t_lv3, t_lv2, t_lv1, lrsr)
    assert expected.requires_grad
    with torch.no_grad():
        lean = model(lr, attention, t_lv3, t_lv2, t_lv1, lrsr)
    assert not lean.requires_grad
    torch.testing.assert_close(lean, expected.detach(), rtol=1e-5, atol=1e-5)
    assert lean.abs().max() <= 1  # clamped like the training path


def test_inputs_are_not_modified_by_the_in_place_inference_path():
    torch.manual_seed(0)
    model = Generator((1, 1, 1, 1), 8, 1.0, True, True).eval()
    arguments = inputs(torch.Generator().manual_seed(2), size=(5, 6))
    copies = [a.clone() for a in arguments]
    with torch.no_grad():
        model(*arguments)
    for argument, copy in zip(arguments, copies, strict=True):
        assert torch.equal(argument, copy)


def test_convolution_of_parts_equals_convolution_of_the_concatenation():
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 5, 3, padding=1)
    parts = [torch.randn(1, c, 6, 7) for c in (4, 3, 5)]
    expected = conv(torch.cat(parts, 1))
    got = conv_of_parts(conv, [parts[0], lambda: parts[1], parts[2]])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="channels"):
        conv_of_parts(conv, parts[:2])


def test_lean_path_can_be_switched_off_for_measurements():
    torch.manual_seed(0)
    model = Generator((1, 1, 1, 1), 8, 1.0, True, True).eval()
    arguments = inputs(torch.Generator().manual_seed(3), size=(4, 5))
    with torch.enable_grad():
        expected = model(*arguments).detach()
    model.lean_inference = False
    assert not any(block.lean_inference for block in model.SFE.RBs)
    with torch.no_grad():
        assert torch.equal(model(*arguments), expected)  # the very same operations


def test_model_inference_without_texture_maps_gives_the_same_image():
    from ttsr import TTSR
    from ttsr.model.config import TTSRConfig

    torch.manual_seed(0)
    model = TTSR(TTSRConfig((1, 1, 1, 1), 8, bicubic_skip=True)).eval()
    generator = torch.Generator().manual_seed(4)
    lr = torch.rand(1, 3, 6, 7, generator=generator) * 2 - 1
    lrsr = torch.nn.functional.interpolate(lr, scale_factor=4, mode="bicubic").clamp(-1, 1)
    ref = torch.rand(1, 3, 20, 16, generator=generator) * 2 - 1
    with torch.no_grad():
        kept = model(lr, lrsr, ref, ref)
        consumed = model(lr, lrsr, ref, ref, keep_textures=False)
    assert torch.equal(consumed.sr, kept.sr)
    assert torch.equal(consumed.index, kept.index)
    assert consumed.t_lv1 is None and kept.t_lv1 is not None
    trained = model(lr, lrsr, ref, ref, keep_textures=False)  # autograd on: textures kept
    assert trained.t_lv1 is not None and trained.sr.requires_grad


def test_consuming_forward_takes_the_textures_and_refuses_autograd():
    torch.manual_seed(0)
    model = Generator((1, 1, 1, 1), 8, 1.0, True, False).eval()
    lr, attention, t_lv3, t_lv2, t_lv1, _ = inputs(torch.Generator().manual_seed(5), size=(4, 4))
    maps = {"t_lv3": t_lv3, "t_lv2": t_lv2, "t_lv1": t_lv1}
    with torch.no_grad():
        expected = model(lr, attention, t_lv3, t_lv2, t_lv1)
        assert torch.equal(model.forward_consuming(lr, attention, maps), expected)
    assert maps == {}
    with pytest.raises(RuntimeError, match="no_grad"):
        model.forward_consuming(lr, attention, {"t_lv3": t_lv3, "t_lv2": t_lv2, "t_lv1": t_lv1})
