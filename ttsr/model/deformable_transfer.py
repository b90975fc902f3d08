"""Deformable texture transfer: modulated deformable convolution (DCN v2) seeded by hard attention.

The hard transfer at scale ``s`` (1, 2, 4 for relu3_1, relu2_1, relu1_1) gives the fine pixel ``q``
of relu3_1 cell ``c = q // s`` the average of nine copies: the patches of the neighbouring cells
``n = c + k``, ``k`` in ``{-1, 0, 1}^2``, each read at ``q + s * flow(n)`` (``flow`` from
:func:`ttsr.model.flow.flow_from_index`). A 3x3 deformable convolution has nine taps per output
pixel, so tap ``k`` is given neighbour ``k``'s match: it samples the reference at::

    target_k(q) = q + s * flow(q // s + k) + residual_k(q)

with a learned ``residual`` (zero at initialisation), and is weighted by the mask::

    mask_k(q) = hard_weight_k(q // s) * 2 * sigmoid(logit_k(q))

``hard_weight_k`` is the hard transfer's divisor: ``valid_k / sum(valid)`` for the ``"overlap"``
divisor, ``valid_k / 9`` for ``"constant"``, where a tap is valid when its neighbour cell lies in
the LR grid and its target lies inside the reference holding the match (the hard transfer's zero
padding). The logits start at 0, so ``2 * sigmoid`` starts at exactly 1 (a plain ``sigmoid`` would
halve the textures); the mask can still learn to drop (towards 0) or double a tap. The
convolution weight starts as the identity on channels at every tap (``weight[o, i, :, :] = [o ==
i]``), so that the whole head starts as ``sum_k mask_k * reference(target_k)``: **the hard
transfer, at every pixel, borders included** (float rounding aside: the head sums
``w_k * v_k`` where the fold computes ``sum(v_k) / count``; about ``1e-16`` relative in float64,
``1e-7`` in float32). The offset predictor sees the LR features and the reference warped by the
central tap (:func:`ttsr.model.flow.warp`). Residual offsets are in pixels of their level's grid.
Invalid taps (no neighbour patch, or a target outside the reference) keep mask 0 for good; at the
integer start the gradient w.r.t. the offsets is the one-sided difference of bilinear sampling.

**Reference grid versus LR grid.** ``deform_conv2d`` samples its input at ``out * stride - padding
+ tap * dilation + offset`` and its output size follows from the input size, whereas we need the
output on the LR grid ``[s*H, s*W]`` and the input on the reference grid. We keep the reference as
the input and compute the offsets as *absolute target minus the tap's base position*: padding and
dilation are chosen per axis only so that the output size is the LR grid (``in + 2*padding -
2*dilation = out``, see :func:`output_geometry`; one zero row/column is appended when the parity
needs it), and the tap's base position is subtracted from its offset again. This is exact
bookkeeping (integer-valued float offsets), costs nothing extra and needs no crop. Several
references are placed side by side on one zero canvas (top-aligned, ``REFERENCE_GAP`` relu3_1
pixels of zeros between them, enough for every hard-transfer target outside a reference to read
zero), so one convolution serves them all.

The convolution is ``torchvision.ops.deform_conv2d`` on CUDA and, on the CPU, its equal
:func:`ttsr.model.sampled_deform_conv.sampled_deform_conv2d` (``grid_sample`` per tap; torchvision's
CPU backward is about 6x slower).

Offset layout of ``torchvision.ops.deform_conv2d`` (pinned by ``tests/test_deform_conventions.py``):
``offset[b, 2 * (g * K*K + t) + 0]`` is ``dy`` and ``... + 1`` is ``dx`` for offset group ``g``
and tap ``t = ky * K + kx`` (row-major over the kernel); ``mask[b, g * K*K + t]``; offset group
``g`` applies to input channels ``g*C/G .. (g+1)*C/G - 1``. Note ``(dy, dx)``, the opposite of the
flow's ``(dx, dy)``. The predicted residual uses the deform layout directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import deform_conv2d

from ttsr.model.config import Divisor
from ttsr.model.flow import flow_from_index, upsample_flow, warp
from ttsr.model.sampled_deform_conv import sampled_deform_conv2d
from ttsr.model.search_transfer import as_reference_list

#: The nine neighbour cells ``(ky, kx)`` in deform_conv2d's tap order (row-major over 3x3).
TAPS: tuple[tuple[int, int], ...] = tuple((ky, kx) for ky in (-1, 0, 1) for kx in (-1, 0, 1))
#: relu3_1 pixels of zeros between references on the canvas (>= 1 keeps the start exact).
REFERENCE_GAP = 1
#: Scales of the three texture levels and their channels (relu3_1, relu2_1, relu1_1).
LEVELS: dict[str, tuple[int, int]] = {"lv3": (1, 256), "lv2": (2, 128), "lv1": (4, 64)}


@dataclass(frozen=True)
class TapPlan:
    """Where the nine taps of every relu3_1 cell sample, from the hard attention.

    ``flow`` ``[B, 2, H, W]``: each cell's own match as a flow ``(dx, dy)`` into the canvas
    (relu3_1 pixels); ``tap_flow`` ``[B, 9, 2, H, W]``: tap ``k`` of cell ``c`` carries the flow
    of neighbour ``c + k`` (zero where invalid); ``tap_weight`` ``[B, 9, H, W]``: the hard
    transfer's weight of that tap (0 where invalid). ``canvas_size`` is the relu3_1 canvas size.
    """

    flow: Tensor
    tap_flow: Tensor
    tap_weight: Tensor
    canvas_size: tuple[int, int]


def canvas_columns(ref_sizes: Sequence[tuple[int, int]]) -> tuple[list[int], tuple[int, int]]:
    """First canvas column of each reference and the canvas size, all at relu3_1."""
    starts, column = [], 0
    for _, width in ref_sizes:
        starts.append(column)
        column += width + REFERENCE_GAP
    return starts, (max(h for h, _ in ref_sizes), column - REFERENCE_GAP)


def build_canvas(references: Sequence[Tensor], scale: int) -> Tensor:
    """References ``[B, C, s*Hr_i, s*Wr_i]`` side by side on one zero canvas (layout of
    :func:`canvas_columns` times ``scale``). One reference is returned as it is."""
    if len(references) == 1:
        return references[0]
    height = max(r.size(-2) for r in references)
    padded = []
    for i, reference in enumerate(references):
        gap = 0 if i == len(references) - 1 else REFERENCE_GAP * scale
        padded.append(F.pad(reference, (0, gap, 0, height - reference.size(-2))))
    return torch.cat(padded, dim=-1)


def plan_taps(
    index: Tensor,
    ref_sizes: Sequence[tuple[int, int]],
    divisor: Divisor = "overlap",
    dtype: torch.dtype = torch.float32,
) -> TapPlan:
    """Tap flows and hard weights for ``index`` ``[B, H, W]`` into references of relu3_1 sizes
    ``ref_sizes`` (see :class:`TapPlan`)."""
    if divisor not in ("overlap", "constant"):
        raise ValueError(f"divisor must be 'overlap' or 'constant', not {divisor!r}")
    flow, reference_id = flow_from_index(index, list(ref_sizes), dtype=dtype)
    _, height, width = index.shape
    starts, canvas_size = canvas_columns(ref_sizes)
    table = torch.tensor(
        [[start, h, w] for start, (h, w) in zip(starts, ref_sizes, strict=True)],
        device=index.device,
        dtype=dtype,
    )[reference_id].permute(0, 3, 1, 2)  # [B, 3, H, W]: start column, height, width
    grid_y = torch.arange(height, device=index.device, dtype=dtype).view(height, 1)
    grid_x = torch.arange(width, device=index.device, dtype=dtype).view(1, width)
    ref_x, ref_y = flow[:, 0] + grid_x, flow[:, 1] + grid_y  # in the matched reference
    canvas_flow = torch.stack((flow[:, 0] + table[:, 0], flow[:, 1]), dim=1)
    in_grid = torch.ones_like(ref_x)
    fields = torch.stack(
        (canvas_flow[:, 0], canvas_flow[:, 1], ref_x, ref_y, *table[:, 1:].unbind(1), in_grid), 1
    )
    fields = F.pad(fields, (1, 1, 1, 1))  # neighbours outside the LR grid: in_grid = 0
    tap_flows, valids = [], []
    for ky, kx in TAPS:
        neighbour = fields[:, :, 1 + ky : 1 + ky + height, 1 + kx : 1 + kx + width]
        flow_x, flow_y, n_ref_x, n_ref_y, n_height, n_width, n_in_grid = neighbour.unbind(1)
        target_x, target_y = n_ref_x - kx, n_ref_y - ky  # neighbour's patch read at this cell
        valid = (
            (n_in_grid > 0)
            & (target_x >= 0)
            & (target_x < n_width)
            & (target_y >= 0)
            & (target_y < n_height)
        ).to(dtype)
        tap_flows.append(torch.stack((flow_x, flow_y), 1) * valid.unsqueeze(1))
        valids.append(valid)
    valid = torch.stack(valids, 1)
    if divisor == "overlap":
        tap_weight = valid / valid.sum(1, keepdim=True).clamp_min(1.0)
    else:
        tap_weight = valid / 9.0
    return TapPlan(canvas_flow, torch.stack(tap_flows, 1), tap_weight, canvas_size)


def output_geometry(in_size: int, out_size: int) -> tuple[int, int, int]:
    """``(extra, padding, dilation)`` making a 3x3, stride-1 ``deform_conv2d`` map an input of
    ``in_size + extra`` (``extra`` zero rows appended, 0 or 1, for parity) to ``out_size``."""
    extra = (out_size - in_size) % 2
    half_difference = (out_size - in_size - extra) // 2  # padding - dilation
    dilation = max(1, -half_difference)
    return extra, dilation + half_difference, dilation


def replicate(tensor: Tensor, factor: int) -> Tensor:
    """Nearest-neighbour upsampling of the last two axes by ``factor``."""
    return tensor.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def deform_transfer(
    canvas: Tensor,
    plan: TapPlan,
    scale: int,
    weight: Tensor,
    residual_offset: Tensor | None = None,
    mask_logits: Tensor | None = None,
) -> Tensor:
    """Sample ``canvas`` ``[B, C, s*Hc, s*Wc]`` at the taps of ``plan`` on the LR grid at ``scale``.

    Args:
        weight: ``[C_out, C, 3, 3]`` deform convolution weight.
        residual_offset: ``[B, 2*G*9, s*H, s*W]`` in deform layout (``dy, dx``), fine pixels.
        mask_logits: ``[B, G*9, s*H, s*W]``; the mask is ``hard_weight * 2 * sigmoid(logits)``.
    Returns:
        ``[B, C_out, s*H, s*W]`` in ``canvas``'s dtype. With no residual and no logits this is the
        hard sampling. Coordinates are computed in float32 or better whatever the features'
        dtype (float16 represents integers exactly only up to 2048, bfloat16 up to 256).
    """
    batch, _, height, width = plan.flow.shape
    expected = (scale * plan.canvas_size[0], scale * plan.canvas_size[1])
    if tuple(canvas.shape[-2:]) != expected:
        raise ValueError(f"canvas must be {expected} at scale {scale}, got {tuple(canvas.shape)}")
    out_dtype = canvas.dtype
    dtype = torch.promote_types(canvas.dtype, torch.float32)
    canvas, weight = canvas.to(dtype), weight.to(dtype)
    out_h, out_w = scale * height, scale * width
    extra_h, pad_h, dil_h = output_geometry(canvas.size(-2), out_h)
    extra_w, pad_w, dil_w = output_geometry(canvas.size(-1), out_w)
    if extra_h or extra_w:
        canvas = F.pad(canvas, (0, extra_w, 0, extra_h))
    tap_row = torch.tensor([ky + 1 for ky, _ in TAPS], device=canvas.device, dtype=dtype)
    tap_col = torch.tensor([kx + 1 for _, kx in TAPS], device=canvas.device, dtype=dtype)
    base = torch.stack((pad_h - tap_row * dil_h, pad_w - tap_col * dil_w), 1)  # [9, 2] (dy, dx)
    tap_flow = upsample_flow(plan.tap_flow.to(dtype), scale)  # [B, 9, 2, sH, sW] (dx, dy)
    offset = (tap_flow.flip(2) + base.view(1, 9, 2, 1, 1)).unsqueeze(1)  # -> (dy, dx) - base
    mask = replicate(plan.tap_weight.to(dtype), scale).unsqueeze(1)  # [B, 1, 9, sH, sW]
    groups = 1
    if residual_offset is not None:
        groups = residual_offset.size(1) // 18
        offset = offset + residual_offset.to(dtype).view(batch, groups, 9, 2, out_h, out_w)
    if mask_logits is not None:
        if residual_offset is not None and mask_logits.size(1) != 9 * groups:
            raise ValueError("residual_offset and mask_logits disagree on the offset groups")
        groups = mask_logits.size(1) // 9
        logits = mask_logits.to(dtype).view(batch, groups, 9, out_h, out_w)
        mask = mask * 2.0 * torch.sigmoid(logits)
    offset = offset.expand(batch, groups, 9, 2, out_h, out_w).reshape(batch, -1, out_h, out_w)
    mask = mask.expand(batch, groups, 9, out_h, out_w).reshape(batch, -1, out_h, out_w)
    if canvas.is_cuda:  # torchvision's CUDA kernel; on the CPU the grid_sample one is faster
        out = deform_conv2d(
            canvas, offset, weight, padding=(pad_h, pad_w), dilation=(dil_h, dil_w), mask=mask
        )
    else:
        out = sampled_deform_conv2d(canvas, offset, weight, mask, (pad_h, pad_w), (dil_h, dil_w))
    return out.to(out_dtype)


def identity_taps(channels: int) -> Tensor:
    """``[C, C, 3, 3]`` weight copying every channel at every tap: ``w[o, i] = [o == i]``."""
    return torch.eye(channels).view(channels, channels, 1, 1).repeat(1, 1, 3, 3)


class DeformableLevel(nn.Module):
    """The deformable transfer of one texture level (relu3_1, relu2_1 or relu1_1).

    ``offset_head``: conv3x3 -> LeakyReLU -> conv3x3 (zero-initialised) on the LR features and the
    centrally warped reference, predicting ``2*G*9`` residual offsets and ``G*9`` mask logits;
    ``weight``: the ``[C, C, 3, 3]`` deform convolution weight (identity at every tap).
    """

    def __init__(self, channels: int, scale: int, offset_groups: int, hidden: int) -> None:
        super().__init__()
        if offset_groups < 1 or channels % offset_groups:
            raise ValueError(f"offset_groups ({offset_groups}) must divide channels ({channels})")
        self.scale = scale
        self.offset_groups = offset_groups
        self.offset_head = nn.Sequential(
            nn.Conv2d(2 * channels, hidden, 3, padding=1),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(hidden, 3 * 9 * offset_groups, 3, padding=1),
        )
        nn.init.zeros_(self.offset_head[-1].weight)
        nn.init.zeros_(self.offset_head[-1].bias)
        self.weight = nn.Parameter(identity_taps(channels))

    def forward(self, lr_features: Tensor, canvas: Tensor, plan: TapPlan) -> Tensor:
        """``lr_features`` ``[B, C, s*H, s*W]``, ``canvas`` ``[B, C, s*Hc, s*Wc]`` -> same as LR."""
        dtype = torch.promote_types(canvas.dtype, torch.float32)  # exact coordinates
        central = warp(canvas.to(dtype), upsample_flow(plan.flow.to(dtype), self.scale))
        central = central.to(lr_features.dtype)
        prediction = self.offset_head(torch.cat((lr_features, central), 1))
        residual_offset, mask_logits = prediction.split(
            [18 * self.offset_groups, 9 * self.offset_groups], dim=1
        )
        return deform_transfer(canvas, plan, self.scale, self.weight, residual_offset, mask_logits)


class DeformableTransfer(nn.Module):
    """Deformable texture transfer at relu3_1, relu2_1 and relu1_1, seeded by the hard attention.

    ``forward(index, lrsr_lv1, lrsr_lv2, lrsr_lv3, ref_lv1, ref_lv2, ref_lv3) -> (T_lv3, T_lv2,
    T_lv1)``: ``index`` ``[B, H, W]`` from the hard search; ``lrsr_lv*`` the extractor features of
    LR-up (``[B, 64, 4H, 4W]``, ``[B, 128, 2H, 2W]``, ``[B, 256, H, W]``); ``ref_lv*`` those of
    the reference(s) (a tensor or a list, as for
    :class:`~ttsr.model.search_transfer.SearchTransfer`). Textures have the hard transfer's shapes
    and, at initialisation, its values (see the module docstring).

    Args:
        offset_groups: offset groups of each deformable convolution (divides 64).
        hidden: width of the offset predictors.
        divisor: the hard transfer's divisor the start reproduces.
    """

    def __init__(
        self, offset_groups: int = 8, hidden: int = 64, divisor: Divisor = "overlap"
    ) -> None:
        super().__init__()
        if divisor not in ("overlap", "constant"):
            raise ValueError(f"divisor must be 'overlap' or 'constant', not {divisor!r}")
        self.divisor: Divisor = divisor
        self.lv3 = DeformableLevel(LEVELS["lv3"][1], LEVELS["lv3"][0], offset_groups, hidden)
        self.lv2 = DeformableLevel(LEVELS["lv2"][1], LEVELS["lv2"][0], offset_groups, hidden)
        self.lv1 = DeformableLevel(LEVELS["lv1"][1], LEVELS["lv1"][0], offset_groups, hidden)

    def forward(
        self,
        index: Tensor,
        lrsr_lv1: Tensor,
        lrsr_lv2: Tensor,
        lrsr_lv3: Tensor,
        ref_lv1: Tensor | Sequence[Tensor],
        ref_lv2: Tensor | Sequence[Tensor],
        ref_lv3: Tensor | Sequence[Tensor],
    ) -> tuple[Tensor, Tensor, Tensor]:
        ref_lv3 = as_reference_list(ref_lv3)
        sizes = [(int(r.size(-2)), int(r.size(-1))) for r in ref_lv3]
        plan_dtype = torch.promote_types(lrsr_lv3.dtype, torch.float32)
        plan = plan_taps(index, sizes, self.divisor, dtype=plan_dtype)
        return (
            self.lv3(lrsr_lv3, build_canvas(ref_lv3, 1), plan),
            self.lv2(lrsr_lv2, build_canvas(as_reference_list(ref_lv2), 2), plan),
            self.lv1(lrsr_lv1, build_canvas(as_reference_list(ref_lv1), 4), plan),
        )
