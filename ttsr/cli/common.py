"""What the inference CLIs share: error reporting, notes on stderr, model and memory options.

Bad input (:class:`~ttsr.imaging.InputError`, :class:`~ttsr.checkpoints.CheckpointError`, file
system errors) is reported as one line on stderr with exit code 2; ``--debug`` shows the traceback
instead. Notes from the library (e.g. a greyscale image converted to RGB) go to stderr as well.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch

from ttsr.checkpoints import CheckpointError, TTSRWeights
from ttsr.imaging import InputError
from ttsr.inference import Upscaler, shipped_model_names
from ttsr.memory import parse_size
from ttsr.reference_alignment import ALIGNMENTS
from ttsr.runtime.precision import PRECISIONS

EXIT_OK = 0
EXIT_INTERNAL_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

#: Errors that mean the input (or an output location) is unusable: reported without traceback.
BAD_INPUT = (InputError, CheckpointError, OSError)


class _StderrNotes(logging.Handler):
    """Writes ``PROG: note: message`` (``warning:`` for warnings) to whatever ``sys.stderr`` is
    when the note is emitted."""

    def __init__(self, prog: str) -> None:
        super().__init__(logging.INFO)
        self.prog = prog

    def emit(self, record: logging.LogRecord) -> None:
        kind = "warning" if record.levelno >= logging.WARNING else "note"
        print(f"{self.prog}: {kind}: {record.getMessage()}", file=sys.stderr)


def error(prog: str, message: str) -> None:
    """Print one error line on stderr."""
    print(f"{prog}: error: {message}", file=sys.stderr)


def run_guarded(prog: str, body: Callable[[], int], debug: bool = False) -> int:
    """Run ``body`` and turn failures into one stderr line and an exit code (2 for bad input)."""
    notes = _StderrNotes(prog)
    library_logger = logging.getLogger("ttsr")
    previous_level = library_logger.level
    library_logger.addHandler(notes)
    library_logger.setLevel(logging.INFO)
    try:
        return body()
    except BAD_INPUT as failure:
        if debug:
            raise
        error(prog, _message(failure))
        return EXIT_BAD_INPUT
    except (MemoryError, torch.cuda.OutOfMemoryError):
        if debug:
            raise
        error(prog, "ran out of memory; lower --max-memory so that the image is processed in tiles")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        error(prog, "interrupted")
        return EXIT_INTERRUPTED
    except Exception as failure:
        if debug:
            raise
        error(
            prog,
            f"internal error ({type(failure).__name__}: {failure}); rerun with --debug "
            "for the traceback and report it",
        )
        return EXIT_INTERNAL_ERROR
    finally:
        library_logger.removeHandler(notes)
        library_logger.setLevel(previous_level)


#: A CLI's body: ``run(args, parser) -> exit code``; ``parser.error`` for bad option combinations.
CliBody = Callable[[argparse.Namespace, argparse.ArgumentParser], int]


def run_cli(
    prog: str, parser: argparse.ArgumentParser, body: CliBody, argv: Sequence[str] | None
) -> int:
    """A CLI's ``main``: parse ``argv`` (``None``: the command line), then run ``body`` under
    :func:`run_guarded` (one stderr line and exit code 2 for bad input; ``--debug`` re-raises)."""
    args = parser.parse_args(argv)
    return run_guarded(prog, lambda: body(args, parser), debug=args.debug)


def _message(failure: BaseException) -> str:
    if isinstance(failure, OSError) and not isinstance(failure, InputError):
        where = f" ({failure.filename})" if failure.filename else ""
        return f"{failure.strerror or failure}{where}"
    return str(failure)


def memory_size(text: str) -> int:
    """argparse type for ``--max-memory``."""
    try:
        return parse_size(text)
    except InputError as failure:
        raise argparse.ArgumentTypeError(str(failure)) from failure


def positive_int(text: str) -> int:
    """argparse type for counts and sizes."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_precision_argument(group: argparse._ActionsContainer, default: str = "auto") -> None:
    """``--precision``: what the model computes in (:mod:`ttsr.runtime.precision`)."""
    group.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=default,
        help="what the network computes in: auto (bf16 on CPUs with native bfloat16, AVX-512 "
        "BF16 or AMX, and on CUDA GPUs, else fp16 on GPUs and fp32), fp32, bf16 or fp16 "
        f"(default: {default}); the texture search compares relevances in float32 in every "
        "precision (speed and quality: README, Speed)",
    )


