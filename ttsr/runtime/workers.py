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

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch

Item = TypeVar("Item")
State = TypeVar("State")

_DONE = object()


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
    the calling thread with one intra-op thread.
    """
    work = iter(items)
    if workers <= 1:
        with one_intra_op_thread():
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
