"""Bad input everywhere: one clear stderr line, exit code 2, no traceback, no partial output.

Convertible colour modes (greyscale, RGBA, palette, 16-bit, CMYK, EXIF rotation) are converted with
a note instead. Every bad file is generated here.
"""

from __future__ import annotations

import os
import random
import struct
import zlib
from pathlib import Path

import numpy as np
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
from PIL import Image

from ttsr.checkpoints import CheckpointError, read_weights_only
from ttsr.cli import convert, eval, infer
from ttsr.imaging import OutputError, load_rgb, save_image

PROG = "ttsr-infer"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("checkpoint"))


@pytest.fixture
def work(tmp_path: Path) -> dict[str, Path]:
    """A good LR, a good reference and an output folder that must stay empty on failure."""
    return {
        "lr": save_png(textured(8, 8, seed=1), tmp_path / "lr.png"),
        "ref": save_png(textured(16, 16, seed=2), tmp_path / "ref.png"),
        "out": tmp_path / "out",
    }


def infer_args(work: dict[str, Path], checkpoint: Path, **override: object) -> list[object]:
    values = {"lr": work["lr"], "ref": work["ref"], "out": work["out"] / "sr.png"}
    values.update(override)
    return ["--lr", values["lr"], "--ref", values["ref"], "--out", values["out"]] + (
        ["--checkpoint", checkpoint] if checkpoint else []
    )


def assert_refused(work, capsys, argv, *fragments: str, prog: str = PROG, main=infer.main):
    code, _, err = call(main, argv, capsys)
    assert_bad_input(code, err, prog, *fragments)
    assert not work["out"].exists() or files_in(work["out"]) == []


# --- image files --------------------------------------------------------------------------------


def truncated_png(path: Path) -> Path:
    save_png(textured(32, 32), path)
    path.write_bytes(path.read_bytes()[:150])
    return path


def header_only_png(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width x height`` (the pixel data is one row)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * (1 + 3 * width))
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )
    return path


BAD_IMAGES = {
    "missing file": (lambda d: d / "nothing.png", "no such file"),
    "directory": (lambda d: (d / "folder.png").mkdir() or d / "folder.png", "is a directory"),
    "not an image": (
        lambda d: (d / "notes.png").write_text("hello") and d / "notes.png",
        "not an image file",
    ),
    "empty file": (lambda d: (d / "empty.png").write_bytes(b"") or d / "empty.png", "not an image"),
    "truncated": (lambda d: truncated_png(d / "cut.png"), "truncated or corrupt"),
    "too small": (lambda d: save_png(textured(3, 9), d / "small.png"), "too small"),
    "decompression bomb": (
        lambda d: header_only_png(d / "bomb.png", 100_000, 100_000),
        "decompression-bomb",
    ),
    "over the pixel limit": (
        lambda d: header_only_png(d / "huge.png", 12_000, 10_000),
        "megapixel limit",
    ),
}


@pytest.mark.parametrize("case", BAD_IMAGES)
@pytest.mark.parametrize("role", ["lr", "ref"])
def test_unusable_image_is_refused(tmp_path, work, checkpoint, capsys, case, role) -> None:
    make, message = BAD_IMAGES[case]
    bad = make(tmp_path)
    assert_refused(work, capsys, infer_args(work, checkpoint, **{role: bad}), message)


# --- convertible modes --------------------------------------------------------------------------


def converted(path: Path, mode: str, **save: object) -> Path:
    rgb = Image.fromarray(textured(8, 8, seed=3))
    image = rgb.convert(mode)
    image.save(path, **save)
    return path


CONVERTIBLE = {
    "greyscale": (lambda d: converted(d / "grey.png", "L"), "is L; converted"),
    "RGBA": (lambda d: converted(d / "alpha.png", "RGBA"), "alpha channel is ignored"),
    "palette": (lambda d: converted(d / "palette.png", "P"), "is P; converted"),
    "16-bit": (
        lambda d: save_16_bit(d / "deep.png"),
        "high bit depth",
    ),
    "CMYK JPEG": (lambda d: converted(d / "print.jpg", "CMYK"), "is CMYK; converted"),
}


