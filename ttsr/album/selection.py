"""An :class:`Album` of photos and the choice of references from it for one low-resolution image.

::

    album = Album("ALBUM/")                    # index cached under ~/.cache/ttsr (see index.py)
    matches = album.select(lr_rgb, model, top_k=3)
    matches.chosen                             # paths, best first, to search jointly

Every photo is ranked by the global stage; the :data:`DEFAULT_SHORTLIST` best go through the
fine stage (:mod:`ttsr.album.ranking`). References are then chosen greedily: the photo with the
highest fine score first, then, up to ``top_k`` in all, each photo that gives a close match to at
least :data:`MIN_GAIN` of the LR patches that the photos chosen before did not. A photo that adds
nothing new is not searched, so a single right photo costs the time of a single reference.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import Tensor

from ttsr.album import ranking
from ttsr.album.index import (
    AlbumIndex,
    Progress,
    cache_location,
    default_cache_dir,
    load_index,
    refresh_index,
    save_index,
)
from ttsr.imaging import ImageSource, InputError, load_rgb
from ttsr.model.ttsr import TTSR

logger = logging.getLogger(__name__)

#: References chosen at most, by default.
DEFAULT_TOP_K = 3
#: Photos that go through the fine stage, by default.
DEFAULT_SHORTLIST = 6
#: Share of the LR patches a further reference must newly match closely to be chosen.
MIN_GAIN = 0.2
#: Candidates written to a matches file (the shortlist first, then the best of the rest).
LISTED_CANDIDATES = 20


@dataclass(frozen=True)
class Candidate:
    """One album photo's scores: ``global_score`` (descriptor cosine) and ``global_rank``
    (1 = best); for shortlisted photos ``fine_score`` (share of LR patches with a close match),
    ``mean_relevance`` and, for chosen ones, ``gain`` (share of LR patches it newly covered)."""

    path: Path
    global_score: float
    global_rank: int
    fine_score: float | None = None
    mean_relevance: float | None = None
    gain: float | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "path": str(self.path),
            "global_score": round(self.global_score, 6),
            "global_rank": self.global_rank,
            "fine_score": None if self.fine_score is None else round(self.fine_score, 6),
            "mean_relevance": None
            if self.mean_relevance is None
            else round(self.mean_relevance, 6),
            "gain": None if self.gain is None else round(self.gain, 6),
        }


@dataclass(frozen=True)
class AlbumMatches:
    """The references chosen for one image (best first) and the ranked candidates."""

    album: Path
    chosen: tuple[Path, ...]
    candidates: tuple[Candidate, ...]
    settings: dict[str, object] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        """``references`` (chosen paths in order), ``candidates`` with both stages' scores."""
        document = {
            "album": str(self.album),
            "references": [str(p) for p in self.chosen],
            "candidates": [c.as_dict() for c in self.candidates],
            "settings": self.settings,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }
        return json.dumps(document, indent=2) + "\n"


