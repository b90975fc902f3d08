"""Convolutions with their ReLU or residual addition fused in, for reduced-precision inference.

On a CPU, a bfloat16 convolution runs several times faster than a float32 one, which leaves the
passes over memory around it (ReLU, residual additions) as a large share of the time. oneDNN
applies those inside the convolution (post-ops) at no extra pass. PyTorch exposes the fused
kernels it uses for compiled CPU code as ``torch.ops.mkldnn._convolution_pointwise``; they are
used here for bfloat16 CPU tensors without autograd and, where they are missing or the tensor is
anything else, the same result is computed with plain operations (float32 results are never
touched: they stay bit for bit what they were).
"""

from __future__ import annotations

import math
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Reduced-precision dtypes: their activations run channels-last, with float32 at the output.
REDUCED_FLOATS = (torch.bfloat16, torch.float16)


def to_compute(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` as the layers' ``dtype``; reduced precisions in channels-last layout (what oneDNN and
    cuDNN run fastest). Input already in a float32 network's dtype is returned as it is."""
    if dtype not in REDUCED_FLOATS:
        return x.to(dtype)
    return x.to(dtype, memory_format=torch.channels_last)


@cache
def _fused_kernels_available() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    try:
        return hasattr(ops, "_convolution_pointwise") and hasattr(ops, "_convolution_pointwise_")
    except RuntimeError:  # pragma: no cover - builds without the mkldnn op library
        return False


def fusable(x: Tensor, weight: Tensor | None = None) -> bool:
    """Whether convolutions of ``x`` (by ``weight``) take the fused oneDNN kernels: bfloat16
    input and weights (not autocast's float32 weights) on a CPU, no autograd, kernels present."""
    return (
        x.dtype == torch.bfloat16
        and (weight is None or weight.dtype == x.dtype)
        and x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and _fused_kernels_available()
    )


def _geometry(conv: nn.Conv2d) -> tuple[list[int], list[int], list[int], int]:
    padding = conv.padding
    if isinstance(padding, str):
        raise ValueError("fused convolutions need numeric padding")
    return list(padding), list(conv.stride), list(conv.dilation), conv.groups


def conv_relu(conv: nn.Conv2d, x: Tensor, in_place: bool = False) -> Tensor:
    """``relu(conv(x))``; ``in_place``: the ReLU may overwrite the convolution's output."""
    if fusable(x, conv.weight):
        padding, stride, dilation, groups = _geometry(conv)
        return torch.ops.mkldnn._convolution_pointwise(
            x, conv.weight, conv.bias, padding, stride, dilation, groups, "relu", [], ""
        )
    y = conv(x)
    return F.relu_(y) if in_place else F.relu(y)


def conv_add_(
    conv: nn.Conv2d,
    x: Tensor,
    into: Tensor,
    weight: Tensor | None = None,
    with_bias: bool = True,
) -> Tensor:
    """``into += conv(x)`` in place, returning ``into``; ``weight`` replaces the layer's weight
    (a slice of its input channels), ``with_bias=False`` leaves the bias out."""
    weight = conv.weight if weight is None else weight
    bias = conv.bias if with_bias else None
    padding, stride, dilation, groups = _geometry(conv)
    if (
        fusable(x, weight)
        and into.dtype == x.dtype
        and into.is_contiguous(memory_format=torch.channels_last)
    ):
        return torch.ops.mkldnn._convolution_pointwise_.binary(
            into, x, weight.contiguous(), bias, padding, stride, dilation, groups,
            "add", 1.0, None, [], None,
        )  # fmt: skip
    return into.add_(F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, groups))


def conv_then_add(conv: nn.Conv2d, x: Tensor, residual: Tensor) -> Tensor:
    """``conv(x) + residual`` in a new tensor (the convolution's output, added into)."""
    if fusable(x, conv.weight) and residual.dtype == x.dtype:
        padding, stride, dilation, groups = _geometry(conv)
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, residual, conv.weight, conv.bias, padding, stride, dilation, groups,
            "add", 1.0, None, [], None,
        )  # fmt: skip
    return conv(x).add_(residual)


#: Bicubic convolution constant of PyTorch's (and the released code's) ``mode="bicubic"``.
CUBIC_A = -0.75


def _cubic(distance: float) -> float:
    d = abs(distance)
    if d <= 1:
        return ((CUBIC_A + 2) * d - (CUBIC_A + 3)) * d * d + 1
    if d < 2:
        return ((CUBIC_A * d - 5 * CUBIC_A) * d + 8 * CUBIC_A) * d - 4 * CUBIC_A
    return 0.0


@cache
def _phase_taps(factor: int) -> tuple[tuple[float, ...], ...]:
    """Per output phase, the weights over input offsets ``-2..2`` of ``interpolate(...,
    scale_factor=factor, mode="bicubic", align_corners=False)`` (factors 2 and 4 need 5 taps)."""
    phases = []
    for phase in range(factor):
        source = (phase + 0.5) / factor - 0.5  # relative to the input pixel of this output cell
        base = math.floor(source)
        fraction = source - base
        weights = [0.0] * 5
        for tap in range(-1, 3):
            weights[base + tap + 2] = _cubic(fraction - tap)
        phases.append(tuple(weights))
    return tuple(phases)


def _polyphase_kernel(factor: int, channels: int, like: Tensor) -> Tensor:
    """Depthwise kernels ``[channels * factor**2, 1, 5, 5]``: one per output phase, in
    :func:`torch.nn.functional.pixel_shuffle`'s channel order."""
    taps = torch.tensor(_phase_taps(factor), dtype=torch.float64)  # [factor, 5]
    kernel = taps[:, None, :, None] * taps[None, :, None, :]  # [fy, fx, 5, 5]
    kernel = kernel.reshape(factor * factor, 1, 5, 5).repeat(channels, 1, 1, 1)
    return kernel.to(like.dtype).to(like.device)


def bicubic_upsample(x: Tensor, factor: int) -> Tensor:
    """``interpolate(x, scale_factor=factor, mode="bicubic", align_corners=False)`` for integer
    ``factor`` in 2..4 as one depthwise convolution (a 5x5 kernel per output phase, borders
    replicated as the interpolation clamps them) and a pixel shuffle: the same function to float
    rounding, several times faster than the interpolation kernel for channels-last bfloat16."""
    if factor not in (2, 3, 4):
        raise ValueError(f"factor must be 2, 3 or 4, not {factor}")
    channels = x.size(1)
    padded = F.pad(x, (2, 2, 2, 2), mode="replicate")
    phases = F.conv2d(padded, _polyphase_kernel(factor, channels, x), groups=channels)
    return F.pixel_shuffle(phases, factor)