def save_16_bit(path: Path) -> Path:
    Image.fromarray(np.full((8, 8), 40_000, np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"
    return path


@pytest.mark.parametrize("case", CONVERTIBLE)
def test_convertible_colour_modes_are_converted_with_a_note(
    tmp_path, work, checkpoint, capsys, case
) -> None:
    make, note = CONVERTIBLE[case]
    code, _, err = call(infer.main, infer_args(work, checkpoint, lr=make(tmp_path)), capsys)
    assert code == 0, err
    assert f"{PROG}: note:" in err and note in err
    assert Image.open(work["out"] / "sr.png").size == (32, 32)


def test_16_bit_values_are_scaled_not_clipped(tmp_path) -> None:
    assert (load_rgb(save_16_bit(tmp_path / "deep.png")) == round(40_000 / 257)).all()


def test_exif_rotated_jpeg_is_turned_upright(tmp_path, work, checkpoint, capsys) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "phone.jpg"
    Image.fromarray(textured(8, 12, seed=4)).save(path, exif=exif)
    code, _, err = call(infer.main, infer_args(work, checkpoint, lr=path), capsys)
    assert code == 0, err
    assert "EXIF orientation" in err
    assert Image.open(work["out"] / "sr.png").size == (32, 48)  # 12 wide, 8 high stored


# --- resources and outputs ----------------------------------------------------------------------


def test_run_over_the_memory_budget_is_refused_up_front(work, checkpoint, capsys) -> None:
    argv = infer_args(work, checkpoint) + ["--max-memory", "2MB"]
    assert_refused(work, capsys, argv, "memory budget", "--max-memory")


def test_unreadable_memory_size_is_a_usage_error(work, checkpoint, capsys) -> None:
    code, _, err = call(infer.main, infer_args(work, checkpoint) + ["--max-memory", "lots"], capsys)
    assert code == 2 and "memory size" in err


@pytest.mark.parametrize(
    ("out", "message"),
    [
        (lambda d: (d / "file.txt").write_text("x") and d / "file.txt" / "sr.png", "cannot write"),
        (lambda d: d / "sr.unknown", "which image format"),
        (lambda d: d, "is a directory"),
    ],
    ids=["parent is a file", "unknown suffix", "directory"],
)
def test_output_that_cannot_be_written_is_refused(
    tmp_path, work, checkpoint, capsys, out, message
) -> None:
    argv = infer_args(work, checkpoint, out=out(tmp_path))
    assert_refused(work, capsys, argv, message)


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch) -> None:
    def broken_replace(source: str, destination: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OutputError, match="No space left"):
        save_image(textured(8, 8), tmp_path / "sr.png")
    assert files_in(tmp_path) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_refused(work, checkpoint, capsys) -> None:
    argv = infer_args(work, checkpoint) + ["--device", "cuda"]
    assert_refused(work, capsys, argv, "no CUDA GPU", "--device cpu")


def test_debug_shows_the_traceback(work, checkpoint, tmp_path) -> None:
    argv = infer_args(work, checkpoint, lr=tmp_path / "missing.png") + ["--debug"]
    with pytest.raises(ValueError, match="no such file"):  # the library's InputError itself
        infer.main([str(a) for a in argv])


# --- checkpoints --------------------------------------------------------------------------------


class Opaque:
    """Something only pickle can restore."""


def other_architecture(path: Path) -> Path:
    torch.save({"conv.weight": torch.zeros(4, 3, 3, 3)}, path)
    return path


def mismatched_ttsr(path: Path, good: Path) -> Path:
    content = torch.load(good, weights_only=True)
    content["config"]["n_feats"] = 16
    torch.save(content, path)
    return path


def garbage_file(path: Path) -> Path:
    path.write_bytes(random.Random(1).randbytes(300))
    return path


BAD_CHECKPOINTS = {
    "missing": (lambda d, good: d / "none.pt", "does not exist"),
    "directory": (lambda d, good: d, "is a directory"),
    "corrupt": (
        lambda d, good: garbage_file(d / "bad.pt"),
        "corrupt",
    ),
    "text file": (
        lambda d, good: (d / "notes.pt").write_text("hello world") and d / "notes.pt",
        "corrupt",
    ),
    "truncated": (
        lambda d, good: (d / "cut.pt").write_bytes(good.read_bytes()[:1000]) and d / "cut.pt",
        "corrupt",
    ),
    "other architecture": (
        lambda d, good: other_architecture(d / "other.pt"),
        "not a ttsr checkpoint",
    ),
    "mismatched config": (
        lambda d, good: mismatched_ttsr(d / "wide.pt", good),
        "does not fit this architecture",
    ),
    "needs pickle code": (
        lambda d, good: (
            torch.save({"format": "ttsr", "x": Opaque()}, d / "code.pt") or d / "code.pt"
        ),
        "arbitrary code",
    ),
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_unusable_checkpoint_is_refused(tmp_path, work, checkpoint, capsys, case) -> None:
    make, message = BAD_CHECKPOINTS[case]
    argv = infer_args(work, make(tmp_path, checkpoint))
    assert_refused(work, capsys, argv, message)


def test_any_garbage_file_is_reported_as_corrupt(tmp_path) -> None:
    # Random bytes reach different failures inside torch.load (the unpickler, the zip reader,
    # a UTF-8 decode error): every one must come out as the same clear error.
    path = tmp_path / "garbage.pt"
    for seed in range(200):
        rng = random.Random(seed)
        prefix = (b"", b"\x80\x02", b"PK\x03\x04")[seed % 3]
        path.write_bytes(prefix + rng.randbytes(rng.randint(1, 600)))
        with pytest.raises(CheckpointError, match="corrupt"):
            read_weights_only(path)


# --- the other CLIs -----------------------------------------------------------------------------


def test_eval_refuses_missing_dataset_and_bad_images(tmp_path, work, checkpoint, capsys) -> None:
    code, _, err = call(eval.main, [tmp_path / "nowhere", "--bicubic-only"], capsys)
    assert_bad_input(code, err, "ttsr-eval", "not a folder")
    dataset = tmp_path / "hr"
    save_png(textured(32, 32), dataset / "a.png")
    truncated_png(dataset / "b.png")
    argv = [dataset, "--bicubic-only", "--out", work["out"]]
    code, _, err = call(eval.main, argv, capsys)
    assert_bad_input(code, err, "ttsr-eval", "b.png", "truncated")
    tiny = save_png(textured(12, 12), tmp_path / "tiny" / "t.png")
    code, _, err = call(eval.main, [tiny.parent, "--bicubic-only", "--out", work["out"]], capsys)
    assert_bad_input(code, err, "ttsr-eval", "too small")
    assert not work["out"].exists() or files_in(work["out"]) == []


def test_eval_refuses_a_bad_checkpoint(tmp_path, work, capsys) -> None:
    save_png(textured(32, 32), tmp_path / "hr" / "a.png")
    bad = other_architecture(tmp_path / "other.pt")
    argv = [tmp_path / "hr", "--checkpoint", bad, "--out", work["out"]]
    code, _, err = call(eval.main, argv, capsys)
    assert_bad_input(code, err, "ttsr-eval", "not a ttsr checkpoint")


def test_convert_refuses_bad_sources_and_destinations(tmp_path, checkpoint, capsys) -> None:
    code, _, err = call(convert.main, [tmp_path / "none.pt", tmp_path / "out.pt"], capsys)
    assert_bad_input(code, err, "ttsr-convert", "does not exist")
    code, _, err = call(convert.main, [checkpoint, tmp_path / "out.pt"], capsys)
    assert_bad_input(code, err, "ttsr-convert", "not a released TTSR state dict")
    (tmp_path / "file").write_text("x")
    code, _, err = call(convert.main, [checkpoint, tmp_path / "file" / "out.pt"], capsys)
    assert_bad_input(code, err, "ttsr-convert", "cannot write")
    assert not (tmp_path / "out.pt").exists()
