"""The album option of ``ttsr-eval --pairs``: are the right references found among distractors,
and what does it cost in Y-PSNR and time? (Argument parsing and messages only; the work is
:mod:`ttsr.album.evaluation`.)"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from ttsr.album import DEFAULT_TOP_K, Album
from ttsr.album.evaluation import AlbumTable, build_album, evaluate_album, time_against_album
from ttsr.cli.common import positive_int
from ttsr.evaluation import Corruption
from ttsr.imaging import InputError, write_atomic
from ttsr.inference import Upscaler
from ttsr.pair_evaluation import PairItem


def add_album_arguments(parser: argparse.ArgumentParser) -> None:
    """``--album-distractors``, ``--album-size``, ``--top-k``, ``--album-timing``."""
    group = parser.add_argument_group(
        "album (with --pairs): every pair's reference pooled with distractor photos into one "
        "album (OUT/album, a folder of links; its index in OUT/album-cache); each target's "
        "references are chosen from it and scored against its true reference alone"
    )
    group.add_argument(
        "--album-distractors",
        metavar="DIR",
        action="append",
        default=[],
        help="folder of distractor photos (repeatable, used in order); turns the album on",
    )
    group.add_argument(
        "--album-size",
        type=positive_int,
        metavar="N",
        help="photos in the album: the references, then distractors up to N (default: all)",
    )
    group.add_argument(
        "--top-k",
        type=positive_int,
        default=DEFAULT_TOP_K,
        metavar="K",
        help=f"references chosen from the album at most (default {DEFAULT_TOP_K})",
    )
    group.add_argument(
        "--album-timing",
        metavar="NAME",
        action="append",
        default=[],
        help="instead of the table: time pair NAME with its true reference alone and against "
        "the cached album (repeatable)",
    )


def run_album(
    args: argparse.Namespace,
    pairs: Sequence[PairItem],
    upscaler: Upscaler,
    out: Path,
    corrupt: Corruption | None,
) -> AlbumTable | None:
    """Build and index the album, then evaluate (a table) or time (``None``, printed)."""
    references = build_album(
        pairs, [Path(d) for d in args.album_distractors], out / "album", args.album_size
    )
    album = Album(out / "album", out / "album-cache")
    with tqdm(unit="photo", file=sys.stderr, disable=None, desc="indexing album") as bar:

        def indexed(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        album.index(upscaler.model, progress=indexed)
    if args.album_timing:
        by_name = {p.name: p for p in pairs}
        unknown = [n for n in args.album_timing if n not in by_name]
        if unknown:
            raise InputError(f"no pair named {unknown[0]!r} in {args.pairs}")
        timings = []
        for name in args.album_timing:
            timing = time_against_album(
                by_name[name], album.folder, album.cache_dir, upscaler, args.top_k, corrupt
            )
            timings.append(asdict(timing))
            print(
                f"{name}: true reference {timing.true_reference_wall:.1f} s wall / "
                f"{timing.true_reference_cpu:.1f} s CPU; album of {timing.photos} photos "
                f"{timing.album_wall:.1f} s wall / {timing.album_cpu:.1f} s CPU "
                f"(x{timing.album_wall / timing.true_reference_wall:.2f} wall, "
                f"x{timing.album_cpu / timing.true_reference_cpu:.2f} CPU); chosen "
                f"{', '.join(timing.chosen)}"
            )
        write_atomic(out / "album_timing.json", (json.dumps(timings, indent=2) + "\n").encode())
        return None
    with tqdm(total=len(pairs), unit="pair", file=sys.stderr, disable=None) as bar:
        return evaluate_album(
            pairs,
            references,
            album,
            upscaler,
            args.top_k,
            args.border,
            corrupt,
            on_row=lambda _: bar.update(1),
        )
