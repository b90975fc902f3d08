"""TTSR's training losses: reconstruction, perceptual, transferal perceptual, WGAN-GP.

Images are ``[B, 3, H, W]`` in [-1, 1]. The paper's weights are :data:`DEFAULT_WEIGHTS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ttsr.model.extractor import IMAGENET_MEAN, IMAGENET_STD, load_vgg_head_state


@dataclass(frozen=True)
class LossWeights:
    """Weights of the four losses (the paper's values by default)."""

    reconstruction: float = 1.0
    perceptual: float = 1e-2
    transferal: float = 1e-2
    adversarial: float = 1e-3


DEFAULT_WEIGHTS = LossWeights()

#: Weight of the gradient penalty in the critic loss (WGAN-GP).
GRADIENT_PENALTY_WEIGHT = 10.0

#: Initialisations of the perceptual VGG19 besides a state-dict path.
PERCEPTUAL_INITS = ("torchvision", "random")


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights that cannot be had here (no network, no cached copy)."""


# VGG19 configuration "E" up to conv5_1 ("M" = max-pool); features[0:30] ends at relu5_1.
_VGG19_TO_CONV5_1 = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M")
_VGG19_TO_CONV5_1 += (512,)


def reconstruction_loss(sr: Tensor, hr: Tensor) -> Tensor:
    """L1 distance between the super-resolved and the ground-truth image."""
    return F.l1_loss(sr, hr)


def vgg19_to_relu5_1() -> nn.Sequential:
    """VGG19 ``features[0:30]`` (conv1_1 .. relu5_1) with torchvision's layer indices."""
    layers: list[nn.Module] = []
    channels = 3
    for entry in _VGG19_TO_CONV5_1:
        if entry == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            conv = nn.Conv2d(channels, int(entry), 3, padding=1)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)  # torchvision's VGG initialisation
            layers += [conv, nn.ReLU(inplace=True)]
            channels = int(entry)
    return nn.Sequential(*layers)


def load_perceptual_vgg(init: str | Path) -> nn.Sequential:
    """A frozen VGG19 up to relu5_1, initialised from ``init``.

    ``init``: ``"torchvision"`` (torchvision's ImageNet VGG19; downloads once, then cached),
    ``"random"`` (for tests only: the loss is then meaningless) or a path to a state dict with
    torchvision's ``features.N.*`` keys.
    """
    features = vgg19_to_relu5_1()
    if init != "random":
        try:
            state = load_vgg_head_state(init)
        except RuntimeError as error:
            raise WeightsUnavailableError(
                "the perceptual loss needs ImageNet VGG19 weights up to relu5_1 and "
                f"torchvision's could not be fetched ({error.__cause__ or error}). Give "
                "perceptual_init a path to a saved torchvision VGG19 state dict, set per_weight "
                "to 0, or (tests only) use perceptual_init='random'."
            ) from error
        except ValueError as error:
            raise ValueError(f"perceptual_init: {error}") from error
        wanted = features.state_dict().keys()
        picked = {k: state.get(f"features.{k}") for k in wanted}
        missing = sorted(k for k, v in picked.items() if v is None)
        if missing:
            raise ValueError(
                f"perceptual_init {str(init)!r} lacks VGG19 layers {missing[:4]}... up to relu5_1 "
                "(the bundled extractor weights stop at relu3_1)"
            )
        features.load_state_dict(picked)
    return features.requires_grad_(False)  # no dropout or batch norm: train/eval alike


class PerceptualLoss(nn.Module):
    """MSE between frozen VGG19 relu5_1 features of ``(sr + 1) / 2`` and ``(hr + 1) / 2``."""

    def __init__(self, init: str | Path = "torchvision") -> None:
        super().__init__()
        self.features = load_perceptual_vgg(init)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def relu5_1(self, image: Tensor) -> Tensor:
        """``[B, 3, H, W]`` in [-1, 1] -> ``[B, 512, H/16, W/16]``."""
        return self.features(((image + 1.0) / 2.0 - self.mean) / self.std)

    def forward(self, sr: Tensor, hr: Tensor) -> Tensor:
        with torch.no_grad():
            target = self.relu5_1(hr)
        return F.mse_loss(self.relu5_1(sr), target)


