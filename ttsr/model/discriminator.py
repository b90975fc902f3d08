"""TTSR's discriminator (a WGAN-GP critic): ten 3x3 convolutions, then two linear layers."""

from __future__ import annotations

from torch import Tensor, nn

#: (in, out, stride) of the ten convolutions; every second one halves the resolution.
_CONV_LAYERS = (
    (3, 32, 1),
    (32, 32, 2),
    (32, 64, 1),
    (64, 64, 2),
    (64, 128, 1),
    (128, 128, 2),
    (128, 256, 1),
    (256, 256, 2),
    (256, 512, 1),
    (512, 512, 2),
)

#: Total downsampling of the convolutions.
DOWNSAMPLING = 32


class Discriminator(nn.Module):
    """Critic for ``[B, 3, in_size, in_size]`` images in [-1, 1] -> scores ``[B, 1]``.

    Args:
        in_size: side of the (square) input patches, at least 32; the first linear layer has
            ``(in_size // 32) ** 2 * 512`` inputs (for multiples of 32; ceil in general), so the
            critic only takes this size.
    """

    def __init__(self, in_size: int = 160) -> None:
        super().__init__()
        if in_size < DOWNSAMPLING:
            raise ValueError(
                f"discriminator in_size must be at least {DOWNSAMPLING}, got {in_size}"
            )
        self.in_size = in_size
        layers: list[nn.Module] = []
        for in_channels, out_channels, stride in _CONV_LAYERS:
            layers.append(nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1))
            layers.append(nn.LeakyReLU(0.2))
        self.features = nn.Sequential(*layers)
        side = in_size
        for _, _, stride in _CONV_LAYERS:
            side = (side - 1) // stride + 1  # 3x3, padding 1: ceil(side / stride)
        self.classifier = nn.Sequential(
            nn.Linear(side * side * 512, 1024), nn.LeakyReLU(0.2), nn.Linear(1024, 1)
        )

    def forward(self, image: Tensor) -> Tensor:
        if image.shape[-2:] != (self.in_size, self.in_size):
            raise ValueError(
                f"this discriminator takes {self.in_size}x{self.in_size} patches, "
                f"got {tuple(image.shape[-2:])}"
            )
        return self.classifier(self.features(image).flatten(1))
