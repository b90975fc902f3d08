"""ttsr-infer through its entry points: single pair, several references, folders, --demo."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from inference_helpers import call, files_in, save_png, textured, write_tiny_checkpoint
from PIL import Image

from ttsr import inference
from ttsr.cli import infer

PROG = "ttsr-infer"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("checkpoint"))


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    return (
        save_png(textured(8, 10, seed=1), tmp_path / "lr.png"),
        save_png(textured(20, 24, seed=2), tmp_path / "ref.png"),
    )


def test_single_pair_writes_a_4x_image_and_a_summary(tmp_path, pair, checkpoint, capsys) -> None:
    lr, ref = pair
    out = tmp_path / "out" / "sr.png"
    code, stdout, _ = call(
        infer.main, ["--lr", lr, "--ref", ref, "--out", out, "--checkpoint", checkpoint], capsys
    )
    assert code == 0
    assert Image.open(out).size == (40, 32)
    assert "upscaled 1 image x4" in stdout and str(out) in stdout
    assert files_in(tmp_path / "out") == ["sr.png"]  # no temporaries left


def test_several_references_and_every_extra_output(tmp_path, pair, checkpoint, capsys) -> None:
    lr, ref = pair
    ref2 = save_png(textured(16, 16, seed=3), tmp_path / "ref2.png")
    out = tmp_path / "sr.jpg"
    extras = ["--save-bicubic", "--save-attention", "--save-correspondence", "--save-comparison"]
    argv = ["--lr", lr, "--ref", ref, "--ref", ref2, "--out", out, "--checkpoint", checkpoint]
    code, _, err = call(infer.main, argv + extras, capsys)
    assert code == 0, err
    assert Image.open(out).size == (40, 32)
    for kind in ("bicubic", "attention"):
        assert Image.open(tmp_path / f"sr_{kind}.jpg").size == (40, 32)
    for kind in ("correspondence", "comparison"):
        assert Image.open(tmp_path / f"sr_{kind}.jpg").height >= 32


def test_folder_mode_matches_references_by_stem(tmp_path, checkpoint, capsys) -> None:
    lr_dir, ref_dir, out_dir = tmp_path / "lr", tmp_path / "ref", tmp_path / "sr"
    save_png(textured(8, 8, seed=1), lr_dir / "a.png")
    save_png(textured(6, 9, seed=2), lr_dir / "b.png")
    save_png(textured(16, 16, seed=3), ref_dir / "a_1.png")
    save_png(textured(16, 20, seed=4), ref_dir / "a_2.png")
    save_png(textured(20, 16, seed=5), ref_dir / "b.png")
    argv = ["--lr", lr_dir, "--ref", ref_dir, "--out", out_dir, "--checkpoint", checkpoint]
    code, stdout, err = call(infer.main, argv + ["--save-correspondence"], capsys)
    assert code == 0, err
    assert files_in(out_dir) == ["a.png", "a_correspondence.png", "b.png", "b_correspondence.png"]
    assert Image.open(out_dir / "b.png").size == (36, 24)
    assert "upscaled 2 images" in stdout


def test_folder_mode_with_one_reference_set_for_all(tmp_path, checkpoint, capsys) -> None:
    lr_dir = tmp_path / "lr"
    save_png(textured(8, 8, seed=1), lr_dir / "x.png")
    save_png(textured(8, 8, seed=2), lr_dir / "y.png")
    ref = save_png(textured(16, 16, seed=3), tmp_path / "common.png")
    argv = ["--lr", lr_dir, "--ref", ref, "--out", tmp_path / "sr", "--checkpoint", checkpoint]
    code, _, err = call(infer.main, argv, capsys)
    assert code == 0, err
    assert files_in(tmp_path / "sr") == ["x.png", "y.png"]


def test_folder_mode_refuses_inputs_without_reference_before_writing(
    tmp_path, checkpoint, capsys
) -> None:
    lr_dir, ref_dir = tmp_path / "lr", tmp_path / "ref"
    save_png(textured(8, 8, seed=1), lr_dir / "a.png")
    save_png(textured(8, 8, seed=2), lr_dir / "lonely.png")
    save_png(textured(16, 16, seed=3), ref_dir / "a.png")
    argv = ["--lr", lr_dir, "--ref", ref_dir, "--out", tmp_path / "sr", "--checkpoint", checkpoint]
    code, _, err = call(infer.main, argv, capsys)
    assert code == 2 and "lonely" in err and "Traceback" not in err
    assert not (tmp_path / "sr").exists() or files_in(tmp_path / "sr") == []


def shipped_or_tiny_checkpoint(monkeypatch: pytest.MonkeyPatch, tiny: Path) -> None:
    """Use the shipped checkpoint when it is installed, the tiny one otherwise."""
    if not inference.default_checkpoint_path().is_file():
        monkeypatch.setattr(inference, "default_checkpoint_path", lambda: tiny)


def test_demo_runs_on_the_bundled_pair(tmp_path, checkpoint, monkeypatch, capsys) -> None:
    shipped_or_tiny_checkpoint(monkeypatch, checkpoint)
    out = tmp_path / "demo.png"
    code, stdout, err = call(infer.main, ["--demo", "--out", out, "--save-comparison"], capsys)
    assert code == 0, err
    assert Image.open(out).size == (384, 256)
    assert (tmp_path / "demo_comparison.png").is_file()
    assert "upscaled 1 image" in stdout


def test_demo_pair_is_bundled_with_its_licence() -> None:
    lr, ref = infer.demo_paths()
    assert Image.open(lr).size == (96, 64) and Image.open(ref).size == (420, 312)
    assert "CC0" in (lr.parent / "README.md").read_text()


def test_help_explains_the_options(capsys) -> None:
    code, stdout, _ = call(infer.main, ["--help"], capsys)
    assert code == 0
    for option in ("--lr", "--ref", "--out", "--demo", "--max-memory", "--save-attention"):
        assert option in stdout


def test_installed_console_script(tmp_path, pair, checkpoint) -> None:
    script = shutil.which("ttsr-infer")
    if script is None:
        pytest.skip("the ttsr-infer console script is not installed")
    lr, ref = pair
    out = tmp_path / "script.png"
    argv = [script, "--lr", lr, "--ref", ref, "--out", out, "--checkpoint", checkpoint]
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert Image.open(out).size == (40, 32)
    broken = subprocess.run(
        [script, "--lr", str(tmp_path / "missing.png"), "--ref", str(ref), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert broken.returncode == 2
    assert broken.stderr.startswith("ttsr-infer: error:") and "Traceback" not in broken.stderr


def test_flow_export_of_a_reference_that_is_the_hr_image_is_zero(tmp_path, checkpoint, capsys):
    """With the HR as reference, Ref-down-up equals LR-up exactly, so every LR position matches
    itself: the exported flow is zero and the matches are the output patch centres."""
    hr_image = Image.open(save_png(textured(32, 40, seed=4), tmp_path / "hr.png"))
    lr = tmp_path / "lr.png"
    hr_image.resize((10, 8), Image.Resampling.BICUBIC).save(lr)
    out = tmp_path / "sr.png"
    argv = ["--lr", lr, "--ref", tmp_path / "hr.png", "--out", out, "--checkpoint", checkpoint]
    code, _, err = call(infer.main, argv + ["--save-flow"], capsys)
    assert code == 0, err
    with np.load(tmp_path / "sr_flow.npz") as archive:
        flow, reference_id = archive["flow"], archive["reference_id"]
        match_x, match_y = archive["match_x"], archive["match_y"]
        assert archive["reference_sizes"].tolist() == [[32, 40]]
    assert flow.shape == (2, 8, 10) and reference_id.shape == (8, 10)
    assert np.abs(flow).max() == 0 and not reference_id.any()
    np.testing.assert_array_equal(match_x[0], np.arange(10) * 4 + 1.5)
    np.testing.assert_array_equal(match_y[:, 0], np.arange(8) * 4 + 1.5)
