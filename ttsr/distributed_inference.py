"""Folder inference that scales out: Lightning's ``Trainer.predict`` over processes and machines.

Every process (``devices`` per node x ``num_nodes``) builds the same job list and runs its shard:
Lightning's distributed sampler for prediction gives job ``i`` to rank ``i % world size`` and no
job twice. Each process writes the outputs it made, atomically (a temporary file renamed into
place), so an interrupted run leaves no partial files and ``pending_jobs`` resumes it. Images are
independent: the result of each is that of :meth:`ttsr.Upscaler.upscale`, whatever the number of
processes.

::

    jobs = [InferenceJob(Path("lr/a.png"), (Path("refs/a.png"),), Path("sr/a.png")), ...]
    summary = upscale_jobs(jobs, "model.pt", accelerator="cpu", devices=2)

With ``devices > 1`` or ``num_nodes > 1`` the strategy is ``"ddp"``, which starts the other
processes by running the same command again: call this from a script or a CLI (like
``ttsr-infer-dist``), not from a notebook or an interactive session.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningModule, Trainer
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ttsr.imaging import InputError, save_image
from ttsr.inference import Upscaler, UpscaleResult
from ttsr.memory import default_budget
from ttsr.model.ttsr import TTSR

#: Extra outputs a job may ask for, and how each is drawn from a result.
EXTRA_RENDERERS: dict[str, Callable[[UpscaleResult], Image.Image]] = {
    "bicubic": lambda result: result.bicubic,
    "attention": lambda result: result.attention_map(),
    "correspondence": lambda result: result.correspondence_map(),
    "comparison": lambda result: result.comparison(),
}

#: Called with a job and the message of the :class:`~ttsr.imaging.InputError` that stopped it.
FailureReport = Callable[["InferenceJob", str], None]


@dataclass(frozen=True)
class InferenceJob:
    """One image to upscale: its LR, its references, the output and extra outputs by kind."""

    lr: Path
    refs: tuple[Path, ...]
    out: Path
    extras: tuple[tuple[str, Path], ...] = ()

    def __post_init__(self) -> None:
        unknown = [kind for kind, _ in self.extras if kind not in EXTRA_RENDERERS]
        if unknown:
            raise ValueError(f"unknown extra outputs {unknown}; use {sorted(EXTRA_RENDERERS)}")

    def to_batch(self) -> dict[str, object]:
        """Plain containers, which Lightning's batch transfer accepts (not dataclasses)."""
        return {
            "lr": str(self.lr),
            "refs": [str(ref) for ref in self.refs],
            "out": str(self.out),
            "extras": [[kind, str(path)] for kind, path in self.extras],
        }

    @classmethod
    def from_batch(cls, batch: dict) -> InferenceJob:
        return cls(
            Path(batch["lr"]),
            tuple(Path(ref) for ref in batch["refs"]),
            Path(batch["out"]),
            tuple((kind, Path(path)) for kind, path in batch["extras"]),
        )

    def outputs(self) -> tuple[Path, ...]:
        return (self.out, *(path for _, path in self.extras))

    def is_done(self) -> bool:
        """Whether every output exists (outputs are written atomically: existing = complete)."""
        return all(path.is_file() for path in self.outputs())


def pending_jobs(jobs: Sequence[InferenceJob]) -> list[InferenceJob]:
    """The jobs whose outputs are not all there yet (to resume an interrupted run)."""
    return [job for job in jobs if not job.is_done()]


class JobDataset(Dataset):
    """The jobs, in order; the model reads the images itself (only paths travel)."""

    def __init__(self, jobs: Sequence[InferenceJob]) -> None:
        self.jobs = list(jobs)

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, index: int) -> dict[str, object]:
        return self.jobs[index].to_batch()


def _single(batch: list[dict[str, object]]) -> dict[str, object]:
    """Collate function: batches of one job, passed through as they are."""
    return batch[0]


@dataclass(frozen=True)
class RunSummary:
    """What all processes did together: images written and failed (per rank too), tiles."""

    done: int
    failed: int
    tiles: int
    done_per_rank: tuple[int, ...]
    seconds: float
    is_global_zero: bool = True

    @property
    def world_size(self) -> int:
        return len(self.done_per_rank)


