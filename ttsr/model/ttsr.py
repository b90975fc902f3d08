"""The TTSR network: texture extractor + search/transfer + generator."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ttsr.model.config import RELEASED, Divisor, TTSRConfig
from ttsr.model.deformable_transfer import DeformableTransfer
from ttsr.model.extractor import TextureExtractor
from ttsr.model.fast_search_transfer import FastSearchTransfer
from ttsr.model.fused_ops import REDUCED_FLOATS, to_compute
from ttsr.model.generator import Generator
from ttsr.model.search_transfer import SearchTransfer, TransferResult
from ttsr.runtime import Runtime

#: Implementations of the search/transfer step; they compute the same result.
SEARCH_IMPLEMENTATIONS = ("straightforward", "fast")

#: Smallest reference side (pixels): one relu3_1 position needs a 4x4 reference.
MIN_REFERENCE_SIDE = 4


@dataclass(frozen=True)
class TTSROutput:
    """What one forward pass returns.

    ``sr`` ``[B, 3, 4H, 4W]`` in [-1, 1]; ``soft_attention`` ``[B, 1, H, W]``; textures ``t_lv3``
    ``[B, 256, H, W]``, ``t_lv2`` ``[B, 128, 2H, 2W]``, ``t_lv1`` ``[B, 64, 4H, 4W]``; ``index``
    ``[B, H, W]``: best reference position (row-major over the relu3_1 grids of the references,
    concatenated in order). Textures, attention and index are ``None`` for a texture-less model.
    """

    sr: Tensor
    soft_attention: Tensor | None = None
    t_lv3: Tensor | None = None
    t_lv2: Tensor | None = None
    t_lv1: Tensor | None = None
    index: Tensor | None = None


@dataclass(frozen=True)
class ReferenceFeatures:
    """Texture-extractor features of the reference(s), computed once and reused across LR tiles.

    One list entry per reference: ``refsr_lv3`` (relu3_1 of Ref-down-up, ``[B, 256, Hr, Wr]``),
    ``ref_lv1``/``ref_lv2``/``ref_lv3`` (relu1_1, relu2_1, relu3_1 of the reference).
    """

    refsr_lv3: list[Tensor]
    ref_lv1: list[Tensor]
    ref_lv2: list[Tensor]
    ref_lv3: list[Tensor]


def build_search_transfer(implementation: str, divisor: Divisor) -> nn.Module:
    """The search/transfer module: ``"straightforward"`` (the definition) or ``"fast"``."""
    if implementation == "straightforward":
        return SearchTransfer(divisor)
    if implementation == "fast":
        return FastSearchTransfer(divisor)
    raise ValueError(f"search must be one of {SEARCH_IMPLEMENTATIONS}, not {implementation!r}")


def full_precision(device: torch.device) -> torch.autocast:
    """Autocast off: the search compares relevances in float32 even under mixed precision
    (bf16 features would turn near-ties into different best patches), and its fast path keeps
    its own float32 tables."""
    return torch.autocast(device.type, enabled=False)


def at_least_float32(*features: Tensor | list[Tensor]) -> list[Tensor | list[Tensor]]:
    """Features for the search: bf16/fp16 ones (from autocast) as float32, others unchanged
    (a float64 model keeps float64)."""

    def widen(feature: Tensor) -> Tensor:
        if feature.dtype not in REDUCED_FLOATS:
            return feature
        return feature.to(torch.float32, memory_format=torch.contiguous_format)

    return [[widen(f) for f in x] if isinstance(x, list) else widen(x) for x in features]


def crop_to_multiple_of_4(image: Tensor) -> Tensor:
    """Crop ``[B, C, H, W]`` at the bottom/right to sides divisible by 4 (as the released code)."""
    height, width = image.shape[-2:]
    return image[..., : height // 4 * 4, : width // 4 * 4]


def check_inputs(lr: Tensor, lrsr: Tensor, refs: list[Tensor], refsrs: list[Tensor]) -> None:
    """Raise ``ValueError`` for empty, mis-shaped or too-small inputs."""
    if lr.dim() != 4 or lr.size(1) != 3 or lr.numel() == 0:
        raise ValueError(f"lr must be a non-empty [B, 3, H, W] tensor, got {tuple(lr.shape)}")
    expected = (lr.size(0), 3, lr.size(2) * 4, lr.size(3) * 4)
    if tuple(lrsr.shape) != expected:
        raise ValueError(f"lrsr must be the x4 upsampled lr {expected}, got {tuple(lrsr.shape)}")
    if not refs or len(refs) != len(refsrs):
        raise ValueError("give one refsr for each reference, and at least one reference")
    for ref, refsr in zip(refs, refsrs, strict=True):
        if ref.dim() != 4 or ref.size(1) != 3 or ref.size(0) != lr.size(0):
            raise ValueError(
                f"reference must be [B, 3, H, W] with B={lr.size(0)}, got {tuple(ref.shape)}"
            )
        if min(ref.shape[-2:]) < MIN_REFERENCE_SIDE:
            raise ValueError(
                f"reference {tuple(ref.shape[-2:])} is too small: each side needs at "
                f"least {MIN_REFERENCE_SIDE} pixels"
            )
        if refsr.shape != ref.shape:
            raise ValueError(
                f"refsr {tuple(refsr.shape)} must match its reference {tuple(ref.shape)}"
            )


class TTSR(nn.Module):
    """Texture Transformer Network for x4 reference-based super-resolution.

    Args:
        config: the architecture (:class:`~ttsr.model.config.TTSRConfig`), kept as ``config``.
        search: ``"fast"`` or ``"straightforward"`` (the definition) search/transfer: the same
            result, not a weight.
        extractor_init: texture extractor initialisation (see :class:`TextureExtractor`).
    """

    def __init__(
        self,
        config: TTSRConfig = RELEASED,
        search: str = "fast",
        extractor_init: str | Path = "random",
    ) -> None:
        super().__init__()
        self.config = config
        self.generator = Generator(
            config.num_res_blocks,
            config.n_feats,
            config.res_scale,
            config.use_texture,
            config.bicubic_skip,
        )
        self.extractor = TextureExtractor(extractor_init)
        self.search = search
        self.search_transfer = build_search_transfer(search, config.divisor)
        self.deformable_transfer: DeformableTransfer | None = None
        if config.transfer == "deformable" and config.use_texture:
            self.deformable_transfer = DeformableTransfer(
                config.offset_groups, divisor=config.divisor
            )

    def set_precision(self, dtype: torch.dtype) -> None:
        """Convert the generator's and the texture extractor's convolution weights to ``dtype``
        for inference (in place, once): ``torch.bfloat16`` or ``torch.float16`` run their
        activations channels-last in that dtype, while the search still compares relevances in
        float32 and the output layer stays float32. Converting back to float32 does not restore
        the rounded weights: load the checkpoint again for that."""
        memory_format = torch.channels_last if dtype in REDUCED_FLOATS else torch.contiguous_format
        for module in (self.generator, self.extractor):
            for layer in module.modules():
                if isinstance(layer, nn.Conv2d):
                    layer.to(dtype=dtype, memory_format=memory_format)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the generator and extractor compute in (:meth:`set_precision`)."""
        return self.generator.SFE.conv_head.weight.dtype

    def set_search(self, implementation: str) -> None:
        """Switch the search/transfer implementation (they hold no weights)."""
        self.search_transfer = build_search_transfer(implementation, self.config.divisor)
        self.search = implementation

    def extract_reference_features(
        self, refs: Sequence[Tensor], refsrs: Sequence[Tensor]
    ) -> ReferenceFeatures:
        """Extractor features of references in [-1, 1] (sides multiples of 4), computed once,
        at least float32 (for the search and the transfer)."""
        refsr_lv3 = [self.extractor((r.detach() + 1.0) / 2.0)[2] for r in refsrs]
        levels = [self.extractor((r.detach() + 1.0) / 2.0) for r in refs]
        features = at_least_float32(
            refsr_lv3, [lv[0] for lv in levels], [lv[1] for lv in levels], [lv[2] for lv in levels]
        )
        return ReferenceFeatures(*features)  # type: ignore[arg-type]

    def transfer_textures(
        self, lrsr: Tensor, references: ReferenceFeatures, runtime: Runtime | None = None
    ) -> TransferResult:
        """Search the references for every LR-up patch and transfer their textures.

        ``lrsr`` ``[B, 3, 4H, 4W]`` in [-1, 1]; ``references`` from
        :meth:`extract_reference_features`; ``runtime`` as for :meth:`forward`.
        """
        lrsr_lv1, lrsr_lv2, lrsr_lv3 = self.extractor((lrsr.detach() + 1.0) / 2.0)
        if self.deformable_transfer is None:
            del lrsr_lv1, lrsr_lv2  # the hard transfer needs relu3_1 only
            (lrsr_lv3,) = at_least_float32(lrsr_lv3)  # the references are widened already
            with full_precision(lrsr.device):
                return self.search_transfer.search_and_transfer(
                    lrsr_lv3,
                    references.refsr_lv3,
                    references.ref_lv1,
                    references.ref_lv2,
                    references.ref_lv3,
                    runtime=runtime,
                )
        # The head samples the references itself: search only, no hard textures.
        with full_precision(lrsr.device):
            soft_attention, index = self.search_transfer.search_only(
                *at_least_float32(lrsr_lv3), references.refsr_lv3, runtime=runtime
            )
        t_lv3, t_lv2, t_lv1 = self.deformable_transfer(
            index,
            *at_least_float32(lrsr_lv1, lrsr_lv2, lrsr_lv3),  # the head stays float32
            references.ref_lv1,
            references.ref_lv2,
            references.ref_lv3,
        )
        return TransferResult(
            soft_attention=soft_attention, t_lv3=t_lv3, t_lv2=t_lv2, t_lv1=t_lv1, index=index
        )

    def forward_with_reference_features(
        self,
        lr: Tensor,
        lrsr: Tensor,
        references: ReferenceFeatures,
        runtime: Runtime | None = None,
        lean: bool = False,
    ) -> TTSROutput:
        """:meth:`forward` with precomputed reference features (no input checks)."""
        return self._generate(lr, lrsr, self.transfer_textures(lrsr, references, runtime), lean)

    def _generate(
        self, lr: Tensor, lrsr: Tensor, textures: TransferResult, lean: bool
    ) -> TTSROutput:
        dtype = self.compute_dtype
        if dtype in REDUCED_FLOATS:  # each float32 map is freed as its copy is made
            for level in ("t_lv3", "t_lv2", "t_lv1"):
                texture = getattr(textures, level)
                setattr(textures, level, None)
                setattr(textures, level, to_compute(texture, dtype))
                del texture
        sr = self.generator(lr, textures, lrsr, lean=lean)  # lean: takes the maps out
        return TTSROutput(
            sr=sr,
            soft_attention=textures.soft_attention,
            t_lv3=textures.t_lv3,
            t_lv2=textures.t_lv2,
            t_lv1=textures.t_lv1,
            index=textures.index,
        )

    def forward(
        self,
        lr: Tensor,
        lrsr: Tensor,
        ref: Tensor | Sequence[Tensor],
        refsr: Tensor | Sequence[Tensor],
        runtime: Runtime | None = None,
        lean: bool = False,
    ) -> TTSROutput:
        """Super-resolve ``lr`` ``[B, 3, H, W]`` (in [-1, 1]) with one or several references.

        ``lrsr`` is ``lr`` bicubic-upsampled x4; ``ref`` the reference(s) and ``refsr`` each
        reference bicubic-downsampled x4 and upsampled back. References of any size at least 4x4
        are accepted; sides that are not multiples of 4 are cropped at the bottom/right.

        ``runtime`` (:mod:`ttsr.runtime`) runs the fast search's CPU work, owned by the caller;
        without one, plain PyTorch (the same result). ``lean`` (inference, under
        ``torch.no_grad()``): the generator's lean forward, which frees each texture map once
        fused, so ``t_lv*`` are left out of the output.
        """
        refs = [ref] if isinstance(ref, Tensor) else list(ref)
        refsrs = [refsr] if isinstance(refsr, Tensor) else list(refsr)
        check_inputs(lr, lrsr, refs, refsrs)
        if not self.config.use_texture:
            return TTSROutput(sr=self.generator(lr, lrsr=lrsr, lean=lean))
        refs = [crop_to_multiple_of_4(r) for r in refs]
        refsrs = [crop_to_multiple_of_4(r) for r in refsrs]
        # The reference features die before the generator runs, where the peak is.
        references = self.extract_reference_features(refs, refsrs)
        textures = self.transfer_textures(lrsr, references, runtime)
        del references
        return self._generate(lr, lrsr, textures, lean)