def gram_matrix(features: Tensor) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, C, C]``: ``F F^T / (C * H * W)`` with ``F`` = ``[B, C, H*W]``."""
    batch, channels, height, width = features.shape
    flat = features.reshape(batch, channels, height * width)
    return torch.bmm(flat, flat.transpose(1, 2)) / (channels * height * width)


def transferal_perceptual_loss(
    extractor: nn.Module,
    sr: Tensor,
    soft_attention: Tensor,
    t_lv3: Tensor,
    t_lv2: Tensor,
    t_lv1: Tensor,
) -> Tensor:
    """Gram-matrix distance between the extractor's features of SR and the transferred textures.

    The texture extractor runs with a detached copy of its *current* weights
    (``torch.func.functional_call``), so the loss trains the generator only: no gradient reaches
    the extractor, the textures or the soft attention. Features at each level are weighted by
    ``sigmoid(S)`` (upsampled bicubically to the level), as in the paper; the three levels'
    MSEs are averaged.

    Shapes: ``sr`` ``[B, 3, 4H, 4W]``; ``soft_attention`` ``[B, 1, H, W]``; ``t_lv3``
    ``[B, 256, H, W]``, ``t_lv2`` ``[B, 128, 2H, 2W]``, ``t_lv1`` ``[B, 64, 4H, 4W]``.
    """
    frozen = {
        name: tensor.detach()
        for name, tensor in chain(extractor.named_parameters(), extractor.named_buffers())
    }
    sr_lv1, sr_lv2, sr_lv3 = functional_call(extractor, frozen, ((sr + 1.0) / 2.0,))
    attention = soft_attention.detach()
    height, width = attention.shape[-2:]
    loss = sr.new_zeros(())
    for scale, sr_level, texture in ((1, sr_lv3, t_lv3), (2, sr_lv2, t_lv2), (4, sr_lv1, t_lv1)):
        weight = attention
        if scale > 1:
            weight = F.interpolate(attention, size=(height * scale, width * scale), mode="bicubic")
        weight = torch.sigmoid(weight)
        loss = loss + F.mse_loss(
            gram_matrix(sr_level * weight), gram_matrix(texture.detach() * weight)
        )
    return loss / 3.0


def gradient_penalty(
    discriminator: nn.Module, real: Tensor, fake: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """WGAN-GP penalty ``mean((||grad D(x_hat)||_2 - 1)^2)`` on random real/fake mixtures."""
    real, fake = real.detach(), fake.detach()
    epsilon = torch.rand(
        real.size(0), 1, 1, 1, device=real.device, dtype=real.dtype, generator=generator
    )
    mixed = (epsilon * real + (1.0 - epsilon) * fake).requires_grad_(True)
    (gradient,) = torch.autograd.grad(discriminator(mixed).sum(), mixed, create_graph=True)
    return ((gradient.flatten(1).norm(2, dim=1) - 1.0) ** 2).mean()


@dataclass(frozen=True)
class CriticLoss:
    """The critic's loss and its parts (scores are batch means)."""

    loss: Tensor
    real_score: Tensor
    fake_score: Tensor
    penalty: Tensor


def critic_loss(
    discriminator: nn.Module,
    real: Tensor,
    fake: Tensor,
    penalty_weight: float = GRADIENT_PENALTY_WEIGHT,
    generator: torch.Generator | None = None,
) -> CriticLoss:
    """WGAN-GP critic loss ``D(fake) - D(real) + penalty_weight * GP`` (inputs are detached)."""
    real_score = discriminator(real.detach()).mean()
    fake_score = discriminator(fake.detach()).mean()
    penalty = gradient_penalty(discriminator, real, fake, generator)
    return CriticLoss(
        fake_score - real_score + penalty_weight * penalty, real_score, fake_score, penalty
    )


def generator_adversarial_loss(discriminator: nn.Module, fake: Tensor) -> Tensor:
    """The generator's WGAN loss ``-D(fake)``."""
    return -discriminator(fake).mean()
