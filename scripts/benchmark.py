"""Time and peak memory of TTSR's SearchTransfer and whole model, straightforward against fast,
and of whole-image inference (the shipped model through ``Upscaler``) in float32 against bfloat16.

Every case runs in a fresh Python process (``--case NAME``) so that its peak memory is its own:
the child reports the resident set before the timed work (inputs, weights and libraries loaded)
and the peak during it (``VmHWM`` after resetting it through ``/proc/self/clear_refs``; where
that is not allowed, the child's whole-life peak from ``os.wait4``). "Extra" memory is the peak
minus the resident set before the timed work.

Run from the repository root::

    python scripts/benchmark.py --out benchmarks/cpu.md      # full run (about 15 minutes)
    python scripts/benchmark.py --quick                       # small smoke run (about a minute)
    python scripts/benchmark.py --tasks precision-0.7mp precision-4mp --out benchmarks/precision.md

Inputs are features of a real stereo pair when ``../shared/data/pairs`` (or ``--images``) has
one, else of synthetic images. Timings on a shared machine are noisy: compare ratios of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "pairs"
RELEASED_BLOCKS = (16, 16, 8, 4)
RELEASED_FEATS = 64


# ----------------------------------------------------------------------------- measurement


def rss_bytes(field_name: str) -> int:
    """``VmRSS`` or ``VmHWM`` of this process, in bytes (0 where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current resident set (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@dataclass
class Measurement:
    """What a case reports: wall and CPU seconds per run, memory before and at peak."""

    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    rss_before: int = 0
    peak_rss: int = 0
    peak_is_own: bool = False
    notes: dict[str, Any] = field(default_factory=dict)


def measure(run: Callable[[], object], warmup: int, repeats: int) -> Measurement:
    """Run ``warmup`` untimed then ``repeats`` timed calls; peak memory covers all of them."""
    import gc

    gc.collect()
    result = Measurement(rss_before=rss_bytes("VmRSS"))
    result.peak_is_own = reset_peak_rss()
    for _ in range(warmup):
        run()
    for _ in range(repeats):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        run()
        result.seconds.append(time.perf_counter() - start_wall)
        result.cpu_seconds.append(time.process_time() - start_cpu)
    result.peak_rss = rss_bytes("VmHWM")
    return result


# ----------------------------------------------------------------------------- inputs


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> ``[1, 3, H, W]`` in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy()).permute(2, 0, 1)[None]


def resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """PIL bicubic to ``(height, width)``."""
    return image.resize((size[1], size[0]), Image.BICUBIC)


def synthetic_pair(size: tuple[int, int], seed: int = 0) -> tuple[Image.Image, Image.Image]:
    """Two overlapping views of a smooth random scene with edges and texture."""
    generator = torch.Generator().manual_seed(seed)
    height, width = size
    coarse = torch.rand(1, 3, height // 32 + 2, width // 24 + 3, generator=generator)
    scene = F.interpolate(coarse, size=(height, width + 48), mode="bicubic", align_corners=False)
    stripes = torch.sin(torch.arange(width + 48) / 3.0)[None, None, None] * 0.1
    blocks = torch.rand(1, 1, height // 16 + 1, (width + 48) // 16 + 1, generator=generator) > 0.7
    blocks = F.interpolate(blocks.float(), scale_factor=16)[..., :height, : width + 48] * 0.3
    scene = scene + stripes + blocks + 0.02 * torch.randn(scene.shape, generator=generator)
    scene = scene.clamp(0, 1)

    def image(tensor: torch.Tensor) -> Image.Image:
        array = (tensor[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        return Image.fromarray(array)

    return image(scene[..., :width]), image(scene[..., 48:])


def image_pair(images: Path | None) -> tuple[Image.Image, Image.Image, str]:
    """(left, right) views: a real stereo pair where available, else synthetic."""
    if images is not None:
        found = sorted(p for p in images.glob("*.png"))
        if len(found) >= 2:
            return Image.open(found[0]), Image.open(found[1]), f"{found[0].name}, {found[1].name}"
    left, right = synthetic_pair((500, 741))
    return left, right, "synthetic"


@dataclass
class Sample:
    """One TTSR input set in [-1, 1] (NCHW): LR, LR-up, HR, reference, reference-down-up."""

    lr: torch.Tensor
    lrsr: torch.Tensor
    hr: torch.Tensor
    ref: torch.Tensor
    refsr: torch.Tensor


def make_samples(
    left: Image.Image,
    right: Image.Image,
    lr_size: tuple[int, int],
    ref_size: tuple[int, int],
    batch: int = 1,
    seed: int = 0,
) -> Sample:
    """Crops (random for batches) of the left view as HR and of the right view as reference;
    views smaller than the crop are enlarged first. LR = bicubic x4 down, as TTSR does."""
    hr_size = (lr_size[0] * 4, lr_size[1] * 4)
    generator = torch.Generator().manual_seed(seed)

    def fitted(image: Image.Image, size: tuple[int, int]) -> Image.Image:
        scale = max(size[0] / image.height, size[1] / image.width, 1.0)
        if scale > 1.0:
            image = resize(image, (round(image.height * scale), round(image.width * scale)))
        return image

    left, right = fitted(left, hr_size), fitted(right, ref_size)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("lr", "lrsr", "hr", "ref", "refsr")}
    for b in range(batch):
        if batch == 1:
            y, x = (left.height - hr_size[0]) // 2, (left.width - hr_size[1]) // 2
            ry, rx = (right.height - ref_size[0]) // 2, (right.width - ref_size[1]) // 2
        else:
            y = int(torch.randint(0, left.height - hr_size[0] + 1, (1,), generator=generator))
            x = int(torch.randint(0, left.width - hr_size[1] + 1, (1,), generator=generator))
            ry = min(y, right.height - ref_size[0])
            rx = min(max(0, x - 24), right.width - ref_size[1])
        del b
        hr = left.crop((x, y, x + hr_size[1], y + hr_size[0]))
        ref = right.crop((rx, ry, rx + ref_size[1], ry + ref_size[0]))
        lr = resize(hr, lr_size)
        refsr = resize(resize(ref, (ref_size[0] // 4, ref_size[1] // 4)), ref_size)
        for key, image in (
            ("lr", lr),
            ("lrsr", resize(lr, hr_size)),
            ("hr", hr),
            ("ref", ref),
            ("refsr", refsr),
        ):
            parts[key].append(to_tensor(image) * 2 - 1)
    return Sample(**{k: torch.cat(v) for k, v in parts.items()})


# ----------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Size:
    """An input size: LR ``(h, w)``, reference ``(h, w)``, batch."""

    name: str
    lr: tuple[int, int]
    ref: tuple[int, int]
    batch: int = 1

    def relevance_bytes(self) -> int:
        """The straightforward search's float32 relevance matrix (``B x N x M``)."""
        queries = self.lr[0] * self.lr[1]
        positions = (self.ref[0] // 4) * (self.ref[1] // 4)
        return 4 * self.batch * queries * positions


FULL_SIZES = {
    "cufed5": Size("CUFED5 (LR 88x125, ref 352x500)", (88, 125), (352, 500)),
    "lr192": Size("LR 192x192, ref 768x768", (192, 192), (768, 768)),
    "lr256": Size("LR 256x256, ref 1024x1024", (256, 256), (1024, 1024)),
    "train": Size("batch 9, HR 160x160 (relu3_1 40x40), ref 160x160", (40, 40), (160, 160), 9),
}
QUICK_SIZES = {
    "cufed5": Size("LR 32x40, ref 128x160", (32, 40), (128, 160)),
    "lr192": Size("LR 48x48, ref 192x192", (48, 48), (192, 192)),
    "lr256": Size("LR 64x64, ref 256x256", (64, 64), (256, 256)),
    "train": Size("batch 2, HR 96x96, ref 96x96", (24, 24), (96, 96), 2),
}

#: The straightforward module is not run where its relevance matrix alone would exceed this.
STRAIGHTFORWARD_LIMIT_BYTES = 12 * 2**30


def make_runtime(kind: str, keep_freed: bool) -> Any:
    """The runtime the fast variants pass to the model: ``"cpu"`` (worker threads, scratch
    memory: what ``Upscaler`` and training use) or ``"plain"`` (PyTorch's own intra-op threads).
    ``keep_freed``: keep freed memory in the heap (glibc), so large tensors stop paying page
    faults (and the runtime does not trim it)."""
    from ttsr.runtime import PLAIN, CPURuntime, keep_freed_memory

    if keep_freed:
        keep_freed_memory()
    return CPURuntime(trim=not keep_freed) if kind == "cpu" else PLAIN


def build_model(search: str, optimized: bool, quick: bool) -> torch.nn.Module:
    """The released architecture (or a small one with --quick), same weights for any search."""
    from ttsr.model.config import TTSRConfig
    from ttsr.model.ttsr import TTSR

    torch.manual_seed(0)
    blocks, feats = ((2, 2, 1, 1), 16) if quick else (RELEASED_BLOCKS, RELEASED_FEATS)
    config = TTSRConfig(num_res_blocks=blocks, n_feats=feats)
    model = TTSR(config, search=search, extractor_init="bundled")
    if optimized:
        model = model.to(memory_format=torch.channels_last)
    return model


def layout(sample: Sample, optimized: bool) -> Sample:
    if not optimized:
        return sample
    return Sample(
        **{
            k: getattr(sample, k).contiguous(memory_format=torch.channels_last)
            for k in ("lr", "lrsr", "hr", "ref", "refsr")
        }
    )


def run_case(name: str, args: argparse.Namespace) -> Measurement:
    """Run one case in this process; ``name`` is ``kind:size:variant``."""
    kind, size_key, variant = name.split(":")
    if kind == "precision":
        return precision_case(size_key, variant, args)
    size = (QUICK_SIZES if args.quick else FULL_SIZES)[size_key]
    left, right, _ = image_pair(args.images)
    fast = variant in ("fast", "optimized", "bf16")
    optimized = variant in ("optimized", "bf16")
    # Kept freed memory: faster training steps; inference keeps glibc's default (less memory).
    runtime = make_runtime(args.runtime, keep_freed=optimized and kind.startswith("train"))
    runtime = runtime if fast else None
    sample = make_samples(left, right, size.lr, size.ref, size.batch)
    warmup, repeats = args.warmup, args.repeats
    if size_key in ("lr192", "lr256"):
        warmup, repeats = 0, 1
    if kind in ("search-forward", "search-train"):
        return search_case(kind, sample, fast, warmup, repeats, runtime)
    if kind == "upscale":
        return upscale_case(sample, args.quick)
    model = build_model("fast" if fast else "straightforward", optimized, args.quick)
    sample = layout(sample, optimized)
    if kind == "infer":
        model.eval()

        def infer() -> None:
            with torch.no_grad():  # optimized: what the Upscaler asks for (the lean forward)
                model(sample.lr, sample.lrsr, sample.ref, sample.refsr, runtime, lean=optimized)

        return measure(infer, warmup, repeats)
    if kind in ("train", "train-bf16"):
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        mixed = variant == "bf16"  # what --trainer.precision bf16-mixed does

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):
                out = model(sample.lr, sample.lrsr, sample.ref, sample.refsr, runtime)
                loss = F.l1_loss(out.sr.float(), sample.hr * 1.0)
            loss.backward()
            optimizer.step()

        return measure(step, warmup, repeats)
    raise ValueError(f"unknown case {name!r}")


def search_case(
    kind: str, sample: Sample, fast: bool, warmup: int, repeats: int, runtime: Any
) -> Measurement:
    """SearchTransfer alone on extractor features of the sample."""
    from ttsr.model.extractor import TextureExtractor
    from ttsr.model.ttsr import build_search_transfer

    extractor = TextureExtractor("bundled").eval()
    with torch.no_grad():
        lrsr_lv3 = extractor((sample.lrsr + 1) / 2)[2]
        refsr_lv3 = extractor((sample.refsr + 1) / 2)[2]
        ref_lv1, ref_lv2, ref_lv3 = extractor((sample.ref + 1) / 2)
    inputs = [lrsr_lv3, refsr_lv3, ref_lv1, ref_lv2, ref_lv3]
    module = build_search_transfer("fast" if fast else "straightforward", "overlap")
    del extractor
    if kind == "search-forward":

        def forward() -> None:
            with torch.no_grad():
                module.search_and_transfer(*inputs, runtime=runtime)

        return measure(forward, warmup, repeats)
    leaves = [x.clone().requires_grad_() for x in inputs]

    def forward_backward() -> None:
        for leaf in leaves:
            leaf.grad = None
        found = module.search_and_transfer(*leaves, runtime=runtime)
        loss = found.soft_attention.sum() + found.t_lv3.mean() + found.t_lv2.mean()
        loss = loss + found.t_lv1.mean()
        loss.backward()

    return measure(forward_backward, warmup, repeats)


#: Rows of the table, for ``--tasks``.
TASKS = (
    "search-forward-cufed5",
    "search-train-train",
    "infer-cufed5",
    "infer-lr192",
    "train-train",
    "train-bf16-train",
    "infer-lr256",
    "upscale-lr256",
    "precision-0.7mp",
    "precision-4mp",
)

#: Whole-image inference sizes (LR height, width), the LR as its own reference: output 0.7 MP
#: (1024x680) and 4 MP (2464x1640).
PRECISION_SIZES = {"0.7mp": (170, 256), "4mp": (410, 616)}
QUICK_PRECISION_SIZES = {"0.7mp": (24, 36), "4mp": (48, 72)}


def y_channel(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of uint8 RGB, as the evaluation scores it."""
    rgb = rgb.astype(np.float64)
    return 16 + (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255


def y_psnr(a: np.ndarray, b: np.ndarray) -> float:
    error = float(np.mean((y_channel(a) - y_channel(b)) ** 2))
    return float("inf") if error == 0 else 10 * float(np.log10(255**2 / error))


def precision_case(size_key: str, precision: str, args: argparse.Namespace) -> Measurement:
    """What ``ttsr-infer --model bicubic --precision P`` does on the whole image: the
    LR (bicubic x4 down of a crop of the left view) as its own reference. Saves the output to
    ``--outputs`` and notes its Y-PSNR against the crop."""
    from ttsr.inference import Upscaler

    sizes = QUICK_PRECISION_SIZES if args.quick else PRECISION_SIZES
    lr_size = sizes[size_key]
    left, _, _ = image_pair(args.images)
    hr_size = (lr_size[0] * 4, lr_size[1] * 4)
    scale = max(hr_size[0] / left.height, hr_size[1] / left.width, 1.0)
    if scale > 1.0:
        left = resize(left, (round(left.height * scale) + 1, round(left.width * scale) + 1))
    top, left_x = (left.height - hr_size[0]) // 2, (left.width - hr_size[1]) // 2
    hr = left.convert("RGB").crop((left_x, top, left_x + hr_size[1], top + hr_size[0]))
    lr = resize(hr, lr_size)
    upscaler = Upscaler.from_checkpoint("bicubic", device="cpu", precision=precision)
    outputs: list[np.ndarray] = []
    warmup = 0 if size_key == "4mp" else args.warmup
    repeats = 1 if size_key == "4mp" else args.repeats
    measurement = measure(
        lambda: outputs.append(np.asarray(upscaler.upscale(lr, lr).sr)), warmup, repeats
    )
    sr = outputs[-1]
    if args.outputs is not None:
        np.save(args.outputs / f"{size_key}-{precision}.npy", sr)
    plan = upscaler.plan(lr_size, [lr_size])
    measurement.notes.update(
        psnr_vs_hr=y_psnr(sr, np.asarray(hr)),
        tiles=len(plan.tiles),
        estimate_mb=plan.estimate.peak / 2**20,
    )
    return measurement


#: Memory budget of the ``ttsr-infer`` case (``--max-memory``).
UPSCALE_BUDGET = 4 * 2**30


def upscale_case(sample: Sample, quick: bool) -> Measurement:
    """What ``ttsr-infer --max-memory 4GiB`` does: the Upscaler plans tiles for the budget."""
    from ttsr.inference import Upscaler

    def image(tensor: torch.Tensor) -> Image.Image:
        array = ((tensor[0] + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        return Image.fromarray(array)

    lr, ref = image(sample.lr), image(sample.ref)
    model = build_model("fast", False, quick)  # as ttsr-infer loads it (NCHW)
    upscaler = Upscaler(model, "cpu", max_memory=UPSCALE_BUDGET)
    plan = upscaler.plan((lr.height, lr.width), [(ref.height, ref.width)])
    measurement = measure(lambda: upscaler.upscale(lr, ref), 0, 1)
    measurement.notes.update(
        budget_mb=UPSCALE_BUDGET / 2**20,
        estimate_mb=plan.estimate.peak / 2**20,
        tiles=len(plan.tiles),
    )
    return measurement


# ----------------------------------------------------------------------------- driver


def child(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run ``name`` in a fresh process; its measurement plus its whole-life peak RSS."""
    command = [sys.executable, str(Path(__file__).resolve()), "--case", name]
    command += ["--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    command += ["--runtime", args.runtime]
    if args.quick:
        command.append("--quick")
    if args.images is not None:
        command += ["--images", str(args.images)]
    if args.outputs is not None:
        command += ["--outputs", str(args.outputs)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = process.communicate()
    usage = getattr(process, "rusage", None)
    if process.returncode != 0:
        return {"error": stderr.strip().splitlines()[-1] if stderr.strip() else "failed"}
    result = json.loads(stdout.strip().splitlines()[-1])
    if usage is not None:
        result["life_peak_rss"] = usage.ru_maxrss * 1024
    return result


class _WaitingPopen(subprocess.Popen):
    """Popen that keeps the child's resource usage (``os.wait4``)."""

    def _try_wait(self, wait_flags: int) -> tuple[int, int]:  # type: ignore[override]
        try:
            pid, status, usage = os.wait4(self.pid, wait_flags)
        except ChildProcessError:
            return self.pid, 0
        if pid == self.pid:
            self.rusage = usage
        return pid, status


subprocess.Popen = _WaitingPopen  # type: ignore[misc]


@dataclass(frozen=True)
class Ratios:
    """Fast against straightforward: speed-up, extra-memory and peak-memory ratios (or None),
    and the fast run's extra memory in MB."""

    speed: float | None
    extra: float | None
    peak: float | None
    fast_extra_mb: float | None


@dataclass
class Row:
    """One line of the table: a task measured with both implementations."""

    task: str
    size: str
    baseline: dict[str, Any] | None
    fast: dict[str, Any]
    target: str
    check: Callable[[Ratios], bool]
    baseline_note: str = ""


def seconds(result: dict[str, Any] | None) -> float | None:
    if not result or "seconds" not in result:
        return None
    return min(result["seconds"])


def extra_mb(result: dict[str, Any] | None) -> float | None:
    if not result or "peak_rss" not in result:
        return None
    return (result["peak_rss"] - result["rss_before"]) / 2**20


def peak_mb(result: dict[str, Any] | None) -> float | None:
    if not result or "peak_rss" not in result:
        return None
    return result["peak_rss"] / 2**20


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def describe(result: dict[str, Any] | None, note: str = "") -> str:
    if result is None:
        return note or "-"
    if "error" in result:
        return f"error: {result['error']}"
    times = result["seconds"]
    median = statistics.median(times)
    return (
        f"{fmt(min(times))} s (median {fmt(median)}, cpu {fmt(min(result['cpu_seconds']))}); "
        f"peak {fmt(peak_mb(result), 0)} MB, +{fmt(extra_mb(result), 0)} MB"
    )


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def markdown(rows: list[Row], header: list[str]) -> str:
    lines = header + [
        "",
        "| task | size | straightforward / baseline | fast / optimized | speed-up | "
        "extra memory, fast / straightforward | peak memory, fast / straightforward | target "
        "| met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ratios = Ratios(
            speed=ratio(seconds(row.baseline), seconds(row.fast)),
            extra=ratio(extra_mb(row.fast), extra_mb(row.baseline)),
            peak=ratio(peak_mb(row.fast), peak_mb(row.baseline)),
            fast_extra_mb=extra_mb(row.fast),
        )
        met = "-" if "error" in row.fast or row.target == "-" else row.check(ratios)
        verdict = met if isinstance(met, str) else ("yes" if met else "no")
        speed = "-" if ratios.speed is None else f"{ratios.speed:.1f}x"
        lines.append(
            f"| {row.task} | {row.size} | {describe(row.baseline, row.baseline_note)} | "
            f"{describe(row.fast)} | {speed} | {fmt(ratios.extra, 3)} | {fmt(ratios.peak, 3)} | "
            f"{row.target} | {verdict} |"
        )
    return "\n".join(lines)


def at_least(value: float | None, bound: float) -> bool:
    return value is not None and value >= bound


def at_most(value: float | None, bound: float) -> bool:
    return value is not None and value <= bound


def largest_row(largest: Size, get: Callable[[str], dict[str, Any]]) -> Row:
    """LR 256 / ref 1024: the fast model alone (the straightforward one does not fit)."""
    fast = get("infer:lr256:optimized")
    relevance_gb = largest.relevance_bytes() / 2**30
    note = "-"
    if largest.relevance_bytes() > STRAIGHTFORWARD_LIMIT_BYTES:
        note = f"does not fit: its relevance matrix alone is {relevance_gb:.1f} GB"
        base = None
    else:
        base = get("infer:lr256:baseline")
    return Row(
        "whole model, inference",
        largest.name,
        base,
        fast,
        "completes within 4 GB above the model's own memory",
        lambda r: at_most(r.fast_extra_mb, 4096),
        baseline_note=note,
    )


def precision_row(
    size_key: str, args: argparse.Namespace, get: Callable[[str], dict[str, Any]]
) -> Row:
    """Whole-image inference of the shipped bicubic model, float32 against bfloat16."""
    exact = get(f"precision:{size_key}:fp32")
    reduced = get(f"precision:{size_key}:bf16")
    height, width = (QUICK_PRECISION_SIZES if args.quick else PRECISION_SIZES)[size_key]
    quality = "output not compared"
    close = False
    files = [args.outputs / f"{size_key}-{p}.npy" for p in ("fp32", "bf16")]
    if all(f.is_file() for f in files):
        a, b = (np.load(f) for f in files)
        gap = reduced["notes"]["psnr_vs_hr"] - exact["notes"]["psnr_vs_hr"]
        changed = float(np.mean(a != b))
        quality = (
            f"Y-PSNR against the HR crop {exact['notes']['psnr_vs_hr']:.3f} (fp32) / "
            f"{reduced['notes']['psnr_vs_hr']:.3f} (bf16): {gap:+.3f} dB; bf16 against fp32 "
            f"{y_psnr(a, b):.1f} dB, {changed:.1%} of values differ, at most by "
            f"{int(np.abs(a.astype(int) - b).max())}"
        )
        close = abs(gap) <= 0.02
        quality += "; memory estimates " + " / ".join(
            f"{r['notes']['estimate_mb']:.0f} MB" for r in (exact, reduced)
        )
    return Row(
        "whole-image inference (Upscaler, shipped bicubic model, LR as its own reference): fp32 "
        "(baseline column) against bf16",
        f"LR {width}x{height} -> {4 * width}x{4 * height} ({16 * width * height / 1e6:.1f} MP; "
        f"{reduced.get('notes', {}).get('tiles', '?')} tile(s))",
        exact,
        reduced,
        f">= 2.5x faster, Y-PSNR within 0.02 dB: {quality}",
        lambda r: at_least(r.speed, 2.5) and close,
    )


def budget_row(largest: Size, get: Callable[[str], dict[str, Any]]) -> Row:
    """What ttsr-infer does with a memory budget on LR 256 / ref 1024."""
    budgeted = get("upscale:lr256:optimized")
    notes = budgeted.get("notes", {})
    return Row(
        f"ttsr-infer (Upscaler, --max-memory {UPSCALE_BUDGET / 2**30:.0f}GiB)",
        largest.name,
        None,
        budgeted,
        f"the budget holds ({notes.get('tiles', '?')} tiles planned, "
        f"estimate {notes.get('estimate_mb', 0):.0f} MB)",
        lambda r: at_most(r.fast_extra_mb, UPSCALE_BUDGET / 2**20),
        baseline_note="-",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    parser.add_argument("--json", type=Path, help="write raw measurements here")
    parser.add_argument(
        "--images", type=Path, default=DEFAULT_IMAGES if DEFAULT_IMAGES.is_dir() else None
    )
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--runtime",
        choices=("cpu", "plain"),
        default="cpu",
        help="how the fast variants run the search's CPU work: ttsr.runtime.CPURuntime "
        "(worker threads, scratch memory) or plain PyTorch (its own intra-op threads)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--tasks",
        nargs="+",
        choices=TASKS,
        help="measure only these rows (default: all)",
    )
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--outputs", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.case:
        result = run_case(args.case, args)
        print(json.dumps(result.__dict__))
        return 0

    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    _, _, source = image_pair(args.images)
    started = time.time()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    results: dict[str, dict[str, Any]] = {}

    def wanted(task: str) -> bool:
        return not args.tasks or task in args.tasks

    def get(name: str) -> dict[str, Any]:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results[name] = child(name, args)
        print(f"  {describe(results[name])}", file=sys.stderr, flush=True)
        return results[name]

    rows: list[Row] = []
    for kind, task, size_key, target, check in (
        (
            "search-forward",
            "SearchTransfer forward",
            "cufed5",
            ">= 10x faster, <= 1/5 of the extra memory",
            lambda r: at_least(r.speed, 10) and at_most(r.extra, 1 / 5),
        ),
        (
            "search-train",
            "SearchTransfer forward+backward",
            "train",
            ">= 5x faster",
            lambda r: at_least(r.speed, 5),
        ),
        (
            "infer",
            "whole model, inference",
            "cufed5",
            ">= 2x faster, <= 1/3 of the peak memory (what the run adds: extra)",
            lambda r: at_least(r.speed, 2) and at_most(r.extra, 1 / 3),
        ),
        ("infer", "whole model, inference", "lr192", "-", lambda r: True),
        (
            "train",
            "whole model, training step (L1, Adam)",
            "train",
            ">= 1.3x faster",
            lambda r: at_least(r.speed, 1.3),
        ),
        (
            "train-bf16",
            "whole model, training step, bf16-mixed against float32 (both optimized)",
            "train",
            "-",
            lambda r: True,
        ),
    ):
        if not wanted(f"{kind}-{size_key}"):
            continue
        if kind.startswith("search"):
            variants = ("straightforward", "fast")
        elif kind == "train-bf16":
            variants = ("optimized", "bf16")
        else:
            variants = ("baseline", "optimized")
        base = get(f"{kind}:{size_key}:{variants[0]}")
        fast = get(f"{kind}:{size_key}:{variants[1]}")
        rows.append(Row(task, sizes[size_key].name, base, fast, target, check))

    largest = sizes["lr256"]
    if wanted("infer-lr256"):
        rows.append(largest_row(largest, get))
    if wanted("upscale-lr256"):
        rows.append(budget_row(largest, get))
    with tempfile.TemporaryDirectory() as outputs:
        args.outputs = Path(outputs)
        for size_key in PRECISION_SIZES:
            if wanted(f"precision-{size_key}"):
                rows.append(precision_row(size_key, args, get))

    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    header = [
        f"# TTSR CPU benchmark{' (quick)' if args.quick else ''}",
        "",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads",
        f"- date: {time.strftime('%Y-%m-%d %H:%M', time.localtime(started))}, "
        f"{(time.time() - started) / 60:.1f} min; load average {load_before:.1f} at the start, "
        f"{load_after:.1f} at the end (the machine is shared: ratios of one run are what count)",
        f"- inputs: {source}; extractor: bundled ImageNet VGG19; generator: "
        f"{'small (2+2+1+1, 16 feats)' if args.quick else 'released size (16+16+8+4, 64 feats)'},"
        " seeded random weights, the same in both columns",
        "- straightforward / baseline: `SearchTransfer` as written, NCHW. fast / optimized: "
        "`FastSearchTransfer`; for the whole model also channels_last and, under no_grad, the "
        "generator's lean forward; for the training step also freed memory kept in "
        f"the heap (`ttsr.runtime.keep_freed_memory`); runtime: {args.runtime}. Precision rows: "
        "`Upscaler(precision=...)` with the shipped `bicubic` model, fp32 against bf16",
        "- times: best of the timed runs (median and CPU seconds beside; big sizes: one cold "
        "run); memory: peak resident set of the case's own process (warm-up included) and how "
        "far it rose above the set before the timed work (extra: libraries, weights and inputs "
        "excluded)",
    ]
    report = markdown(rows, header)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
