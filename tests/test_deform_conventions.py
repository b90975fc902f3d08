"""torchvision's ``deform_conv2d`` conventions, pinned by hand-made cases.

What :mod:`ttsr.model.deformable_transfer` relies on: for offset group ``g`` and tap
``t = ky * K + kx``, ``offset[:, 2 * (g*K*K + t)]`` is ``dy`` (rows) and the next channel ``dx``
(columns); the tap samples ``out * stride - padding + k * dilation + offset``; samples outside the
input read zero; bilinear in between; ``mask[:, g*K*K + t]``; group ``g`` covers input channels
``g*C/G .. (g+1)*C/G - 1`` whatever the output channels.
"""

from __future__ import annotations

import torch
from torchvision.ops import deform_conv2d

from ttsr.model.deformable_transfer import output_geometry


def ramp(channels: int = 1, height: int = 4, width: int = 5) -> torch.Tensor:
    """``[1, C, H, W]`` float64 with value ``100*c + 10*y + x``: every pixel tells where it is."""
    c = torch.arange(channels, dtype=torch.float64).view(channels, 1, 1)
    y = torch.arange(height, dtype=torch.float64).view(1, height, 1)
    x = torch.arange(width, dtype=torch.float64).view(1, 1, width)
    return (100 * c + 10 * y + x).unsqueeze(0)


def constant_offset(dy: float, dx: float, height: int, width: int) -> torch.Tensor:
    offset = torch.empty(1, 2, height, width, dtype=torch.float64)
    offset[:, 0], offset[:, 1] = dy, dx
    return offset


def identity_1x1(channels: int = 1) -> torch.Tensor:
    return torch.eye(channels, dtype=torch.float64).view(channels, channels, 1, 1)


def test_channel_zero_is_dy_and_channel_one_is_dx():
    x = ramp()
    down = deform_conv2d(x, constant_offset(1, 0, 4, 5), identity_1x1())
    right = deform_conv2d(x, constant_offset(0, 2, 4, 5), identity_1x1())
    # out[y, x] = in[y + dy, x + dx]: a positive dy reads the row below.
    assert torch.equal(down[..., :3, :], x[..., 1:, :])
    assert torch.equal(right[..., :, :3], x[..., :, 2:])


def test_samples_outside_the_input_read_zero():
    x = ramp() + 1.0  # no zeros inside
    down = deform_conv2d(x, constant_offset(1, 0, 4, 5), identity_1x1())
    left = deform_conv2d(x, constant_offset(0, -1, 4, 5), identity_1x1())
    assert torch.equal(down[..., 3, :], torch.zeros(1, 1, 5, dtype=torch.float64))
    assert torch.equal(left[..., :, 0], torch.zeros(1, 1, 4, dtype=torch.float64))
    # Half a pixel outside: bilinear with a zero neighbour.
    half = deform_conv2d(x, constant_offset(0.5, 0, 4, 5), identity_1x1())
    torch.testing.assert_close(half[..., 3, :], x[..., 3, :] / 2, rtol=0, atol=1e-12)


def test_fractional_offsets_interpolate_bilinearly():
    x = ramp()
    out = deform_conv2d(x, constant_offset(0.25, 0.5, 4, 5), identity_1x1())
    # The ramp is linear: bilinear interpolation reproduces it exactly inside.
    torch.testing.assert_close(out[..., :3, :4], x[..., :3, :4] + 2.5 + 0.5, rtol=0, atol=1e-12)


def test_tap_order_is_row_major_and_base_is_out_minus_padding_plus_tap_times_dilation():
    x = ramp(height=9, width=11)
    padding, dilation = (1, 2), (2, 3)
    out_h, out_w = 9 + 2 * 1 - 2 * 2, 11 + 2 * 2 - 2 * 3
    for tap, (ky, kx) in enumerate((ky, kx) for ky in range(3) for kx in range(3)):
        weight = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
        weight[0, 0, ky, kx] = 1.0
        offset = torch.zeros(1, 18, out_h, out_w, dtype=torch.float64)
        offset[:, 2 * tap] = 1.0  # dy of this tap
        offset[:, 2 * tap + 1] = -1.0  # dx of this tap
        out = deform_conv2d(x, offset, weight, padding=padding, dilation=dilation)
        assert out.shape[-2:] == (out_h, out_w)
        for oy in range(out_h):
            for ox in range(out_w):
                y = oy - padding[0] + ky * dilation[0] + 1
                x_ = ox - padding[1] + kx * dilation[1] - 1
                inside = 0 <= y < 9 and 0 <= x_ < 11
                expected = x[0, 0, y, x_].item() if inside else 0.0
                assert out[0, 0, oy, ox].item() == expected


def test_output_geometry_maps_any_input_size_to_any_output_size():
    for in_size in range(1, 12):
        for out_size in range(1, 12):
            extra, padding, dilation = output_geometry(in_size, out_size)
            assert extra in (0, 1) and padding >= 0 and dilation >= 1
            assert in_size + extra + 2 * padding - 2 * dilation == out_size
            x = torch.zeros(1, 1, in_size + extra, 3)
            offset = torch.zeros(1, 18, out_size, 3)
            out = deform_conv2d(
                x, offset, torch.ones(1, 1, 3, 3), padding=(padding, 1), dilation=(dilation, 1)
            )
            assert out.shape[-2] == out_size


def test_offset_groups_follow_input_channels_not_output_channels():
    x = ramp(channels=4)
    offset = torch.zeros(1, 4, 4, 5, dtype=torch.float64)  # G=2, 1x1 kernel
    offset[:, 1] = 1.0  # group 0: dx = +1
    offset[:, 2] = 1.0  # group 1: dy = +1
    # Output 0 reads input channel 3 (group 1), output 1 reads input channel 0 (group 0).
    weight = torch.zeros(2, 4, 1, 1, dtype=torch.float64)
    weight[0, 3] = 1.0
    weight[1, 0] = 1.0
    out = deform_conv2d(x, offset, weight)
    assert torch.equal(out[0, 0, :3, :], x[0, 3, 1:, :])  # shifted by group 1's dy
    assert torch.equal(out[0, 1, :, :4], x[0, 0, :, 1:])  # shifted by group 0's dx


def test_mask_is_group_major_then_tap_and_multiplies_the_sample():
    x = ramp(channels=2)
    weight = torch.ones(1, 2, 3, 3, dtype=torch.float64)
    offset = torch.zeros(1, 2 * 2 * 9, 4, 5, dtype=torch.float64)
    mask = torch.zeros(1, 2 * 9, 4, 5, dtype=torch.float64)
    mask[:, 9 + 4] = 0.5  # group 1 (input channel 1), centre tap
    out = deform_conv2d(x, offset, weight, padding=1, mask=mask)
    assert torch.equal(out[0, 0], 0.5 * x[0, 1])
