"""Which floating-point precision inference runs in: ``auto``, ``fp32``, ``bf16`` or ``fp16``.

``auto`` takes bfloat16 where the hardware computes it natively and float32 elsewhere: on a CPU
with AVX-512 BF16 or AMX (bfloat16 convolutions run several times faster than float32 ones
there; without them bfloat16 is emulated and slower), on a CUDA GPU bfloat16 where it supports
it, else float16. The texture search compares relevances in float32 whatever the precision.
"""

from __future__ import annotations

from typing import Literal

import torch

Precision = Literal["auto", "fp32", "bf16", "fp16"]
#: Accepted precision names, ``auto`` first.
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
#: The dtype of each explicit precision name.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively: AVX-512 BF16 or AMX tiles (as PyTorch's
    own CPU feature detection reports them)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    for name in checks:
        check = getattr(torch.cpu, name, None)
        if check is not None and check():
            return True
    return False


def auto_dtype(device: torch.device) -> torch.dtype:
    """What ``auto`` chooses on ``device`` (see the module's docstring)."""
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bfloat16() else torch.float32
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The dtype for a precision name on ``device``; ``ValueError`` for an unknown name."""
    if precision == "auto":
        return auto_dtype(device)
    if precision not in DTYPES:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    return DTYPES[precision]


def precision_name(dtype: torch.dtype) -> str:
    """``"fp32"``, ``"bf16"`` or ``"fp16"`` for a dtype (its ``str`` for any other)."""
    for name, known in DTYPES.items():
        if known == dtype:
            return name
    return str(dtype)
