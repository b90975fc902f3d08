"""sampled_deform_conv2d against torchvision.ops.deform_conv2d: values and all four gradients."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import deform_conv2d

from ttsr.model.sampled_deform_conv import sampled_deform_conv2d


def random_case(size, out_size, groups, padding, dilation, offset_scale, seed=0):
    generator = torch.Generator().manual_seed(seed)
    channels, height, width = 8, *size
    options = {"generator": generator, "dtype": torch.float64}
    input = torch.randn(2, channels, height, width, **options)
    offset = torch.randn(2, 2 * groups * 9, *out_size, **options) * offset_scale
    mask = torch.rand(2, groups * 9, *out_size, **options)
    weight = torch.randn(5, channels, 3, 3, **options)
    return [t.requires_grad_() for t in (input, offset, mask, weight)], padding, dilation


CASES = [
    # size, output size, offset groups, padding, dilation, offset scale (pixels)
    ((9, 11), (9, 11), 1, (1, 1), (1, 1), 0.7),
    ((9, 11), (7, 13), 4, (1, 2), (2, 1), 2.0),
    ((6, 5), (8, 7), 2, (2, 2), (1, 1), 4.0),  # many samples past every border
    ((12, 10), (10, 8), 8, (0, 0), (1, 1), 1.5),
]


@pytest.mark.parametrize(("size", "out_size", "groups", "padding", "dilation", "scale"), CASES)
def test_values_and_gradients_equal_torchvision(size, out_size, groups, padding, dilation, scale):
    (input, offset, mask, weight), padding, dilation = random_case(
        size, out_size, groups, padding, dilation, scale
    )
    expected = deform_conv2d(input, offset, weight, padding=padding, dilation=dilation, mask=mask)
    out = sampled_deform_conv2d(input, offset, weight, mask, padding, dilation)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    upstream = torch.randn_like(out)
    expected_grads = torch.autograd.grad(expected, (input, offset, mask, weight), upstream)
    grads = torch.autograd.grad(out, (input, offset, mask, weight), upstream)
    for name, grad, expected_grad in zip(
        ("input", "offset", "mask", "weight"), grads, expected_grads, strict=True
    ):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-8, atol=1e-8, msg=name)


def test_integer_offsets_shift_exactly_and_read_zero_outside():
    input = torch.arange(1.0, 13.0).view(1, 1, 3, 4)
    offset = torch.zeros(1, 2, 3, 4)
    offset[:, 0] = 1.0  # dy = +1: every output reads the row below
    weight = torch.ones(1, 1, 1, 1)
    out = sampled_deform_conv2d(input, offset, weight, torch.ones(1, 1, 3, 4))
    torch.testing.assert_close(out[0, 0, :2], input[0, 0, 1:])
    assert out[0, 0, 2].abs().max() == 0


def test_tiny_inputs_fall_back_to_torchvision():
    (input, offset, mask, weight), padding, dilation = random_case(
        (1, 5), (1, 5), 2, (1, 1), (1, 1), 0.5
    )
    out = sampled_deform_conv2d(input, offset, weight, mask, padding, dilation)
    expected = deform_conv2d(input, offset, weight, padding=padding, dilation=dilation, mask=mask)
    torch.testing.assert_close(out, expected)


def test_inconsistent_groups_are_refused():
    (input, offset, mask, weight), padding, dilation = random_case(
        (6, 6), (6, 6), 2, (1, 1), (1, 1), 0.5
    )
    with pytest.raises(ValueError, match="inconsistent"):
        sampled_deform_conv2d(input, offset, weight, mask[:, :9], padding, dilation)
