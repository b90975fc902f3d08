"""``ttsr-convert``: turn a released researchmm/TTSR checkpoint into a ttsr checkpoint.

    ttsr-convert TTSR.pt ttsr_released.pt
    ttsr-infer --checkpoint ttsr_released.pt --lr lr.png --ref ref.png --out sr.png

The released file is read weights-only (no pickled code runs); block counts and width are read
from its keys and shapes. The result records ``divisor="constant"`` (the released fold divides
by 9).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ttsr.checkpoints import convert_released_checkpoint
from ttsr.cli import common
from ttsr.cli.common import EXIT_OK, add_debug_argument, cli_main
from ttsr.imaging import check_writable

PROG = "ttsr-convert"


def build_parser() -> argparse.ArgumentParser:
    parser = common.command_parser(
        PROG,
        "Convert a released TTSR checkpoint (researchmm/TTSR, MainNet.* / LTE.* keys) "
        "into a ttsr checkpoint for ttsr-infer and ttsr-eval.",
        __doc__,
    )
    parser.add_argument("source", help="released checkpoint (.pt), e.g. TTSR.pt or TTSR-rec.pt")
    parser.add_argument("destination", help="ttsr checkpoint to write (.pt)")
    parser.add_argument(
        "--res-scale",
        type=float,
        default=1.0,
        help="residual scaling the released model was trained with (its --res_scale; default 1.0)",
    )
    add_debug_argument(parser)
    return parser


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    destination = check_writable(Path(args.destination), image=False)
    config = convert_released_checkpoint(args.source, destination, res_scale=args.res_scale)
    blocks = "+".join(str(n) for n in config.num_res_blocks)
    print(
        f"{PROG}: wrote {destination} (blocks {blocks}, n_feats {config.n_feats}, "
        f"res_scale {config.res_scale}, divisor {config.divisor})"
    )
    return EXIT_OK


main = cli_main(PROG, build_parser, run)


if __name__ == "__main__":
    sys.exit(main())
