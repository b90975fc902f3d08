"""Colour and exposure alignment of a reference to the LR (CIE Lab statistics)."""

from __future__ import annotations

import numpy as np
import pytest
from inference_helpers import textured, tiny_model

from ttsr.data.degradation import downsample
from ttsr.imaging import InputError
from ttsr.inference import Upscaler
from ttsr.reference_alignment import align_reference, to_lab


def lab_stats(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lab = to_lab(image).reshape(-1, 3)
    return lab.mean(axis=0), lab.std(axis=0)


@pytest.fixture
def scene() -> np.ndarray:
    return textured(64, 64, seed=4)


def darker_and_bluer(image: np.ndarray) -> np.ndarray:
    shifted = image.astype(np.float64) * np.array([0.6, 0.65, 0.8]) + np.array([0, 0, 20])
    return np.clip(np.rint(shifted), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("method", ["meanstd", "histogram"])
def test_a_differently_exposed_reference_gets_the_lr_colours(scene, method) -> None:
    lr = downsample(scene)
    reference = darker_and_bluer(scene)
    aligned = align_reference(reference, lr, method)
    assert aligned.shape == reference.shape and aligned.dtype == np.uint8
    target_mean, target_std = lab_stats(scene)
    before = np.abs(lab_stats(reference)[0] - target_mean)
    after = np.abs(lab_stats(aligned)[0] - target_mean)
    assert np.all(after < 0.25 * before + 0.5), (before, after)
    assert np.allclose(lab_stats(aligned)[1], target_std, rtol=0.2, atol=1.0)


def test_a_reference_already_like_the_lr_is_barely_changed(scene) -> None:
    aligned = align_reference(scene, downsample(scene), "meanstd")
    assert np.abs(aligned.astype(int) - scene).mean() < 1.5


def test_none_returns_the_reference_itself_and_unknown_methods_are_refused(scene) -> None:
    lr = downsample(scene)
    assert align_reference(scene, lr, "none") is scene
    with pytest.raises(ValueError, match="unknown reference alignment"):
        align_reference(scene, lr, "magic")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="unknown reference alignment"):
        Upscaler(tiny_model(), "cpu", reference_alignment="magic")  # type: ignore[arg-type]


def test_the_upscaler_aligns_the_references_it_uses(scene) -> None:
    lr = downsample(scene)
    reference = darker_and_bluer(scene)
    upscaler = Upscaler(tiny_model(), "cpu", reference_alignment="meanstd")
    used = upscaler.prepare(lr, [reference]).references_rgb[0]
    np.testing.assert_array_equal(used, align_reference(reference, lr, "meanstd"))
    plain = upscaler.prepare(lr, [reference], alignment="none").references_rgb[0]
    np.testing.assert_array_equal(plain, reference)
