"""Synthetic references, dataset layouts, the training collate and bad-file reporting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ttsr.data.datamodule import TrainingCollate, TTSRDataModule, evaluation_dataset
from ttsr.data.datasets import (
    Cufed5Dataset,
    CufedTrainDataset,
    SyntheticReferenceDataset,
    ValidationDataset,
)
from ttsr.data.degradation import lr_from_hr, to_tensor
from ttsr.data.layouts import cufed5_entries, is_cufed5_layout
from ttsr.data.synthetic import (
    SyntheticOptions,
    footprint_overlap,
    synthesize_pair,
    warp_reference,
)
from ttsr.evaluation import cufed_items
from ttsr.imaging import ImageError, image_size, list_images

KEYS = {"lr", "lrsr", "hr", "ref", "refsr"}


def textured(height: int, width: int, seed: int) -> np.ndarray:
    """A photo-like ``HxWx3`` uint8 image: smooth gradients plus random texture."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([xs * 200 / width, ys * 200 / height, (xs + ys) * 100 / (width + height)], -1)
    return np.clip(base + rng.integers(0, 56, (height, width, 3)), 0, 255).astype(np.uint8)


def write_image(path: Path, height: int, width: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(textured(height, width, seed)).save(path)
    return path


# --- synthetic references -----------------------------------------------------------------------


def test_synthetic_pair_sizes_overlap_and_transform():
    photo = textured(120, 160, 0)
    options = SyntheticOptions(aligned_probability=0.0)
    for seed in range(8):
        pair = synthesize_pair(photo, 32, 48, np.random.default_rng(seed), options)
        assert pair.hr.shape == (32, 32, 3) and pair.ref.shape == (48, 48, 3)
        assert pair.hr.dtype == pair.ref.dtype == np.uint8
        assert 0.0 < pair.overlap < 1.0
        assert 0.5 <= pair.scale <= 2.0 and abs(pair.rotation) <= 30.0
        top, left, size = pair.hr_box
        assert np.array_equal(pair.hr, photo[top : top + size, left : left + size])
        assert pair.overlap == footprint_overlap(
            pair.hr_box, pair.ref_center, 48, pair.scale, pair.rotation
        )


def test_synthetic_pair_is_deterministic_under_a_seed():
    photo = textured(100, 100, 1)
    first = synthesize_pair(photo, 32, 32, np.random.default_rng(7))
    again = synthesize_pair(photo, 32, 32, np.random.default_rng(7))
    other = synthesize_pair(photo, 32, 32, np.random.default_rng(8))
    assert np.array_equal(first.ref, again.ref) and np.array_equal(first.hr, again.hr)
    assert first.overlap == again.overlap
    assert not np.array_equal(first.ref, other.ref)


def test_aligned_reference_is_a_grid_shifted_crop_of_the_photo():
    photo = textured(96, 96, 2)
    options = SyntheticOptions(aligned_probability=1.0, color_jitter=0.0, flip_probability=0.0)
    for seed in range(4):
        pair = synthesize_pair(photo, 32, 32, np.random.default_rng(seed), options)
        top, left = round(pair.ref_center[0] - 16), round(pair.ref_center[1] - 16)
        assert (top - pair.hr_box[0]) % 4 == 0 and (left - pair.hr_box[1]) % 4 == 0
        assert 0 < pair.overlap < 1
        if 0 <= top <= 64 and 0 <= left <= 64:  # inside the photo: exact pixels
            assert np.array_equal(pair.ref, photo[top : top + 32, left : left + 32])


def test_warp_geometry_identity_and_half_turn():
    photo = textured(64, 64, 3)
    crop = photo[16:48, 8:40]
    assert np.array_equal(warp_reference(photo, (32.0, 24.0), 32, 1.0, 0.0), crop)
    assert np.array_equal(warp_reference(photo, (32.0, 24.0), 32, 1.0, 180.0), crop[::-1, ::-1])


def test_footprint_overlap_known_cases():
    assert footprint_overlap((0, 0, 32), (16.0, 16.0), 32, 1.0, 0.0) == 1.0
    assert footprint_overlap((0, 0, 32), (16.0, 32.0), 32, 1.0, 0.0) == pytest.approx(0.5)
    assert footprint_overlap((0, 0, 32), (16.0, 16.0), 32, 2.0, 0.0) == pytest.approx(0.25)
    assert footprint_overlap((0, 0, 32), (100.0, 100.0), 32, 1.0, 45.0) == 0.0


def test_synthetic_options_are_checked():
    with pytest.raises(ValueError, match="overlap_range"):
        SyntheticOptions(overlap_range=(0.5, 1.0))
    with pytest.raises(ValueError, match="smaller"):
        synthesize_pair(textured(20, 40, 0), 32, 32, np.random.default_rng(0))


# --- datasets -----------------------------------------------------------------------------------


def assert_sample(sample: dict, hr_size: tuple[int, int], ref_size: tuple[int, int]) -> None:
    assert set(sample) >= KEYS
    height, width = hr_size
    assert sample["hr"].shape == sample["lrsr"].shape == (3, height, width)
    assert sample["lr"].shape == (3, height // 4, width // 4)
    assert sample["ref"].shape == sample["refsr"].shape == (3, *ref_size)
    for key in KEYS:
        assert sample[key].dtype == torch.float32
        assert sample[key].min() >= -1.0 and sample[key].max() <= 1.0


def test_synthetic_dataset_samples_and_skips_small_photos(tmp_path, caplog):
    write_image(tmp_path / "a" / "big.png", 80, 96, 0)
    write_image(tmp_path / "b" / "other.jpg", 64, 64, 1)
    write_image(tmp_path / "b" / "tiny.png", 20, 20, 2)
    dataset = SyntheticReferenceDataset([tmp_path / "a", tmp_path / "b"], patch_size=32, repeats=3)
    assert len(dataset) == 6 and "tiny.png" in caplog.text
    torch.manual_seed(0)
    sample = dataset[4]
    assert_sample(sample, (32, 32), (32, 32))
    torch.manual_seed(0)
    assert torch.equal(dataset[4]["ref"], sample["ref"])


def test_synthetic_dataset_degradation_matches_degradation_module(tmp_path):
    write_image(tmp_path / "p.png", 48, 48, 0)
    dataset = SyntheticReferenceDataset(tmp_path, patch_size=32, augment=False)
    sample = dataset[0]
    hr = ((sample["hr"] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    _, lr, lrsr = lr_from_hr(hr)
    assert torch.equal(sample["lr"], to_tensor(lr)) and torch.equal(sample["lrsr"], to_tensor(lrsr))


def test_patch_size_must_divide_by_16(tmp_path):
    write_image(tmp_path / "p.png", 48, 48, 0)
    with pytest.raises(ValueError, match="multiple of 16"):
        SyntheticReferenceDataset(tmp_path, patch_size=40)


def test_cufed_train_layout(tmp_path):
    for index in range(2):
        write_image(tmp_path / "input" / f"{index:06d}.png", 40, 40, index)
        write_image(tmp_path / "ref" / f"{index:06d}.png", 24, 36, index + 5)
    dataset = CufedTrainDataset(tmp_path, patch_size=32)
    assert len(dataset) == 2
    assert_sample(dataset[1], (32, 32), (32, 32))


def test_cufed_train_missing_reference_is_named(tmp_path):
    write_image(tmp_path / "input" / "000001.png", 32, 32)
    write_image(tmp_path / "ref" / "000002.png", 32, 32)
    with pytest.raises(ValueError, match="000001"):
        CufedTrainDataset(tmp_path, patch_size=32)


def test_cufed5_layout_and_levels(tmp_path):
    for level in range(6):
        write_image(tmp_path / f"001_{level}.png", 36 + 4 * level, 40, level)
    dataset = Cufed5Dataset(tmp_path, level=3)
    sample = dataset[0]
    assert sample["name"] == "001" and sample["reference"] == "level3"
    assert_sample(sample, (36, 40), (48, 40))
    with pytest.raises(ValueError, match="1..5"):
        Cufed5Dataset(tmp_path, level=6)


def test_cufed5_layout_is_found_once_for_datasets_and_evaluation(tmp_path):
    for name in ("002", "001"):
        for level in range(6):
            write_image(tmp_path / f"{name}_{level}.png", 32, 32, level)
    write_image(tmp_path / "notes.png", 32, 32)
    assert is_cufed5_layout(tmp_path) and not is_cufed5_layout(tmp_path.parent)
    entries = cufed5_entries(tmp_path, (2, 5))
    assert [(e.name, e.hr.name) for e in entries] == [("001", "001_0.png"), ("002", "002_0.png")]
    assert [r.name for r in entries[1].references] == ["002_2.png", "002_5.png"]
    assert [item.references for item in cufed_items(tmp_path, "all")] == [
        e.references for e in cufed5_entries(tmp_path, (1, 2, 3, 4, 5))
    ]
    assert Cufed5Dataset(tmp_path, 2).refs == [e.references[0] for e in entries]
    limited = evaluation_dataset("cufed5", [str(tmp_path)], "2", limit=1)
    assert len(limited) == 1 and limited[0]["reference"] == "level2"
    (tmp_path / "002_4.png").unlink()
    with pytest.raises(ValueError, match="002_4 of 002_0 is missing"):
        cufed5_entries(tmp_path, (4,))
    with pytest.raises(ValueError, match="level"):
        evaluation_dataset("cufed5", [str(tmp_path)], "lr")


def test_validation_reference_modes(tmp_path):
    write_image(tmp_path / "hr" / "b.png", 42, 66, 0)  # cropped to 40x64
    write_image(tmp_path / "hr" / "a.png", 32, 32, 1)
    write_image(tmp_path / "refs" / "b.jpg", 30, 20, 2)
    write_image(tmp_path / "refs" / "a.png", 16, 16, 3)
    by_lr = ValidationDataset(tmp_path / "hr", "lr")
    assert [p.name for p in by_lr.images] == ["a.png", "b.png"]
    sample = by_lr[1]
    assert sample["name"] == "b" and sample["reference"] == "lr"
    assert_sample(sample, (40, 64), (8, 16))
    assert torch.equal(sample["ref"], sample["lr"][:, :8, :16])
    by_hr = ValidationDataset(tmp_path / "hr", "hr", limit=1)
    assert len(by_hr) == 1 and torch.equal(by_hr[0]["ref"], by_hr[0]["hr"])
    by_folder = ValidationDataset(tmp_path / "hr", str(tmp_path / "refs"))
    assert by_folder[1]["reference"] == "ref"
    assert_sample(by_folder[1], (40, 64), (28, 20))


def test_validation_missing_reference_folder_entry(tmp_path):
    write_image(tmp_path / "hr" / "a.png", 32, 32)
    write_image(tmp_path / "refs" / "z.png", 32, 32)
    with pytest.raises(ValueError, match="no reference for a.png"):
        ValidationDataset(tmp_path / "hr", str(tmp_path / "refs"))


@pytest.mark.parametrize("kind", ["synthetic", "validation"])
def test_bad_image_is_reported_with_its_path(tmp_path, kind):
    write_image(tmp_path / "good.png", 48, 48)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a PNG")
    with pytest.raises(ValueError, match="broken.png"):
        if kind == "synthetic":
            SyntheticReferenceDataset(tmp_path, patch_size=32)
        else:
            ValidationDataset(tmp_path, "lr")


def test_missing_folder_is_reported(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        ValidationDataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        ValidationDataset(tmp_path / "empty")


def test_image_size_is_height_then_width_and_can_verify(tmp_path):
    path = write_image(tmp_path / "tall.png", 40, 24)
    assert image_size(path) == image_size(path, verify=True) == (40, 24)
    assert image_size(np.zeros((5, 7, 3), np.uint8)) == (5, 7)
    assert list_images(tmp_path) == [path]
    data = path.read_bytes()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    assert image_size(truncated) == (40, 24)  # the header alone is fine
    with pytest.raises(ImageError, match="truncated.png: unreadable"):
        image_size(truncated, verify=True)


# --- collate and datamodule ---------------------------------------------------------------------


def test_training_collate_lr_as_reference():
    samples = [
        {
            "lr": to_tensor(textured(8, 8, i)),
            "lrsr": torch.zeros(3, 32, 32),
            "hr": torch.zeros(3, 32, 32),
            "ref": torch.zeros(3, 32, 32),
            "refsr": torch.zeros(3, 32, 32),
        }
        for i in range(2)
    ]
    always = TrainingCollate(1.0)(samples)
    assert always["ref"].shape == (2, 3, 8, 8) and torch.equal(always["ref"], always["lr"])
    assert always["refsr"].shape == (2, 3, 8, 8)
    never = TrainingCollate(0.0)(samples)
    assert never["ref"].shape == (2, 3, 32, 32)


def test_datamodule_batches_are_seeded(tmp_path):
    for index in range(3):
        write_image(tmp_path / "train" / f"{index}.png", 48, 64, index)
    write_image(tmp_path / "val" / "v.png", 32, 48, 9)
    data = TTSRDataModule(
        train_dirs=[str(tmp_path / "train")],
        patch_size=32,
        lr_reference_probability=0.5,
        val_dirs=[str(tmp_path / "val")],
        val_references=["lr", "hr"],
        batch_size=2,
        num_workers=1,
    )
    data.setup("fit")
    batches = []
    for _ in range(2):
        torch.manual_seed(3)
        batches.append(next(iter(data.train_dataloader())))
    assert set(batches[0]) == KEYS
    assert batches[0]["hr"].shape == (2, 3, 32, 32)
    for key in KEYS:
        assert torch.equal(batches[0][key], batches[1][key])
    loaders = data.val_dataloader()
    assert [next(iter(loader))["reference"] for loader in loaders] == [["lr"], ["hr"]]


def test_datamodule_without_training_folders_says_so():
    with pytest.raises(ValueError, match="train_dirs"):
        TTSRDataModule().setup("fit")


def test_dataloader_workers_get_different_samples(tmp_path):
    write_image(tmp_path / "p.png", 64, 64, 0)
    dataset = SyntheticReferenceDataset(tmp_path, patch_size=32, repeats=4)
    torch.manual_seed(0)
    loader = DataLoader(dataset, batch_size=1, num_workers=2)
    refs = [batch["ref"] for batch in loader]
    assert not torch.equal(refs[0], refs[1])
