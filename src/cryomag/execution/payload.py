"""Shipping a pass function to workers: content tokens and payloads.

A pass function usually refers to a few large read-only objects (a particle table, an image
source, a reference map) and to small per-pass state. :class:`Payload` pickles it *without*
the large parts: each *shared* part is replaced by a content token, shipped once per worker
and built once per worker process; what goes out per pass is the small rest, and per task a
chunk descriptor.

Shared parts are found by protocol, not by type, so this module knows nothing of the domain:

- an object whose class defines ``__cryomag_token__(self) -> str`` (a digest of its content;
  the object is treated as read-only while a run lasts) travels as a shared part;
- it may define ``__cryomag_on_worker__(self, threads: int) -> None``, called once when a
  worker process has built it (e.g. to use that worker's thread count);
- it controls its own pickled form (``__reduce__`` / ``__getstate__``), e.g. a map that ships
  its real volume in single precision rather than its evaluation buffers;
- plain numpy arrays of at least :data:`SHARE_MIN_BYTES` are shared parts too.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cloudpickle
import numpy as np

__all__ = [
    "SHARE_MIN_BYTES",
    "Blob",
    "Payload",
    "content_token",
    "is_shared",
    "load_blob",
    "on_worker",
    "package_version",
]

#: Arrays at least this large travel once per worker, keyed by their content.
SHARE_MIN_BYTES = 1 << 20

_TOKENS: dict[int, tuple[weakref.ref, str]] = {}
_TOKENS_LOCK = threading.Lock()


def digest(*parts: bytes | str) -> str:
    """SHA-1 hex digest of the parts (separated, so that ("ab", "c") != ("a", "bc"))."""
    h = hashlib.sha1()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\x00")
    return h.hexdigest()


def array_token(a: np.ndarray) -> str:
    """Content token of an array (dtype, shape and bytes)."""
    a = np.ascontiguousarray(a)
    return digest("ndarray", str(a.dtype), str(a.shape), memoryview(a).cast("B"))


def is_shared(obj: Any) -> bool:
    """Whether ``obj``'s class declares itself a shared part (``__cryomag_token__``)."""
    return callable(getattr(type(obj), "__cryomag_token__", None))


def _content_token(obj: Any) -> str:
    if isinstance(obj, np.ndarray):
        return array_token(obj)
    if is_shared(obj):
        return digest(type(obj).__qualname__, obj.__cryomag_token__())
    return digest(type(obj).__qualname__, cloudpickle.dumps(obj, protocol=5))


def content_token(obj: Any) -> str:
    """A hex digest of ``obj``'s content (cached per object for shared parts).

    Shared parts are hashed once per object (they are read-only during a run); arrays are
    hashed each time (cheap next to a pass).
    """
    if isinstance(obj, np.ndarray):
        return array_token(obj)
    key = id(obj)
    with _TOKENS_LOCK:
        hit = _TOKENS.get(key)
        if hit is not None and hit[0]() is obj:
            return hit[1]
    try:
        tok = _content_token(obj)
    except Exception:  # unhashable content: a token that matches nothing else
        tok = digest("unique", os.urandom(16))
    try:
        ref = weakref.ref(obj)
    except TypeError:
        return tok
    with _TOKENS_LOCK:
        _TOKENS[key] = (ref, tok)
        if len(_TOKENS) > 256:
            for k in [k for k, (r, _) in _TOKENS.items() if r() is None]:
                del _TOKENS[k]
    return tok


def on_worker(obj: Any, threads: int) -> None:
    """Let a shared part adapt to the worker process that built it (if it wants to)."""
    hook = getattr(obj, "__cryomag_on_worker__", None)
    if callable(hook):
        hook(threads)


class _Pickler(cloudpickle.Pickler):
    """Pickles an object with its shared parts replaced by persistent tokens."""

    def __init__(self, file, top: Any, shared: dict[str, Any], share_arrays: bool) -> None:
        super().__init__(file, protocol=5)
        self._top = top
        self._shared = shared
        self._share_arrays = share_arrays

    def persistent_id(self, obj: Any) -> str | None:
        if obj is self._top:
            return None
        if is_shared(obj) or (
            self._share_arrays
            and type(obj) is np.ndarray
            and obj.nbytes >= SHARE_MIN_BYTES
            and obj.dtype != object
        ):
            tok = content_token(obj)
            self._shared.setdefault(tok, obj)
            return tok
        return None


@dataclass
class Blob:
    """An object pickled without its shared parts.

    Attributes
    ----------
    token : str
        Content token of the object (for shared objects) or of ``data`` (for payloads).
    data : bytes
        The pickle, with persistent ids for the shared parts.
    deps : tuple of str
        Tokens of the shared parts it refers to.
    """

    token: str
    data: bytes
    deps: tuple


def _dumps(obj: Any, share_arrays: bool) -> tuple[bytes, dict[str, Any]]:
    buf = io.BytesIO()
    shared: dict[str, Any] = {}
    _Pickler(buf, obj, shared, share_arrays).dump(obj)
    return buf.getvalue(), shared


class Payload:
    """A pass function split into a small pickle and its shared parts.

    Attributes
    ----------
    blob : Blob
        The function; ``blob.token`` fingerprints everything it computes from (shared parts
        enter through their content tokens).
    direct : dict of str to object
        The shared objects the function refers to directly, by token.
    """

    def __init__(self, fn: Any) -> None:
        data, direct = _dumps(fn, share_arrays=True)
        self.blob = Blob(digest("payload", data), data, tuple(direct))
        self.direct = direct

    @property
    def token(self) -> str:
        """The fingerprint of the function (content of all its parts)."""
        return self.blob.token

    def parts(self, known: dict[str, tuple]) -> tuple[list[str], dict[str, Blob]]:
        """The tokens of every shared part (recursively) and blobs for the new ones.

        Parameters
        ----------
        known : dict of str to tuple of str
            Parts already shipped, with the tokens they depend on; they are not pickled
            again.

        Returns
        -------
        tokens : list of str
            Every shared part the function needs, directly or through other parts.
        new : dict of str to Blob
            Pickles of the parts not in ``known``.
        """
        tokens: list[str] = []
        new: dict[str, Blob] = {}
        stack: list[tuple[str, Any]] = list(self.direct.items())
        while stack:
            tok, obj = stack.pop()
            if tok in tokens:
                continue
            tokens.append(tok)
            if tok in known:
                stack.extend((d, None) for d in known[tok])
                continue
            data, deps = _dumps(obj, share_arrays=False)
            new[tok] = Blob(tok, data, tuple(deps))
            stack.extend(deps.items())
        return tokens, new


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, resolve: Callable[[str], Any]) -> None:
        super().__init__(file)
        self._resolve = resolve

    def persistent_load(self, pid: str) -> Any:
        return self._resolve(pid)


def load_blob(blob: Blob, resolve: Callable[[str], Any]) -> Any:
    """Unpickle ``blob``, taking its shared parts from ``resolve(token)``."""
    return _Unpickler(io.BytesIO(blob.data), resolve).load()


def package_version() -> str:
    """The installed cryomag version (part of checkpoint fingerprints)."""
    try:
        from importlib.metadata import version

        return version("cryomag")
    except Exception:  # pragma: no cover - not installed
        return "unknown"
