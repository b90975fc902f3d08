"""Measure peak memory of TTSR stages and whole runs on CPU, to check :mod:`ttsr.memory`.

    python scripts/calibrate_memory.py            # stages and end-to-end runs, one process each
    python scripts/calibrate_memory.py --quick    # fewer, smaller runs

Each measurement runs in a fresh process: it resets the peak RSS (``/proc/self/clear_refs``),
runs one stage with random inputs and reports ``VmHWM - VmRSS(before)`` in bytes per unit of the
size that drives it. End-to-end runs compare :meth:`ttsr.inference.Upscaler.plan`'s estimate with
the measured peak of :meth:`~ttsr.inference.Upscaler.upscale`. Linux only.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys

STAGES = ("generator", "extract_lrup", "reference", "search", "transfer", "upscale")


def _status(key: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"{key}:\s+(\d+)", status.read()).group(1)) * 1024


def measure(stage: str, lr: int, ref: int, n_feats: int, tile: int | None) -> dict:
    """Peak RSS growth of one stage, in this process (call in a fresh one)."""
    import numpy as np
    import torch

    from ttsr.inference import Upscaler
    from ttsr.model import TTSR, TTSRConfig, search_transfer

    blocks = (16, 16, 8, 4) if n_feats == 64 else (1, 1, 1, 1)
    model = TTSR(TTSRConfig(num_res_blocks=blocks, n_feats=n_feats)).eval()
    generator = torch.Generator().manual_seed(0)

    def noise(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator) * 2 - 1

    result: dict = {"stage": stage, "lr": lr, "ref": ref, "n_feats": n_feats}
    with torch.inference_mode():
        lr_t, lrsr_t, ref_t = (
            noise(1, 3, lr, lr),
            noise(1, 3, 4 * lr, 4 * lr),
            noise(1, 3, ref, ref),
        )
        prepared = {}
        if stage in ("search", "transfer", "generator"):
            features = model.extract_reference_features([ref_t], [ref_t])
            query = model.extractor((lrsr_t + 1) / 2)[2]
            found = search_transfer.search(query, features.refsr_lv3)
            prepared = {"features": features, "query": query, "found": found}
            if stage == "generator":
                prepared["textures"] = model.transfer_textures(lrsr_t, features)
        if stage == "upscale":
            rng = np.random.default_rng(0)
            lr_image = rng.integers(0, 256, (lr, lr, 3), dtype=np.uint8)
            ref_image = rng.integers(0, 256, (ref, ref, 3), dtype=np.uint8)
            upscaler = Upscaler(model, "cpu", max_memory=2**40, tile_size=tile)
            result["estimate"] = upscaler.check_sizes(lr_image, [ref_image]).estimate.peak
        before = _status("VmRSS")
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        if stage == "generator":
            model.generator(lr_t, prepared["textures"], lean=True)
            result["per"], result["unit"] = lr * lr, "LR pixel"
        elif stage == "extract_lrup":
            model.extractor((lrsr_t + 1) / 2)
            result["per"], result["unit"] = lr * lr, "LR pixel"
        elif stage == "reference":
            model.extract_reference_features([ref_t], [ref_t])
            result["per"], result["unit"] = ref * ref, "reference pixel"
        elif stage == "search":
            search_transfer.search(prepared["query"], prepared["features"].refsr_lv3)
            result["per"], result["unit"] = (ref // 4) ** 2, "reference position"
        elif stage == "transfer":
            index = prepared["found"].index
            search_transfer.transfer(prepared["features"].ref_lv1, index, (lr, lr), 4)
            result["per"], result["unit"] = (ref // 4) ** 2, "reference position"
        elif stage == "upscale":
            upscaler.upscale(lr_image, [ref_image])
            result["per"], result["unit"] = 1, "run"
        result["peak"] = _status("VmHWM") - before
    result["bytes_per_unit"] = result["peak"] / result["per"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--one", nargs=5, metavar=("STAGE", "LR", "REF", "NFEATS", "TILE"))
    args = parser.parse_args()
    if args.one:
        stage, lr, ref, n_feats, tile = args.one
        tile_size = None if tile == "none" else int(tile)
        print(json.dumps(measure(stage, int(lr), int(ref), int(n_feats), tile_size)))
        return
    runs = [
        ("generator", 64, 64, 64, None),
        ("generator", 96, 64, 64, None),
        ("extract_lrup", 96, 64, 8, None),
        ("reference", 16, 512, 8, None),
        ("search", 32, 256, 8, None),
        ("search", 64, 256, 8, None),
        ("transfer", 32, 512, 8, None),
        ("upscale", 64, 256, 64, None),
        ("upscale", 96, 400, 64, None),
        ("upscale", 96, 256, 64, 32),
    ]
    if args.quick:
        runs = [r for r in runs if r[1] <= 64]
    for run in runs:
        command = [sys.executable, __file__, "--one", *(str(v).lower() for v in run)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        print(output.strip(), flush=True)


if __name__ == "__main__":
    main()
