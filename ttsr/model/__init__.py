"""TTSR building blocks: texture extractor, search/transfer, generator, discriminator.

``SearchTransfer`` is the definition of the texture search and transfer; ``FastSearchTransfer``
is its fast, bounded-memory equivalent (same result), the one :class:`TTSR` runs by default.
"""

from ttsr.model.config import TTSRConfig
from ttsr.model.extractor import TextureExtractor
from ttsr.model.fast_search_transfer import FastSearchTransfer
from ttsr.model.generator import Generator
from ttsr.model.search_transfer import SearchTransfer
from ttsr.model.ttsr import TTSR, TTSROutput

__all__ = [
    "TTSR",
    "TTSRConfig",
    "TTSROutput",
    "Generator",
    "SearchTransfer",
    "FastSearchTransfer",
    "TextureExtractor",
]