class UpscalePredictor(LightningModule):
    """Wraps a TTSR model for ``Trainer.predict``: each step upscales one job and saves it.

    ``max_memory``: budget per image in bytes (``None``: half the available memory, shared by
    the processes of a CPU node); ``threads``: CPU threads per process (``None``: Lightning's
    choice); ``on_failure``: called for a job refused as bad input (the run goes on);
    ``precision``: as for :class:`~ttsr.inference.Upscaler`.
    """

    def __init__(
        self,
        model: TTSR,
        max_memory: int | None = None,
        tile_size: int | None = None,
        threads: int | None = None,
        on_failure: FailureReport | None = None,
        precision: str = "fp32",
    ) -> None:
        super().__init__()
        self.model = model
        self.inference_precision = precision
        self.max_memory = max_memory
        self.tile_size = tile_size
        self.threads = threads
        self.on_failure = on_failure
        self.upscaler: Upscaler | None = None
        self.done = 0
        self.failed = 0
        self.tiles = 0
        self.done_per_rank: tuple[int, ...] = ()
        self.totals = (0, 0, 0)
        self._threads_before = torch.get_num_threads()

    def on_predict_start(self) -> None:
        self._threads_before = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        budget = self.max_memory
        if budget is None:
            budget = default_budget(self.device)
            if self.device.type == "cpu":  # the processes of a node share its memory
                budget //= max(1, self.trainer.num_devices)
        self.upscaler = Upscaler(
            self.model, self.device, budget, self.tile_size, precision=self.inference_precision
        )

    def predict_step(self, batch: dict, batch_idx: int) -> str | None:
        """Upscale and save one job; its output path, or ``None`` if it was refused."""
        assert self.upscaler is not None
        job = InferenceJob.from_batch(batch)
        try:
            result = self.upscaler.upscale(job.lr, job.refs)
            save_image(result.sr, job.out)
            for kind, path in job.extras:
                save_image(EXTRA_RENDERERS[kind](result), path)
        except InputError as failure:
            self.failed += 1
            if self.on_failure is not None:
                self.on_failure(job, str(failure))
            return None
        self.done += 1
        self.tiles += len(result.plan.tiles)
        return str(job.out)

    def on_predict_end(self) -> None:
        counts = torch.tensor([self.done, self.failed, self.tiles], device=self.device)
        if dist.is_available() and dist.is_initialized():
            parts = [torch.zeros_like(counts) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, counts)
            counts = torch.stack(parts)
        gathered = counts.reshape(-1, 3).cpu()
        self.done_per_rank = tuple(int(n) for n in gathered[:, 0])
        done, failed, tiles = (int(n) for n in gathered.sum(dim=0))
        self.totals = (done, failed, tiles)
        torch.set_num_threads(self._threads_before)


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Hide Lightning's banner lines and the hint about data-loading workers (images are read
    in ``predict_step`` on purpose)."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*predict returned None.*")  # a refused job
            # A deprecation inside Lightning's batch flattening with recent torch:
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def upscale_jobs(
    jobs: Sequence[InferenceJob],
    model: TTSR | str | os.PathLike | None = None,
    *,
    accelerator: str = "auto",
    devices: int | str = 1,
    num_nodes: int = 1,
    strategy: str | None = None,
    max_memory: int | None = None,
    tile_size: int | None = None,
    threads: int | None = None,
    on_failure: FailureReport | None = None,
    progress_bar: bool = False,
    quiet: bool = True,
    precision: str = "fp32",
) -> RunSummary:
    """Upscale every job x4 on ``devices`` x ``num_nodes`` processes (``Trainer.predict``).

    ``model``: a TTSR, a shipped model's name (``"real"``, ``"bicubic"``), a checkpoint path,
    or ``None`` for the default model. ``strategy``:
    ``None`` picks ``"ddp"`` for several processes; strategies that spawn or fork the workers
    are refused (the summary would stay in the workers). Jobs refused as bad input (unreadable
    image, over the memory budget) are reported to ``on_failure`` and counted; the others go on.
    Raises :class:`~ttsr.imaging.InputError` for an accelerator or device count not available.
    """
    if strategy is not None and any(word in strategy for word in ("spawn", "fork", "notebook")):
        raise InputError(f"strategy {strategy!r} runs the work in child processes; use 'ddp'")
    if not isinstance(model, TTSR):
        model = Upscaler.from_checkpoint(model, device="cpu").model
    if not jobs:
        return RunSummary(0, 0, 0, (0,), 0.0)
    several = num_nodes > 1 or (isinstance(devices, int) and devices > 1)
    predictor = UpscalePredictor(model, max_memory, tile_size, threads, on_failure, precision)
    loader = DataLoader(JobDataset(jobs), batch_size=1, shuffle=False, collate_fn=_single)
    quieting = _quiet_lightning() if quiet else contextlib.nullcontext()
    with quieting:
        try:
            trainer = Trainer(
                accelerator=accelerator,
                devices=devices,
                num_nodes=num_nodes,
                strategy=strategy or ("ddp" if several else "auto"),
                logger=False,
                enable_checkpointing=False,
                enable_model_summary=False,
                enable_progress_bar=progress_bar,
                use_distributed_sampler=True,
            )
        except MisconfigurationException as error:
            raise InputError(f"cannot run on {accelerator} x {devices}: {error}") from error
        started = time.perf_counter()
        trainer.predict(predictor, dataloaders=loader, return_predictions=False)
    done, failed, tiles = predictor.totals
    if dist.is_available() and dist.is_initialized():
        # Tear the process group down here: left to the interpreter's exit, gloo's threads can
        # abort the process ("terminate called without an active exception").
        dist.destroy_process_group()
    return RunSummary(
        done=done,
        failed=failed,
        tiles=tiles,
        done_per_rank=predictor.done_per_rank,
        seconds=time.perf_counter() - started,
        is_global_zero=trainer.is_global_zero,
    )
