"""Harder synthetic references and real-world degraded samples: every transform keeps the
reference overlapping the HR crop, and the degraded LR reaches the sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ttsr.data.datamodule import TTSRDataModule
from ttsr.data.datasets import SyntheticReferenceDataset, ValidationDataset
from ttsr.data.degradation import downsample, to_tensor, upsample
from ttsr.data.real_degradation import DegradationOptions, LRCorruption, jpeg
from ttsr.data.synthetic import SyntheticOptions, synthesize_pair

PLAIN = dict(aligned_probability=1.0, color_jitter=0.0, flip_probability=0.0)
#: Each harder transform alone, strong enough to change the reference.
TRANSFORMS = {
    "perspective": dict(perspective=0.08),
    "exposure": dict(exposure=1.0),
    "gamma": dict(gamma_range=(0.6, 0.7)),
    "white_balance": dict(white_balance=0.3),
    "blur": dict(blur_probability=1.0, blur_sigma_range=(1.0, 1.5)),
    "occlusion": dict(occlusion_probability=1.0, occlusion_max_area=0.2),
    "jpeg": dict(jpeg_probability=1.0, jpeg_quality_range=(60, 70)),
}


def smooth_photo(height: int = 160, width: int = 160, seed: int = 0) -> np.ndarray:
    """Photo-like texture: random blobs at a few scales (no pixel-level noise)."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), np.float32)
    for cells in (5, 10, 20):
        coarse = rng.uniform(0, 255, (cells, cells, 3)).astype(np.uint8)
        image += np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC)) / 3
    return np.clip(image, 0, 255).astype(np.uint8)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def shared_windows(pair, ref_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The HR crop's and the aligned reference's pixels over their common photo area."""
    top, left, size = pair.hr_box
    ref_top = round(pair.ref_center[0] - ref_size / 2)
    ref_left = round(pair.ref_center[1] - ref_size / 2)
    y0, y1 = max(top, ref_top), min(top + size, ref_top + ref_size)
    x0, x1 = max(left, ref_left), min(left + size, ref_left + ref_size)
    assert y1 - y0 >= 8 and x1 - x0 >= 8, "the aligned reference must overlap the HR crop"
    hr = pair.hr[y0 - top : y1 - top, x0 - left : x1 - left]
    ref = pair.ref[y0 - ref_top : y1 - ref_top, x0 - ref_left : x1 - ref_left]
    return hr, ref


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_each_harder_transform_changes_the_reference_but_keeps_the_overlap(name):
    photo = smooth_photo()
    for seed in range(3):
        plain = synthesize_pair(
            photo, 48, 48, np.random.default_rng(seed), SyntheticOptions(**PLAIN)
        )
        hard = synthesize_pair(
            photo,
            48,
            48,
            np.random.default_rng(seed),
            SyntheticOptions(**PLAIN, **TRANSFORMS[name]),
        )
        assert hard.hr_box == plain.hr_box and hard.ref_center == plain.ref_center
        assert np.array_equal(hard.hr, plain.hr)
        assert not np.array_equal(hard.ref, plain.ref), f"{name} left the reference unchanged"
        hr_part, plain_part = shared_windows(plain, 48)
        assert correlation(hr_part, plain_part) > 0.99  # the plain reference is a shifted crop
        hr_part, hard_part = shared_windows(hard, 48)
        # Shared content survives: structure still matches (occlusion covers at most 20%).
        assert correlation(hr_part, hard_part) > 0.6, name


def test_scale_range_down_to_a_quarter_and_up_to_four_keeps_overlap():
    photo = smooth_photo(200, 240, 1)
    options = SyntheticOptions(scale_range=(0.25, 4.0), aligned_probability=0.0)
    scales = []
    for seed in range(24):
        pair = synthesize_pair(photo, 48, 48, np.random.default_rng(seed), options)
        assert 0 < pair.overlap <= 1 and pair.ref.shape == (48, 48, 3)  # zoomed out: may hold all
        scales.append(pair.scale)
    assert min(scales) < 0.6 and max(scales) > 2.0


def test_all_harder_transforms_together_are_seeded():
    photo = smooth_photo()
    options = SyntheticOptions(**{k: v for t in TRANSFORMS.values() for k, v in t.items()})
    first = synthesize_pair(photo, 48, 48, np.random.default_rng(5), options)
    again = synthesize_pair(photo, 48, 48, np.random.default_rng(5), options)
    assert np.array_equal(first.ref, again.ref)


def test_harder_options_off_leave_the_research_references_unchanged():
    photo = smooth_photo()
    default = synthesize_pair(photo, 48, 48, np.random.default_rng(3), SyntheticOptions())
    explicit_off = SyntheticOptions(blur_probability=0.0, occlusion_probability=0.0, perspective=0)
    again = synthesize_pair(photo, 48, 48, np.random.default_rng(3), explicit_off)
    assert np.array_equal(default.ref, again.ref)


def test_harder_probability_keeps_a_share_of_exact_references():
    photo = smooth_photo()
    options = SyntheticOptions(**PLAIN, exposure=1.0, harder_probability=0.5)
    exact = 0
    for seed in range(40):
        pair = synthesize_pair(photo, 48, 48, np.random.default_rng(seed), options)
        hr_part, ref_part = shared_windows(pair, 48)
        exact += bool(np.array_equal(hr_part, ref_part))
    assert 8 <= exact <= 32  # about half, never all nor none


def test_harder_options_are_checked():
    with pytest.raises(ValueError, match="perspective"):
        SyntheticOptions(perspective=1.5)
    with pytest.raises(ValueError, match="gamma_range"):
        SyntheticOptions(gamma_range=(0.0, 1.0))
    with pytest.raises(ValueError, match="jpeg_quality_range"):
        SyntheticOptions(jpeg_quality_range=(50, 101))


def test_degraded_training_sample_has_a_degraded_lr_and_its_upsampling(tmp_path):
    Image.fromarray(smooth_photo(96, 96, 2)).save(tmp_path / "p.png")
    only_jpeg = DegradationOptions(
        blur_probability=0.0,
        noise_probability=0.0,
        jpeg_probability=1.0,
        jpeg_quality_range=(20, 20),
        second_stage_probability=0.0,
        clean_probability=0.0,
        resize_kernels=("bicubic",),
    )
    dataset = SyntheticReferenceDataset(tmp_path, 64, augment=False, degradation=only_jpeg)
    torch.manual_seed(0)
    sample = dataset[0]
    hr = ((sample["hr"] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    expected = jpeg(downsample(hr), 20)
    assert torch.equal(sample["lr"], to_tensor(expected))
    assert torch.equal(sample["lrsr"], to_tensor(upsample(expected)))


def test_validation_corruption_reaches_lr_and_names_the_set(tmp_path):
    Image.fromarray(smooth_photo(64, 64, 3)).save(tmp_path / "a.png")
    clean = ValidationDataset(tmp_path, "lr")[0]
    corrupted = ValidationDataset(tmp_path, "lr", corruption=LRCorruption(jpeg=30))[0]
    assert clean["reference"] == "lr" and corrupted["reference"] == "lr_jpeg30"
    assert torch.equal(corrupted["hr"], clean["hr"])
    lr = ((clean["lr"] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert torch.equal(corrupted["lr"], to_tensor(jpeg(lr, 30)))
    assert torch.equal(corrupted["ref"], corrupted["lr"])  # the LR as its own reference


def test_datamodule_adds_corrupted_validation_sets(tmp_path):
    Image.fromarray(smooth_photo(64, 64, 4)).save(tmp_path / "a.png")
    module = TTSRDataModule(
        val_dirs=[str(tmp_path)],
        val_references=["lr", "hr"],
        val_corruption=LRCorruption(jpeg=75),
        num_workers=0,
    )
    module.setup("validate")
    names = [dataset[0]["reference"] for dataset in module.val_sets]
    assert names == ["lr", "hr", "lr_jpeg75", "hr_jpeg75"]
