"""ttsr-convert, and a converted released checkpoint through ttsr-infer vs. the released code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from inference_helpers import RELEASED, call
from PIL import Image

from ttsr.checkpoints import load_checkpoint
from ttsr.cli import convert, infer


def test_convert_writes_a_ttsr_checkpoint(tmp_path: Path, capsys) -> None:
    out = tmp_path / "converted.pt"
    argv = [RELEASED / "released_format_state_dict.pt", out, "--res-scale", "0.5"]
    code, stdout, err = call(convert.main, argv, capsys)
    assert code == 0, err
    assert "blocks 2+2+1+1" in stdout and "n_feats 16" in stdout and "divisor constant" in stdout
    content = torch.load(out, weights_only=True)
    assert content["config"]["res_scale"] == 0.5
    assert load_checkpoint(out).generator.num_res_blocks == (2, 2, 1, 1)


def test_converted_checkpoint_reproduces_the_released_output(tmp_path: Path, capsys) -> None:
    checkpoint = tmp_path / "converted.pt"
    assert (
        call(convert.main, [RELEASED / "released_format_state_dict.pt", checkpoint], capsys)[0] == 0
    )
    out = tmp_path / "sr.png"
    argv = ["--lr", RELEASED / "lr.png", "--ref", RELEASED / "ref.png", "--out", out]
    argv += ["--checkpoint", checkpoint, "--device", "cpu", "--precision", "fp32"]
    code, _, err = call(infer.main, argv, capsys)
    assert code == 0, err
    ours = np.asarray(Image.open(out), dtype=int)
    released = np.asarray(Image.open(RELEASED / "sr.png"), dtype=int)
    assert ours.shape == released.shape == (160, 240, 3)
    assert np.abs(ours - released).max() <= 1  # quantised float rounding at most


def test_help_explains_the_conversion(capsys) -> None:
    code, stdout, _ = call(convert.main, ["--help"], capsys)
    assert code == 0 and "released" in stdout and "--res-scale" in stdout
