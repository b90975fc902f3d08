"""Evaluation of references chosen from an album, on pairs of real photos.

Pairs are those of :mod:`ttsr.pair_evaluation` (``NAME/target.png`` + ``NAME/ref.png``). Every
pair's reference is pooled with distractor photos into one album (:func:`build_album`, a folder of
links); each target is taken down x4 as in :func:`ttsr.evaluation.degraded_lr` (optionally
corrupted) and its references are chosen from the album. Reported per pair: the rank of the true
reference in both stages, whether it was chosen first (top-1), and the Y-PSNR of bicubic, of the
model with the true reference alone and with the references chosen from the album (default
``top_k``).

When the album's choice is exactly the true reference, the album run is the true-reference run
(same inputs, same deterministic computation): its output is reused, not recomputed.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from ttsr.album.selection import DEFAULT_TOP_K, Album, AlbumMatches
from ttsr.evaluation import Corruption, degraded_lr
from ttsr.imaging import list_images, load_rgb
from ttsr.inference import Upscaler
from ttsr.metrics import psnr_y
from ttsr.pair_evaluation import PairItem

#: Separates the source (pair or folder name) from the file name in the album's link names.
LINK_SEPARATOR = "__"


@dataclass(frozen=True)
class AlbumRow:
    """Scores of one pair (PSNR in dB on the BT.601 luma; ranks 1 = best, ``None``: not
    shortlisted)."""

    name: str
    global_rank: int
    fine_rank: int | None
    top1: bool
    chosen: tuple[str, ...]
    bicubic_psnr: float
    true_reference_psnr: float
    album_psnr: float
    ranking_seconds: float


def build_album(
    pairs: Sequence[PairItem], distractors: Sequence[Path], folder: Path, size: int | None = None
) -> dict[str, Path]:
    """Link every pair's reference and the distractor photos (images directly in the given
    folders, in order, until the album holds ``size`` photos) into ``folder``.

    Returns each pair's reference as named in the album. Existing links are replaced, so the
    album's file stamps (those of the linked files) stay the same between runs.
    """
    folder.mkdir(parents=True, exist_ok=True)
    links: dict[Path, Path] = {}
    references = {}
    for pair in pairs:
        link = folder / f"{pair.name}{LINK_SEPARATOR}ref{pair.reference.suffix}"
        links[link] = pair.reference
        references[pair.name] = link
    for source in distractors:
        for photo in list_images(source):
            if size is not None and len(links) >= size:
                break
            links[folder / f"{source.name}{LINK_SEPARATOR}{photo.name}"] = photo
    for stale in folder.iterdir():
        if stale.is_symlink() and stale not in links:
            stale.unlink()
    for link, target in links.items():
        if not (link.is_symlink() and Path(os.readlink(link)) == target.resolve()):
            link.unlink(missing_ok=True)
            link.symlink_to(target.resolve())
    return references


def _rank(matches: AlbumMatches, reference: Path) -> tuple[int, int | None]:
    """Global rank and fine rank (``None`` if not shortlisted) of ``reference``."""
    fine = [c for c in matches.candidates if c.fine_score is not None]
    for position, candidate in enumerate(fine, start=1):
        if candidate.path == reference:
            return candidate.global_rank, position
    for candidate in matches.candidates:
        if candidate.path == reference:
            return candidate.global_rank, None
    return matches.settings.get("photos", 0) + 1, None  # type: ignore[operator]


def evaluate_pair(
    pair: PairItem,
    reference_in_album: Path,
    album: Album,
    upscaler: Upscaler,
    top_k: int = DEFAULT_TOP_K,
    border: int = 0,
    corrupt: Corruption | None = None,
) -> AlbumRow:
    """Score one pair against the album."""
    hr, lr, bicubic = degraded_lr(load_rgb(pair.target), corrupt)
    started = time.perf_counter()
    matches = upscaler.choose_references(lr, album, top_k)
    ranking_seconds = time.perf_counter() - started
    true_sr = np.asarray(upscaler.upscale(lr, [pair.reference]).sr)
    if matches.chosen == (reference_in_album,):
        album_sr = true_sr
    else:
        album_sr = np.asarray(upscaler.upscale(lr, list(matches.chosen)).sr)
    global_rank, fine_rank = _rank(matches, reference_in_album)
    return AlbumRow(
        name=pair.name,
        global_rank=global_rank,
        fine_rank=fine_rank,
        top1=matches.chosen[0] == reference_in_album,
        chosen=tuple(p.name for p in matches.chosen),
        bicubic_psnr=psnr_y(hr, bicubic, border),
        true_reference_psnr=psnr_y(hr, true_sr, border),
        album_psnr=psnr_y(hr, album_sr, border),
        ranking_seconds=ranking_seconds,
    )


@dataclass
class AlbumTable:
    """Rows and their summary: top-1 accuracy and mean PSNRs."""

    rows: list[AlbumRow]
    settings: dict[str, object]

    def summary(self) -> dict[str, float]:
        count = len(self.rows)
        return {
            "pairs": count,
            "top1_accuracy": sum(r.top1 for r in self.rows) / count,
            "global_top1_accuracy": sum(r.global_rank == 1 for r in self.rows) / count,
            "mean_bicubic_psnr": float(np.mean([r.bicubic_psnr for r in self.rows])),
            "mean_true_reference_psnr": float(np.mean([r.true_reference_psnr for r in self.rows])),
            "mean_album_psnr": float(np.mean([r.album_psnr for r in self.rows])),
            "mean_references_chosen": float(np.mean([len(r.chosen) for r in self.rows])),
            "mean_ranking_seconds": float(np.mean([r.ranking_seconds for r in self.rows])),
        }

    def format(self) -> str:
        width = max(len("mean"), *(len(r.name) for r in self.rows))
        header = f"{'pair':<{width}}  global  fine  top1  refs  bicubic  true ref    album  rank s"
        lines = [header, "-" * len(header)]
        for r in self.rows:
            fine = "-" if r.fine_rank is None else str(r.fine_rank)
            lines.append(
                f"{r.name:<{width}}  {r.global_rank:>6}  {fine:>4}  {'yes' if r.top1 else 'no':>4}"
                f"  {len(r.chosen):>4}  {r.bicubic_psnr:>7.2f}  {r.true_reference_psnr:>8.2f}"
                f"  {r.album_psnr:>7.2f}  {r.ranking_seconds:>6.1f}"
            )
        s = self.summary()
        lines.append("-" * len(header))
        lines.append(
            f"{'mean':<{width}}  top-1 {s['top1_accuracy']:.0%} (global stage alone "
            f"{s['global_top1_accuracy']:.0%})  bicubic {s['mean_bicubic_psnr']:.2f}  true ref "
            f"{s['mean_true_reference_psnr']:.2f}  album {s['mean_album_psnr']:.2f} dB "
            f"({s['mean_album_psnr'] - s['mean_true_reference_psnr']:+.3f})"
        )
        return "\n".join(lines)

    def to_csv(self) -> str:
        """One line per pair."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        names = [f.name for f in fields(AlbumRow)]
        writer.writerow(names)
        for row in self.rows:
            values = asdict(row)
            values["chosen"] = " ".join(row.chosen)
            writer.writerow([values[n] for n in names])
        return buffer.getvalue()

    def to_json(self) -> str:
        document = {
            "settings": self.settings,
            "summary": self.summary(),
            "rows": [asdict(r) for r in self.rows],
        }
        return json.dumps(document, indent=2, default=_finite) + "\n"