def add_model_arguments(
    parser: argparse.ArgumentParser, precision: str = "auto", per_process: bool = False
) -> None:
    """Model choice (``--model`` or ``--checkpoint``), resources (device, precision, memory,
    tiles) and ``--debug``: the options of the commands that run a model; ``precision``: the
    ``--precision`` default.

    ``per_process`` (``ttsr-infer-dist``): no ``--device`` (the processes' devices are chosen by
    that command's own options); ``--max-memory`` is then per process.
    """
    group = parser.add_argument_group("model and resources")
    names = shipped_model_names()
    described = "; ".join(f"{n}: {TTSRWeights.get(n).description}" for n in names)
    group.add_argument(
        "--model",
        choices=names,
        help=f"shipped model to use (default: {names[0]}). {described}",
    )
    group.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="a ttsr checkpoint file (.pt) to use instead of a shipped model (convert "
        "released TTSR weights with ttsr-convert)",
    )
    if not per_process:
        group.add_argument(
            "--device",
            default="auto",
            help="auto (CUDA when available), cpu, cuda or cuda:N (default: auto)",
        )
    add_precision_argument(group, precision)
    group.add_argument(
        "--max-memory",
        type=memory_size,
        metavar="SIZE",
        help=(
            "memory budget per image and process, e.g. 4GB (default: half of the available "
            "memory, shared by the CPU processes of a machine); larger images are tiled"
            if per_process
            else "memory budget for one image, e.g. 4GB (default: half of the memory available); "
            "larger images are processed in tiles with identical results, and a run that cannot "
            "fit is refused before it starts"
        ),
    )
    if not per_process:
        group.add_argument(
            "--align-ref",
            choices=ALIGNMENTS,
            default="none",
            help="match each reference's colours and exposure to the input's before the search, "
            "in CIE Lab: meanstd (mean and spread per channel), histogram, or none (default: none)",
        )
    group.add_argument(
        "--tile",
        type=positive_int,
        metavar="PIXELS",
        help="force LR tiles of this size"
        + ("" if per_process else " (default: as large as --max-memory allows)"),
    )
    add_debug_argument(parser)


def command_parser(
    prog: str, description: str, doc: str, epilog: Literal["examples", "doc"] = "examples"
) -> argparse.ArgumentParser:
    """A command's parser: its description, and an epilog shown as written, from the CLI
    module's docstring ``doc``: its ``ttsr-`` command lines (``"examples"``) or all of it but
    the first line (``"doc"``)."""
    return argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=examples(doc) if epilog == "examples" else doc.split("\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def examples(docstring: str) -> str:
    """An ``examples:`` epilog from the command lines in a CLI module's docstring."""
    lines = [line.strip() for line in docstring.splitlines() if line.strip().startswith("ttsr-")]
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def cli_main(
    prog: str, build_parser: Callable[[], argparse.ArgumentParser], body: CliBody
) -> Callable[[Sequence[str] | None], int]:
    """A CLI's ``main(argv=None) -> exit code``: :func:`run_cli` with a fresh parser."""

    def main(argv: Sequence[str] | None = None) -> int:
        return run_cli(prog, build_parser(), body, argv)

    return main


def add_flag(group: argparse._ActionsContainer, option: str, help: str) -> None:
    """An on/off option (``store_true``): ``--option`` turns it on."""
    group.add_argument(option, action="store_true", help=help)


def add_debug_argument(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "--debug", "show the full traceback when something fails")


def chosen_model(args: argparse.Namespace) -> str | Path | None:
    """What :func:`add_model_arguments` options ask for: a file, a shipped name or the default."""
    if args.checkpoint and args.model:
        raise InputError("give --model NAME or --checkpoint PATH, not both")
    return Path(args.checkpoint) if args.checkpoint else args.model


def model_label(args: argparse.Namespace) -> str:
    """The model in words for reports: ``"real"``, ``"bicubic"`` or the checkpoint's path."""
    return str(chosen_model(args) or shipped_model_names()[0])


def _describe(name: str) -> str:
    return f"the {name} model" if name in shipped_model_names() else f"checkpoint {name}"


def describe_model(upscaler: Upscaler) -> str:
    """``"the real model"`` for a shipped model, ``"checkpoint PATH"`` for a file."""
    return _describe(upscaler.model_name)


def describe_chosen_model(args: argparse.Namespace) -> str:
    """:func:`describe_model` of what the :func:`add_model_arguments` options ask for."""
    return _describe(model_label(args))


def build_upscaler(args: argparse.Namespace) -> Upscaler:
    """The :class:`Upscaler` described by :func:`add_model_arguments` options."""
    return Upscaler.from_checkpoint(
        chosen_model(args),
        device=args.device,
        max_memory=args.max_memory,
        tile_size=args.tile,
        reference_alignment=args.align_ref,
        precision=args.precision,
    )
