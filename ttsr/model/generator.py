"""TTSR's generator: shallow features, soft-attention fusion at x1/x2/x4, cross-scale integration.

Module and attribute names follow the released ``MainNet`` so that its weights load one-to-one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ttsr.model.config import DEFAULT_BLOCKS
from ttsr.model.fused_ops import (
    REDUCED_FLOATS,
    bicubic_upsample,
    conv_add_,
    conv_relu,
    conv_then_add,
    to_compute,
)
from ttsr.model.search_transfer import TransferResult

#: Channels of the relu3_1, relu2_1, relu1_1 textures fused at x1, x2, x4.
TEXTURE_CHANNELS = (256, 128, 64)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)


def conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1)


def upsample(x: Tensor, factor: int) -> Tensor:
    """Bicubic upsampling as the released code does it (``align_corners=False``); reduced
    precisions as a polyphase convolution (the same function, faster there)."""
    if x.dtype in REDUCED_FLOATS:
        return bicubic_upsample(x, factor)
    return F.interpolate(x, scale_factor=factor, mode="bicubic", align_corners=False)


def conv_of_parts(conv: nn.Conv2d, parts: Sequence[Tensor | Callable[[], Tensor]]) -> Tensor:
    """``conv(torch.cat(parts, 1))`` as a sum of convolutions of the parts, without the
    concatenation; a callable part is built only when its turn comes and freed after it.
    Equal to the concatenated convolution to float rounding (the sum runs in another order)."""
    out: Tensor | None = None
    start = 0
    for part in parts:
        x = part() if callable(part) else part
        channels = x.size(1)
        weight = conv.weight[:, start : start + channels]
        if out is None:
            out = F.conv2d(x, weight, conv.bias, conv.stride, conv.padding)
        else:
            out = conv_add_(conv, x, out, weight, with_bias=False)
        del x
        start += channels
    if out is None or start != conv.in_channels:
        raise ValueError(f"parts give {start} channels, the convolution takes {conv.in_channels}")
    return out


def relu(x: Tensor, lean: bool) -> Tensor:
    """ReLU, in place when ``lean`` (``x`` is a fresh intermediate nobody else reads)."""
    return F.relu_(x) if lean else F.relu(x)


def merge(conv: nn.Conv2d, parts: Sequence[Tensor | Callable[[], Tensor]], lean: bool) -> Tensor:
    """``conv`` of the concatenated ``parts`` (a callable part is built when needed); ``lean``:
    as a sum of per-part convolutions (:func:`conv_of_parts`), with no concatenation."""
    if lean:
        return conv_of_parts(conv, parts)
    return conv(torch.cat([part() if callable(part) else part for part in parts], dim=1))


def project_up(conv: nn.Conv2d, x: Tensor, factor: int, lean: bool) -> Tensor:
    """A 1x1 ``conv`` of ``x`` upsampled by ``factor``; ``lean``: the 1x1 first, on ``factor**2``
    times fewer pixels (both are linear and bicubic weights sum to one, so they commute)."""
    return upsample(conv(x), factor) if lean else conv(upsample(x, factor))


class ResBlock(nn.Module):
    """conv-ReLU-conv with an identity skip: ``x + res_scale * body(x)``."""

    def __init__(self, n_feats: int, res_scale: float = 1.0) -> None:
        super().__init__()
        self.res_scale = res_scale
        self.conv1 = conv3x3(n_feats, n_feats)
        self.conv2 = conv3x3(n_feats, n_feats)

    def forward(self, x: Tensor, overwrite: bool = False) -> Tensor:
        """``overwrite``: add into ``x`` itself (inference, the caller gives ``x`` up)."""
        body = conv_relu(self.conv1, x, in_place=True)
        if self.res_scale != 1:
            body = self.conv2(body).mul_(self.res_scale)
            return x.add_(body) if overwrite else body.add_(x)
        return conv_add_(self.conv2, body, x) if overwrite else conv_then_add(self.conv2, body, x)


def res_blocks(count: int, n_feats: int, res_scale: float) -> nn.ModuleList:
    return nn.ModuleList(ResBlock(n_feats, res_scale) for _ in range(count))


def run_blocks(blocks: nn.ModuleList, x: Tensor, lean: bool, consume: bool = False) -> Tensor:
    """The residual blocks in turn. ``lean``: every block after the first adds into its input in
    place, and the first too when ``consume`` (the caller gives ``x`` up)."""
    for position, block in enumerate(blocks):
        x = block(x, overwrite=lean and (consume or position > 0))
    return x


class SFE(nn.Module):
    """Shallow feature extraction: conv + ReLU, residual blocks, conv, global skip."""

    def __init__(self, num_blocks: int, n_feats: int, res_scale: float) -> None:
        super().__init__()
        self.conv_head = conv3x3(3, n_feats)
        self.RBs = res_blocks(num_blocks, n_feats, res_scale)
        self.conv_tail = conv3x3(n_feats, n_feats)

    def forward(self, x: Tensor, lean: bool = False) -> Tensor:
        x = conv_relu(self.conv_head, x, in_place=lean)
        return conv_then_add(self.conv_tail, run_blocks(self.RBs, x, lean), x)


class CSFI2(nn.Module):
    """Cross-scale feature integration of the x1 and x2 streams."""

    def __init__(self, n_feats: int) -> None:
        super().__init__()
        self.conv12 = conv1x1(n_feats, n_feats)
        self.conv21 = conv3x3(n_feats, n_feats, 2)
        self.conv_merge1 = conv3x3(n_feats * 2, n_feats)
        self.conv_merge2 = conv3x3(n_feats * 2, n_feats)

    def forward(self, x1: Tensor, x2: Tensor, lean: bool = False) -> tuple[Tensor, Tensor]:
        x21 = lambda: conv_relu(self.conv21, x2, in_place=lean)  # noqa: E731
        x12 = lambda: relu(project_up(self.conv12, x1, 2, lean), lean)  # noqa: E731
        out1 = relu(merge(self.conv_merge1, [x1, x21], lean), lean)
        out2 = relu(merge(self.conv_merge2, [x2, x12], lean), lean)
        return out1, out2


class CSFI3(nn.Module):
    """Cross-scale feature integration of the x1, x2 and x4 streams."""

    def __init__(self, n_feats: int) -> None:
        super().__init__()
        self.conv12 = conv1x1(n_feats, n_feats)
        self.conv13 = conv1x1(n_feats, n_feats)
        self.conv21 = conv3x3(n_feats, n_feats, 2)
        self.conv23 = conv1x1(n_feats, n_feats)
        self.conv31_1 = conv3x3(n_feats, n_feats, 2)
        self.conv31_2 = conv3x3(n_feats, n_feats, 2)
        self.conv32 = conv3x3(n_feats, n_feats, 2)
        self.conv_merge1 = conv3x3(n_feats * 3, n_feats)
        self.conv_merge2 = conv3x3(n_feats * 3, n_feats)
        self.conv_merge3 = conv3x3(n_feats * 3, n_feats)

    def forward(
        self, x1: Tensor, x2: Tensor, x3: Tensor, lean: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        def down(conv: nn.Conv2d, x: Tensor) -> Callable[[], Tensor]:
            return lambda: conv_relu(conv, x, in_place=lean)

        def up(conv: nn.Conv2d, x: Tensor, factor: int) -> Callable[[], Tensor]:
            return lambda: relu(project_up(conv, x, factor, lean), lean)

        x31 = lambda: conv_relu(  # noqa: E731
            self.conv31_2, conv_relu(self.conv31_1, x3, in_place=lean), in_place=lean
        )
        out1 = merge(self.conv_merge1, [x1, down(self.conv21, x2), x31], lean)
        out2 = merge(self.conv_merge2, [x2, up(self.conv12, x1, 2), down(self.conv32, x3)], lean)
        out3 = merge(self.conv_merge3, [x3, up(self.conv13, x1, 4), up(self.conv23, x2, 2)], lean)
        return relu(out1, lean), relu(out2, lean), relu(out3, lean)


class MergeTail(nn.Module):
    """Merge the three streams at x4 and map to RGB in [-1, 1]."""

    def __init__(self, n_feats: int) -> None:
        super().__init__()
        self.conv13 = conv1x1(n_feats, n_feats)
        self.conv23 = conv1x1(n_feats, n_feats)
        self.conv_merge = conv3x3(n_feats * 3, n_feats)
        self.conv_tail1 = conv3x3(n_feats, n_feats // 2)
        self.conv_tail2 = conv1x1(n_feats // 2, 3)

    def forward(
        self, x1: Tensor, x2: Tensor, x3: Tensor, skip: Tensor | None = None, lean: bool = False
    ) -> Tensor:
        x13 = lambda: relu(project_up(self.conv13, x1, 4, lean), lean)  # noqa: E731
        x23 = lambda: relu(project_up(self.conv23, x2, 2, lean), lean)  # noqa: E731
        x = relu(merge(self.conv_merge, [x3, x13, x23], lean), lean)
        x = self.conv_tail1(x)
        if x.dtype in REDUCED_FLOATS:
            # The RGB layer in float32: the image is not rounded to a reduced precision's 8 bits.
            tail = self.conv_tail2
            x = F.conv2d(x.float(), tail.weight.float(), tail.bias.float())
        else:
            x = self.conv_tail2(x)
        if skip is not None:
            x = x.add_(skip)
        return x.clamp_(-1, 1) if lean else torch.clamp(x, -1, 1)


class Generator(nn.Module):
    """TTSR's main network: LR image plus transferred textures -> x4 image in [-1, 1].

    Args:
        num_res_blocks: residual blocks of SFE, stage x1, stage x2 (per stream), stage x4
            (per stream). The released model uses ``(16, 16, 8, 4)``.
        n_feats: feature width (64 in the released model).
        res_scale: residual scaling inside the blocks.
        use_texture: fuse the transferred textures. ``False`` builds the same network without its
            texture path (no fusion convolutions), a single-image baseline for ablations.
        bicubic_skip: add the bicubic upsampled LR to the output (a global residual; not in the
            released model, off by default). Training converges much faster with it.
    """

    def __init__(
        self,
        num_res_blocks: Sequence[int] = DEFAULT_BLOCKS,
        n_feats: int = 64,
        res_scale: float = 1.0,
        use_texture: bool = True,
        bicubic_skip: bool = False,
    ) -> None:
        super().__init__()
        if len(num_res_blocks) != 4:
            raise ValueError(f"num_res_blocks needs 4 counts, got {tuple(num_res_blocks)}")
        self.num_res_blocks = tuple(int(n) for n in num_res_blocks)
        self.n_feats = n_feats
        self.use_texture = use_texture
        self.bicubic_skip = bicubic_skip
        sfe, stage1, stage2, stage3 = self.num_res_blocks
        c3, c2, c1 = TEXTURE_CHANNELS

        self.SFE = SFE(sfe, n_feats, res_scale)
        self._add_stage(1, stage1, c3, res_scale)
        self.conv12 = conv3x3(n_feats, n_feats * 4)
        self.ps12 = nn.PixelShuffle(2)
        self._add_stage(2, stage2, c2, res_scale, CSFI2(n_feats))
        self.conv23 = conv3x3(n_feats, n_feats * 4)
        self.ps23 = nn.PixelShuffle(2)
        self._add_stage(3, stage3, c1, res_scale, CSFI3(n_feats))
        self.merge_tail = MergeTail(n_feats)

    def _add_stage(
        self,
        stage: int,
        blocks: int,
        channels: int,
        res_scale: float,
        csfi: nn.Module | None = None,
    ) -> None:
        """Stage ``stage`` (1, 2, 3 at x1, x2, x4) with ``stage`` streams, in the released order
        and names: the texture fusion head ``conv{s}{s}_head`` (``channels`` texture channels),
        the cross-scale integration (``ex12``, ``ex123``), per stream ``RB{s}{i}`` and then
        per stream ``conv{s}{i}_tail``."""
        n_feats = self.n_feats
        if self.use_texture:
            setattr(self, f"conv{stage}{stage}_head", conv3x3(channels + n_feats, n_feats))
        if csfi is not None:
            setattr(self, "ex12" if stage == 2 else "ex123", csfi)
        for stream in range(1, stage + 1):
            setattr(self, f"RB{stage}{stream}", res_blocks(blocks, n_feats, res_scale))
        for stream in range(1, stage + 1):
            setattr(self, f"conv{stage}{stream}_tail", conv3x3(n_feats, n_feats))

    def forward(
        self,
        lr: Tensor,
        textures: TransferResult | None = None,
        lrsr: Tensor | None = None,
        lean: bool = False,
    ) -> Tensor:
        """``lr`` ``[B, 3, H, W]`` in [-1, 1] and transferred ``textures`` -> ``[B, 3, 4H, 4W]``.

        ``lrsr`` (the bicubic x4 of ``lr``) is needed only with ``bicubic_skip``.

        The layers compute in their weights' dtype (:meth:`ttsr.model.TTSR.set_precision`);
        with a reduced precision, ``lr`` and the textures are converted as they enter, the
        activations are channels-last, and the RGB output layer and ``lrsr`` stay float32.

        ``lean`` (inference, without autograd) computes the same function to float rounding in
        less memory and time: convolutions of concatenations as sums of per-part convolutions,
        1x1 convolutions before the bicubic upsampling, activations and residual additions in
        place, and each texture map taken out of ``textures`` (set to ``None``) once fused, so
        that it is freed then if the caller holds no other reference to it (the x4 map is as
        large as a feature map of the x4 stage).
        """
        if lean and torch.is_grad_enabled():
            raise RuntimeError("lean=True is for inference: run it under torch.no_grad()")
        if self.use_texture and (
            textures is None
            or textures.t_lv1 is None
            or textures.t_lv2 is None
            or textures.t_lv3 is None
        ):
            raise ValueError("this generator fuses textures: pass the transferred textures")
        if self.bicubic_skip and lrsr is None:
            raise ValueError("this generator adds the bicubic image: pass lrsr")

        def fuse(x: Tensor, level: str, scale: int, head: nn.Conv2d) -> Tensor:
            """Soft-attention fusion: ``x + conv(cat(x, T)) * S``."""
            assert textures is not None
            attention = textures.soft_attention
            attention = attention if scale == 1 else upsample(attention, scale)
            attention = to_compute(attention, dtype)
            texture = getattr(textures, level)
            if lean:
                setattr(textures, level, None)
            texture = to_compute(texture, dtype)  # the float32 map is freed here when lean
            return merge(head, [x, texture], lean).mul_(attention).add_(x)

        texture = self.use_texture
        dtype = self.SFE.conv_head.weight.dtype
        x11 = self.SFE(to_compute(lr, dtype), lean)
        if texture:
            x11 = fuse(x11, "t_lv3", 1, self.conv11_head)
        x11 = conv_then_add(self.conv11_tail, run_blocks(self.RB11, x11, lean), x11)

        x22 = self.ps12(conv_relu(self.conv12, x11, in_place=lean))
        if texture:
            x22 = fuse(x22, "t_lv2", 2, self.conv22_head)
        x21_res, x22_res = self.ex12(x11, x22, lean)
        x21 = conv_then_add(self.conv21_tail, run_blocks(self.RB21, x21_res, lean, True), x11)
        del x11, x21_res
        x22 = conv_then_add(self.conv22_tail, run_blocks(self.RB22, x22_res, lean, True), x22)
        del x22_res

        x33 = self.ps23(conv_relu(self.conv23, x22, in_place=lean))
        if texture:
            x33 = fuse(x33, "t_lv1", 4, self.conv33_head)
        x31_res, x32_res, x33_res = self.ex123(x21, x22, x33, lean)
        x31 = conv_then_add(self.conv31_tail, run_blocks(self.RB31, x31_res, lean, True), x21)
        del x21, x31_res
        x32 = conv_then_add(self.conv32_tail, run_blocks(self.RB32, x32_res, lean, True), x22)
        del x22, x32_res
        x33 = conv_then_add(self.conv33_tail, run_blocks(self.RB33, x33_res, lean, True), x33)
        del x33_res
        return self.merge_tail(x31, x32, x33, lrsr if self.bicubic_skip else None, lean)