class Album:
    """A folder of photos (sub-folders included) to take references from.

    Args:
        folder: the album.
        cache_dir: where indexes are kept (``None``: :func:`~ttsr.album.index.default_cache_dir`;
            ``False``: nowhere, the index lives in this object only).
    """

    def __init__(
        self, folder: str | os.PathLike, cache_dir: str | os.PathLike | bool | None = None
    ):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise InputError(f"{self.folder} is not a folder; give the folder of album photos")
        if cache_dir is False:
            self.cache_dir: Path | None = None
        elif cache_dir is None or cache_dir is True:
            self.cache_dir = default_cache_dir()
        else:
            self.cache_dir = Path(cache_dir)
        self._index: AlbumIndex | None = None

    @property
    def location(self) -> Path | None:
        """The folder of this album's cached index (``None`` without a cache)."""
        return None if self.cache_dir is None else cache_location(self.folder, self.cache_dir)

    def index(self, model: TTSR, progress: Progress | None = None) -> AlbumIndex:
        """Bring the index up to date (reading only new or changed photos) and save it.

        Files that are not usable images are skipped with one warning each; an album without a
        usable photo raises :class:`~ttsr.imaging.InputError`.
        """
        fingerprint = ranking.descriptor_fingerprint(model)
        previous = self._index
        location = self.location
        if (previous is None or previous.fingerprint != fingerprint) and location is not None:
            previous = load_index(location, fingerprint)
        with ranking.quiet_image_notes():
            index, changed = refresh_index(
                self.folder,
                previous,
                lambda path: ranking.describe_photo(model, path),
                fingerprint,
                progress,
            )
        for skipped in index.skipped:
            logger.warning("skipped %s: %s", self.folder / skipped.name, skipped.reason)
        if changed and location is not None:
            try:
                save_index(index, location, self.folder)
            except OSError as failure:
                logger.warning("could not cache the album index in %s: %s", location, failure)
        if not index.photos:
            raise InputError(
                f"{self.folder} holds no usable image ({len(index.skipped)} file(s) skipped); "
                "give a folder of photos (.png, .jpg, ...)"
            )
        self._index = index
        return index

    def select(
        self,
        lr: ImageSource,
        model: TTSR,
        top_k: int = DEFAULT_TOP_K,
        shortlist: int = DEFAULT_SHORTLIST,
        reduction: int = ranking.DEFAULT_REDUCTION,
    ) -> AlbumMatches:
        """Choose up to ``top_k`` references for the low-resolution image ``lr``."""
        if top_k < 1 or shortlist < 1:
            raise InputError(f"top-k and shortlist must be at least 1, got {top_k}, {shortlist}")
        index = self._index
        if index is None or index.fingerprint != ranking.descriptor_fingerprint(model):
            index = self.index(model)
        lr_rgb = load_rgb(lr)
        started = time.perf_counter()
        global_scores = index.descriptors @ ranking.global_descriptor(model, lr_rgb)
        order = np.argsort(-global_scores, kind="stable")
        global_seconds = time.perf_counter() - started
        paths = [self.folder / p.name for p in index.photos]
        shortlisted = order[: max(shortlist, top_k)]
        query = ranking.query_features(model, lr_rgb, reduction)
        relevance: dict[int, np.ndarray] = {}
        for row in shortlisted:
            key = _reference_features_or_none(model, paths[row], reduction)
            if key is not None:
                relevance[int(row)] = ranking.patch_relevance(model, query, key).numpy()
        chosen, gains = choose_greedily(relevance, top_k)
        fine_seconds = time.perf_counter() - started - global_seconds
        rank_of = {int(row): rank for rank, row in enumerate(order, start=1)}

        def candidate(row: int) -> Candidate:
            maps = relevance.get(row)
            return Candidate(
                paths[row],
                float(global_scores[row]),
                rank_of[row],
                None if maps is None else close_share(maps),
                None if maps is None else float(maps.mean()),
                gains.get(row),
            )

        fine_order = sorted(relevance, key=lambda row: -close_share(relevance[row]))
        rest = [int(r) for r in order if int(r) not in relevance][
            : max(0, LISTED_CANDIDATES - len(fine_order))
        ]
        if not chosen:
            raise InputError(f"no photo of {self.folder} could be read for the fine ranking")
        return AlbumMatches(
            album=self.folder,
            chosen=tuple(paths[row] for row in chosen),
            candidates=tuple(candidate(row) for row in [*fine_order, *rest]),
            settings={
                "top_k": top_k,
                "shortlist": shortlist,
                "reduction": reduction,
                "close_match": ranking.CLOSE_MATCH,
                "min_gain": MIN_GAIN,
                "photos": len(index.photos),
            },
            seconds={"global": global_seconds, "fine": fine_seconds},
        )


def close_share(relevance: np.ndarray) -> float:
    """Share of LR patches whose best match is a close one (the fine stage's score)."""
    return float(np.mean(relevance >= ranking.CLOSE_MATCH))


def choose_greedily(
    relevance: dict[int, np.ndarray], top_k: int, min_gain: float = MIN_GAIN
) -> tuple[list[int], dict[int, float]]:
    """Pick photos (keys of ``relevance``, each an ``[h, w]`` relevance map of the same LR) that
    together give the most LR patches a close match: the best first, then each that newly covers
    at least ``min_gain`` of the patches. Returns the chosen keys and their gains."""
    covered: np.ndarray | None = None
    chosen: list[int] = []
    gains: dict[int, float] = {}
    remaining = dict(relevance)
    while remaining and len(chosen) < top_k:
        close = {row: maps >= ranking.CLOSE_MATCH for row, maps in remaining.items()}
        gain = {
            row: float(np.mean(mask if covered is None else mask & ~covered))
            for row, mask in close.items()
        }
        best = max(remaining, key=lambda row: (gain[row], float(remaining[row].mean())))
        if chosen and gain[best] < min_gain:
            break
        chosen.append(best)
        gains[best] = gain[best]
        covered = close[best] if covered is None else covered | close[best]
        del remaining[best]
    return chosen, gains


def _reference_features_or_none(model: TTSR, path: Path, reduction: int) -> Tensor | None:
    """Fine-stage features of a photo, or ``None`` (with a warning) if it cannot be read now."""
    try:
        with ranking.quiet_image_notes():
            return ranking.reference_features(model, path, reduction)
    except (InputError, OSError) as failure:
        logger.warning("skipped %s: %s", path, failure)
        return None
