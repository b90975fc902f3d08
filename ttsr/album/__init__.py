"""References from an album: find the right photos among hundreds, then upscale with them.

:class:`Album` indexes a folder of photos (cached on disk, see :mod:`ttsr.album.index`) and
chooses references for a low-resolution image in two stages (:mod:`ttsr.album.ranking`,
:mod:`ttsr.album.selection`).
"""

from ttsr.album.selection import (
    DEFAULT_SHORTLIST,
    DEFAULT_TOP_K,
    Album,
    AlbumMatches,
    Candidate,
)

__all__ = ["DEFAULT_SHORTLIST", "DEFAULT_TOP_K", "Album", "AlbumMatches", "Candidate"]
