"""The generator's lean forward (inference: fewer, freed intermediates) against its plain forward
(autograd): the same function to float rounding, in every configuration, chosen explicitly."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from ttsr.model.generator import Generator, conv_of_parts
from ttsr.model.search_transfer import TransferResult


def inputs(generator: torch.Generator, size=(7, 9)) -> tuple[Tensor, TransferResult, Tensor]:
    height, width = size
    lr = torch.rand(2, 3, height, width, generator=generator) * 2 - 1
    attention = torch.rand(2, 1, height, width, generator=generator)
    t_lv3, t_lv2, t_lv1 = (
        torch.randn(2, channels, scale * height, scale * width, generator=generator)
        for channels, scale in ((256, 1), (128, 2), (64, 4))
    )
    lrsr = torch.rand(2, 3, 4 * height, 4 * width, generator=generator) * 2 - 1
    index = torch.zeros(2, height, width, dtype=torch.long)
    return lr, TransferResult(attention, t_lv3, t_lv2, t_lv1, index), lrsr


def copy_of(textures: TransferResult) -> TransferResult:
    return TransferResult(**vars(textures))


@pytest.mark.parametrize("use_texture", [True, False])
@pytest.mark.parametrize("bicubic_skip", [True, False])
@pytest.mark.parametrize("res_scale", [1.0, 0.5])
@pytest.mark.parametrize("channels_last", [False, True])
def test_lean_forward_equals_the_plain_forward(use_texture, bicubic_skip, res_scale, channels_last):
    torch.manual_seed(0)
    model = Generator((2, 2, 1, 1), 16, res_scale, use_texture, bicubic_skip).eval()
    lr, textures, lrsr = inputs(torch.Generator().manual_seed(1))
    given = textures if use_texture else None
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        lr = lr.contiguous(memory_format=torch.channels_last)
    expected = model(lr, given and copy_of(given), lrsr)
    assert expected.requires_grad
    with torch.no_grad():
        plain = model(lr, given and copy_of(given), lrsr)
        lean = model(lr, given and copy_of(given), lrsr, lean=True)
    assert torch.equal(plain, expected.detach())  # grad mode does not choose the path
    torch.testing.assert_close(lean, expected.detach(), rtol=1e-5, atol=1e-5)
    assert lean.abs().max() <= 1  # clamped like the plain forward


def test_lean_forward_takes_each_texture_map_and_leaves_the_inputs_unchanged():
    torch.manual_seed(0)
    model = Generator((1, 1, 1, 1), 8, 1.0, True, True).eval()
    lr, textures, lrsr = inputs(torch.Generator().manual_seed(2), size=(5, 6))
    maps = [textures.t_lv3.clone(), textures.t_lv2.clone(), textures.t_lv1.clone()]
    originals = [textures.t_lv3, textures.t_lv2, textures.t_lv1]
    copies = [lr.clone(), textures.soft_attention.clone(), lrsr.clone()]
    with torch.no_grad():
        model(lr, textures, lrsr, lean=True)
    assert textures.t_lv3 is None and textures.t_lv2 is None and textures.t_lv1 is None
    for original, kept in zip(originals, maps, strict=True):
        assert torch.equal(original, kept)
    for argument, kept in zip((lr, textures.soft_attention, lrsr), copies, strict=True):
        assert torch.equal(argument, kept)


def test_lean_forward_refuses_autograd():
    model = Generator((1, 1, 1, 1), 8, 1.0, True, False)
    lr, textures, _ = inputs(torch.Generator().manual_seed(5), size=(4, 4))
    with pytest.raises(RuntimeError, match="no_grad"):
        model(lr, textures, lean=True)


def test_convolution_of_parts_equals_convolution_of_the_concatenation():
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 5, 3, padding=1)
    parts = [torch.randn(1, c, 6, 7) for c in (4, 3, 5)]
    expected = conv(torch.cat(parts, 1))
    got = conv_of_parts(conv, [parts[0], lambda: parts[1], parts[2]])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="channels"):
        conv_of_parts(conv, parts[:2])


def test_lean_model_output_leaves_out_the_texture_maps_with_the_same_image():
    from ttsr import TTSR, TTSRConfig

    torch.manual_seed(0)
    model = TTSR(TTSRConfig((1, 1, 1, 1), 8, bicubic_skip=True)).eval()
    generator = torch.Generator().manual_seed(4)
    lr = torch.rand(1, 3, 6, 7, generator=generator) * 2 - 1
    lrsr = torch.nn.functional.interpolate(lr, scale_factor=4, mode="bicubic").clamp(-1, 1)
    ref = torch.rand(1, 3, 20, 16, generator=generator) * 2 - 1
    with torch.no_grad():
        kept = model(lr, lrsr, ref, ref)
        lean = model(lr, lrsr, ref, ref, lean=True)
    torch.testing.assert_close(lean.sr, kept.sr, rtol=1e-5, atol=1e-5)
    assert torch.equal(lean.index, kept.index)
    assert lean.t_lv1 is None and kept.t_lv1 is not None
    trained = model(lr, lrsr, ref, ref)
    assert trained.t_lv1 is not None and trained.sr.requires_grad
