"""The C library's heap: giving free memory back to the OS, or keeping it for reuse (glibc)."""

from __future__ import annotations

import ctypes
import ctypes.util
from contextlib import suppress
from functools import cache

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
    threads, and pass ``trim=False`` to :class:`~ttsr.runtime.CPURuntime` after it. Results are
    unchanged. Returns whether it took effect (False without glibc).
    """
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, KEPT_FREE_BYTES))
    return all(bool(mallopt(parameter, value)) for parameter, value in settings)


def release_free_memory() -> None:
    """Give the free memory of every thread's heap arena back to the OS (glibc ``malloc_trim``).

    Worker threads keep what they freed in their own arenas, where the main thread cannot reuse
    it; after a parallel phase this returns it.
    """
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
