"""ttsr: reference-based x4 super-resolution with a texture transformer (TTSR, CVPR 2020)."""

from ttsr.model import TTSR, Generator, SearchTransfer, TextureExtractor, TTSROutput

__all__ = ["TTSR", "TTSROutput", "Generator", "SearchTransfer", "TextureExtractor"]
__version__ = "0.1.0"
