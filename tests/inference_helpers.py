"""Helpers for the inference, evaluation and CLI tests: tiny checkpoints, images, CLI calls."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ttsr.checkpoints import save_checkpoint
from ttsr.model.config import TTSRConfig
from ttsr.model.ttsr import TTSR

#: Test vectors carried in the repository (each folder's README says where it comes from).
FIXTURES = Path(__file__).resolve().parent / "fixtures"
RELEASED = FIXTURES / "released_ttsr_small"


def tiny_model(
    seed: int = 0, blocks: tuple[int, ...] = (1, 1, 1, 1), search: str = "fast", **config
) -> TTSR:
    """A random TTSR small enough for CPU tests (1 block per stage, 8 features); ``config``:
    other :class:`TTSRConfig` entries."""
    torch.manual_seed(seed)
    return TTSR(TTSRConfig(num_res_blocks=blocks, n_feats=8, **config), search=search)


def write_tiny_checkpoint(folder: Path, name: str = "tiny.pt") -> Path:
    path = folder / name
    save_checkpoint(tiny_model(), path)
    return path


def textured(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB texture (sums of random sinusoids): survives bicubic down/up well."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    image = np.zeros((height, width, 3))
    for _ in range(6):
        frequency = rng.uniform(0.05, 0.5, size=2)
        phase = rng.uniform(0, 2 * np.pi)
        image += (
            rng.uniform(0.2, 1.0, size=3)
            * np.sin(frequency[0] * rows + frequency[1] * cols + phase)[..., None]
        )
    image = (image - image.min()) / (image.max() - image.min() + 1e-9)
    return np.clip(np.rint(image * 235 + 10), 0, 255).astype(np.uint8)


def save_png(array: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def call(
    main: Callable[[Sequence[str]], int], argv: Sequence[str], capsys: pytest.CaptureFixture
) -> tuple[int, str, str]:
    """Run a CLI ``main`` in-process: ``(exit code, stdout, stderr)`` (SystemExit included)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_bad_input(code: int, err: str, prog: str, *fragments: str) -> None:
    """Exit code 2, one ``PROG: error:`` line on stderr containing ``fragments``, no traceback."""
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith(f"{prog}: error:")]
    assert len(errors) == 1, err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def files_in(folder: Path) -> list[str]:
    """All files under ``folder`` (hidden temporaries included), relative, sorted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
