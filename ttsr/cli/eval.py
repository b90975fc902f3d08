"""``ttsr-eval``: Y-PSNR / SSIM of bicubic and TTSR on a dataset, TTSR's protocol.

    ttsr-eval data/CUFED5 --ref-level 1                  # NNN_0.png HR + NNN_1..5.png references
    ttsr-eval data/CUFED5 --ref-level all                # all five references jointly
    ttsr-eval data/val/set5 --ref-mode lr                # the LR is its own reference
    ttsr-eval data/val/set5 --ref-mode hr                # the HR as reference (upper bound)
    ttsr-eval data/hr --ref-dir data/refs                # references matched by file stem
    ttsr-eval --hr left.png --ref right.png              # one HR image and its reference(s)
    ttsr-eval --hr left.png --ref-mode lr                # one HR image, its LR as reference
    ttsr-eval data/val/bsd100 --bicubic-only --limit 10  # the bicubic baseline only
    ttsr-eval data/val/kodak24 --jpeg 75                 # the LR saved as JPEG quality 75
    ttsr-eval --pairs data/pairs --jpeg 75               # NAME/target.png + NAME/ref.png pairs
    ttsr-eval --pairs data/pairs --album-distractors data/val/bsd100  # references from an album

HR images are cropped to a multiple of 4 and taken down x4 with PIL bicubic; scores are on the
BT.601 luma of 8-bit images, with no border crop unless --border says so. --blur, --noise and --jpeg
corrupt the LR after the downscale, in that order, as photos people bring are; bicubic then
upscales the corrupted LR. With --pairs, each pair is scored three ways: bicubic, the model with
the LR as its own reference, and the model with the real reference. The table is printed and
written to OUT/results.json and OUT/results.csv.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from PIL import Image
from tqdm import tqdm

from ttsr.album.evaluation import AlbumTable
from ttsr.cli import common
from ttsr.cli.album_eval import add_album_arguments, run_album
from ttsr.cli.common import (
    EXIT_OK,
    add_flag,
    add_model_arguments,
    build_upscaler,
    cli_main,
    describe_chosen_model,
    model_label,
    positive_int,
)
from ttsr.data.layouts import is_cufed5_layout, pairs_folder_items
from ttsr.data.real_degradation import LRCorruption
from ttsr.evaluation import (
    BicubicImages,
    BicubicRow,
    EvalItem,
    EvalTable,
    check_item,
    comparison_grid,
    cufed_items,
    evaluate,
    folder_items,
    pair_items,
    summary_chart,
)
from ttsr.imaging import InputError, check_writable, save_image, write_atomic
from ttsr.pair_evaluation import (
    check_pair,
    evaluate_pairs,
    pair_grid,
)

PROG = "ttsr-eval"


def build_parser() -> argparse.ArgumentParser:
    parser = common.command_parser(
        PROG,
        "Evaluate x4 super-resolution with TTSR's protocol: a table of Y-PSNR and "
        "SSIM (BT.601, 8-bit) for bicubic and the model, per image and on average.",
        __doc__,
    )
    parser.add_argument("dataset", nargs="?", help="folder of HR images (or CUFED5 layout)")
    refs = parser.add_argument_group("references")
    refs.add_argument(
        "--ref-mode",
        choices=("auto", "cufed", "lr", "hr"),
        default="auto",
        help="cufed: NNN_0.png HR with NNN_1..5.png references; lr: the LR image is its own "
        "reference; hr: the HR image (upper bound). auto (default): cufed for a CUFED5-style "
        "folder, otherwise lr",
    )
    refs.add_argument(
        "--ref-level",
        default="1",
        choices=("1", "2", "3", "4", "5", "all"),
        help="CUFED5 reference level (1 = most similar; default 1) or all five jointly",
    )
    refs.add_argument("--ref-dir", metavar="DIR", help="references matched to HR images by stem")
    refs.add_argument("--hr", metavar="FILE", help="evaluate one HR file (with --ref)")
    refs.add_argument(
        "--pairs",
        metavar="DIR",
        help="a folder of real pairs NAME/target.png + NAME/ref.png: scores bicubic, the LR as its "
        "own reference and the real reference (with --align-ref, also the real reference "
        "aligned), per pair and on average",
    )
    refs.add_argument(
        "--ref", metavar="FILE", action="append", default=[], help="reference of --hr (repeatable)"
    )
    corruption = parser.add_argument_group(
        "corruption of the LR, after the bicubic downscale (in this order: blur, noise, JPEG)"
    )
    corruption.add_argument(
        "--blur",
        type=non_negative_float,
        default=0.0,
        metavar="SIGMA",
        help="Gaussian blur of this sigma, in LR pixels (default: 0, none)",
    )
    corruption.add_argument(
        "--noise",
        type=non_negative_float,
        default=0.0,
        metavar="SIGMA",
        help="Gaussian colour noise of this standard deviation, in 0-255 units (default: 0, none)",
    )
    corruption.add_argument(
        "--jpeg",
        type=jpeg_quality,
        metavar="Q",
        help="save the LR as JPEG at quality Q (1-100, PIL, 4:2:0) and decode it (default: none)",
    )
    corruption.add_argument(
        "--seed", type=int, default=0, help="seed of the --noise (default: 0, reproducible)"
    )
    protocol = parser.add_argument_group("protocol and outputs")
    protocol.add_argument(
        "--border",
        type=int,
        default=0,
        help="pixels cropped on each side before scoring (TTSR: 0, the default; some papers use 4)",
    )
    protocol.add_argument("--limit", type=positive_int, help="evaluate only the first N images")
    add_flag(protocol, "--bicubic-only", "measure the bicubic baseline, no model")
    protocol.add_argument(
        "--out",
        metavar="DIR",
        default="ttsr-eval-results",
        help="folder for results.json, results.csv and pictures (default: ttsr-eval-results)",
    )
    add_flag(
        protocol,
        "--save-grids",
        "write OUT/grids/NAME.png: HR | bicubic | TTSR | reference(s) per image",
    )
    add_flag(protocol, "--save-summary", "write OUT/summary.png: a chart of the scores")
    add_album_arguments(parser)
    add_model_arguments(parser, precision="fp32")  # tables: exact, the same on every machine
    return parser


def non_negative_float(text: str) -> float:
    """argparse type for sigmas."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def jpeg_quality(text: str) -> int:
    """argparse type for ``--jpeg``."""
    if not text.isdigit() or not 1 <= int(text) <= 100:
        raise argparse.ArgumentTypeError(f"expected a JPEG quality 1..100, got {text!r}")
    return int(text)


