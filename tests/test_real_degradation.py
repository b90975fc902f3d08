"""Real-world LR degradations: each step does what its parameters say."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ttsr.data.real_degradation import (
    DegradationOptions,
    LRCorruption,
    add_gaussian_noise,
    add_poisson_noise,
    degrade,
    gaussian_blur,
    gaussian_kernel,
    jpeg,
    resize,
)


def textured_image(size: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)


def flat_image(value: int = 128, size: int = 96) -> np.ndarray:
    return np.full((size, size, 3), value, dtype=np.uint8)


def high_frequency_energy(image: np.ndarray) -> float:
    """Share of the spectrum's energy beyond a quarter of the Nyquist frequency (grey)."""
    grey = image.astype(np.float64).mean(axis=2)
    spectrum = np.abs(np.fft.fftshift(np.fft.fft2(grey - grey.mean()))) ** 2
    size = grey.shape[0]
    freqs = np.fft.fftshift(np.fft.fftfreq(size))
    radius = np.hypot(*np.meshgrid(freqs, freqs))
    return float(spectrum[radius > 0.125].sum() / spectrum.sum())


def test_jpeg_quality_reaches_the_encoder():
    image = gaussian_blur(textured_image(), 1.5)  # photo-like: JPEG's error falls with quality
    for quality in (30, 90):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        expected = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
        np.testing.assert_array_equal(jpeg(image, quality), expected)
    low_error = np.abs(jpeg(image, 95).astype(int) - image).mean()
    high_error = np.abs(jpeg(image, 20).astype(int) - image).mean()
    assert high_error > low_error * 1.5


def test_blur_sigma_removes_high_frequencies_in_order():
    image = textured_image(64)
    energies = [high_frequency_energy(gaussian_blur(image, s)) for s in (0.5, 1, 2)]
    original = high_frequency_energy(image)
    assert original > energies[0] > energies[1] > energies[2]
    assert energies[2] < 0.2 * original


def test_anisotropic_blur_acts_along_its_axis():
    kernel = gaussian_kernel(3.0, 0.5, angle=0.0)
    assert kernel.sum() == pytest.approx(1.0, abs=1e-5)
    centre = kernel.shape[0] // 2
    assert kernel[centre, centre + 3] > 20 * kernel[centre + 3, centre]  # wide in x, narrow in y
    turned = gaussian_kernel(3.0, 0.5, angle=90.0)
    np.testing.assert_allclose(turned, kernel.T, atol=1e-6)


@pytest.mark.parametrize("sigma", [3.0, 10.0])
def test_gaussian_noise_has_the_stated_sigma(sigma):
    noisy = add_gaussian_noise(flat_image(), sigma, np.random.default_rng(1))
    residual = noisy.astype(np.float64) - 128
    assert abs(residual.mean()) < 0.3
    assert residual.std() == pytest.approx(sigma, rel=0.05)


def test_grey_noise_is_the_same_in_every_channel():
    noisy = add_gaussian_noise(flat_image(), 5.0, np.random.default_rng(1), grey=True)
    np.testing.assert_array_equal(noisy[..., 0], noisy[..., 1])
    colour = add_gaussian_noise(flat_image(), 5.0, np.random.default_rng(1), grey=False)
    assert not np.array_equal(colour[..., 0], colour[..., 1])


def test_poisson_noise_grows_with_brightness():
    rng = np.random.default_rng(2)
    dark = add_poisson_noise(flat_image(16), 1.0, rng).astype(np.float64) - 16
    bright = add_poisson_noise(flat_image(200), 1.0, rng).astype(np.float64) - 200
    assert dark.std() == pytest.approx(4.0, rel=0.1)
    assert bright.std() == pytest.approx(np.sqrt(200), rel=0.1)


def test_resize_kernels_differ_and_unknown_is_refused():
    image = textured_image(64)
    outputs = {k: resize(image, 16, 16, k) for k in ("bicubic", "bilinear", "area")}
    assert all(o.shape == (16, 16, 3) for o in outputs.values())
    assert not np.array_equal(outputs["bicubic"], outputs["area"])
    with pytest.raises(ValueError, match="unknown resize kernel"):
        resize(image, 16, 16, "nearest-ish")


def test_degrade_is_seeded_and_gives_the_lr_size():
    hr = textured_image(96, seed=3)
    options = DegradationOptions(clean_probability=0.0)
    first = degrade(hr, options, np.random.default_rng(7))
    again = degrade(hr, options, np.random.default_rng(7))
    other = degrade(hr, options, np.random.default_rng(8))
    assert first.shape == (24, 24, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_degrade_clean_probability_one_is_the_research_protocol():
    from ttsr.data.degradation import downsample

    hr = textured_image(96, seed=4)
    lr = degrade(hr, DegradationOptions(clean_probability=1.0), np.random.default_rng(0))
    np.testing.assert_array_equal(lr, downsample(hr))


def test_degrade_steps_switched_on_alone_do_their_job():
    hr = np.repeat(np.repeat(textured_image(24, seed=5), 4, axis=0), 4, axis=1)  # 96x96
    off = dict(
        blur_probability=0.0,
        noise_probability=0.0,
        jpeg_probability=0.0,
        second_stage_probability=0.0,
        clean_probability=0.0,
        resize_kernels=("area",),
    )
    plain = degrade(hr, DegradationOptions(**off), np.random.default_rng(0))
    np.testing.assert_array_equal(plain, hr[::4, ::4])  # box filter of 4x4 constant blocks
    jpeg_only = degrade(
        hr,
        DegradationOptions(**{**off, "jpeg_probability": 1.0, "jpeg_quality_range": (40, 40)}),
        np.random.default_rng(0),
    )
    np.testing.assert_array_equal(jpeg_only, jpeg(plain, 40))


def test_degradation_options_are_checked():
    with pytest.raises(ValueError, match="jpeg_quality_range"):
        DegradationOptions(jpeg_quality_range=(0, 90))
    with pytest.raises(ValueError, match="noise_probability"):
        DegradationOptions(noise_probability=1.5)
    with pytest.raises(ValueError, match="resize_kernels"):
        DegradationOptions(resize_kernels=("cubic",))


def test_lr_corruption_order_tag_and_determinism():
    lr = textured_image(32, seed=6)
    corruption = LRCorruption(blur=1.0, noise=5.0, jpeg=75, seed=3)
    assert corruption.tag == "blur1_noise5_jpeg75"
    expected = jpeg(add_gaussian_noise(gaussian_blur(lr, 1.0), 5.0, np.random.default_rng(3)), 75)
    np.testing.assert_array_equal(corruption(lr), expected)
    np.testing.assert_array_equal(corruption(lr), corruption(lr))
    assert LRCorruption().is_identity and LRCorruption().tag == ""
    np.testing.assert_array_equal(LRCorruption()(lr), lr)
    with pytest.raises(ValueError, match="JPEG quality"):
        LRCorruption(jpeg=0)
