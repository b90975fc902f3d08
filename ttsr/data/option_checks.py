"""Checks shared by the option dataclasses of :mod:`ttsr.data` (one message for each rule)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def check_probabilities(options: Any, names: Iterable[str]) -> None:
    """``ValueError`` unless each named field of ``options`` is in [0, 1]."""
    for name in names:
        value = getattr(options, name)
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {value}")


def check_ranges(options: Any, names: Iterable[str], positive: bool = False) -> None:
    """``ValueError`` unless each named ``(low, high)`` field has ``0 <= low <= high``
    (``0 < low`` with ``positive``)."""
    for name in names:
        low, high = getattr(options, name)
        if not (low > 0 if positive else low >= 0) or low > high:
            bound = "0 < low <= high" if positive else "0 <= low <= high"
            raise ValueError(f"{name} must be {bound}, got {(low, high)}")


def check_jpeg_quality_range(quality_range: tuple[int, int]) -> None:
    """``ValueError`` unless ``quality_range`` is an ordered range within 1..100."""
    low, high = quality_range
    if not 1 <= low <= high <= 100:
        raise ValueError(f"jpeg_quality_range must be within 1..100, got {(low, high)}")