def collect_items(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[EvalItem]:
    """The images to evaluate, as the options describe them."""
    if args.hr:
        if args.dataset or args.ref_dir:
            parser.error("--hr evaluates one file: leave out the dataset folder and --ref-dir")
        if args.ref and args.ref_mode in ("lr", "hr"):
            parser.error("--hr takes either --ref files or --ref-mode lr|hr, not both")
        if args.ref_mode in ("lr", "hr"):
            return [EvalItem(Path(args.hr).stem, Path(args.hr), args.ref_mode)]
        if not args.ref and not args.bicubic_only:
            parser.error("--hr needs at least one --ref, or --ref-mode lr|hr")
        if not args.ref:
            return [EvalItem(Path(args.hr).stem, Path(args.hr), "hr")]
        return pair_items(Path(args.hr), [Path(r) for r in args.ref])
    if not args.dataset:
        parser.error("give a dataset folder, or --hr FILE --ref FILE")
    if args.ref:
        parser.error("--ref goes with --hr; for a folder use --ref-dir or --ref-mode")
    folder = Path(args.dataset)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder of images")
    if args.ref_dir:
        if args.ref_mode != "auto":
            parser.error("--ref-dir and --ref-mode are alternatives: give one of them")
        return folder_items(folder, "dir", Path(args.ref_dir))
    mode = args.ref_mode
    if mode == "auto":
        mode = "cufed" if is_cufed5_layout(folder) else "lr"
    if mode == "cufed":
        return cufed_items(folder, "all" if args.ref_level == "all" else int(args.ref_level))
    return folder_items(folder, mode)


def corruption_of(args: argparse.Namespace) -> LRCorruption | None:
    """The LR corruption the options ask for (``None``: the clean bicubic LR)."""
    corruption = LRCorruption(blur=args.blur, noise=args.noise, jpeg=args.jpeg, seed=args.seed)
    return None if corruption.is_identity else corruption


def _evaluate(
    args: argparse.Namespace, parser: argparse.ArgumentParser, out: Path
) -> tuple[EvalTable, str]:
    """Check every input from its header, then score it; returns the table and the unit."""
    corruption = corruption_of(args)
    if args.pairs:
        pairs = pairs_folder_items(Path(args.pairs))[: args.limit]
        upscaler = None if args.bicubic_only else build_upscaler(args)
        for pair in pairs:  # sizes and memory budget from the headers, before any heavy work
            check_pair(pair, upscaler, args.border)
        with progress_bar(len(pairs), "pair") as bar:
            on_pair = grid_saver(bar, out / "grids" if args.save_grids else None, pair_grid)
            table = evaluate_pairs(pairs, upscaler, args.border, corruption, on_pair)
        return table, "pair"
    items = collect_items(args, parser)[: args.limit]
    upscaler = None if args.bicubic_only else build_upscaler(args)
    for item in items:
        check_item(item, upscaler, args.border)
    with progress_bar(len(items), "image") as bar:
        on_image = grid_saver(bar, out / "grids" if args.save_grids else None, comparison_grid)
        table = evaluate(items, upscaler, args.border, on_image, corruption)
    table.settings = {
        "references": items[0].ref_mode if items else None,
        "ref_level": args.ref_level if items and items[0].ref_mode == "cufed" else None,
    }
    return table, "image"


def progress_bar(total: int, unit: str) -> tqdm:
    return tqdm(total=total, unit=unit, file=sys.stderr, disable=None)


Row = TypeVar("Row", bound=BicubicRow)
Images = TypeVar("Images", bound=BicubicImages)


def grid_saver(
    bar: tqdm, grids: Path | None, grid: Callable[[Row, Images], Image.Image]
) -> Callable[[Row, Images], None]:
    """A per-image callback: advance ``bar``, and with a ``grids`` folder save the image's
    comparison ``grid`` there as ``NAME.png``."""

    def on_row(row: Row, images: Images) -> None:
        if grids is not None:
            save_image(grid(row, images), grids / f"{row.image}.png")
        bar.update(1)

    return on_row


def write_table(table: EvalTable | AlbumTable, out: Path) -> None:
    """Print ``table`` and write it to ``out/results.json`` and ``out/results.csv``."""
    print(table.format())
    write_atomic(out / "results.json", table.to_json().encode())
    write_atomic(out / "results.csv", table.to_csv().encode())


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Evaluate, print the table, write JSON/CSV and the requested pictures."""
    if args.border < 0:
        parser.error("--border must be 0 or more")
    if args.pairs and (args.dataset or args.hr or args.ref or args.ref_dir):
        parser.error("--pairs evaluates a folder of pairs: leave out the dataset, --hr and --ref")
    out = Path(args.out)
    check_writable(out / "results.json", image=False)
    if args.album_distractors or args.album_timing:
        if not args.pairs or args.bicubic_only or not args.album_distractors:
            parser.error("the album options go with --pairs, --album-distractors and a model")
        return _evaluate_album(args, out)
    table, unit = _evaluate(args, parser, out)
    corruption = corruption_of(args)
    table.settings = {
        "dataset": str(args.pairs or args.dataset or args.hr),
        "references": "pairs" if args.pairs else None,
        **table.settings,
        "border": args.border,
        "lr_corruption": corruption.tag if corruption else None,
        "seed": args.seed if args.noise else None,
        "model": None if args.bicubic_only else model_label(args),
        "reference_alignment": None if args.bicubic_only else args.align_ref,
        "protocol": "HR cropped to a multiple of 4, PIL bicubic x4 down, then the LR corruption "
        "(blur, noise, JPEG); Y (BT.601) PSNR/SSIM",
    }
    write_table(table, out)
    if args.save_summary:
        title = f"{table.settings['dataset']}: Y-PSNR (border {args.border})"
        save_image(summary_chart(table, title), out / "summary.png")
    count = f"{len(table.rows)} {unit}{'s' * (len(table.rows) != 1)}"
    model = "" if args.bicubic_only else f" with {describe_chosen_model(args)}"
    print(f"{PROG}: {count}{model}; results in {out}/results.json and results.csv")
    return EXIT_OK


def _evaluate_album(args: argparse.Namespace, out: Path) -> int:
    """``--pairs`` with ``--album-distractors``: see :mod:`ttsr.cli.album_eval`."""
    pairs = pairs_folder_items(Path(args.pairs))[: args.limit]
    upscaler = build_upscaler(args)
    for pair in pairs:
        check_pair(pair, upscaler, args.border)
    corruption = corruption_of(args)
    table = run_album(args, pairs, upscaler, out, corruption)
    if table is None:  # --album-timing
        return EXIT_OK
    table.settings.update(
        checkpoint=str(args.checkpoint or "shipped"),
        border=args.border,
        lr_corruption=corruption.tag if corruption else None,
    )
    write_table(table, out)
    print(f"{PROG}: {len(table.rows)} pairs; results in {out}/results.json and results.csv")
    return EXIT_OK


main = cli_main(PROG, build_parser, run)


if __name__ == "__main__":
    sys.exit(main())
