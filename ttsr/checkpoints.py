"""Checkpoint files: this project's format, weights-only loading, released-TTSR conversion, and
the shipped models (:class:`TTSRWeights`).

A ttsr checkpoint is a ``torch.save`` of plain data (loadable with ``weights_only=True``)::

    {"format": "ttsr", "version": 1,
     "config": {"num_res_blocks": [16, 16, 8, 4], "n_feats": 64, "res_scale": 1.0,
                "divisor": "overlap", "use_texture": True, "bicubic_skip": False,
                "transfer": "hard", "offset_groups": 8},
     "state_dict": {"generator.*": ..., "extractor.features.*": ...},
     "metadata": {...free text fields: source, training command...}}

Files written before ``transfer`` and ``offset_groups`` existed load as the hard transfer.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ttsr.files import atomic_write
from ttsr.model.config import TTSRConfig
from ttsr.model.ttsr import TTSR

FORMAT_NAME = "ttsr"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: missing, corrupt, unsafe or of another model."""


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: no partial files."""
    atomic_write(path, lambda stream: torch.save(obj, stream))


def save_checkpoint(
    model: TTSR, path: str | Path, metadata: Mapping[str, Any] | None = None
) -> None:
    """Write ``model``'s weights and architecture to ``path`` in the ttsr format."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_torch_save(
        {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "config": model.config.to_dict(),
            "state_dict": state,
            "metadata": dict(metadata or {}),
        },
        path,
    )


