"""TTSR's generator: shallow features, soft-attention fusion at x1/x2/x4, cross-scale integration.

Module and attribute names follow the released ``MainNet`` so that its weights load one-to-one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ttsr.model.config import DEFAULT_BLOCKS

#: Channels of the relu3_1, relu2_1, relu1_1 textures fused at x1, x2, x4.
TEXTURE_CHANNELS = (256, 128, 64)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)


def conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1)


def upsample(x: Tensor, factor: int) -> Tensor:
    """Bicubic upsampling as the released code does it (``align_corners=False``)."""
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
        y = F.conv2d(x, weight, conv.bias if out is None else None, conv.stride, conv.padding)
        del x
        out = y if out is None else out.add_(y)
        start += channels
    if out is None or start != conv.in_channels:
        raise ValueError(f"parts give {start} channels, the convolution takes {conv.in_channels}")
    return out


class ResBlock(nn.Module):
    """conv-ReLU-conv with an identity skip: ``x + res_scale * body(x)``."""

    def __init__(self, n_feats: int, res_scale: float = 1.0) -> None:
        super().__init__()
        self.res_scale = res_scale
        self.conv1 = conv3x3(n_feats, n_feats)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(n_feats, n_feats)
        #: Under no_grad, compute in place (same values, fewer temporaries).
        self.lean_inference = True

    def forward(self, x: Tensor) -> Tensor:
        if self.lean_inference and not torch.is_grad_enabled():
            return self._body(x).add_(x)  # same values, no temporaries beyond the body
        return x + self.conv2(self.relu(self.conv1(x))) * self.res_scale

    def _body(self, x: Tensor) -> Tensor:
        body = self.conv2(self.relu(self.conv1(x)))
        return body if self.res_scale == 1 else body.mul_(self.res_scale)

    def add_in_place(self, x: Tensor) -> Tensor:
        """``x += res_scale * body(x)``, overwriting ``x`` (inference; the caller gives it up)."""
        return x.add_(self._body(x))


def res_blocks(count: int, n_feats: int, res_scale: float) -> nn.ModuleList:
    return nn.ModuleList(ResBlock(n_feats, res_scale) for _ in range(count))


def run_blocks(blocks: nn.ModuleList, x: Tensor, consume: bool = False) -> Tensor:
    """The residual blocks in turn. Under no_grad (lean inference) every block after the first
    adds into its input in place, and the first too when ``consume`` (the caller gives ``x`` up)."""
    lean = not torch.is_grad_enabled()
    for position, block in enumerate(blocks):
        if lean and block.lean_inference and (consume or position > 0):
            x = block.add_in_place(x)
        else:
            x = block(x)
    return x


class SFE(nn.Module):
    """Shallow feature extraction: conv + ReLU, residual blocks, conv, global skip."""

    def __init__(self, num_blocks: int, n_feats: int, res_scale: float) -> None:
        super().__init__()
        self.conv_head = conv3x3(3, n_feats)
        self.RBs = res_blocks(num_blocks, n_feats, res_scale)
        self.conv_tail = conv3x3(n_feats, n_feats)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv_head(x))
        return x + self.conv_tail(run_blocks(self.RBs, x))


class CSFI2(nn.Module):
    """Cross-scale feature integration of the x1 and x2 streams."""

    def __init__(self, n_feats: int) -> None:
        super().__init__()
        self.conv12 = conv1x1(n_feats, n_feats)
        self.conv21 = conv3x3(n_feats, n_feats, 2)
        self.conv_merge1 = conv3x3(n_feats * 2, n_feats)
        self.conv_merge2 = conv3x3(n_feats * 2, n_feats)

    def forward(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
        x12 = F.relu(self.conv12(upsample(x1, 2)))
        x21 = F.relu(self.conv21(x2))
        out1 = F.relu(self.conv_merge1(torch.cat((x1, x21), dim=1)))
        out2 = F.relu(self.conv_merge2(torch.cat((x2, x12), dim=1)))
        return out1, out2

    def lean(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`forward` for inference: no concatenations, branches freed as used."""
        out1 = F.relu_(conv_of_parts(self.conv_merge1, [x1, lambda: F.relu_(self.conv21(x2))]))
        x12 = lambda: F.relu_(upsample(self.conv12(x1), 2))  # noqa: E731
        return out1, F.relu_(conv_of_parts(self.conv_merge2, [x2, x12]))


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

    def forward(self, x1: Tensor, x2: Tensor, x3: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x12 = F.relu(self.conv12(upsample(x1, 2)))
        x13 = F.relu(self.conv13(upsample(x1, 4)))
        x21 = F.relu(self.conv21(x2))
        x23 = F.relu(self.conv23(upsample(x2, 2)))
        x31 = F.relu(self.conv31_2(F.relu(self.conv31_1(x3))))
        x32 = F.relu(self.conv32(x3))
        out1 = F.relu(self.conv_merge1(torch.cat((x1, x21, x31), dim=1)))
        out2 = F.relu(self.conv_merge2(torch.cat((x2, x12, x32), dim=1)))
        out3 = F.relu(self.conv_merge3(torch.cat((x3, x13, x23), dim=1)))
        return out1, out2, out3

    def lean(self, x1: Tensor, x2: Tensor, x3: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`forward` for inference: no concatenations, branches freed as used."""
        out1 = conv_of_parts(
            self.conv_merge1,
            [
                x1,
                lambda: F.relu_(self.conv21(x2)),
                lambda: F.relu_(self.conv31_2(F.relu_(self.conv31_1(x3)))),
            ],
        )
        out2 = conv_of_parts(
            self.conv_merge2,
            [x2, lambda: F.relu_(upsample(self.conv12(x1), 2)), lambda: F.relu_(self.conv32(x3))],
        )
        out3 = conv_of_parts(
            self.conv_merge3,
            [
                x3,
                lambda: F.relu_(upsample(self.conv13(x1), 4)),
                lambda: F.relu_(upsample(self.conv23(x2), 2)),
            ],
        )
        return F.relu_(out1), F.relu_(out2), F.relu_(out3)


class MergeTail(nn.Module):
    """Merge the three streams at x4 and map to RGB in [-1, 1]."""

    def __init__(self, n_feats: int) -> None:
        super().__init__()
        self.conv13 = conv1x1(n_feats, n_feats)
        self.conv23 = conv1x1(n_feats, n_feats)
        self.conv_merge = conv3x3(n_feats * 3, n_feats)
        self.conv_tail1 = conv3x3(n_feats, n_feats // 2)
        self.conv_tail2 = conv1x1(n_feats // 2, 3)

    def forward(self, x1: Tensor, x2: Tensor, x3: Tensor, skip: Tensor | None = None) -> Tensor:
        x13 = F.relu(self.conv13(upsample(x1, 4)))
        x23 = F.relu(self.conv23(upsample(x2, 2)))
        x = F.relu(self.conv_merge(torch.cat((x3, x13, x23), dim=1)))
        x = self.conv_tail2(self.conv_tail1(x))
        return torch.clamp(x if skip is None else x + skip, -1, 1)

    def lean(self, x1: Tensor, x2: Tensor, x3: Tensor, skip: Tensor | None = None) -> Tensor:
        """:meth:`forward` for inference: no concatenation, branches freed as used."""
        x = conv_of_parts(
            self.conv_merge,
            [
                x3,
                lambda: F.relu_(upsample(self.conv13(x1), 4)),
                lambda: F.relu_(upsample(self.conv23(x2), 2)),
            ],
        )
        x = self.conv_tail2(self.conv_tail1(F.relu_(x)))
        return (x if skip is None else x.add_(skip)).clamp_(-1, 1)


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
        if use_texture:
            self.conv11_head = conv3x3(c3 + n_feats, n_feats)
        self.RB11 = res_blocks(stage1, n_feats, res_scale)
        self.conv11_tail = conv3x3(n_feats, n_feats)

        self.conv12 = conv3x3(n_feats, n_feats * 4)
        self.ps12 = nn.PixelShuffle(2)
        if use_texture:
            self.conv22_head = conv3x3(c2 + n_feats, n_feats)
        self.ex12 = CSFI2(n_feats)
        self.RB21 = res_blocks(stage2, n_feats, res_scale)
        self.RB22 = res_blocks(stage2, n_feats, res_scale)
        self.conv21_tail = conv3x3(n_feats, n_feats)
        self.conv22_tail = conv3x3(n_feats, n_feats)

        self.conv23 = conv3x3(n_feats, n_feats * 4)
        self.ps23 = nn.PixelShuffle(2)
        if use_texture:
            self.conv33_head = conv3x3(c1 + n_feats, n_feats)
        self.ex123 = CSFI3(n_feats)
        self.RB31 = res_blocks(stage3, n_feats, res_scale)
        self.RB32 = res_blocks(stage3, n_feats, res_scale)
        self.RB33 = res_blocks(stage3, n_feats, res_scale)
        self.conv31_tail = conv3x3(n_feats, n_feats)
        self.conv32_tail = conv3x3(n_feats, n_feats)
        self.conv33_tail = conv3x3(n_feats, n_feats)

        self.merge_tail = MergeTail(n_feats)
        self.lean_inference = True

    @property
    def lean_inference(self) -> bool:
        """Whether forward under no_grad takes the lean path (:meth:`_forward_lean`); on by
        default, off only to measure against the plain one (``scripts/benchmark.py``)."""
        return self._lean_inference

    @lean_inference.setter
    def lean_inference(self, enabled: bool) -> None:
        self._lean_inference = bool(enabled)
        for module in self.modules():
            if isinstance(module, ResBlock):
                module.lean_inference = bool(enabled)

    @staticmethod
    def _fuse(x: Tensor, texture: Tensor, attention: Tensor, head: nn.Conv2d) -> Tensor:
        """Soft-attention fusion: ``x + conv(cat(x, T)) * S``."""
        return x + head(torch.cat((x, texture), dim=1)) * attention

    def forward(
        self,
        lr: Tensor,
        soft_attention: Tensor | None = None,
        t_lv3: Tensor | None = None,
        t_lv2: Tensor | None = None,
        t_lv1: Tensor | None = None,
        lrsr: Tensor | None = None,
    ) -> Tensor:
        """``lr`` ``[B, 3, H, W]`` in [-1, 1] (+ S and textures) -> ``[B, 3, 4H, 4W]``.

        ``lrsr`` (the bicubic x4 of ``lr``) is needed only with ``bicubic_skip``.
        """
        if self.use_texture and (
            soft_attention is None or t_lv1 is None or t_lv2 is None or t_lv3 is None
        ):
            raise ValueError("this generator fuses textures: pass soft_attention and t_lv1..3")
        if self.bicubic_skip and lrsr is None:
            raise ValueError("this generator adds the bicubic image: pass lrsr")
        if self.lean_inference and not torch.is_grad_enabled():
            textures = {"t_lv3": t_lv3, "t_lv2": t_lv2, "t_lv1": t_lv1}
            return self._forward_lean(lr, soft_attention, textures, lrsr)
        x11 = self.SFE(lr)
        if self.use_texture:
            x11 = self._fuse(x11, t_lv3, soft_attention, self.conv11_head)
        x11 = x11 + self.conv11_tail(run_blocks(self.RB11, x11))

        x21 = x11
        x22 = F.relu(self.ps12(self.conv12(x11)))
        if self.use_texture:
            x22 = self._fuse(x22, t_lv2, upsample(soft_attention, 2), self.conv22_head)
        x21_res, x22_res = self.ex12(x21, x22)
        x21 = x21 + self.conv21_tail(run_blocks(self.RB21, x21_res))
        x22 = x22 + self.conv22_tail(run_blocks(self.RB22, x22_res))

        x31, x32 = x21, x22
        x33 = F.relu(self.ps23(self.conv23(x22)))
        if self.use_texture:
            x33 = self._fuse(x33, t_lv1, upsample(soft_attention, 4), self.conv33_head)
        x31_res, x32_res, x33_res = self.ex123(x31, x32, x33)
        x31 = x31 + self.conv31_tail(run_blocks(self.RB31, x31_res))
        x32 = x32 + self.conv32_tail(run_blocks(self.RB32, x32_res))
        x33 = x33 + self.conv33_tail(run_blocks(self.RB33, x33_res))
        return self.merge_tail(x31, x32, x33, lrsr if self.bicubic_skip else None)

    def forward_consuming(
        self,
        lr: Tensor,
        soft_attention: Tensor | None = None,
        textures: dict[str, Tensor | None] | None = None,
        lrsr: Tensor | None = None,
    ) -> Tensor:
        """Inference (no autograd) that takes ``t_lv3``, ``t_lv2``, ``t_lv1`` out of ``textures``
        as it fuses them: a caller that keeps no other reference frees each texture map as soon
        as it is used (the x4 map ``t_lv1`` is as large as a feature map of the x4 stage).
        Otherwise as :meth:`forward`."""
        if torch.is_grad_enabled():
            raise RuntimeError("forward_consuming is for inference: call it under torch.no_grad()")
        textures = {} if textures is None else textures
        if self.use_texture and (
            soft_attention is None
            or any(textures.get(k) is None for k in ("t_lv3", "t_lv2", "t_lv1"))
        ):
            raise ValueError("this generator fuses textures: pass soft_attention and t_lv1..3")
        if self.bicubic_skip and lrsr is None:
            raise ValueError("this generator adds the bicubic image: pass lrsr")
        return self._forward_lean(lr, soft_attention, textures, lrsr)

    def _forward_lean(
        self,
        lr: Tensor,
        soft_attention: Tensor | None,
        textures: dict[str, Tensor | None],
        lrsr: Tensor | None,
    ) -> Tensor:
        """:meth:`forward` without autograd, in less memory and time: convolutions of
        concatenations as sums of per-part convolutions, 1x1 convolutions before the bicubic
        upsampling instead of after (both are linear and bicubic weights sum to one, so they
        commute; the 1x1 then runs on 4 or 16 times fewer pixels), in-place activations and
        additions, every intermediate freed once used. Equal to :meth:`forward` to float
        rounding."""
        texture = self.use_texture

        def fuse(x: Tensor, level: str, scale: int, head: nn.Module) -> Tensor:
            attention = soft_attention if scale == 1 else upsample(soft_attention, scale)
            return conv_of_parts(head, [x, textures.pop(level)]).mul_(attention).add_(x)

        x11 = self.SFE(lr)
        if texture:
            x11 = fuse(x11, "t_lv3", 1, self.conv11_head)
        x11 = self.conv11_tail(run_blocks(self.RB11, x11)).add_(x11)

        x22 = F.relu_(self.ps12(self.conv12(x11)))
        if texture:
            x22 = fuse(x22, "t_lv2", 2, self.conv22_head)
        x21_res, x22_res = self.ex12.lean(x11, x22)
        x21 = self.conv21_tail(run_blocks(self.RB21, x21_res, consume=True)).add_(x11)
        del x11, x21_res
        x22 = self.conv22_tail(run_blocks(self.RB22, x22_res, consume=True)).add_(x22)
        del x22_res

        x33 = F.relu_(self.ps23(self.conv23(x22)))
        if texture:
            x33 = fuse(x33, "t_lv1", 4, self.conv33_head)
        x31_res, x32_res, x33_res = self.ex123.lean(x21, x22, x33)
        x31 = self.conv31_tail(run_blocks(self.RB31, x31_res, consume=True)).add_(x21)
        del x21, x31_res
        x32 = self.conv32_tail(run_blocks(self.RB32, x32_res, consume=True)).add_(x22)
        del x22, x32_res
        x33 = self.conv33_tail(run_blocks(self.RB33, x33_res, consume=True)).add_(x33)
        del x33_res
        return self.merge_tail.lean(x31, x32, x33, lrsr if self.bicubic_skip else None)
