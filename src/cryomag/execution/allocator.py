"""Memory-allocator settings for the worker processes that run the statistics kernel.

Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536`` (to hand freed memory
back to the system). Setting any glibc malloc parameter freezes its mmap threshold at
128 KiB, so every block-sized temporary of the kernel (0.1-2 MB) is then a fresh mmap
whose pages the kernel zero-fills on first touch: measured 1.7x slower per particle
(box 128, 1,024 particles, one thread: 3.1 vs 1.8 ms). :func:`keep_block_arrays_on_heap`
raises the mmap threshold to glibc's maximum (32 MiB: the per-chunk arrays above it are
still mapped and returned) and the trim threshold to 256 MiB, so blocks reuse heap memory.
Memory stays bounded by the chunk size; a worker may keep up to 256 MiB more than it uses.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("cryomag")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done = False


def keep_block_arrays_on_heap() -> bool:
    """Tune glibc malloc in this process (once); False where there is no glibc."""
    global _done
    if _done:
        return True
    try:
        name = ctypes.util.find_library("c")
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        mallopt = None
    if mallopt is None:
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)) and bool(
        mallopt(_M_TRIM_THRESHOLD, 256 * 1024 * 1024)
    )
    _done = ok
    return ok
