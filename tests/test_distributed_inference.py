"""Folder inference that scales out: Lightning ``Trainer.predict``, DDP on CPU (gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from inference_helpers import (
    assert_bad_input,
    call,
    files_in,
    save_png,
    textured,
    write_tiny_checkpoint,
)

from ttsr.cli import infer_dist
from ttsr.distributed_inference import InferenceJob, pending_jobs, upscale_jobs
from ttsr.imaging import save_image
from ttsr.inference import Upscaler

PROG = "ttsr-infer-dist"
LR_SIZES = {"a": (8, 8), "b": (8, 12), "c": (12, 8)}


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One CPU thread, as each of the two DDP processes gets (``--threads 1``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path, Path]:
    """``(lr folder, reference folder, checkpoint)``; input ``b`` has two references."""
    for seed, (stem, size) in enumerate(LR_SIZES.items()):
        save_png(textured(*size, seed=seed), tmp_path / "lr" / f"{stem}.png")
        save_png(textured(16, 16, seed=10 + seed), tmp_path / "refs" / f"{stem}.png")
    save_png(textured(12, 16, seed=20), tmp_path / "refs" / "b_1.png")
    return tmp_path / "lr", tmp_path / "refs", write_tiny_checkpoint(tmp_path)


def jobs_for(lr: Path, refs: Path, out: Path) -> list[InferenceJob]:
    jobs = []
    for stem in LR_SIZES:
        references = tuple(sorted(refs.glob(f"{stem}*.png")))
        extras = (("attention", out / f"{stem}_attention.png"),)
        jobs.append(InferenceJob(lr / f"{stem}.png", references, out / f"{stem}.png", extras))
    return jobs


def test_one_process_writes_what_the_upscaler_makes_and_reports_bad_images(
    folders: tuple[Path, Path, Path], tmp_path: Path, one_thread: None
) -> None:
    lr, refs, checkpoint = folders
    jobs = jobs_for(lr, refs, tmp_path / "out")
    broken = tmp_path / "broken.png"
    broken.write_bytes((lr / "a.png").read_bytes()[:60])
    jobs.append(InferenceJob(broken, jobs[0].refs, tmp_path / "out" / "broken.png"))
    failures: list[str] = []

    summary = upscale_jobs(
        jobs,
        checkpoint,
        accelerator="cpu",
        devices=1,
        on_failure=lambda job, message: failures.append(message),
    )

    assert (summary.done, summary.failed, summary.tiles) == (3, 1, 3)
    assert summary.done_per_rank == (3,) and summary.is_global_zero
    assert len(failures) == 1 and "broken.png could not be decoded" in failures[0]
    upscaler = Upscaler.from_checkpoint(checkpoint, device="cpu")
    for job in jobs[:3]:
        result = upscaler.upscale(job.lr, job.refs)
        expected = save_image(result.sr, tmp_path / "expected" / job.out.name)
        assert job.out.read_bytes() == expected.read_bytes()
    assert files_in(tmp_path / "out") == sorted(
        [f"{stem}.png" for stem in LR_SIZES] + [f"{stem}_attention.png" for stem in LR_SIZES]
    )
    assert [job.lr for job in pending_jobs(jobs)] == [broken]


@pytest.mark.slow
def test_two_processes_write_the_same_files_as_one(
    folders: tuple[Path, Path, Path], tmp_path: Path, one_thread: None
) -> None:
    lr, refs, checkpoint = folders
    single = tmp_path / "single"
    summary = upscale_jobs(jobs_for(lr, refs, single), checkpoint, accelerator="cpu", devices=1)
    assert summary.done == 3

    double = tmp_path / "double"
    command = [sys.executable, "-m", "ttsr.cli.infer_dist", "--lr", lr, "--ref", refs]
    command += ["--out", double, "--checkpoint", checkpoint, "--save-attention"]
    command += ["--accelerator", "cpu", "--devices", "2", "--threads", "1", "--precision", "fp32"]
    finished = subprocess.run(
        [str(part) for part in command],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )

    assert finished.returncode == 0, finished.stderr
    assert f"upscaled 3 of 3 images x4 with checkpoint {checkpoint}" in finished.stdout
    assert "on 2 processes (2 + 1;" in finished.stdout  # each rank took its shard
    assert "Traceback" not in finished.stderr
    assert files_in(double) == files_in(single)  # no temporaries left, nothing missing
    for name in files_in(single):
        assert (double / name).read_bytes() == (single / name).read_bytes(), name


def test_cli_resumes_and_reports_bad_input(
    folders: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    lr, refs, checkpoint = folders
    out = tmp_path / "out"
    for job in jobs_for(lr, refs, out):
        for path in job.outputs():
            save_png(textured(4, 4), path)
    base = ["--lr", lr, "--ref", refs, "--out", out, "--checkpoint", checkpoint]

    code, stdout, _ = call(infer_dist.main, [*base, "--save-attention", "--skip-existing"], capsys)
    assert code == 0 and "nothing to do: the outputs of all 3 inputs exist" in stdout

    code, _, err = call(infer_dist.main, ["--lr", lr, "--out", out], capsys)
    assert_bad_input(code, err, PROG, "give --lr, --ref and --out")
    code, _, err = call(infer_dist.main, [*base[:2], "--ref", tmp_path / "none", *base[4:]], capsys)
    assert_bad_input(code, err, PROG, "none")
    code, _, err = call(infer_dist.main, [*base, "--devices", "0"], capsys)
    assert_bad_input(code, err, PROG, "--devices")
    code, _, err = call(infer_dist.main, [*base, "--model", "bicubic"], capsys)
    assert_bad_input(code, err, PROG, "not both")
    code, _, err = call(infer_dist.main, [*base[:4], "--model", "nosuch"], capsys)
    assert code == 2 and "invalid choice" in err
    if not torch.cuda.is_available():
        code, _, err = call(infer_dist.main, [*base, "--accelerator", "gpu"], capsys)
        assert_bad_input(code, err, PROG, "cannot run on gpu")
    code, stdout, _ = call(infer_dist.main, ["--help"], capsys)
    assert code == 0 and "--num-nodes" in stdout and "MASTER_ADDR" in stdout
    assert "--model {real,bicubic}" in stdout
