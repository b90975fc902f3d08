"""``ttsr-train``: train, validate and test TTSR with LightningCLI, and export trained weights.

    ttsr-train fit --config configs/demo.yaml [--ckpt_path last] [--trainer.max_steps 1000]
    ttsr-train validate --config configs/demo.yaml --ckpt_path runs/demo/checkpoints/last.ckpt
    ttsr-train fit --config configs/demo.yaml --print_config
    ttsr-train export --ckpt runs/demo/checkpoints/last.ckpt --out checkpoints/demo.pt

Bad input (a missing file, an invalid option) prints one line on stderr and exits with 2; add
``--debug`` for the full traceback.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import warnings
from collections.abc import Sequence
from typing import Any, NoReturn

from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.trainer import Trainer

from ttsr.checkpoints import load_checkpoint, load_state_strict
from ttsr.data.datamodule import TTSRDataModule
from ttsr.losses import WeightsUnavailableError
from ttsr.training import AtomicCheckpointIO, TTSRTraining, export_weights

PROG = "ttsr-train"

#: Warnings that say nothing useful here: manual-optimisation checkpoints hold the post-step
#: weights, which is what resuming needs; main(argv) passes its arguments on purpose.
IGNORED_WARNINGS = (
    "Using ModelCheckpoint with manual optimization",
    "LightningCLI's args parameter is intended",
)
DESCRIPTION = (
    "Train, validate and test TTSR (LightningCLI: every option of the model, data and trainer can "
    "be set in --config files or on the command line). Also: 'ttsr-train export --ckpt X.ckpt "
    "--out Y.pt' writes a trained model for ttsr-infer/ttsr-eval. Add --debug for tracebacks."
)
#: Exceptions that mean bad input (files, options), reported in one line with exit code 2.
BAD_INPUT = (
    ArgumentError,
    ValueError,
    OSError,
    MisconfigurationException,
    WeightsUnavailableError,
)


class TTSRCLI(LightningCLI):
    """LightningCLI for :class:`TTSRTraining` and :class:`TTSRDataModule`.

    The discriminator takes the data's patch size; checkpoints are written atomically unless
    ``trainer.plugins`` says otherwise; the command line is recorded in every checkpoint.
    """

    def __init__(self, args: list[str], from_command_line: bool = False, **kwargs: Any) -> None:
        self.command = shlex.join([PROG, *args])
        super().__init__(
            TTSRTraining,
            TTSRDataModule,
            args=None if from_command_line else args,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False, "prog": PROG, "description": DESCRIPTION},
            auto_configure_optimizers=False,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.patch_size", "model.discriminator_size")
        parser.add_argument(
            "--init_weights",
            type=str | None,
            default=None,
            help="ttsr checkpoint (.pt, e.g. from 'ttsr-train export') whose weights start a new "
            "run (warm start with fresh optimizers); the architecture must match the config. "
            "Ignored when --ckpt_path resumes a run.",
        )

    def before_fit(self) -> None:
        subcommand = self.config[self.subcommand]
        init_weights = subcommand.get("init_weights")
        if init_weights and not subcommand.get("ckpt_path"):
            warm_start(self.model, init_weights)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        self.model.commands = [self.command]

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer_config = self._get(self.config_init, "trainer", default={})
        if not trainer_config.get("plugins"):
            kwargs["plugins"] = [AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)


def warm_start(training: TTSRTraining, path: str) -> None:
    """Copy the weights of the ttsr checkpoint at ``path`` into ``training.model``."""
    state = load_checkpoint(path).state_dict()
    head = {
        k: v for k, v in training.model.state_dict().items() if k.startswith("deformable_transfer.")
    }
    note = ""
    if head and not any(k.startswith("deformable_transfer.") for k in state):
        # A hard-transfer model seeds a deformable one: the head keeps its initialisation,
        # which reproduces the hard transfer, so training starts from the trained model's output.
        state = {**state, **head}
        note = " (the deformable head starts as the hard transfer)"
    load_state_strict(training.model, state, source=path)
    print(f"{PROG}: weights initialised from {path}{note}", file=sys.stderr)


class _OneLineParser(argparse.ArgumentParser):
    """argparse that raises its usage errors (``main`` prints them in one line)."""

    def error(self, message: str) -> NoReturn:
        raise ValueError(f"{self.prog}: {message}")


def export_main(args: Sequence[str]) -> None:
    """``ttsr-train export``: a training checkpoint's model -> a ttsr checkpoint."""
    parser = _OneLineParser(
        prog=f"{PROG} export",
        description="Write the model of a ttsr-train checkpoint (.ckpt) as a ttsr checkpoint "
        "for ttsr-infer / ttsr-eval (weights, architecture, training metadata).",
    )
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint written by fit")
    parser.add_argument("--out", required=True, help="ttsr checkpoint to write (.pt)")
    options = parser.parse_args(args)
    metadata = export_weights(options.ckpt, options.out, shlex.join([PROG, "export", *args]))
    print(
        f"wrote {options.out} (step {metadata['global_step']}, epoch {metadata['epoch']})",
        file=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``ttsr-train``."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        with warnings.catch_warnings():
            for message in IGNORED_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            if args and args[0] == "export":
                export_main(args[1:])
            else:
                TTSRCLI(args, from_command_line=argv is None and args == sys.argv[1:])
    except BAD_INPUT as error:
        if debug:
            raise
        message = " ".join(str(error).split()) or repr(error)
        if len(message) > 400:
            message = message[:400] + " ..."
        print(
            f"{PROG}: error: {message} (--help for usage, --debug for a traceback)", file=sys.stderr
        )
        sys.exit(2)


if __name__ == "__main__":
    main()
