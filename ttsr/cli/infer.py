"""``ttsr-infer``: upscale images x4, borrowing texture from reference images.

ttsr-infer --lr photo.png --ref other_view.jpg --out photo_x4.png
ttsr-infer --lr photo.png --ref a.jpg --ref b.jpg --out photo_x4.png --save-attention
ttsr-infer --lr lr_dir/ --ref ref_dir/ --out sr_dir/     # references matched by file stem
ttsr-infer --lr lr_dir/ --ref common.jpg --out sr_dir/   # one reference set for every input
ttsr-infer --lr photo.png --ref-dir album/ --out photo_x4.png --save-matches  # ttsr chooses
ttsr-infer --demo --out demo_sr.png                       # the example pair shipped with ttsr
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ttsr.album import DEFAULT_TOP_K, Album, AlbumMatches
from ttsr.cli import common
from ttsr.cli.common import (
    EXIT_OK,
    add_flag,
    add_model_arguments,
    build_upscaler,
    cli_main,
    describe_model,
    positive_int,
)
from ttsr.imaging import (
    InputError,
    OutputError,
    check_writable,
    list_images,
    match_references,
    save_image,
    write_atomic,
)
from ttsr.inference import Upscaler, UpscaleResult
from ttsr.memory import format_size

PROG = "ttsr-infer"

#: Extra outputs, by option (``--save-<option>``): the kind (file ``NAME_<kind>.<ext>``), the help.
EXTRAS = {
    "bicubic": ("bicubic", "the bicubic x4 upscale"),
    "attention": (
        "attention",
        "soft-attention heat map: bright where a reference held a close match",
    ),
    "correspondence": (
        "correspondence",
        "each output patch coloured by the reference position its texture came from, beside "
        "the references coloured with the same code",
    ),
    "comparison": ("comparison", "bicubic | TTSR | reference side by side"),
    "flow": (
        "flow",
        "the correspondence as a flow field, NAME_flow.npz: 'flow' [2, H, W] (dx, dy) in "
        "output pixels from each LR position's 4x4 output patch to its match, 'reference_id', "
        "'match_x', 'match_y' (centres in reference pixels), 'reference_sizes'",
    ),
    "matches": (
        "references",
        "with --ref-dir: NAME_references.json, the chosen references in order and the "
        "ranked candidates with their scores from both stages",
    ),
}
#: Extras that are not images, by kind: their file extension.
DATA_EXTRAS = {"flow": ".npz", "references": ".json"}


def add_extra_arguments(parser: argparse.ArgumentParser, album: bool = True) -> None:
    """The ``--save-<option>`` options of :data:`EXTRAS` (``album=False``: without the album's
    ``--save-matches``, which is off)."""
    extras = parser.add_argument_group(
        "extra outputs (written beside each output as NAME_<kind>.<ext>)"
    )
    for option, (_, description) in EXTRAS.items():
        if album or option != "matches":
            add_flag(extras, f"--save-{option}", description)
    if not album:
        parser.set_defaults(save_matches=False, ref_dir=None)


def add_input_arguments(
    parser: argparse.ArgumentParser, lr_help: str, ref_help: str
) -> argparse._ArgumentGroup:
    """The "inputs and outputs" group, with ``--lr`` and the repeatable ``--ref``."""
    group = parser.add_argument_group("inputs and outputs")
    group.add_argument("--lr", metavar="PATH", help=lr_help)
    group.add_argument("--ref", metavar="PATH", action="append", default=[], help=ref_help)
    return group


def demo_paths() -> tuple[Path, Path]:
    """The demo pair shipped in ``ttsr/assets``: (LR, reference)."""
    assets = Path(str(resources.files("ttsr") / "assets"))
    return assets / "demo_lr.png", assets / "demo_ref.png"


@dataclass(frozen=True)
class Job:
    """One image to upscale: its LR, references and output file (and, for references chosen
    from an album, how they were chosen)."""

    lr: Path
    refs: tuple[Path, ...]
    out: Path
    matches: AlbumMatches | None = None


def build_parser() -> argparse.ArgumentParser:
    parser = common.command_parser(
        PROG,
        "Reference-based x4 super-resolution (TTSR): upscale a low-resolution image "
        "with textures found in one or more reference images of similar content (another view of "
        "the scene, a sharper photo). Folders process every image in them.",
        __doc__,
    )
    io = add_input_arguments(
        parser,
        "low-resolution image, or a folder of them",
        "reference image; repeat for several references (searched jointly). With --lr DIR: "
        "a folder whose NAME.png and NAME_1.png, NAME_2.png ... are the references of input "
        "NAME, or files used for every input",
    )
    io.add_argument(
        "--ref-dir",
        metavar="ALBUM",
        help="a folder of photos (an album, sub-folders included) for ttsr to choose the "
        "references from, for each input: a cheap global ranking of every photo, then TTSR's "
        "patch search on the best few. Its index is cached (see --album-cache), so a second run "
        "reads only new or changed photos",
    )
    io.add_argument(
        "--top-k",
        type=positive_int,
        default=DEFAULT_TOP_K,
        metavar="K",
        help=f"with --ref-dir: use at most K references (default {DEFAULT_TOP_K}); after the best "
        "one, a photo is added only if it closely matches a fifth or more of the image that the "
        "ones before did not",
    )
    io.add_argument(
        "--album-cache",
        metavar="DIR",
        help="where album indexes are kept (default: $TTSR_CACHE_DIR, else $XDG_CACHE_HOME/ttsr, "
        "else ~/.cache/ttsr); the album folder itself is never written to",
    )
    io.add_argument(
        "--out",
        metavar="PATH",
        help="output image (.png, .jpg ...), or a folder with --lr DIR (default for --demo: "
        "ttsr_demo_sr.png)",
    )
    add_flag(io, "--demo", "upscale the example pair shipped with ttsr")
    add_extra_arguments(parser)
    add_model_arguments(parser)
    return parser


def extra_outputs(out: Path, args: argparse.Namespace) -> dict[str, Path]:
    """Requested extra output files of one SR output, by kind."""
    return {
        kind: out.with_name(f"{out.stem}_{kind}{DATA_EXTRAS.get(kind, out.suffix)}")
        for option, (kind, _) in EXTRAS.items()
        if getattr(args, f"save_{option}")
    }


def _require_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise InputError(f"{path}: no such file; check the path of the {what}")
    if path.is_dir():
        raise InputError(f"{path} is a directory, but a {what} is expected here")
    return path


def plan_jobs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[Job]:
    """Turn the options into jobs; raises :class:`InputError` for unusable paths."""
    if args.save_matches and not args.ref_dir:
        parser.error("--save-matches goes with --ref-dir (references chosen from an album)")
    if args.demo:
        if args.lr or args.ref or args.ref_dir:
            parser.error("--demo uses the shipped example pair: leave out --lr, --ref, --ref-dir")
        lr, ref = demo_paths()
        return [Job(lr, (ref,), Path(args.out or "ttsr_demo_sr.png"))]
    if args.ref and args.ref_dir:
        parser.error("give --ref (references) or --ref-dir (an album to choose from), not both")
    if not args.lr or not (args.ref or args.ref_dir) or not args.out:
        parser.error("give --lr, --ref or --ref-dir, and --out (or --demo)")
    if args.ref_dir:
        if not Path(args.ref_dir).is_dir():
            raise InputError(f"{args.ref_dir} is not a folder; --ref-dir takes a folder of photos")
        return _album_jobs(Path(args.lr), Path(args.out))
    lr, refs, out = Path(args.lr), [Path(r) for r in args.ref], Path(args.out)
    if lr.is_dir():
        return _folder_jobs(lr, refs, out)
    _require_file(lr, "low-resolution image file")
    if out.is_dir():
        raise OutputError(f"{out} is a directory; give an output file name (e.g. {out}/sr.png)")
    return [Job(lr, tuple(_require_file(r, "reference image file") for r in refs), out)]


def _album_jobs(lr: Path, out: Path) -> list[Job]:
    """Jobs whose references are chosen from the album later (:func:`choose_from_album`)."""
    if lr.is_dir():
        return [Job(p, (), out / f"{p.stem}.png") for p in _folder_inputs(lr, out)]
    _require_file(lr, "low-resolution image file")
    if out.is_dir():
        raise OutputError(f"{out} is a directory; give an output file name (e.g. {out}/sr.png)")
    return [Job(lr, (), out)]


def _folder_inputs(lr_dir: Path, out_dir: Path) -> list[Path]:
    inputs = list_images(lr_dir)
    if not inputs:
        raise InputError(
            f"{lr_dir} is a directory without images (.png, .jpg, ...); give an image file or a "
            "folder of images"
        )
    stems = [p.stem for p in inputs]
    duplicates = sorted({s for s in stems if stems.count(s) > 1})
    if duplicates:
        raise InputError(f"{lr_dir}: several inputs share the name {duplicates[0]!r}; rename them")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir} is a file; with --lr DIR, --out must be a folder")
    return inputs


def _folder_jobs(lr_dir: Path, refs: list[Path], out_dir: Path) -> list[Job]:
    inputs = _folder_inputs(lr_dir, out_dir)
    stems = [p.stem for p in inputs]
    if len(refs) == 1 and refs[0].is_dir():
        matched = match_references(stems, list_images(refs[0]))
        missing = [s for s in stems if not matched[s]]
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise InputError(
                f"no reference in {refs[0]} for {len(missing)} of {len(stems)} inputs ({shown}); "
                "name references NAME.png or NAME_1.png, NAME_2.png ... after their input"
            )
        reference_sets = {s: tuple(matched[s]) for s in stems}
    else:
        common = tuple(_require_file(r, "reference image file") for r in refs)
        reference_sets = {s: common for s in stems}
    return [Job(p, reference_sets[p.stem], out_dir / f"{p.stem}.png") for p in inputs]


def save_outputs(result: UpscaleResult, job: Job, extras: dict[str, Path]) -> None:
    """Write the SR image and the requested extras (each atomically)."""
    save_image(result.sr, job.out)
    render = {
        "bicubic": lambda: result.bicubic,
        "attention": result.attention_map,
        "correspondence": result.correspondence_map,
        "comparison": result.comparison,
    }
    for kind, path in extras.items():
        if kind == "flow":
            write_atomic(path, flow_archive(result))
        elif kind == "references":
            assert job.matches is not None
            write_atomic(path, job.matches.to_json().encode())
        else:
            save_image(render[kind](), path)


def flow_archive(result: UpscaleResult) -> bytes:
    """The ``.npz`` bytes of ``--save-flow`` (see its help)."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **result.flow_fields())
    return buffer.getvalue()


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Check everything that can be checked cheaply, then upscale every job."""
    jobs = plan_jobs(args, parser)
    for job in jobs:
        check_writable(job.out)
        for kind, path in extra_outputs(job.out, args).items():
            check_writable(path, image=kind not in DATA_EXTRAS)
    upscaler = build_upscaler(args)
    if not upscaler.model.config.use_texture and (
        args.save_attention or args.save_correspondence or args.save_flow
    ):
        raise InputError("this checkpoint's model uses no references: it has no attention to save")
    if args.ref_dir:
        jobs = choose_from_album(jobs, Album(args.ref_dir, args.album_cache), upscaler, args.top_k)
    plans = [upscaler.check_sizes(job.lr, job.refs) for job in jobs]
    total_tiles = sum(len(p.tiles) for p in plans)
    started = time.perf_counter()
    with tqdm(total=total_tiles, unit="tile", file=sys.stderr, disable=None) as bar:
        for job in jobs:
            bar.set_description(job.lr.name)
            result = upscaler.upscale(job.lr, job.refs, progress=lambda *_: bar.update(1))
            save_outputs(result, job, extra_outputs(job.out, args))
    elapsed = time.perf_counter() - started
    where = jobs[0].out if len(jobs) == 1 else jobs[0].out.parent
    peak = max(p.estimate.peak for p in plans)
    print(
        f"{PROG}: upscaled {len(jobs)} image{'s' * (len(jobs) != 1)} x4 with "
        f"{describe_model(upscaler)} in {elapsed:.1f} s on "
        f"{upscaler.device} in {upscaler.precision} "
        f"({total_tiles} tile{'s' * (total_tiles != 1)}, estimated peak "
        f"{format_size(peak)} of a {format_size(upscaler.max_memory)} budget) -> {where}"
    )
    return EXIT_OK


def choose_from_album(jobs: list[Job], album: Album, upscaler: Upscaler, top_k: int) -> list[Job]:
    """Index the album (progress bar), then choose each job's references from it."""
    with tqdm(unit="photo", file=sys.stderr, disable=None, desc="indexing album") as bar:

        def indexed(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        album.index(upscaler.model, progress=indexed)  # the model's extractor describes photos
    chosen = []
    with tqdm(jobs, unit="image", file=sys.stderr, disable=None, desc="choosing references") as bar:
        for job in bar:
            matches = upscaler.choose_references(job.lr, album, top_k)
            chosen.append(replace(job, refs=matches.chosen, matches=matches))
    for job in chosen:
        names = ", ".join(str(p) for p in job.refs)
        print(f"{PROG}: {job.lr.name}: reference{'s' * (len(job.refs) > 1)} {names}")
    return chosen


main = cli_main(PROG, build_parser, run)


if __name__ == "__main__":
    sys.exit(main())
