"""Inference precision: what auto chooses, the reduced-precision building blocks, bf16 runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from inference_helpers import (
    assert_bad_input,
    call,
    save_png,
    textured,
    tiny_model,
    write_tiny_checkpoint,
)
from PIL import Image

from ttsr.cli import eval as eval_cli
from ttsr.cli import infer, infer_dist, serve
from ttsr.imaging import InputError
from ttsr.inference import Upscaler
from ttsr.model import fused_ops
from ttsr.model.config import TTSRConfig
from ttsr.model.fused_ops import bicubic_upsample, conv_add_, conv_relu, conv_then_add
from ttsr.model.ttsr import TTSR
from ttsr.runtime import precision

CPU = torch.device("cpu")
BIG_BUDGET = 2**34


def force_native_bfloat16(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: native, raising=False)


def test_auto_keeps_fp32_on_a_cpu_without_native_bfloat16(monkeypatch: pytest.MonkeyPatch) -> None:
    force_native_bfloat16(monkeypatch, False)
    assert not precision.cpu_has_native_bfloat16()
    assert precision.resolve_precision("auto", CPU) == torch.float32
    assert Upscaler(tiny_model(), "cpu", precision="auto").precision == "fp32"


def test_auto_takes_bf16_on_a_cpu_with_native_bfloat16(monkeypatch: pytest.MonkeyPatch) -> None:
    force_native_bfloat16(monkeypatch, True)
    assert precision.resolve_precision("auto", CPU) == torch.bfloat16
    assert Upscaler(tiny_model(), "cpu", precision="auto").precision == "bf16"


def test_explicit_precisions_and_unknown_names() -> None:
    for name, dtype in precision.DTYPES.items():
        assert precision.resolve_precision(name, CPU) == dtype
        assert precision.precision_name(dtype) == name
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        precision.resolve_precision("fp8", CPU)
    with pytest.raises(InputError, match="unknown precision"):
        Upscaler(tiny_model(), "cpu", precision="half")


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_polyphase_bicubic_equals_interpolate(factor: int) -> None:
    x = torch.randn(2, 3, 7, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = F.interpolate(x, scale_factor=factor, mode="bicubic", align_corners=False)
    torch.testing.assert_close(bicubic_upsample(x, factor), expected, atol=1e-12, rtol=0)
    reduced = bicubic_upsample(x.bfloat16().to(memory_format=torch.channels_last), factor)
    assert reduced.dtype == torch.bfloat16
    assert (reduced.double() - expected).abs().max() < 0.05 * x.abs().max()


def conv(in_channels: int, out_channels: int, dtype: torch.dtype) -> torch.nn.Conv2d:
    torch.manual_seed(3)
    layer = torch.nn.Conv2d(in_channels, out_channels, 3, padding=1)
    if dtype == torch.bfloat16:
        layer.to(dtype=dtype, memory_format=torch.channels_last)
    return layer


def test_fused_convolutions_compute_the_plain_ones() -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 6, 9, 10, generator=generator)
    residual = torch.randn(1, 6, 9, 10, generator=generator)
    with torch.no_grad():
        layer = conv(6, 6, torch.float32)
        plain_relu, plain_sum = F.relu(layer(x)), layer(x) + residual
        # float32 takes the plain operations: bit for bit what they give
        assert torch.equal(conv_relu(layer, x), plain_relu)
        assert torch.equal(conv_then_add(layer, x, residual), plain_sum)
        assert torch.equal(conv_add_(layer, x, residual.clone()), plain_sum)

        reduced = conv(6, 6, torch.bfloat16)
        xb = x.bfloat16().to(memory_format=torch.channels_last)
        rb = residual.bfloat16().to(memory_format=torch.channels_last)
        expected_relu = F.relu(
            F.conv2d(xb.float(), reduced.weight.float(), reduced.bias.float(), padding=1)
        )
        expected_sum = (
            F.conv2d(xb.float(), reduced.weight.float(), reduced.bias.float(), padding=1)
            + rb.float()
        )
        tolerance = dict(atol=0.05, rtol=0.02)
        torch.testing.assert_close(conv_relu(reduced, xb).float(), expected_relu, **tolerance)
        torch.testing.assert_close(
            conv_then_add(reduced, xb, rb).float(), expected_sum, **tolerance
        )
        into = rb.clone()
        assert conv_add_(reduced, xb, into) is into
        torch.testing.assert_close(into.float(), expected_sum, **tolerance)


def test_fused_kernels_are_taken_only_for_cpu_bfloat16_without_autograd() -> None:
    x = torch.zeros(1, 2, 3, 3, dtype=torch.bfloat16)
    with torch.no_grad():
        assert fused_ops.fusable(x) == fused_ops._fused_kernels_available()
        assert not fused_ops.fusable(x.float())
        assert not fused_ops.fusable(x, torch.zeros(2, 2, 3, 3))  # autocast: float32 weights
    with torch.enable_grad():
        assert not fused_ops.fusable(x.requires_grad_())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    error = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255**2 / max(error, 1e-12)))


@pytest.mark.parametrize("reduced_name", ["bf16", "fp16"])
def test_reduced_upscaler_matches_fp32_and_leaves_the_callers_model_alone(reduced_name) -> None:
    model = tiny_model(seed=2)
    lr, ref = textured(20, 24, seed=8), textured(40, 44, seed=9)
    exact = Upscaler(model, "cpu", max_memory=BIG_BUDGET, precision="fp32").upscale(lr, ref)
    reduced_engine = Upscaler(model, "cpu", max_memory=BIG_BUDGET, precision=reduced_name)
    reduced = reduced_engine.upscale(lr, ref)
    assert model.compute_dtype == torch.float32 and reduced_engine.model is not model
    assert reduced_engine.model.compute_dtype == precision.DTYPES[reduced_name]
    a, b = np.asarray(exact.sr), np.asarray(reduced.sr)
    assert psnr(a, b) > 40 and np.abs(a.astype(int) - b).max() <= 8
    assert (exact.correspondence.reference_id == reduced.correspondence.reference_id).all()
    # the search ran on (nearly) the same features: almost every best patch is the same one
    same = np.mean(exact.correspondence.y == reduced.correspondence.y)
    assert same > 0.9


def test_bf16_tiles_equal_the_whole_image_up_to_rounding() -> None:
    lr, ref = textured(8, 56, seed=1), textured(24, 28, seed=2)
    model = tiny_model(blocks=(0, 0, 0, 0))
    whole = Upscaler(model, "cpu", max_memory=BIG_BUDGET, precision="bf16")
    tiled = Upscaler(model, "cpu", max_memory=BIG_BUDGET, tile_size=14, precision="bf16")
    inputs = whole.prepare(lr, [ref])
    sizes = [r.shape[:2] for r in inputs.references_rgb]
    tiled_plan = tiled.plan((8, 56), sizes)
    assert len(tiled_plan.tiles) == 4
    expected = whole.run(inputs, whole.plan((8, 56), sizes))
    result = tiled.run(inputs, tiled_plan)
    assert result.sr.dtype == torch.float32
    torch.testing.assert_close(result.sr, expected.sr, atol=0.02, rtol=0)
    assert (result.sr - expected.sr).abs().mean() < 1e-3


def test_reduced_precision_estimates_less_memory_and_grows_tiles() -> None:
    model = TTSR(TTSRConfig(num_res_blocks=(1, 1, 1, 1), n_feats=64))  # the generator dominates
    exact = Upscaler(model, "cpu", max_memory=BIG_BUDGET, precision="fp32")
    reduced = Upscaler(model, "cpu", max_memory=BIG_BUDGET, precision="bf16")
    sizes = [(64, 64)]
    full, half = exact.estimate((400, 400), sizes, 400), reduced.estimate((400, 400), sizes, 400)
    assert half.transient < full.transient and half.fixed <= full.fixed  # bf16 weights too
    budget = exact.estimate((400, 400), sizes, 120).peak
    exact.max_memory = reduced.max_memory = budget
    assert reduced.plan((400, 400), sizes).core > exact.plan((400, 400), sizes).core


@pytest.mark.parametrize("name", ["fp32", "bf16"])
def test_infer_cli_runs_and_reports_the_precision(tmp_path, name, capsys) -> None:
    checkpoint = write_tiny_checkpoint(tmp_path)
    lr = save_png(textured(8, 10, seed=1), tmp_path / "lr.png")
    ref = save_png(textured(20, 24, seed=2), tmp_path / "ref.png")
    out = tmp_path / "sr.png"
    argv = ["--lr", lr, "--ref", ref, "--out", out, "--checkpoint", checkpoint]
    code, stdout, err = call(infer.main, [*argv, "--precision", name], capsys)
    assert code == 0, err
    assert f"on cpu in {name}" in stdout and Image.open(out).size == (40, 32)


def test_precision_option_on_every_command_and_bad_values_refused(tmp_path, capsys) -> None:
    defaults = {infer: "auto", infer_dist: "auto", serve: "auto", eval_cli: "fp32"}
    for module, default in defaults.items():
        parser = module.build_parser()
        assert parser.parse_args([]).precision == default
        assert "--precision {auto,fp32,bf16,fp16}" in parser.format_help()
    code, _, err = call(
        infer.main, ["--demo", "--out", tmp_path / "x.png", "--precision", "fp8"], capsys
    )
    assert_bad_input(code, err, "ttsr-infer", "--precision", "fp8")
    assert not (tmp_path / "x.png").exists()
