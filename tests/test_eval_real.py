"""ttsr-eval for real use: LR corruptions (--blur, --noise, --jpeg) and the real-pairs mode."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from inference_helpers import (
    assert_bad_input,
    call,
    files_in,
    save_png,
    textured,
    write_tiny_checkpoint,
)
from PIL import Image
from test_eval import degrade, psnr, ssim

from ttsr.cli import eval
from ttsr.inference import Upscaler

# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("checkpoint"))


def make_pairs(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Two pairs: a target and a reference cut from a larger texture, shifted and brightened."""
    pairs = {}
    for seed, name in enumerate(("alpha", "beta"), start=1):
        scene = textured(40, 44, seed)
        target, reference = scene[:32, :36], np.clip(scene[6:38, 5:41] * 1.1, 0, 255)
        reference = reference.astype(np.uint8)
        save_png(target, folder / name / "target.png")
        save_png(reference, folder / name / "ref.png")
        pairs[name] = (target, reference)
    (folder / "README.md").write_text("not a pair\n")
    return pairs


def pairs_argv(folder: Path, out: Path, checkpoint: Path, *extra: object) -> list[object]:
    return ["--pairs", folder, "--checkpoint", checkpoint, "--device", "cpu", "--out", out, *extra]


class LRSpy:
    """Records the LR images that reach ``Upscaler.upscale``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.lrs: list[np.ndarray] = []
        original = Upscaler.upscale

        def upscale(upscaler, lr, refs, *args, **kwargs):  # type: ignore[no-untyped-def]
            self.lrs.append(np.array(lr))
            return original(upscaler, lr, refs, *args, **kwargs)

        monkeypatch.setattr(Upscaler, "upscale", upscale)


def pil_jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def mid_grey_hr() -> np.ndarray:
    """A texture in 69..191, so that noise is never clipped."""
    return (textured(48, 48, 7) // 2 + 64).astype(np.uint8)


def eval_one(tmp_path: Path, checkpoint: Path, capsys, monkeypatch, *options: object) -> LRSpy:
    """Run ttsr-eval on :func:`mid_grey_hr` with ``options``; the spy holds the LR it used."""
    save_png(mid_grey_hr(), tmp_path / "hr" / "flat.png")
    spy = LRSpy(monkeypatch)
    argv = [tmp_path / "hr", "--checkpoint", checkpoint, "--device", "cpu"]
    code, _, err = call(eval.main, [*argv, "--out", tmp_path / "out", *options], capsys)
    assert code == 0, err
    return spy


def clean_lr() -> np.ndarray:
    return degrade(mid_grey_hr())[1]


# --- corruptions reach the LR ---------------------------------------------------------------------


def test_jpeg_quality_reaches_the_lr(tmp_path, checkpoint, capsys, monkeypatch) -> None:
    spy = eval_one(tmp_path, checkpoint, capsys, monkeypatch, "--jpeg", "30")
    lr = spy.lrs[0]
    np.testing.assert_array_equal(lr, pil_jpeg(clean_lr(), 30))
    assert not np.array_equal(lr, pil_jpeg(clean_lr(), 90))
    settings = json.loads((tmp_path / "out" / "results.json").read_text())["settings"]
    assert settings["lr_corruption"] == "jpeg30"


def test_noise_has_the_stated_sigma_and_the_seed_reproduces(
    tmp_path, checkpoint, capsys, monkeypatch
) -> None:
    first = eval_one(tmp_path, checkpoint, capsys, monkeypatch, "--noise", "6").lrs[0]
    again = eval_one(tmp_path, checkpoint, capsys, monkeypatch, "--noise", "6").lrs[0]
    other = eval_one(tmp_path, checkpoint, capsys, monkeypatch, "--noise", "6", "--seed", "1")
    noise = first.astype(np.float64) - clean_lr()
    assert noise.std() == pytest.approx(6.0, rel=0.15)
    assert abs(noise.mean()) < 1.0
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other.lrs[0])


def test_blur_removes_high_frequencies_of_the_lr(tmp_path, checkpoint, capsys, monkeypatch) -> None:
    lr = eval_one(tmp_path, checkpoint, capsys, monkeypatch, "--blur", "1.5").lrs[0]

    def detail(image: np.ndarray) -> float:  # energy of the horizontal differences
        return float(np.mean(np.diff(image.astype(np.float64), axis=1) ** 2))

    assert detail(lr) < 0.6 * detail(clean_lr())
    assert abs(lr.astype(np.float64).mean() - clean_lr().mean()) < 1.0


def test_bicubic_row_upscales_the_corrupted_lr(tmp_path, capsys) -> None:
    hr = textured(32, 32, 3)
    save_png(hr, tmp_path / "hr" / "one.png")
    out = tmp_path / "out"
    argv = [tmp_path / "hr", "--bicubic-only", "--jpeg", "40", "--out", out]
    code, _, err = call(eval.main, argv, capsys)
    assert code == 0, err
    hr, lr, _ = degrade(hr)
    jpeg_lr = pil_jpeg(lr, 40)
    bicubic = np.asarray(Image.fromarray(jpeg_lr).resize((32, 32), Image.BICUBIC))
    row = json.loads((out / "results.json").read_text())["rows"][0]
    assert row["bicubic_psnr"] == pytest.approx(psnr(hr, bicubic), abs=1e-6)


# --- pairs mode -----------------------------------------------------------------------------------


def test_pairs_mode_scores_bicubic_lr_as_reference_and_real_reference(
    tmp_path, checkpoint, capsys
) -> None:
    pairs = make_pairs(tmp_path / "pairs")
    out = tmp_path / "out"
    code, stdout, err = call(eval.main, pairs_argv(tmp_path / "pairs", out, checkpoint), capsys)
    assert code == 0, err
    document = json.loads((out / "results.json").read_text())
    assert document["settings"]["references"] == "pairs" and document["images"] == 2
    upscaler = Upscaler.from_checkpoint(checkpoint, device="cpu")
    expected = {}
    for name, (target, reference) in pairs.items():
        hr, lr, bicubic = degrade(target)
        own = np.asarray(upscaler.upscale(lr, lr).sr)
        real = np.asarray(upscaler.upscale(lr, reference).sr)
        expected[name] = [psnr(hr, bicubic), ssim(hr, bicubic), psnr(hr, own), ssim(hr, own)]
        expected[name] += [psnr(hr, real), ssim(hr, real)]
    columns = ["bicubic_psnr", "bicubic_ssim", "lr_ref_psnr", "lr_ref_ssim", "ref_psnr", "ref_ssim"]
    assert [row["image"] for row in document["rows"]] == ["alpha", "beta"]
    for row in document["rows"]:
        np.testing.assert_allclose([row[c] for c in columns], expected[row["image"]], atol=1e-6)
        assert row["aligned_ref_psnr"] is None
    mean = np.mean(list(expected.values()), axis=0)
    np.testing.assert_allclose([document["mean"][c] for c in columns], mean, atol=1e-6)
    assert "lr_ref_psnr" in stdout and stdout.splitlines()[-1].startswith("ttsr-eval: 2 pairs")
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].split(",") == ["image", *columns] and csv_lines[-1].startswith("mean,")


def test_pairs_mode_with_alignment_adds_the_aligned_reference(tmp_path, checkpoint, capsys) -> None:
    make_pairs(tmp_path / "pairs")
    out = tmp_path / "out"
    argv = pairs_argv(tmp_path / "pairs", out, checkpoint, "--align-ref", "meanstd")
    code, _, err = call(
        eval.main, [*argv, "--save-grids", "--save-summary", "--jpeg", "80"], capsys
    )
    assert code == 0, err
    document = json.loads((out / "results.json").read_text())
    assert document["settings"]["reference_alignment"] == "meanstd"
    assert all(isinstance(row["aligned_ref_psnr"], float) for row in document["rows"])
    assert {"grids/alpha.png", "grids/beta.png", "summary.png"} <= set(files_in(out))


def test_pairs_mode_bicubic_only(tmp_path, capsys) -> None:
    make_pairs(tmp_path / "pairs")
    out = tmp_path / "out"
    argv = ["--pairs", tmp_path / "pairs", "--bicubic-only", "--out", out]
    code, _, err = call(eval.main, argv, capsys)
    assert code == 0, err
    header = (out / "results.csv").read_text().splitlines()[0]
    assert header == "image,bicubic_psnr,bicubic_ssim"


# --- bad input: one line, exit 2, nothing written -------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "fragment"),
    [("missing-ref", "ref.png"), ("no-pairs", "holds no pairs"), ("not-a-folder", "not a folder")],
)
def test_bad_pair_folders_are_refused(tmp_path, checkpoint, capsys, layout, fragment) -> None:
    folder = tmp_path / "pairs"
    if layout == "missing-ref":
        make_pairs(folder)
        (folder / "beta" / "ref.png").unlink()
    elif layout == "no-pairs":
        (folder / "empty").mkdir(parents=True)
    out = tmp_path / "out"
    code, _, err = call(eval.main, pairs_argv(folder, out, checkpoint), capsys)
    assert_bad_input(code, err, "ttsr-eval", fragment)
    assert not out.exists() or files_in(out) == []


def test_pairs_over_the_memory_budget_are_refused_before_any_work(
    tmp_path, checkpoint, capsys
) -> None:
    make_pairs(tmp_path / "pairs")
    out = tmp_path / "out"
    argv = pairs_argv(tmp_path / "pairs", out, checkpoint, "--max-memory", "1MB", "--save-grids")
    code, _, err = call(eval.main, argv, capsys)
    assert_bad_input(code, err, "ttsr-eval", "memory budget")
    assert not out.exists() or files_in(out) == []


@pytest.mark.parametrize(
    "option",
    [["--jpeg", "0"], ["--jpeg", "101"], ["--jpeg", "high"], ["--noise", "-1"], ["--blur", "x"]],
)
def test_bad_corruption_values_exit_2(tmp_path, capsys, option) -> None:
    make_pairs(tmp_path / "pairs")
    out = tmp_path / "out"
    argv = ["--pairs", tmp_path / "pairs", "--bicubic-only", "--out", out, *option]
    code, _, err = call(eval.main, argv, capsys)
    assert code == 2 and option[0] in err and "Traceback" not in err
    assert not out.exists()


def test_pairs_and_a_dataset_are_alternatives(tmp_path, capsys) -> None:
    make_pairs(tmp_path / "pairs")
    argv = [tmp_path / "pairs", "--pairs", tmp_path / "pairs", "--bicubic-only"]
    code, _, err = call(eval.main, [*argv, "--out", tmp_path / "out"], capsys)
    assert code == 2 and "--pairs" in err
