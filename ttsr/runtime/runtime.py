"""How the fast search runs its CPU work: plain PyTorch, or a CPU runtime that its owner keeps.

The model takes a :class:`Runtime` as an argument and changes nothing outside itself: the plain
one (the default) runs every loop inline with PyTorch's own intra-op threads and fresh memory.
A :class:`CPURuntime` is made and kept by its owner (an ``Upscaler``, a training module): worker
threads with one intra-op thread each, scratch memory kept between calls, and the C library's
free memory given back after parallel phases. Results are the same with either.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch
from torch import Tensor

from ttsr.runtime.heap import release_free_memory
from ttsr.runtime.scratch import Allocate, ScratchArena, StepBuffers, fresh
from ttsr.runtime.workers import one_intra_op_thread, run_items

Item = TypeVar("Item")
State = TypeVar("State")
Result = TypeVar("Result")
#: ``process(item, state)``: one work item, with its worker's state.
Process = Callable[[Item, State], None]


class Runtime:
    """Plain PyTorch: one worker (the calling thread, its intra-op threads), fresh memory."""

    workers = 1

    def on(self, device: torch.device, scratch: bool = True) -> Runtime:
        """The runtime for work on ``device``; ``scratch=False``: without scratch memory (for
        tensors that outlive the phase, such as those autograd keeps)."""
        return self

    def map(
        self, items: Iterable[Item], process: Process, make_state: Callable[[], State]
    ) -> list[State]:
        """``process(item, state)`` for every item, with per-worker states; returns the states."""
        state = make_state()
        for item in items:
            process(item, state)
        return [state]

    def serial(self, function: Callable[[], Result]) -> Result:
        """``function()``, a loop of many small operations, on the calling thread."""
        return function()

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised tensor, valid until :meth:`next_phase`."""
        return fresh(shape, dtype, device)

    def step_buffers(self) -> StepBuffers:
        """A worker's buffers, reused from step to step (from :meth:`allocate`)."""
        return StepBuffers(self.allocate)

    def next_phase(self) -> None:
        """Every tensor from :meth:`allocate` is dead from here on."""

    def finish(self) -> None:
        """The work is done: scratch memory may be given back."""


#: The plain runtime: what the model uses when given none.
PLAIN = Runtime()


class CPURuntime(Runtime):
    """Worker threads, scratch memory and heap trimming for CPU work, owned by its caller.

    Args:
        workers: worker threads (default: PyTorch's intra-op thread count when made); each runs
            its loop with one intra-op thread, so that a descheduled thread delays only itself.
        trim: give the C library's free memory back after parallel phases (``malloc_trim``);
            ``False`` after :func:`~ttsr.runtime.heap.keep_freed_memory`.

    One runtime serves one thread at a time (its scratch is one arena); give each thread that
    runs a model its own.
    """

    def __init__(self, workers: int | None = None, trim: bool = True) -> None:
        self.workers = max(1, workers or torch.get_num_threads())
        self.trim = trim
        self.arena: ScratchArena | None = ScratchArena()

    def on(self, device: torch.device, scratch: bool = True) -> Runtime:
        if device.type != "cpu":
            return PLAIN  # GPUs: the caching allocator reuses memory, kernels run in parallel
        if scratch or self.arena is None:
            return self
        plain_memory = copy.copy(self)
        plain_memory.arena = None
        return plain_memory

    def map(
        self, items: Iterable[Item], process: Process, make_state: Callable[[], State]
    ) -> list[State]:
        states = run_items(items, process, make_state, self.workers)
        if self.trim and self.workers > 1:
            release_free_memory()  # what the workers freed, before anything else is allocated
        return states

    def serial(self, function: Callable[[], Result]) -> Result:
        with one_intra_op_thread():
            return function()

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        if self.arena is None:
            return fresh(shape, dtype, device)
        return self.arena.take(shape, dtype, device)

    def next_phase(self) -> None:
        if self.arena is not None:
            self.arena.reset()

    def finish(self) -> None:
        if self.arena is not None:
            self.arena.release()
        if self.trim:
            release_free_memory()


__all__ = ["Allocate", "CPURuntime", "PLAIN", "Runtime"]
