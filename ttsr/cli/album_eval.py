"""Album evaluation on real pairs: are the right references found among distractors, and what
does it cost in Y-PSNR and time?

    python -m ttsr.cli.album_eval PAIRS --distractors DIR [--distractors DIR ...]
    python -m ttsr.cli.album_eval PAIRS --distractors DIR --album-size 200 --timing NAME

PAIRS holds NAME/target.png + NAME/ref.png. Every reference is linked with the distractors into
one album (OUT/album, index cached in OUT/cache); each target is taken down x4 with PIL bicubic and
upscaled with its true reference alone and with references chosen from the album. The table is
printed and written to OUT/album_results.json. --timing NAME times that target against the
cached album and against its true reference alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from ttsr.album import DEFAULT_TOP_K, Album
from ttsr.album.evaluation import (
    build_album,
    evaluate_album,
    pair_folders,
    time_against_album,
)
from ttsr.cli.common import (
    EXIT_OK,
    add_debug_argument,
    add_model_arguments,
    build_upscaler,
    positive_int,
    run_guarded,
)
from ttsr.imaging import InputError, check_writable, write_atomic

PROG = "ttsr-album-eval"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Evaluate references chosen from an album: every pair's reference pooled "
        "with distractor photos; top-1 accuracy and Y-PSNR with the album against the true "
        "reference alone.",
        epilog=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("pairs", help="folder of NAME/target.png + NAME/ref.png")
    parser.add_argument(
        "--distractors",
        metavar="DIR",
        action="append",
        default=[],
        help="folder of distractor photos (repeatable; used in order)",
    )
    parser.add_argument(
        "--album-size",
        type=positive_int,
        metavar="N",
        help="photos in the album (references first, then distractors; default: all)",
    )
    parser.add_argument(
        "--top-k",
        type=positive_int,
        default=DEFAULT_TOP_K,
        metavar="K",
        help=f"references chosen at most (default {DEFAULT_TOP_K})",
    )
    parser.add_argument("--limit", type=positive_int, help="evaluate only the first N pairs")
    parser.add_argument(
        "--timing",
        metavar="NAME",
        action="append",
        default=[],
        help="time pair NAME against the cached album and its true reference (repeatable); "
        "skips the accuracy table",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        default="ttsr-album-eval",
        help="folder for the album links, its index and the results (default: ttsr-album-eval)",
    )
    add_model_arguments(parser)
    add_debug_argument(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    pairs = pair_folders(Path(args.pairs))
    out = Path(args.out)
    check_writable(out / "album_results.json", image=False)
    references = build_album(
        pairs, [Path(d) for d in args.distractors], out / "album", args.album_size
    )
    upscaler = build_upscaler(args)
    album = Album(out / "album", out / "cache")
    with tqdm(unit="photo", file=sys.stderr, disable=None, desc="indexing album") as bar:

        def indexed(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        album.index(upscaler.model, progress=indexed)
    if args.timing:
        by_name = {p.name: p for p in pairs}
        unknown = [n for n in args.timing if n not in by_name]
        if unknown:
            raise InputError(f"no pair named {unknown[0]!r} in {args.pairs}")
        timings = []
        for name in args.timing:
            timing = time_against_album(
                by_name[name], album.folder, out / "cache", upscaler, args.top_k
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
        return EXIT_OK
    selected = pairs[: args.limit]
    with tqdm(total=len(selected), unit="pair", file=sys.stderr, disable=None) as bar:
        table = evaluate_album(
            selected, references, album, upscaler, args.top_k, on_row=lambda _: bar.update(1)
        )
    table.settings["checkpoint"] = str(args.checkpoint or "shipped")
    print(table.format())
    write_atomic(out / "album_results.json", table.to_json().encode())
    print(f"{PROG}: {len(table.rows)} pairs; results in {out}/album_results.json")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_guarded(PROG, lambda: run(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
