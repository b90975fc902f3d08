"""ttsr: reference-based x4 super-resolution with a texture transformer (TTSR, CVPR 2020)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ttsr import model
from ttsr.model import *  # noqa: F403 (the model's public names: ttsr.model.__all__)

if TYPE_CHECKING:
    from ttsr.inference import Upscaler, UpscaleResult

__all__ = [*model.__all__, "Upscaler", "UpscaleResult"]
__version__ = "0.1.0"

#: Names imported from :mod:`ttsr.inference` on first use, so that ``import ttsr`` stays light.
_LAZY = {"Upscaler", "UpscaleResult"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from ttsr import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'ttsr' has no attribute {name!r}")
