"""``ttsr-infer-dist``: upscale a folder x4 on several processes, GPUs or machines (Lightning DDP).

ttsr-infer-dist --lr lr_dir/ --ref ref_dir/ --out sr_dir/ --accelerator gpu --devices 4
ttsr-infer-dist --lr lr_dir/ --ref common.jpg --out sr_dir/ --accelerator cpu --devices 8
ttsr-infer-dist --lr lr_dir/ --ref ref_dir/ --out sr_dir/ --devices 4 --skip-existing  # resume

Two machines with 4 GPUs each: run the same command on both, with sr_dir/ on a shared file system
(under SLURM or torchrun the cluster's variables are used instead):
  MASTER_ADDR=node0 MASTER_PORT=29500 NODE_RANK=0 ttsr-infer-dist ... --devices 4 --num-nodes 2
  MASTER_ADDR=node0 MASTER_PORT=29500 NODE_RANK=1 ttsr-infer-dist ... --devices 4 --num-nodes 2

Inputs are matched to references as by ttsr-infer; each process takes every N-th image and writes
its outputs atomically. The outputs are those of ttsr-infer, whatever the number of processes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ttsr.cli import common
from ttsr.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_OK,
    add_flag,
    add_model_arguments,
    chosen_model,
    cli_main,
    describe_chosen_model,
    error,
    positive_int,
)
from ttsr.cli.infer import add_extra_arguments, add_input_arguments, extra_outputs, plan_jobs
from ttsr.imaging import check_writable, image_size

PROG = "ttsr-infer-dist"


def devices_count(text: str) -> int | str:
    """argparse type for ``--devices``: a positive count or ``auto``."""
    return text if text == "auto" else positive_int(text)


def report_failure(job: object, message: str) -> None:
    """One stderr line per refused image (module level: picklable for ``ddp_spawn``)."""
    error(PROG, message)


def build_parser() -> argparse.ArgumentParser:
    parser = common.command_parser(
        PROG,
        "Reference-based x4 super-resolution (TTSR) of a folder of images, shared "
        "among processes on one or several machines with PyTorch Lightning (Trainer.predict, "
        "DDP: this command is rerun in each process). Same inputs and outputs as ttsr-infer with "
        "--lr DIR.",
        __doc__,
        epilog="doc",
    )
    io = add_input_arguments(
        parser,
        "folder of low-resolution images (or one image)",
        "folder whose NAME.png and NAME_1.png, NAME_2.png ... are the references of input "
        "NAME, or reference files used for every input (repeat --ref)",
    )
    io.add_argument(
        "--out", metavar="DIR", help="output folder (NAME.png per input; a file with --lr FILE)"
    )
    add_flag(
        io,
        "--skip-existing",
        "leave out inputs whose outputs all exist (resume an interrupted run)",
    )
    add_extra_arguments(parser, album=False)
    scale = parser.add_argument_group("processes")
    scale.add_argument(
        "--accelerator",
        choices=("auto", "cpu", "gpu"),
        default="auto",
        help="where to run (default: auto, GPUs when there are)",
    )
    scale.add_argument(
        "--devices",
        type=devices_count,
        default=1,
        metavar="N",
        help="processes per machine: GPUs, or CPU processes (default: 1; auto: all GPUs)",
    )
    scale.add_argument(
        "--num-nodes", type=positive_int, default=1, metavar="M", help="machines (default: 1)"
    )
    scale.add_argument(
        "--threads",
        type=positive_int,
        metavar="T",
        help="CPU threads per process (default: the cores shared among the processes)",
    )
    add_model_arguments(parser, per_process=True)
    parser.set_defaults(demo=False)  # ttsr-infer's job planning reads it
    return parser


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ttsr.distributed_inference import InferenceJob, pending_jobs, upscale_jobs

    if not (args.lr and args.ref and args.out):
        parser.error("give --lr, --ref and --out")
    model = chosen_model(args)
    jobs = [
        InferenceJob(job.lr, job.refs, job.out, tuple(extra_outputs(job.out, args).items()))
        for job in plan_jobs(args, parser)
    ]
    for job in jobs:
        for path in job.outputs():
            check_writable(path)
    todo = pending_jobs(jobs) if args.skip_existing else jobs
    if not todo:
        print(f"{PROG}: nothing to do: the outputs of all {len(jobs)} inputs exist")
        return EXIT_OK
    for path in sorted({p for job in todo for p in (job.lr, *job.refs)}):
        image_size(path)  # unreadable files are reported now, before any process starts

    summary = upscale_jobs(
        todo,
        model,
        accelerator=args.accelerator,
        devices=args.devices,
        num_nodes=args.num_nodes,
        max_memory=args.max_memory,
        tile_size=args.tile,
        threads=args.threads,
        precision=args.precision,
        on_failure=report_failure,
        progress_bar=sys.stderr.isatty(),
        quiet=not args.debug,
    )
    if not summary.is_global_zero:
        return EXIT_BAD_INPUT if summary.failed else EXIT_OK
    where = jobs[0].out if len(jobs) == 1 else Path(args.out)
    shares = " + ".join(str(n) for n in summary.done_per_rank)
    skipped = len(jobs) - len(todo)
    print(
        f"{PROG}: upscaled {summary.done} of {len(todo)} images x4 with "
        f"{describe_chosen_model(args)} in {summary.seconds:.1f} s on "
        f"{summary.world_size} process{'es' * (summary.world_size != 1)} ({shares}; "
        f"{summary.tiles} tiles)"
        + (f", skipped {skipped} already done" if skipped else "")
        + f" -> {where}"
    )
    if summary.failed:
        error(PROG, f"{summary.failed} images failed (see above)")
        return EXIT_BAD_INPUT
    return EXIT_OK


main = cli_main(PROG, build_parser, run)


if __name__ == "__main__":
    sys.exit(main())
