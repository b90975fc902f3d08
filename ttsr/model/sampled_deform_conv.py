"""Modulated deformable convolution (DCN v2) computed with ``grid_sample``, tap by tap.

``torchvision.ops.deform_conv2d`` is the reference: same arguments (stride 1, no bias, no weight
groups), same offset layout (``offset[b, 2 * (g * K + t)]`` is ``dy``, ``+ 1`` is ``dx``, tap ``t``
row-major over the kernel, offset group ``g`` covering input channels ``g*C/G .. (g+1)*C/G - 1``)
and the same bilinear sampling with zeros outside. Each tap samples the input at
``out - padding + tap * dilation + offset`` with :func:`torch.nn.functional.grid_sample`
(``align_corners=True``, zeros padding), is weighted by its mask and contracted with that tap's
``[C_out, C]`` weight; the nine products are summed. Memory is one sampled tap at a time, and the
backward is ``grid_sample``'s vectorised one, where torchvision's CPU backward is a scalar loop:
about 6x faster forward+backward on this project's 2-core CPU at relu1_1 of a training batch
(8 x 64 x 96 x 96, 8 offset groups: 1.7 s against 10.9 s).

Values and gradients equal torchvision's to float rounding (``tests/test_sampled_deform_conv.py``,
in float64, including samples past every border). Inputs with a side under 2 pixels, where
``grid_sample``'s normalisation is undefined, go to torchvision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import deform_conv2d


def sampled_deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    mask: Tensor,
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
) -> Tensor:
    """``deform_conv2d(input, offset, weight, padding=padding, dilation=dilation, mask=mask)``
    (stride 1) by bilinear ``grid_sample`` per tap; see the module docstring.

    Args:
        input: ``[B, C, H, W]``.
        offset: ``[B, 2*G*K, H_out, W_out]``, ``(dy, dx)`` per group and tap.
        weight: ``[C_out, C, kh, kw]`` (``K = kh*kw``).
        mask: ``[B, G*K, H_out, W_out]``.
    """
    batch, channels, height, width = input.shape
    out_channels, in_channels, kernel_h, kernel_w = weight.shape
    taps = kernel_h * kernel_w
    groups = offset.size(1) // (2 * taps)
    if in_channels != channels or groups < 1 or channels % groups or mask.size(1) != groups * taps:
        raise ValueError(
            f"inconsistent shapes: input {tuple(input.shape)}, weight {tuple(weight.shape)}, "
            f"offset {tuple(offset.shape)}, mask {tuple(mask.shape)}"
        )
    if height < 2 or width < 2:  # grid_sample's normalisation needs two pixels per axis
        return deform_conv2d(input, offset, weight, padding=padding, dilation=dilation, mask=mask)
    out_h, out_w = offset.shape[-2:]
    offset = offset.view(batch, groups, taps, 2, out_h, out_w)
    mask = mask.view(batch, groups, taps, 1, out_h, out_w)
    grouped = input.reshape(batch * groups, channels // groups, height, width)
    rows = torch.arange(out_h, device=input.device, dtype=offset.dtype).view(out_h, 1)
    cols = torch.arange(out_w, device=input.device, dtype=offset.dtype).view(1, out_w)
    scale_y, scale_x = 2.0 / (height - 1), 2.0 / (width - 1)
    out = None
    for tap in range(taps):
        ky, kx = divmod(tap, kernel_w)
        y = offset[:, :, tap, 0] + (rows + (ky * dilation[0] - padding[0]))
        x = offset[:, :, tap, 1] + (cols + (kx * dilation[1] - padding[1]))
        grid = torch.stack((x * scale_x - 1.0, y * scale_y - 1.0), dim=-1)
        sampled = F.grid_sample(
            grouped,
            grid.view(batch * groups, out_h, out_w, 2).to(input.dtype),
            mode="bilinear",
            padding_mode="zeros",
            align_corners=True,
        )
        sampled = sampled.view(batch, groups, channels // groups, out_h, out_w) * mask[:, :, tap]
        term = F.conv2d(
            sampled.view(batch, channels, out_h, out_w), weight[:, :, ky : ky + 1, kx : kx + 1]
        )
        out = term if out is None else out + term
    assert out is not None
    return out
