"""The worker side of every parallel executor: pass functions built once per process.

A worker receives a pass function as a :class:`~cryomag.execution.payload.Blob` and the
blobs of its shared parts (:mod:`cryomag.execution.payload`); :func:`materialize` builds each
object once per process and keeps it (least recently used dropped first), so a reference map
shipped for the first pass is not unpickled again for the next ones. Both the local worker
processes (:mod:`cryomag.execution.processes`) and Dask's workers (:mod:`cryomag.execution.dask`)
run chunks through here.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any

from cryomag.execution.payload import Blob, load_blob, on_worker

__all__ = ["limit_blas_threads", "materialize"]

log = logging.getLogger("cryomag")

#: Objects built in this (worker) process, by content token, least recently used first.
_CACHE: OrderedDict[str, Any] = OrderedDict()
_CACHE_LOCK = threading.RLock()
_CACHE_MAX = 16

#: Whether this (worker) process has limited its BLAS to one thread.
_BLAS_LIMITED = False


def limit_blas_threads() -> None:
    """One BLAS thread in this worker process (once), as a spawned Dask worker has (Dask sets
    ``OPENBLAS_NUM_THREADS=1`` before it imports numpy); a forked worker inherits the
    driver's BLAS, initialised for every core. Same thread count, same arithmetic."""
    global _BLAS_LIMITED
    if _BLAS_LIMITED:
        return
    _BLAS_LIMITED = True
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=1, user_api="blas")
    except Exception as exc:  # pragma: no cover - threadpoolctl is a dependency
        log.debug("could not limit the BLAS threads: %s", exc)


def materialize(token: str, blobs: dict[str, Blob], threads: int) -> Any:
    """The object of ``token``, built once per process from ``blobs`` (its shared parts
    recursively), told the worker's thread count (``__cryomag_on_worker__``)."""
    with _CACHE_LOCK:
        if token in _CACHE:
            _CACHE.move_to_end(token)
            return _CACHE[token]
        blob = blobs[token]
        obj = load_blob(blob, lambda t: materialize(t, blobs, threads))
        on_worker(obj, threads)
        _CACHE[token] = obj
        while len(_CACHE) > _CACHE_MAX:
            _CACHE.popitem(last=False)
        return obj
