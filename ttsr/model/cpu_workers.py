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

import threading
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch

Item = TypeVar("Item")
State = TypeVar("State")
Result = TypeVar("Result")

_DONE = object()


def worker_count(device: torch.device) -> int:
    """Workers for CPU tensors: one per intra-op thread; work on other devices runs inline."""
    return max(1, torch.get_num_threads()) if device.type == "cpu" else 1


def _run_threads(targets: list[Callable[[], None]]) -> None:
    """Run each target on its own thread with one intra-op thread and no autograd; re-raise."""
    errors: list[BaseException] = []

    def body(target: Callable[[], None]) -> None:
        torch.set_num_threads(1)
        try:
            with torch.no_grad():
                target()
        except BaseException as error:  # re-raised on the calling thread
            errors.append(error)

    previous = torch.get_num_threads()
    threads = [threading.Thread(target=body, args=(t,), daemon=True) for t in targets]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
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


def single_threaded(function: Callable[[], Result], device: torch.device) -> Result:
    """``function()`` on a worker thread with one intra-op thread for CPU work, else inline."""
    if worker_count(device) <= 1:
        return function()
    results: list[Result] = []
    _run_threads([lambda: results.append(function())])
    return results[0]
