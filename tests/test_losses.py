"""Training losses and the discriminator: values on known cases, where gradients go, shapes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ttsr import losses
from ttsr.losses import (
    PerceptualLoss,
    WeightsUnavailableError,
    critic_loss,
    generator_adversarial_loss,
    gradient_penalty,
    gram_matrix,
    reconstruction_loss,
    transferal_perceptual_loss,
)
from ttsr.model.discriminator import Discriminator
from ttsr.model.extractor import TextureExtractor


class LinearCritic(nn.Module):
    """``D(x) = sum(w * x)``: its input gradient is ``w`` everywhere, of norm ``|w| sqrt(n)``."""

    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(weight))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return (self.weight * image).flatten(1).sum(1, keepdim=True)


def test_reconstruction_loss_is_l1():
    sr, hr = torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.5)
    assert reconstruction_loss(sr, hr).item() == pytest.approx(0.5)


def test_gram_matrix_normalised_by_channels_and_pixels():
    features = torch.arange(8.0).view(1, 2, 2, 2)
    flat = features.view(2, 4)
    expected = flat @ flat.T / (2 * 2 * 2)
    assert torch.allclose(gram_matrix(features)[0], expected)


def test_gradient_penalty_known_value():
    critic = LinearCritic(0.5)
    real, fake = torch.rand(3, 3, 2, 2), torch.rand(3, 3, 2, 2)
    expected = (0.5 * math.sqrt(12) - 1.0) ** 2
    assert gradient_penalty(critic, real, fake).item() == pytest.approx(expected, rel=1e-5)
    result = critic_loss(critic, real, fake, penalty_weight=10.0)
    d_real, d_fake = 0.5 * real.flatten(1).sum(1).mean(), 0.5 * fake.flatten(1).sum(1).mean()
    assert result.loss.item() == pytest.approx((d_fake - d_real + 10 * expected).item(), rel=1e-5)


def test_critic_loss_trains_the_critic_only_and_penalty_is_differentiable():
    critic = LinearCritic(2.0)
    fake = torch.rand(2, 3, 2, 2, requires_grad=True)
    critic_loss(critic, torch.rand(2, 3, 2, 2), fake).loss.backward()
    assert fake.grad is None
    assert critic.weight.grad is not None and critic.weight.grad.abs().item() > 0
    generator_adversarial_loss(critic, fake).backward()
    assert torch.allclose(fake.grad, torch.full_like(fake, -2.0 / 2))


def test_transferal_perceptual_loss_trains_sr_only():
    torch.manual_seed(0)
    extractor = TextureExtractor("random")
    sr = (torch.rand(1, 3, 16, 16) * 2 - 1).requires_grad_(True)
    textures = [
        torch.rand(1, c, s, s, requires_grad=True) for c, s in ((256, 4), (128, 8), (64, 16))
    ]
    attention = torch.rand(1, 1, 4, 4, requires_grad=True)
    loss = transferal_perceptual_loss(extractor, sr, attention, *textures)
    loss.backward()
    assert loss.item() > 0
    assert sr.grad is not None and sr.grad.abs().sum() > 0
    assert all(p.grad is None for p in extractor.parameters())
    assert attention.grad is None and all(t.grad is None for t in textures)


def test_transferal_perceptual_loss_is_zero_for_the_srs_own_textures_and_grows_with_change():
    torch.manual_seed(0)
    extractor = TextureExtractor("random")
    sr = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        lv1, lv2, lv3 = extractor((sr + 1) / 2)
    attention = torch.rand(1, 1, 4, 4)
    own = transferal_perceptual_loss(extractor, sr, attention, lv3, lv2, lv1)
    assert own.item() == pytest.approx(0.0, abs=1e-12)
    near = transferal_perceptual_loss(extractor, sr, attention, lv3 * 1.1, lv2, lv1)
    far = transferal_perceptual_loss(extractor, sr, attention, lv3 * 1.5, lv2, lv1)
    assert 0 < near.item() < far.item()


def test_transferal_perceptual_loss_follows_current_extractor_weights():
    torch.manual_seed(0)
    extractor = TextureExtractor("random")
    sr = torch.rand(1, 3, 16, 16) * 2 - 1
    textures = [torch.rand(1, c, s, s) for c, s in ((256, 4), (128, 8), (64, 16))]
    attention = torch.zeros(1, 1, 4, 4)
    before = transferal_perceptual_loss(extractor, sr, attention, *textures)
    with torch.no_grad():
        extractor.features[0].weight.mul_(2.0)
    after = transferal_perceptual_loss(extractor, sr, attention, *textures)
    assert not torch.isclose(before, after)


def test_perceptual_loss_zero_on_identical_and_frozen():
    torch.manual_seed(0)
    loss = PerceptualLoss("random")
    hr = torch.rand(1, 3, 32, 32) * 2 - 1
    assert loss(hr, hr).item() == pytest.approx(0.0, abs=1e-12)
    sr = (torch.rand(1, 3, 32, 32) * 2 - 1).requires_grad_(True)
    value = loss(sr, hr)
    value.backward()
    assert value.item() > 0 and sr.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in loss.parameters())


def test_perceptual_loss_without_download_names_alternatives(monkeypatch):
    def offline(init):
        raise RuntimeError("no network")

    monkeypatch.setattr(losses, "load_vgg_head_state", offline)
    with pytest.raises(WeightsUnavailableError, match="perceptual_init='random'"):
        PerceptualLoss("torchvision")


def test_perceptual_loss_rejects_truncated_vgg(tmp_path):
    path = tmp_path / "head.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, path)
    with pytest.raises(ValueError, match="relu5_1"):
        PerceptualLoss(path)


@pytest.mark.parametrize("size", [32, 64, 96])
def test_discriminator_shapes(size):
    discriminator = Discriminator(size)
    assert discriminator.classifier[0].in_features == (size // 32) ** 2 * 512
    convs = [m for m in discriminator.features if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs][:2] == [
        (3, 32, 1),
        (32, 32, 2),
    ]
    assert len(convs) == 10 and convs[-1].out_channels == 512
    assert discriminator(torch.rand(2, 3, size, size)).shape == (2, 1)


def test_discriminator_rejects_other_sizes():
    with pytest.raises(ValueError, match="32x32"):
        Discriminator(32)(torch.rand(1, 3, 64, 64))
