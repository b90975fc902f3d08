"""Scratch memory reused between steps and calls, so that large temporaries pay no page faults.

Fresh large tensors are mapped freshly by the C library and pay a page fault per 4 KB page on
first touch (in a VM, a good part of a fast forward's time).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

#: Makes an uninitialised tensor: ``(shape, dtype, device) -> Tensor``.
Allocate = Callable[[Sequence[int], torch.dtype, torch.device], Tensor]


def fresh(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A new uninitialised tensor (the :data:`Allocate` of plain PyTorch)."""
    return torch.empty(*shape, dtype=dtype, device=device)


def _numel(shape: Sequence[int]) -> int:
    numel = 1
    for size in shape:
        numel *= size
    return numel


class StepBuffers:
    """Named flat buffers reused from step to step by one worker, grown on demand."""

    def __init__(self, allocate: Allocate = fresh) -> None:
        self.buffers: dict[tuple[str, torch.dtype], Tensor] = {}
        self.allocate = allocate

    def get(self, name: str, shape: Sequence[int], like: Tensor, dtype: torch.dtype) -> Tensor:
        """A contiguous ``shape`` view of buffer ``name`` (contents undefined)."""
        numel = _numel(shape)
        key = (name, dtype)
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() < numel or buffer.device != like.device:
            buffer = self.allocate((numel,), dtype, like.device)
            self.buffers[key] = buffer
        return buffer[:numel].view(*shape)


class ScratchArena:
    """Consecutive pieces of one byte buffer, kept between calls, for large tensors that die
    before the arena is next reset.

    Phases that follow each other share the same memory. A request that does not fit is served
    freshly, and the next :meth:`reset` grows the buffer to the largest phase seen, up to
    :attr:`LIMIT_BYTES` (larger phases are always served freshly, so one huge image does not
    leave a huge buffer behind). Workers may take pieces concurrently.
    """

    ALIGNMENT = 64
    #: The most the arena keeps (a CUFED5-size forward uses about 85 MB).
    LIMIT_BYTES = 256 * 2**20

    def __init__(self) -> None:
        self.buffer: Tensor | None = None
        self.used = 0
        self.wanted = 0
        self.largest = 0
        self.lock = threading.Lock()

    def reset(self) -> None:
        """Start a phase: every piece handed out before is given back (overwritten next)."""
        if self.wanted <= self.LIMIT_BYTES:
            self.largest = max(self.largest, self.wanted)
        if self.buffer is not None and self.buffer.numel() < self.largest:
            self.buffer = None  # the old buffer goes before the larger one is made
        self.used = self.wanted = 0

    def release(self) -> None:
        """Give the buffer back (every piece handed out must be dead); the next phase makes a
        new one. For callers that run other large work before the next phase."""
        self.reset()
        self.buffer = None

    def take(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A contiguous tensor of ``shape``, valid until the next :meth:`reset`."""
        numel = _numel(shape)
        size = numel * dtype.itemsize
        size += -size % self.ALIGNMENT
        with self.lock:
            self.wanted += size
            if self.buffer is None and self.largest > 0:
                self.buffer = torch.empty(self.largest, dtype=torch.uint8, device=device)
            buffer, start = self.buffer, self.used
            fits = buffer is not None and buffer.device == device
            fits = fits and start + size <= buffer.numel()
            if fits:
                self.used += size
        if not fits:
            return torch.empty(*shape, dtype=dtype, device=device)
        return buffer[start : start + numel * dtype.itemsize].view(dtype).view(*shape)
