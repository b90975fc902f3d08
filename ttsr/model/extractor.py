"""Learnable texture extractor: VGG19 ``features[0:12]`` returning relu1_1, relu2_1, relu3_1."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ttsr.model.fused_ops import REDUCED_FLOATS, conv_relu, to_compute

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Names accepted by :func:`TextureExtractor` for ``init`` besides a file path.
EXTRACTOR_INITS = ("random", "bundled", "torchvision")

# VGG19 ``features`` indices of the conv layers kept here (0..11 = conv1_1 .. relu3_1).
_VGG_CONV_INDICES = (0, 2, 5, 7, 10)


def bundled_vgg_path() -> Path:
    """Path of the ImageNet VGG19 conv1_1..relu3_1 weights shipped with the package (CC BY 4.0)."""
    return Path(str(resources.files("ttsr") / "weights" / "vgg19_relu3_1_imagenet.pth"))


def _vgg19_head() -> nn.Sequential:
    """VGG19 ``features[0:12]`` with torchvision's layer indices (so state-dict keys match)."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 3, padding=1),
        nn.ReLU(inplace=True),  # 0, 1: relu1_1
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(inplace=True),  # 2, 3
        nn.MaxPool2d(2, 2),  # 4
        nn.Conv2d(64, 128, 3, padding=1),
        nn.ReLU(inplace=True),  # 5, 6: relu2_1
        nn.Conv2d(128, 128, 3, padding=1),
        nn.ReLU(inplace=True),  # 7, 8
        nn.MaxPool2d(2, 2),  # 9
        nn.Conv2d(128, 256, 3, padding=1),
        nn.ReLU(inplace=True),  # 10, 11: relu3_1
    ]
    return nn.Sequential(*layers)


def load_vgg_head_state(init: str | Path) -> dict[str, Tensor]:
    """Return a ``features.N.*`` state dict for the extractor's layers from ``init``.

    ``init`` is ``"bundled"`` (the shipped ImageNet file), ``"torchvision"`` (torchvision's
    ImageNet VGG19, downloaded on request) or a path to a state dict saved with ``torch.save``.
    """
    if init == "bundled":
        return torch.load(bundled_vgg_path(), map_location="cpu", weights_only=True)
    if init == "torchvision":
        return _torchvision_vgg_state()
    path = Path(init)
    if not path.is_file():
        raise ValueError(
            f"texture extractor init {str(init)!r} is neither one of {EXTRACTOR_INITS} nor an "
            "existing state-dict file"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return state


def _torchvision_vgg_state() -> dict[str, Tensor]:
    from torchvision.models import VGG19_Weights, vgg19

    try:
        features = vgg19(weights=VGG19_Weights.IMAGENET1K_V1).features
    except Exception as error:  # network failures surface as URLError, OSError, RuntimeError...
        raise RuntimeError(
            "could not get torchvision's ImageNet VGG19 weights (no network and no cached copy?): "
            f"{error}. Use init='bundled' for the ImageNet VGG19 layers shipped with ttsr, "
            "init='random', or a path to a local state dict."
        ) from error
    return {f"features.{k}": v for k, v in features.state_dict().items()}


class TextureExtractor(nn.Module):
    """VGG19 up to relu3_1; returns ``(relu1_1, relu2_1, relu3_1)`` of an RGB input in [0, 1].

    Shapes: input ``[B, 3, H, W]`` -> ``[B, 64, H, W]``, ``[B, 128, H/2, W/2]``,
    ``[B, 256, H/4, W/4]`` (floor division by the max-pools).

    Args:
        init: ``"random"`` (default, never touches disk or network), ``"bundled"`` (ImageNet weights
            shipped with ttsr), ``"torchvision"`` (torchvision's ImageNet weights; downloads) or a
            path to a state dict with torchvision's ``features.N.weight`` keys.
    """

    def __init__(self, init: str | Path = "random") -> None:
        super().__init__()
        self.features = _vgg19_head()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        if init != "random":
            self.load_vgg_weights(init)

    def load_vgg_weights(self, init: str | Path) -> None:
        """Load conv1_1..conv3_1 weights from ``init`` (see :func:`load_vgg_head_state`)."""
        state = load_vgg_head_state(init)
        wanted = {f"features.{i}.{p}" for i in _VGG_CONV_INDICES for p in ("weight", "bias")}
        picked = {k: v for k, v in state.items() if k in wanted}
        missing = sorted(wanted - picked.keys())
        if missing:
            raise ValueError(f"VGG state dict from {str(init)!r} lacks {missing}")
        self.load_state_dict({**self.state_dict(), **picked})

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The three features, in the layers' dtype (the normalisation runs in ``image``'s; a
        reduced-precision extractor gives channels-last features)."""
        layers = self.features
        x = (image - self.mean) / self.std
        dtype = layers[0].weight.dtype
        if dtype != x.dtype and dtype in REDUCED_FLOATS:
            x = to_compute(x, dtype)
        relu1_1 = conv_relu(layers[0], x, in_place=True)
        x = F.max_pool2d(conv_relu(layers[2], relu1_1, in_place=True), 2, 2)
        relu2_1 = conv_relu(layers[5], x, in_place=True)
        x = F.max_pool2d(conv_relu(layers[7], relu2_1, in_place=True), 2, 2)
        relu3_1 = conv_relu(layers[10], x, in_place=True)
        return relu1_1, relu2_1, relu3_1
