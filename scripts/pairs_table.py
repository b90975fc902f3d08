"""Markdown table of ``ttsr-eval --pairs`` results, by difficulty group (easy, hard, all).

    python scripts/pairs_table.py ../shared/data/pairs/real/pairs.json \\
        clean=results/real_pairs_bicubic_clean jpeg75=results/real_pairs_bicubic_jpeg75

Each ``LABEL=FOLDER`` is a ``ttsr-eval --pairs`` output folder (its ``results.json``); the pairs
file lists ``{"name": ..., "level": "easy" | "hard"}`` for every pair. Rows give the mean Y-PSNR
of each method in each group, and the gains over bicubic and over the LR as its own reference.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

METHODS = (
    ("bicubic_psnr", "bicubic"),
    ("lr_ref_psnr", "LR as reference"),
    ("ref_psnr", "real reference"),
    ("aligned_ref_psnr", "real reference, aligned"),
)


def group_means(rows: list[dict], levels: dict[str, str]) -> dict[str, dict[str, float]]:
    """Mean of every PSNR column over each group of pairs (``easy``, ``hard``, ``all``)."""
    groups = {"easy": [], "hard": [], "all": []}
    for row in rows:
        groups[levels[row["image"]]].append(row)
        groups["all"].append(row)
    return {
        group: {
            column: float(np.mean([r[column] for r in members]))
            for column, _ in METHODS
            if members and members[0].get(column) is not None
        }
        for group, members in groups.items()
        if members
    }


def table(levels: dict[str, str], runs: dict[str, Path]) -> str:
    header = "| LR | pairs | " + " | ".join(label for _, label in METHODS)
    header += " | real ref - bicubic | real ref - LR as ref | aligned - real ref |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for label, folder in runs.items():
        rows = json.loads((folder / "results.json").read_text())["rows"]
        for group, mean in group_means(rows, levels).items():
            count = sum(1 for r in rows if group == "all" or levels[r["image"]] == group)
            cells = [f"{mean[c]:.2f}" if c in mean else "-" for c, _ in METHODS]
            gains = [
                mean["ref_psnr"] - mean["bicubic_psnr"],
                mean["ref_psnr"] - mean["lr_ref_psnr"],
            ]
            aligned = mean.get("aligned_ref_psnr")
            extra = f"{aligned - mean['ref_psnr']:+.2f}" if aligned is not None else "-"
            lines.append(
                f"| {label} | {group} ({count}) | "
                + " | ".join(cells)
                + " | "
                + " | ".join(f"{g:+.2f}" for g in gains)
                + f" | {extra} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pairs_json", type=Path, help="the pairs folder's pairs.json (levels)")
    parser.add_argument("runs", nargs="+", help="LABEL=FOLDER of a ttsr-eval --pairs run")
    args = parser.parse_args()
    levels = {p["name"]: p["level"] for p in json.loads(args.pairs_json.read_text())}
    runs = dict(run.split("=", 1) for run in args.runs)
    print(table(levels, {label: Path(folder) for label, folder in runs.items()}))


if __name__ == "__main__":
    main()
