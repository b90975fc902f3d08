"""Shared test helpers: small random tensors and images, deterministic."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)
