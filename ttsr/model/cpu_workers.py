"""Run loops of many small tensor operations on CPU threads with one intra-op thread each.

A loop of thousands of small operations on several OpenMP threads pays a barrier per operation.
When another process holds some of the cores, every barrier waits for a descheduled thread (a
scheduler time slice, milliseconds), and such a loop runs tens of times slower than on one thread
(measured here: 54 s instead of 1.2 s). Here each worker thread runs its operations
single-threaded and takes the next work item when it is done, so a descheduled worker delays only
itself, and the workers together still use every core.

``torch.set_num_threads`` also sets process-wide defaults (MKL's thread count, the count new
threads start with), so the caller's count is restored when the workers are done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from functools import cache
from typing import TypeVar

import torch

Item = TypeVar("Item")
State = TypeVar("State")
Result = TypeVar("Result")

_DONE = object()


def worker_count(device: torch.device) -> int:
    """Workers for CPU tensors: one per intra-op thread; work on other devices runs inline."""
    return max(1, torch.get_num_threads()) if device.type == "cpu" else 1


class _Pool:
    """Worker threads kept between calls, so each keeps reusing its own memory arena.

    (glibc gives each thread an arena that keeps what it frees; fresh threads for every call
    would add arenas, and resident memory, call after call.)
    """

    def __init__(self) -> None:
        self.tasks: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.idle = 0

    def submit(self, tasks: list[Callable[[], None]]) -> None:
        """Run ``tasks`` concurrently on idle pool threads (started as needed)."""
        with self.lock:
            missing = max(0, len(tasks) - self.idle)
            self.idle += missing
        for _ in range(missing):
            threading.Thread(target=self._serve, daemon=True).start()
        for task in tasks:
            self.tasks.put(task)

    def _serve(self) -> None:
        while True:
            task = self.tasks.get()
            with self.lock:
                self.idle -= 1
            try:
                task()
            finally:
                # Drop the finished task now: the loop variable would otherwise keep it, and
                # every tensor its closure holds (search tables, states), until the next task.
                del task
                with self.lock:
                    self.idle += 1


_POOL = _Pool()


def _run_threads(targets: list[Callable[[], None]]) -> None:
    """Run each target on a pool thread with one intra-op thread and no autograd (in inference
    mode if the caller is, so that the caller's inference tensors can be written); re-raise."""
    errors: list[BaseException] = []
    done = threading.Semaphore(0)
    inference = torch.is_inference_mode_enabled()

    def body(target: Callable[[], None]) -> None:
        try:
            torch.set_num_threads(1)
            with torch.inference_mode() if inference else torch.no_grad():
                target()
        except BaseException as error:  # re-raised on the calling thread
            errors.append(error)
        finally:
            done.release()

    previous = torch.get_num_threads()
    try:
        _POOL.submit([lambda t=t: body(t) for t in targets])
        for _ in targets:
            done.acquire()
    finally:
        torch.set_num_threads(previous)
    if errors:
        raise errors[0]


def run_items(
    items: Iterable[Item],
    process: Callable[[Item, State], None],
    make_state: Callable[[], State],
    workers: int,
) -> list[State]:
    """Process ``items`` on ``workers`` single-threaded worker threads, each with its own state.

    Every worker calls ``make_state()`` once, then ``process(item, state)`` for each item it takes
    (items are handed out in order); returns the workers' states. With one worker, runs inline on
    the calling thread, as it is configured.
    """
    work = iter(items)
    if workers <= 1:
        state = make_state()
        for item in work:
            process(item, state)
        return [state]
    lock = threading.Lock()
    states: list[State] = []

    def worker() -> None:
        state = make_state()
        with lock:
            states.append(state)
        while True:
            with lock:
                item = next(work, _DONE)
            if item is _DONE:
                return
            process(item, state)  # type: ignore[arg-type]

    _run_threads([worker] * workers)
    return states


@contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """Run the block with one intra-op thread, then restore the caller's count."""
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def single_threaded(function: Callable[[], Result], device: torch.device) -> Result:
    """``function()`` with one intra-op thread for CPU work (on the calling thread), else as is.

    For loops of many small operations; their memory comes from the caller's arena.
    """
    if device.type != "cpu":
        return function()
    with one_intra_op_thread():
        return function()


#: glibc ``mallopt`` parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
#: Free memory glibc may keep at the top of its heap before giving it back.
KEPT_FREE_BYTES = 256 * 2**20


def keep_freed_memory() -> bool:
    """Opt-in, process-wide: glibc serves every allocation from one shared heap and reuses it.

    By default glibc maps each large block (a tensor of a few MB or more) freshly from the OS and
    unmaps it when freed, so every new large tensor pays a page fault per 4 KB page; in a VM
    that is a good part of a convolution's time (measured here: the generator at CUFED5 size
    13-15% faster). With this, freed memory is reused: large blocks come from the heap, all
    threads share one arena (so what one thread frees another reuses), and up to
    :data:`KEPT_FREE_BYTES` of free memory stay at the top of the heap. Call it before starting
    threads. Results are unchanged. Returns whether it took effect (False without glibc).
    """
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, KEPT_FREE_BYTES))
    global _keeping_freed_memory
    _keeping_freed_memory = all(bool(mallopt(parameter, value)) for parameter, value in settings)
    return _keeping_freed_memory


_keeping_freed_memory = False


def release_free_memory() -> None:
    """Give the free memory of every thread's arena back to the OS (glibc ``malloc_trim``).

    Worker threads keep what they freed in their own arenas, where the main thread cannot reuse
    it; after a parallel phase this returns it. Nothing is done after :func:`keep_freed_memory`.
    """
    if _keeping_freed_memory:
        return
    libc = _libc()
    if libc is not None:
        with suppress(AttributeError):
            libc.malloc_trim(0)


@cache
def _libc() -> ctypes.CDLL | None:
    """The C library, looked up once (``find_library`` runs a subprocess)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