def read_weights_only(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` with clear errors for the usual failures."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory, not a file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" not in str(error):  # garbage bytes fail in the unpickler too
            raise CheckpointError(f"checkpoint {path} is corrupt or not a PyTorch file") from error
        raise CheckpointError(
            f"checkpoint {path} needs arbitrary code to load (pickled objects), which ttsr refuses "
            "for safety; re-save it as a plain state dict of tensors"
        ) from error
    except (
        RuntimeError,
        EOFError,
        zipfile.BadZipFile,
        OSError,
        KeyError,
        IndexError,
        ValueError,
    ) as error:  # ValueError: UnicodeDecodeError on some garbage
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a PyTorch file: {error}"
        ) from error


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> TTSR:
    """Build the model stored in a ttsr checkpoint (weights-only load)."""
    content = read_weights_only(path)
    if not isinstance(content, dict) or content.get("format") != FORMAT_NAME:
        hint = ""
        if isinstance(content, dict) and any(str(k).startswith("MainNet.") for k in content):
            hint = "; it looks like a released TTSR checkpoint: convert it with ttsr-convert first"
        raise CheckpointError(f"{path} is not a ttsr checkpoint{hint}")
    model = TTSR(read_config(content.get("config", {}), source=str(path)))
    load_state_strict(model, content["state_dict"], source=str(path))
    return model.to(map_location)


def read_config(entries: Any, source: str) -> TTSRConfig:
    """The :class:`TTSRConfig` of a checkpoint's ``config`` entries, or :class:`CheckpointError`."""
    if not isinstance(entries, Mapping):
        raise CheckpointError(f"{source}: the config is not a mapping")
    try:
        return TTSRConfig.from_dict(entries)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{source}: {error}") from error


def load_state_strict(model: TTSR, state: Mapping[str, Tensor], source: str) -> None:
    """Load ``state`` into ``model``, reporting missing, unexpected and mis-shaped keys clearly."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    )
    problems = []
    if missing:
        problems.append(f"missing keys {_abbreviate(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_abbreviate(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped {_abbreviate(misshaped)}")
    if problems:
        raise CheckpointError(f"{source} does not fit this architecture: " + "; ".join(problems))
    model.load_state_dict(state)


def _abbreviate(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


# --- released researchmm/TTSR checkpoints -------------------------------------------------------

_LTE_KEY = re.compile(r"^LTE\.slice[123]\.(\d+)\.(weight|bias)$")
_COUNTED_BLOCKS = ("SFE.RBs", "RB11", "RB21", "RB31")


def _count_blocks(state: Mapping[str, Tensor], prefix: str) -> int:
    pattern = re.compile(rf"^MainNet\.{re.escape(prefix)}\.(\d+)\.")
    indices = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def convert_released_state(
    state: Mapping[str, Any], res_scale: float = 1.0
) -> tuple[TTSRConfig, dict[str, Tensor]]:
    """Map a released TTSR state dict (``MainNet.*``, ``LTE.*``, ``LTE_copy.*``) to ours.

    Returns ``(config, state_dict)``. Block counts and width are read from the keys and shapes;
    ``divisor`` is ``"constant"``, as the released code divides every fold by 9. Raises
    :class:`CheckpointError` on unknown, missing or mis-shaped keys.
    """
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError("not a state dict (expected a mapping of key names to tensors)")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    non_tensors = sorted(k for k, v in state.items() if not isinstance(v, Tensor))
    if non_tensors:
        raise CheckpointError(f"entries that are not tensors: {_abbreviate(non_tensors)}")
    if "MainNet.SFE.conv_head.weight" not in state:
        raise CheckpointError("no MainNet.SFE.conv_head.weight: not a released TTSR state dict")
    n_feats = int(state["MainNet.SFE.conv_head.weight"].shape[0])
    config = TTSRConfig(
        num_res_blocks=tuple(_count_blocks(state, p) for p in _COUNTED_BLOCKS),
        n_feats=n_feats,
        res_scale=float(res_scale),
        divisor="constant",
        use_texture=True,
        bicubic_skip=False,
    )
    converted: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        if key.startswith("MainNet."):
            converted["generator." + key.removeprefix("MainNet.")] = value
        elif match := _LTE_KEY.match(key):
            converted[f"extractor.features.{match.group(1)}.{match.group(2)}"] = value
        elif key.startswith(("LTE_copy.", "LTE.sub_mean.")):
            continue  # frozen copy for the loss / fixed ImageNet normalisation: not weights
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"unknown keys in a released TTSR state dict: {_abbreviate(unknown)}")
    model = TTSR(config)
    for name, buffer in model.state_dict().items():  # normalisation buffers are ours
        if name.startswith("extractor.") and name.split(".")[-1] in ("mean", "std"):
            converted[name] = buffer
    load_state_strict(model, converted, source="released state dict")
    return config, converted


def convert_released_checkpoint(
    source: str | Path, destination: str | Path, res_scale: float = 1.0
) -> TTSRConfig:
    """Convert a released TTSR ``.pt`` file into a ttsr checkpoint; returns its config."""
    content = read_weights_only(source)
    if (
        isinstance(content, Mapping)
        and "state_dict" in content
        and "MainNet.SFE.conv_head.weight" not in content
    ):
        content = content["state_dict"]
    config, state = convert_released_state(content, res_scale=res_scale)
    model = TTSR(config)
    model.load_state_dict(state)
    save_checkpoint(
        model,
        destination,
        metadata={"converted_from": Path(source).name, "source_format": "researchmm/TTSR"},
    )
    return config


# --- shipped weights ----------------------------------------------------------------------------

#: How every shipped model takes its inputs (:mod:`ttsr.data.degradation`).
TTSR_PREPROCESSING = (
    "RGB in [-1, 1]; LR-up: the PIL bicubic x4 of the LR; each reference cropped at the "
    "bottom/right to sides divisible by 4 and paired with its PIL bicubic x4 down-up version"
)


@dataclass(frozen=True)
class ShippedWeights:
    """One shipped model, described once: what it is, how it was made and how it scores.

    ``file`` is a name in the package's ``pretrained`` folder (``checkpoints/`` in the source
    tree); ``config`` is the architecture the file holds; ``metrics`` are Y-PSNR figures (dB, no
    border crop) named ``{data set}_{reference}_{figure}``; ``recipe`` says where the training
    recipe is.
    """

    name: str
    file: str
    config: TTSRConfig
    recipe: str
    description: str
    metrics: Mapping[str, float] = field(default_factory=dict)
    preprocessing: str = TTSR_PREPROCESSING

    @property
    def path(self) -> Path:
        """Where the file is installed (it may be missing: see :meth:`load`)."""
        return Path(str(resources.files("ttsr") / "pretrained" / self.file))

    def load(self, map_location: str | torch.device = "cpu") -> TTSR:
        """The model, weights-only; :class:`CheckpointError` when its file is not installed."""
        if not self.path.is_file():
            raise CheckpointError(
                f"the {self.name!r} model ({self.path}) is not installed in this build; choose "
                f"another of {', '.join(w.value.name for w in TTSRWeights)} or pass a checkpoint "
                "file"
            )
        return load_checkpoint(self.path, map_location)


#: The architecture of both shipped models (the real-world one is fine-tuned from the other).
SHIPPED_ARCHITECTURE = TTSRConfig(num_res_blocks=(16, 16, 2, 1), n_feats=48, bicubic_skip=True)


class TTSRWeights(Enum):
    """The shipped models, by name (``TTSRWeights.get("bicubic").load()``)."""

    REAL = ShippedWeights(
        name="real",
        file="ttsr_real.pt",
        config=SHIPPED_ARCHITECTURE,
        recipe="the bicubic model fine-tuned on real-world degradations of the LR (blur, "
        "resampling, noise, JPEG) and harder references; 3400 steps of configs/real.yaml, then "
        "2600 of configs/real_jpeg.yaml; checkpoints/README.md",
        description="for real photos: JPEG'd or noisy inputs, references from another view or day",
        metrics={
            "kodak24_lr-jpeg75_psnr": 27.04,
            "kodak24_lr-jpeg75_gain": 0.67,
            "realpairs_ref-jpeg75_psnr": 27.95,
            "realpairs_ref-jpeg75_gain": 0.84,
            "kodak24_lr_psnr": 28.10,
            "kodak24_lr_gain": 1.20,
            "bsd100_lr_psnr": 27.13,
            "bsd100_lr_gain": 1.15,
        },
    )
    BICUBIC = ShippedWeights(
        name="bicubic",
        file="ttsr_demo.pt",
        config=SHIPPED_ARCHITECTURE,
        recipe="configs/demo.yaml, 5000 steps on BSDS200 + T91 with synthetic references; "
        "checkpoints/README.md",
        description="the research protocol: LR by PIL bicubic x4 of a clean image",
        metrics={
            "set5_lr_psnr": 31.12,
            "set14_lr_psnr": 27.69,
            "bsd100_lr_psnr": 27.25,
            "kodak24_lr_psnr": 28.18,
            "bsd100_lr_gain": 1.27,
            "kodak24_lr_gain": 1.28,
        },
    )
    #: What ``Upscaler.from_checkpoint()`` and the command-line tools use when not told.
    DEFAULT = REAL

    @classmethod
    def get(cls, name: str) -> ShippedWeights:
        """The shipped model called ``name`` (``"real"``, ``"bicubic"``), or ``ValueError``."""
        for member in cls:
            if member.value.name == name:
                return member.value
        names = ", ".join(member.value.name for member in cls)
        raise ValueError(f"unknown model {name!r}; the shipped models are {names}")
