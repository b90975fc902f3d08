"""Validation table of a checkpoint on ../shared/data: Y-PSNR/SSIM, bicubic vs the model.

Rows: each validation set with (a) the LR image as its own reference and (b) the HR image as
reference (an upper bound), and the motorcycle stereo pair (left view at x4 from the right view,
and from its own LR). TTSR protocol: HR cropped to a multiple of 4, PIL bicubic x4 down, BT.601
luma, no border crop. Prints a markdown table and writes it (and JSON) under --out.

    python scripts/validation_table.py --checkpoint ttsr/pretrained/ttsr_demo.pt --out results/demo
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from ttsr.evaluation import EvalItem, evaluate, folder_items, pair_items
from ttsr.imaging import write_atomic
from ttsr.inference import Upscaler

SETS = ("set5", "set14", "bsd100", "kodak24")


MODES = {"lr": "LR as reference", "hr": "HR as reference"}


def table_rows(
    data: Path, sets: list[str], limit: int | None, modes: Sequence[str] = tuple(MODES)
) -> list[tuple[str, list[EvalItem]]]:
    """(row label, items) for every set x reference mode, then the stereo pair."""
    rows = []
    for name in sets:
        for mode, label in ((m, MODES[m]) for m in modes):
            every = folder_items(data / "val" / name, mode)
            items = every[:limit]
            suffix = f" (first {len(items)})" if len(items) < len(every) else ""
            rows.append((f"{name}{suffix}, {label}", items))
    left, right = data / "pairs" / "motorcycle_left.png", data / "pairs" / "motorcycle_right.png"
    rows.append(("motorcycle left, right view as reference", pair_items(left, [right])))
    rows.append(("motorcycle left, own LR as reference", [EvalItem(left.stem, left, "lr")]))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="ttsr checkpoint (default: shipped)")
    parser.add_argument("--data", default="../shared/data", help="the shared data folder")
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    parser.add_argument("--limit", type=int, default=None, help="first N images of each set")
    parser.add_argument(
        "--modes",
        nargs="+",
        default=list(MODES),
        choices=list(MODES),
        help="reference modes of the set rows: lr (LR as its own reference), hr (HR as reference)",
    )
    parser.add_argument("--out", default="results/validation", help="output folder")
    parser.add_argument("--max-memory", default=None, help="memory budget, e.g. 6GB")
    args = parser.parse_args()
    upscaler = Upscaler.from_checkpoint(args.checkpoint, device="cpu", max_memory=args.max_memory)
    lines = [
        "| data | reference | images | bicubic PSNR / SSIM | model PSNR / SSIM | gain (dB) |",
        "|---|---|---|---|---|---|",
    ]
    records = []
    started = time.time()
    for label, items in tqdm(
        table_rows(Path(args.data), args.sets, args.limit, args.modes), file=sys.stderr
    ):
        mean = evaluate(items, upscaler).mean()
        data, reference = label.split(", ", 1)
        gain = mean["ttsr_psnr"] - mean["bicubic_psnr"]
        lines.append(
            f"| {data} | {reference} | {len(items)} | {mean['bicubic_psnr']:.2f} / "
            f"{mean['bicubic_ssim']:.4f} | {mean['ttsr_psnr']:.2f} / {mean['ttsr_ssim']:.4f} "
            f"| {gain:+.2f} |"
        )
        records.append({"row": label, "images": len(items), **mean})
        print(lines[-1], flush=True)
    out = Path(args.out)
    write_atomic(out / "table.md", ("\n".join(lines) + "\n").encode())
    document = {
        "checkpoint": args.checkpoint or "shipped",
        "rows": records,
        "seconds": round(time.time() - started, 1),
        "command": " ".join(sys.argv),
    }
    write_atomic(out / "table.json", (json.dumps(document, indent=2) + "\n").encode())
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
