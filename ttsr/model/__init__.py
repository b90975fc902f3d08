"""TTSR building blocks: texture extractor, search/transfer, generator, discriminator."""

from ttsr.model.config import TTSRConfig
from ttsr.model.extractor import TextureExtractor
from ttsr.model.generator import Generator
from ttsr.model.search_transfer import SearchTransfer
from ttsr.model.ttsr import TTSR, TTSROutput

__all__ = ["TTSR", "TTSRConfig", "TTSROutput", "Generator", "SearchTransfer", "TextureExtractor"]
