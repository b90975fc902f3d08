"""The architecture of a TTSR model, in one place: what checkpoints store and the builder reads."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

#: Residual blocks of the released model: SFE, stage x1, stage x2, stage x4.
DEFAULT_BLOCKS = (16, 16, 8, 4)

#: How the fold of transferred patches is averaged: the exact overlap count, or the released /9.
Divisor = Literal["overlap", "constant"]
DIVISORS = ("overlap", "constant")

#: Texture transfer heads: the hard-attention copy, or deformable convolution seeded by it.
TRANSFER_MODES = ("hard", "deformable")

#: Entries added after the first checkpoints were written, with the value those files imply.
LATER_ENTRIES: dict[str, Any] = {"transfer": "hard", "offset_groups": 8}


@dataclass(frozen=True)
class TTSRConfig:
    """Everything that shapes a TTSR model's weights (not how it is run: the search
    implementation and the extractor's initialisation are arguments of :class:`TTSR`).

    Args:
        num_res_blocks: residual blocks of the generator (SFE, x1, x2, x4 stages).
        n_feats: generator width.
        res_scale: residual scaling.
        divisor: ``"overlap"`` (exact fold average) or ``"constant"`` (released code's /9).
        use_texture: ``False`` removes the whole texture path (single-image ablation).
        bicubic_skip: the generator adds the bicubic upsampled LR to its output.
        transfer: ``"hard"`` (TTSR's copy of the best patches) or ``"deformable"`` (the hard
            search seeds a learned deformable transfer, which starts equal to the hard one).
        offset_groups: offset groups of the deformable transfer (divides 64; unused by ``"hard"``).
    """

    num_res_blocks: tuple[int, int, int, int] = DEFAULT_BLOCKS
    n_feats: int = 64
    res_scale: float = 1.0
    divisor: Divisor = "overlap"
    use_texture: bool = True
    bicubic_skip: bool = False
    transfer: str = "hard"
    offset_groups: int = 8

    def __post_init__(self) -> None:
        blocks = tuple(int(n) for n in self.num_res_blocks)
        if len(blocks) != 4 or min(blocks) < 0:
            raise ValueError(f"num_res_blocks must be 4 counts >= 0, got {self.num_res_blocks!r}")
        object.__setattr__(self, "num_res_blocks", blocks)
        if self.divisor not in DIVISORS:
            raise ValueError(f"divisor must be one of {DIVISORS}, not {self.divisor!r}")
        if self.transfer not in TRANSFER_MODES:
            raise ValueError(f"transfer must be one of {TRANSFER_MODES}, not {self.transfer!r}")
        if self.n_feats < 1 or self.offset_groups < 1 or 64 % self.offset_groups:
            raise ValueError("n_feats must be positive and offset_groups must divide 64")

    def to_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint (loadable with ``weights_only=True``)."""
        return {**asdict(self), "num_res_blocks": list(self.num_res_blocks)}

    @classmethod
    def from_dict(cls, entries: Mapping[str, Any]) -> TTSRConfig:
        """The config of a checkpoint's (or hyper-parameters') entries; entries added later take
        the value older files imply; unknown entries are refused (``ValueError``)."""
        unknown = set(entries) - set(CONFIG_ENTRIES)
        if unknown:
            raise ValueError(f"unknown config entries {sorted(unknown)}")
        missing = [k for k in CONFIG_ENTRIES if k not in entries and k not in LATER_ENTRIES]
        if missing:
            raise ValueError(f"config entries missing: {', '.join(missing)}")
        return cls(**{**LATER_ENTRIES, **entries})


#: The entry names of :class:`TTSRConfig`, in order.
CONFIG_ENTRIES = tuple(f.name for f in fields(TTSRConfig))

#: The released model's architecture (``TTSR()`` builds it).
RELEASED = TTSRConfig()