def _finite(value: object) -> object:
    return None if isinstance(value, float) and not math.isfinite(value) else str(value)


def evaluate_album(
    pairs: Sequence[PairItem],
    references: dict[str, Path],
    album: Album,
    upscaler: Upscaler,
    top_k: int = DEFAULT_TOP_K,
    border: int = 0,
    corrupt: Corruption | None = None,
    on_row: Callable[[AlbumRow], None] | None = None,
) -> AlbumTable:
    """Score every pair against the album (index it first, :meth:`Album.index`)."""
    rows = []
    for pair in pairs:
        row = evaluate_pair(pair, references[pair.name], album, upscaler, top_k, border, corrupt)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    photos = len(album.index(upscaler.model).photos)
    return AlbumTable(rows, {"album": str(album.folder), "photos": photos, "top_k": top_k})


@dataclass(frozen=True)
class Timing:
    """Seconds (wall clock and this process's CPU time) of one target with its true reference
    alone and with references chosen from a cached album (index read from disk, ranking and
    upscaling included)."""

    pair: str
    photos: int
    true_reference_wall: float
    true_reference_cpu: float
    album_wall: float
    album_cpu: float
    chosen: tuple[str, ...]


def time_against_album(
    pair: PairItem,
    album_folder: Path,
    cache_dir: Path | None,
    upscaler: Upscaler,
    top_k: int = DEFAULT_TOP_K,
    corrupt: Corruption | None = None,
) -> Timing:
    """Time one target with its true reference, then against the album (whose index must be
    cached already: a fresh :class:`Album` reads it from disk, as a new run would)."""
    _, lr, _ = degraded_lr(load_rgb(pair.target), corrupt)
    wall, cpu = time.perf_counter(), time.process_time()
    upscaler.upscale(lr, [pair.reference])
    true_wall, true_cpu = time.perf_counter() - wall, time.process_time() - cpu
    wall, cpu = time.perf_counter(), time.process_time()
    album = Album(album_folder, cache_dir if cache_dir is not None else None)
    result = upscaler.upscale(lr, album=album, top_k=top_k)
    album_wall, album_cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert result.matches is not None
    return Timing(
        pair.name,
        int(result.matches.settings["photos"]),  # type: ignore[call-overload]
        true_wall,
        true_cpu,
        album_wall,
        album_cpu,
        tuple(p.name for p in result.matches.chosen),
    )
