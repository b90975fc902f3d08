"""Upscaler: preprocessing, several references, correspondence, tiling and the memory budget."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from inference_helpers import save_png, textured, tiny_model
from PIL import Image

from ttsr import inference
from ttsr.checkpoints import CheckpointError
from ttsr.data.degradation import downsample, reference_pair, to_tensor, upsample
from ttsr.imaging import InputError
from ttsr.inference import Correspondence, Upscaler
from ttsr.memory import MemoryBudgetError, estimate_peak, parse_size
from ttsr.tiling import RELEASED_RADIUS, receptive_radius, tile_grid

BIG_BUDGET = 2**34


def upscaler(tile_size: int | None = None, max_memory: int = BIG_BUDGET, **kwargs) -> Upscaler:
    return Upscaler(tiny_model(**kwargs), "cpu", max_memory=max_memory, tile_size=tile_size)


def test_released_generator_receptive_radius_is_derived_from_block_counts() -> None:
    assert receptive_radius((16, 16, 8, 4)) == RELEASED_RADIUS == 102
    assert receptive_radius((1, 1, 1, 1)) < receptive_radius((1, 3, 1, 1))
    assert receptive_radius((1, 1, 1, 1), use_texture=False) <= receptive_radius((1, 1, 1, 1))


def test_receptive_radius_covers_the_deformable_head() -> None:
    hard = receptive_radius((1, 1, 1, 1))
    assert receptive_radius((1, 1, 1, 1), transfer="deformable") > hard
    assert upscaler(transfer="deformable").margin == receptive_radius(
        (1, 1, 1, 1), transfer="deformable"
    )


def with_working_deformable_head(engine: Upscaler) -> Upscaler:
    """Give the deformable head (zero at initialisation: the hard transfer) seeded random
    offsets and masks, so that tiling errors in its reach would show."""
    head = engine.model.deformable_transfer
    if head is not None:
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for level in (head.lv1, head.lv2, head.lv3):
                last = level.offset_head[-1]
                last.weight.copy_(torch.randn(last.weight.shape, generator=generator) * 0.05)
    return engine


def test_tile_cores_partition_the_image_and_margins_are_clipped() -> None:
    tiles = tile_grid(10, 23, core=6, margin=4)
    covered = np.zeros((10, 23), int)
    for tile in tiles:
        top, bottom, left, right = tile.core
        covered[top:bottom, left:right] += 1
        p_top, p_bottom, p_left, p_right = tile.padded
        assert p_top == max(0, top - 4) and p_right == min(23, right + 4)
        assert p_bottom - p_top >= bottom - top and p_left <= left
    assert (covered == 1).all()


#: No residual blocks: the smallest receptive field (18 LR pixels), so small images tile for real.
SHALLOW = (0, 0, 0, 0)


@pytest.mark.parametrize("transfer", ["hard", "deformable"])
@pytest.mark.parametrize("shape", [(8, 56), (56, 8)])
def test_tiled_run_equals_whole_image_run(shape: tuple[int, int], transfer: str) -> None:
    lr = textured(*shape, seed=1)
    refs = [textured(24, 28, seed=2), textured(20, 36, seed=3)]
    whole = with_working_deformable_head(upscaler(blocks=SHALLOW, transfer=transfer))
    tiled = with_working_deformable_head(upscaler(tile_size=14, blocks=SHALLOW, transfer=transfer))
    inputs = whole.prepare(lr, refs)
    sizes = [r.shape[:2] for r in inputs.references_rgb]
    whole_plan, tiled_plan = whole.plan(shape, sizes), tiled.plan(shape, sizes)
    assert len(whole_plan.tiles) == 1 and len(tiled_plan.tiles) == 4
    assert all(  # every tile is a real crop: its margin does not reach across the image
        (t.padded[1] - t.padded[0]) * (t.padded[3] - t.padded[2]) < shape[0] * shape[1]
        for t in tiled_plan.tiles
    )
    expected = whole.run(inputs, whole_plan)
    result = tiled.run(inputs, tiled_plan)
    torch.testing.assert_close(result.sr, expected.sr, atol=2e-5, rtol=0)
    np.testing.assert_allclose(result.soft_attention, expected.soft_attention, atol=2e-6)
    assert (result.index == expected.index).all()

    tiled.margin = 1  # a too-small margin must show: the comparison can see tiling errors
    wrong = tiled.run(inputs, tiled.plan(shape, sizes))
    assert (wrong.sr - expected.sr).abs().max() > 1e-3


def test_memory_budget_chooses_tiles_that_fit_and_keep_the_result() -> None:
    lr, ref = textured(8, 60, seed=4), textured(24, 24, seed=5)
    free = upscaler(blocks=SHALLOW)
    sizes = [(24, 24)]
    budget = free.estimate((8, 60), sizes, core=12).peak
    bounded = upscaler(max_memory=budget, blocks=SHALLOW)
    plan = bounded.plan((8, 60), sizes)
    assert len(plan.tiles) > 1 and plan.estimate.peak <= budget
    a = np.asarray(free.upscale(lr, ref).sr, dtype=int)
    b = np.asarray(bounded.upscale(lr, ref).sr, dtype=int)
    assert np.abs(a - b).max() <= 1


def test_run_that_cannot_fit_is_refused_before_decoding(tmp_path: Path) -> None:
    truncated = save_png(textured(64, 64), tmp_path / "lr.png")
    truncated.write_bytes(truncated.read_bytes()[:200])  # header intact, pixels missing
    small = upscaler(max_memory=parse_size("1MB"))
    with pytest.raises(MemoryBudgetError, match="memory budget of 1.0 MB"):
        small.upscale(truncated, textured(32, 32))


def test_peak_memory_estimate_covers_a_measured_run() -> None:
    status = Path("/proc/self/status")
    clear_refs = Path("/proc/self/clear_refs")
    if not status.exists():
        pytest.skip("needs Linux /proc")

    def read(key: str) -> int:
        return int(re.search(rf"{key}:\s+(\d+)", status.read_text()).group(1)) * 1024

    engine = upscaler(blocks=SHALLOW)
    lr, ref = textured(24, 24, seed=6), textured(96, 96, seed=7)
    estimate = engine.check_sizes(lr, ref).estimate.peak
    before = read("VmRSS")
    try:
        clear_refs.write_text("5")
    except OSError:
        pytest.skip("cannot reset the peak RSS here")
    engine.upscale(lr, ref)
    assert read("VmHWM") - before <= estimate


def test_estimate_grows_with_tile_and_reference_sizes() -> None:
    def peak(tile: int, ref: int) -> int:
        return estimate_peak((64, 64), (tile, tile), [(ref, ref)], 64, 0).peak

    assert peak(32, 64) < peak(64, 64) < peak(64, 128)


def test_several_references_are_searched_jointly_and_correspondence_finds_the_source() -> None:
    scene = textured(96, 120, seed=8)
    offset_y, offset_x = 16, 40  # the LR shows scene[16:80, 40:104]
    lr = downsample(scene[offset_y : offset_y + 64, offset_x : offset_x + 64])
    distractor = textured(64, 64, seed=9)
    result = upscaler().upscale(lr, [distractor, scene])
    found = result.correspondence
    assert found is not None and result.soft_attention is not None
    inner = (slice(2, -2), slice(2, -2))
    assert (found.reference_id[inner] == 1).mean() > 0.9
    exact = (found.displacement[inner] == (offset_y, offset_x)).all(axis=-1)
    assert exact.mean() > 0.8
    assert result.soft_attention[inner].mean() > 0.95
    assert result.sr.size == (64, 64) and result.bicubic.size == (64, 64)
    assert result.attention_map().size == (64, 64)
    assert result.correspondence_map().height >= 64
    assert result.comparison().height >= 64


def test_correspondence_decodes_index_over_concatenated_reference_grids() -> None:
    sizes = [(8, 12), (16, 8)]  # grids 2x3 (6 positions) then 4x2
    index = np.array([[0, 5, 6, 13]])
    found = Correspondence.from_index(index, sizes)
    assert found.reference_id.tolist() == [[0, 0, 1, 1]]
    assert found.y.tolist() == [[1.5, 5.5, 1.5, 13.5]]
    assert found.x.tolist() == [[1.5, 9.5, 1.5, 5.5]]
    assert found.displacement[0, 1].tolist() == [5.5 - 1.5, 9.5 - 5.5]


def test_preprocessing_is_ttsr_pil_bicubic(tmp_path: Path) -> None:
    lr, ref = textured(12, 16, seed=10), textured(38, 43, seed=11)
    inputs = upscaler().prepare(save_png(lr, tmp_path / "lr.png"), Image.fromarray(ref))
    ref_cropped, refsr = reference_pair(ref)
    assert ref_cropped.shape == (36, 40, 3)
    torch.testing.assert_close(inputs.lrsr[0], to_tensor(upsample(lr)))
    torch.testing.assert_close(inputs.refsrs[0][0], to_tensor(refsr))
    assert inputs.lr.min() >= -1 and inputs.lr.max() <= 1


def test_paths_pil_images_and_arrays_give_the_same_result(tmp_path: Path) -> None:
    lr, ref = textured(8, 8, seed=12), textured(16, 16, seed=13)
    engine = upscaler(blocks=SHALLOW)
    from_arrays = np.asarray(engine.upscale(lr, ref).sr)
    from_files = engine.upscale(
        save_png(lr, tmp_path / "a.png"), [save_png(ref, tmp_path / "b.png")]
    )
    from_pil = engine.upscale(Image.fromarray(lr), (Image.fromarray(ref),))
    assert (np.asarray(from_files.sr) == from_arrays).all()
    assert (np.asarray(from_pil.sr) == from_arrays).all()


def test_model_without_texture_path_needs_no_reference() -> None:
    result = upscaler(use_texture=False).upscale(textured(10, 10), None)
    assert result.sr.size == (40, 40) and result.correspondence is None
    with pytest.raises(InputError, match="no attention"):
        result.attention_map()


def test_missing_reference_and_tiny_images_raise_input_errors() -> None:
    engine = upscaler()
    with pytest.raises(InputError, match="at least one reference"):
        engine.upscale(textured(10, 10), [])
    with pytest.raises(InputError, match="too small"):
        engine.upscale(textured(3, 10), textured(16, 16))
    with pytest.raises(ValueError, match="too small"):  # InputError is a ValueError
        engine.upscale(textured(10, 10), textured(3, 16))


def test_missing_shipped_checkpoint_says_what_to_do(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(inference, "default_checkpoint_path", lambda: tmp_path / "none.pt")
    with pytest.raises(CheckpointError, match="not installed.*--checkpoint"):
        Upscaler.from_checkpoint(device="cpu")


def test_memory_sizes_parse() -> None:
    assert parse_size("4GB") == 4 * 2**30
    assert parse_size("512m") == 512 * 2**20
    assert parse_size("1.5GiB") == int(1.5 * 2**30)
    with pytest.raises(InputError):
        parse_size("lots")
