"""ttsr-eval: tables of Y-PSNR / SSIM against values computed here with plain numpy."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from inference_helpers import call, save_png, textured, write_tiny_checkpoint
from PIL import Image

from ttsr.cli import eval
from ttsr.inference import Upscaler

# --- the protocol, written out independently of ttsr.metrics / ttsr.data --------------------------


def luma(rgb: np.ndarray) -> np.ndarray:
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    return 16.0 + (65.738 * r + 129.057 * g + 25.064 * b) / 256.0


def crop(y: np.ndarray, border: int) -> np.ndarray:
    return y[border:-border, border:-border] if border else y


def psnr(a: np.ndarray, b: np.ndarray, border: int = 0) -> float:
    mse = np.mean((crop(luma(a), border) - crop(luma(b), border)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


def ssim(a: np.ndarray, b: np.ndarray, border: int = 0) -> float:
    x, y = crop(luma(a), border), crop(luma(b), border)
    offsets = np.arange(11) - 5
    gauss = np.exp(-(offsets**2) / (2 * 1.5**2))
    window = np.outer(gauss, gauss) / gauss.sum() ** 2

    def mean_filter(image: np.ndarray) -> np.ndarray:  # 'valid' weighted mean over 11x11
        patches = np.lib.stride_tricks.sliding_window_view(image, (11, 11))
        return np.einsum("ijkl,kl->ij", patches, window)

    mx, my = mean_filter(x), mean_filter(y)
    vx, vy = mean_filter(x * x) - mx**2, mean_filter(y * y) - my**2
    cov = mean_filter(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    return float(
        np.mean(((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    )


def degrade(hr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(HR cropped to a multiple of 4, LR by PIL bicubic /4, LR-up by PIL bicubic x4)."""
    height, width = hr.shape[0] // 4 * 4, hr.shape[1] // 4 * 4
    hr = hr[:height, :width]
    lr = Image.fromarray(hr).resize((width // 4, height // 4), Image.BICUBIC)
    return hr, np.asarray(lr), np.asarray(lr.resize((width, height), Image.BICUBIC))


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("checkpoint"))


@pytest.fixture
def hr_set(tmp_path: Path) -> dict[str, np.ndarray]:
    """Three HR images, two with sides that are not multiples of 4."""
    images = {"a": textured(20, 24, 1), "b": textured(23, 21, 2), "c": textured(24, 22, 3)}
    for name, image in images.items():
        save_png(image, tmp_path / "hr" / f"{name}.png")
    return images


def read_results(out: Path) -> tuple[dict, list[dict]]:
    document = json.loads((out / "results.json").read_text())
    with open(out / "results.csv", newline="") as stream:
        return document, list(csv.DictReader(stream))


# --- tests ----------------------------------------------------------------------------------------


def test_table_matches_numpy_psnr_and_ssim(tmp_path, hr_set, checkpoint, capsys) -> None:
    out = tmp_path / "results"
    argv = [tmp_path / "hr", "--checkpoint", checkpoint, "--out", out, "--device", "cpu"]
    code, stdout, err = call(eval.main, argv, capsys)
    assert code == 0, err
    document, rows = read_results(out)
    assert document["settings"]["references"] == "lr" and document["images"] == 3

    upscaler = Upscaler.from_checkpoint(checkpoint, device="cpu")
    expected = {}
    for name, image in hr_set.items():
        hr, lr, bicubic = degrade(image)
        sr = np.asarray(upscaler.upscale(lr, lr).sr)  # the LR is its own reference
        expected[name] = [psnr(hr, bicubic), ssim(hr, bicubic), psnr(hr, sr), ssim(hr, sr)]
    columns = ["bicubic_psnr", "bicubic_ssim", "ttsr_psnr", "ttsr_ssim"]
    for row, csv_row in zip(document["rows"], rows, strict=False):
        values = [row[c] for c in columns]
        np.testing.assert_allclose(values, expected[row["image"]], rtol=0, atol=1e-6)
        np.testing.assert_allclose([float(csv_row[c]) for c in columns], values, atol=1e-5)
    mean = np.mean(list(expected.values()), axis=0)
    np.testing.assert_allclose([document["mean"][c] for c in columns], mean, atol=1e-6)
    assert rows[-1]["image"] == "mean" and len(rows) == 4
    assert stdout.splitlines()[-2].startswith("mean") and f"{mean[0]:.2f}" in stdout


def test_border_crop_and_limit(tmp_path, hr_set, capsys) -> None:
    out = tmp_path / "results"
    argv = [tmp_path / "hr", "--bicubic-only", "--border", "4", "--limit", "2", "--out", out]
    code, _, err = call(eval.main, argv, capsys)
    assert code == 0, err
    document, _ = read_results(out)
    assert [r["image"] for r in document["rows"]] == ["a", "b"]
    for row in document["rows"]:
        hr, _, bicubic = degrade(hr_set[row["image"]])
        assert row["bicubic_psnr"] == pytest.approx(psnr(hr, bicubic, 4), abs=1e-6)
        assert row["bicubic_ssim"] == pytest.approx(ssim(hr, bicubic, 4), abs=1e-6)
        assert row["ttsr_psnr"] is None


def cufed_folder(folder: Path) -> dict[str, np.ndarray]:
    images = {}
    for index in range(2):
        for level in range(6):
            name = f"{index:03d}_{level}"
            images[name] = textured(16, 20, seed=10 * index + level)
            save_png(images[name], folder / f"{name}.png")
    return images


@pytest.mark.parametrize("level", ["3", "all"])
def test_cufed_layout_uses_the_chosen_reference_level(tmp_path, checkpoint, capsys, level) -> None:
    images = cufed_folder(tmp_path / "cufed")
    out = tmp_path / "results"
    argv = [tmp_path / "cufed", "--ref-level", level, "--checkpoint", checkpoint, "--out", out]
    code, _, err = call(eval.main, argv + ["--save-grids", "--save-summary"], capsys)
    assert code == 0, err
    document, _ = read_results(out)
    assert document["settings"]["references"] == "cufed"
    assert [r["image"] for r in document["rows"]] == ["000", "001"]
    upscaler = Upscaler.from_checkpoint(checkpoint, device="cpu")
    hr, lr, _ = degrade(images["000_0"])
    levels = range(1, 6) if level == "all" else [int(level)]
    sr = np.asarray(upscaler.upscale(lr, [images[f"000_{lv}"] for lv in levels]).sr)
    assert document["rows"][0]["ttsr_psnr"] == pytest.approx(psnr(hr, sr), abs=1e-6)
    assert (out / "grids" / "000.png").is_file() and (out / "summary.png").is_file()


def test_hr_and_reference_files_directly(tmp_path, checkpoint, capsys) -> None:
    left = save_png(textured(32, 36, seed=4), tmp_path / "left.png")
    right = save_png(textured(40, 36, seed=5), tmp_path / "right.png")
    out = tmp_path / "results"
    argv = ["--hr", left, "--ref", right, "--checkpoint", checkpoint, "--out", out]
    code, _, err = call(eval.main, argv, capsys)
    assert code == 0, err
    document, _ = read_results(out)
    hr, lr, bicubic = degrade(textured(32, 36, seed=4))
    sr = np.asarray(Upscaler.from_checkpoint(checkpoint, device="cpu").upscale(lr, right).sr)
    assert document["rows"][0]["bicubic_psnr"] == pytest.approx(psnr(hr, bicubic), abs=1e-6)
    assert document["rows"][0]["ttsr_ssim"] == pytest.approx(ssim(hr, sr), abs=1e-6)


def test_one_hr_file_with_its_own_lr_as_reference(tmp_path, checkpoint, capsys) -> None:
    left = save_png(textured(32, 36, seed=4), tmp_path / "left.png")
    out = tmp_path / "results"
    argv = ["--hr", left, "--ref-mode", "lr", "--checkpoint", checkpoint, "--out", out]
    code, _, err = call(eval.main, argv, capsys)
    assert code == 0, err
    document, _ = read_results(out)
    hr, lr, _ = degrade(textured(32, 36, seed=4))
    sr = np.asarray(Upscaler.from_checkpoint(checkpoint, device="cpu").upscale(lr, lr).sr)
    assert document["settings"]["references"] == "lr"
    assert document["rows"][0]["ttsr_psnr"] == pytest.approx(psnr(hr, sr), abs=1e-6)


def test_reference_folder_matched_by_stem(tmp_path, hr_set, checkpoint, capsys) -> None:
    for name in hr_set:
        save_png(textured(24, 24, seed=7), tmp_path / "refs" / f"{name}_1.png")
    out = tmp_path / "results"
    argv = [tmp_path / "hr", "--ref-dir", tmp_path / "refs", "--checkpoint", checkpoint]
    code, _, err = call(eval.main, argv + ["--out", out], capsys)
    assert code == 0, err
    document, _ = read_results(out)
    assert document["settings"]["references"] == "dir" and document["images"] == 3


def test_hr_as_reference_is_an_upper_bound_mode(tmp_path, hr_set, checkpoint, capsys) -> None:
    out = tmp_path / "results"
    argv = [tmp_path / "hr", "--ref-mode", "hr", "--checkpoint", checkpoint, "--out", out]
    code, _, err = call(eval.main, argv, capsys)
    assert code == 0, err
    assert read_results(out)[0]["settings"]["references"] == "hr"
