"""Checkpoints of passes: resumable runs.

:class:`CheckpointExecutor` wraps an executor. Every chunk result is written atomically as it
arrives to ``FOLDER/pass_NNN/chunk_NNNNN.npz`` together with the fingerprint of its pass: a
digest of everything the pass function computes from (its shared parts through their content
tokens, every other field of the function; see :class:`cryomag.execution.payload.Payload`),
the chunk's rows and the package version. ``FOLDER/state.json`` lists the passes with their
fingerprints and status, and whatever the function reports about itself
(``fn.checkpoint_info()``, e.g. the parameters the pass was run at).

Resuming (``resume=True``) replays the run: each pass recomputes its fingerprint from the
current state; a completed pass with the same fingerprint is read back whole, which reproduces
the same inputs for the next pass; the pass in progress reuses its finished chunks and
computes only the rest. A fingerprint that differs (other inputs or options) discards the
stored passes from there on. Writes are atomic, so a run killed at any point (SIGKILL, Ctrl-C,
a job reaching its walltime) leaves only complete files.

How results become arrays is the caller's choice (``codec``); the default stores dataclasses
of arrays (or lists of them), restoring only classes of this package.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cryomag._files import TEMP_GLOB, atomic_path
from cryomag.execution.base import Executor, ResultCallback
from cryomag.execution.payload import Payload, package_version

__all__ = ["CheckpointExecutor", "DataclassCodec", "ResultCodec"]

log = logging.getLogger("cryomag")

FORMAT_VERSION = 2


class ResultCodec(Protocol):
    """Turns a chunk result into named arrays plus JSON metadata, and back."""

    def encode(self, result: Any) -> tuple[dict[str, np.ndarray], dict]: ...

    def decode(self, arrays: dict[str, np.ndarray], meta: dict) -> Any: ...


class DataclassCodec:
    """Results that are dataclasses of arrays, or lists of them (classes of this package)."""

    @staticmethod
    def _class_path(obj: Any) -> str:
        cls = type(obj)
        return f"{cls.__module__}:{cls.__qualname__}"

    @staticmethod
    def _load_class(path: str) -> type:
        module, _, name = path.partition(":")
        if not module.startswith("cryomag."):
            raise ValueError(f"checkpoint refers to {path}; only cryomag classes are restored")
        obj: Any = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
        if not (isinstance(obj, type) and dataclasses.is_dataclass(obj)):
            raise ValueError(f"checkpoint refers to {path}, which is not a dataclass")
        return obj

    def encode(self, result: Any) -> tuple[dict[str, np.ndarray], dict]:
        items = result if isinstance(result, list) else [result]
        arrays: dict[str, np.ndarray] = {}
        classes = []
        for i, item in enumerate(items):
            if not dataclasses.is_dataclass(item) or isinstance(item, type):
                raise TypeError(
                    f"checkpoints store dataclasses of arrays (or lists of them), got {type(item)}"
                )
            classes.append(self._class_path(item))
            for f in dataclasses.fields(item):
                arrays[f"{i}.{f.name}"] = np.asarray(getattr(item, f.name))
        return arrays, {"list": isinstance(result, list), "classes": classes}

    def decode(self, arrays: dict[str, np.ndarray], meta: dict) -> Any:
        items = []
        for i, path in enumerate(meta["classes"]):
            cls = self._load_class(path)
            items.append(cls(**{f.name: arrays[f"{i}.{f.name}"] for f in dataclasses.fields(cls)}))
        return items if meta["list"] else items[0]


def write_npz(path: Path, fingerprint: str, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    """Write arrays with their fingerprint and metadata, atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                __fingerprint__=np.array(fingerprint),
                __meta__=np.array(json.dumps(meta)),
                **arrays,
            )


def read_npz(path: Path) -> tuple[str, dict, dict[str, np.ndarray]] | None:
    """(fingerprint, metadata, arrays) of a checkpoint file, or None when unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            fp = str(z["__fingerprint__"])
            meta = json.loads(str(z["__meta__"]))
            arrays = {k: z[k] for k in z.files if not k.startswith("__")}
    except (OSError, ValueError, KeyError, EOFError) as exc:
        log.warning("checkpoint %s unreadable (%s); recomputing it", path, exc)
        return None
    return fp, meta, arrays


class CheckpointExecutor(Executor):
    """Store each chunk's result as it finishes; with ``resume``, reuse an earlier run's.

    Parameters
    ----------
    inner : Executor
        Computes the chunks that are not stored.
    folder : path
        Checkpoint folder (``OUT/.chunks``).
    resume : bool
        Reuse stored results whose fingerprint matches. False: an existing folder is
        cleared on the first pass.
    codec : ResultCodec, optional
        How results are stored (default :class:`DataclassCodec`).

    Notes
    -----
    Passes are numbered by the calls to :meth:`map`, in order; the fingerprint of each call
    decides whether stored results apply (see the module docstring).
    """

    def __init__(
        self,
        inner: Executor,
        folder: str | os.PathLike,
        resume: bool = False,
        codec: ResultCodec | None = None,
    ) -> None:
        self.inner = inner
        self.folder = Path(folder)
        self.resume = bool(resume)
        self.codec = codec or DataclassCodec()
        self.name = f"{inner.name}, checkpoints in {self.folder}"
        self._pass = 0
        self._replaying = True  # every pass so far was read back whole
        self._state: dict = {"format": FORMAT_VERSION, "passes": []}
        #: per pass: chunks read back and computed (for logs and tests)
        self.counts: list[dict] = []

    def describe(self) -> str:
        return f"{self.inner.describe()}; checkpoints in {self.folder}"

    def start_in_background(self) -> None:
        self.inner.start_in_background()

    def run_on_workers(self, fn: Callable[[], Any]) -> dict[Any, Any]:
        return self.inner.run_on_workers(fn)

    # ------------------------------------------------------------------ helpers
    def _pass_dir(self, n: int) -> Path:
        return self.folder / f"pass_{n:03d}"

    def _fingerprint(self, fn: Any, chunks: Sequence[Any]) -> str:
        h = hashlib.sha1()
        h.update(f"cryomag {package_version()} checkpoint {FORMAT_VERSION}\n".encode())
        h.update(Payload(fn).token.encode())
        for c in chunks:
            h.update(f"{getattr(c, 'index', '')}:{getattr(c, 'group', '')}:".encode())
            h.update(np.asarray(getattr(c, "rows", ()), np.int64).tobytes())
        return h.hexdigest()

    def _write_state(self) -> None:
        with atomic_path(self.folder / "state.json") as tmp:
            Path(tmp).write_text(json.dumps(self._state, indent=1))

    def _read_state(self) -> dict:
        with contextlib.suppress(OSError, ValueError):
            state = json.loads((self.folder / "state.json").read_text())
            if isinstance(state, dict) and state.get("format") == FORMAT_VERSION:
                return state
        return {"format": FORMAT_VERSION, "passes": []}

    def _start(self) -> None:
        if self.folder.exists() and not self.resume:
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.resume:
            self._state = self._read_state()
            # temporary files of writes cut short by SIGKILL
            for tmp in self.folder.rglob(TEMP_GLOB):
                with contextlib.suppress(OSError):
                    tmp.unlink()
        self._state.setdefault("passes", [])

    def _entry(self, n: int) -> dict | None:
        return next((p for p in self._state["passes"] if p.get("pass") == n), None)

    def _record(self, n: int, fp: str, fn: Any, n_chunks: int, complete: bool) -> None:
        entry = {
            "pass": n,
            "fingerprint": fp,
            "chunks": n_chunks,
            "complete": complete,
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        info = getattr(fn, "checkpoint_info", None)
        if callable(info):
            entry.update(info())
        passes = [p for p in self._state["passes"] if p.get("pass") != n]
        passes.append(entry)
        self._state["passes"] = sorted(passes, key=lambda p: p["pass"])
        self._write_state()

    def _discard_from(self, n: int) -> None:
        for d in sorted(self.folder.glob("pass_*")):
            with contextlib.suppress(ValueError):
                if int(d.name.split("_")[1]) >= n:
                    shutil.rmtree(d, ignore_errors=True)
        self._state["passes"] = [p for p in self._state["passes"] if p.get("pass", 0) < n]

    def _stored(self, pdir: Path, fp: str, chunk: Any) -> Any | None:
        path = pdir / f"chunk_{chunk.index:05d}.npz"
        if not path.exists():
            return None
        got = read_npz(path)
        if got is None or got[0] != fp:
            return None
        return self.codec.decode(got[2], got[1])

    # ------------------------------------------------------------------ Executor
    def map(
        self,
        fn: Callable[[Any], Any],
        chunks: Sequence[Any],
        description: str = "particles",
        progress: bool = True,
        on_result: ResultCallback | None = None,
        collect: bool = True,
    ) -> list[Any] | None:
        """Like the inner executor's map, reading and writing checkpoints (see class)."""
        chunks = list(chunks)
        if self._pass == 0:
            self._start()
        self._pass += 1
        n = self._pass
        pdir = self._pass_dir(n)
        fp = self._fingerprint(fn, chunks)
        results: list[Any] = [None] * len(chunks) if collect else []
        have = [False] * len(chunks)

        def deliver(i: int, res: Any) -> None:
            if on_result is not None:
                on_result(chunks[i], res)
            if collect:
                results[i] = res

        entry = self._entry(n)
        if self.resume and self._replaying and pdir.exists():
            whole = entry is not None and entry.get("complete") and entry.get("fingerprint") == fp
            for i, c in enumerate(chunks):
                res = self._stored(pdir, fp, c)
                if res is not None:
                    have[i] = True
                    deliver(i, res)
                del res
            if whole and all(have):
                log.info("%s: all %d chunks read from %s", description, len(chunks), pdir)
                self.counts.append({"pass": n, "read": len(chunks), "computed": 0})
                return results if collect else None
            if not any(have):
                log.warning(
                    "%s: the stored results of this pass come from other inputs or options; "
                    "recomputing it and the passes after it",
                    description,
                )
        # from here on this run computes: later stored passes are stale
        self._replaying = False
        self._discard_from(n + 1)
        if not any(have):
            self._discard_from(n)
        pdir.mkdir(parents=True, exist_ok=True)
        self._record(n, fp, fn, len(chunks), complete=False)
        todo = [i for i, h in enumerate(have) if not h]
        if any(have):
            log.info(
                "%s: %d of %d chunks read from %s, computing %d",
                description,
                sum(have),
                len(chunks),
                pdir,
                len(todo),
            )
            description = f"{description} (resumed)"
        self.counts.append({"pass": n, "read": sum(have), "computed": len(todo)})
        position = {chunks[i].index: i for i in todo}

        def store(chunk: Any, res: Any) -> None:
            arrays, meta = self.codec.encode(res)
            meta["chunk"] = getattr(chunk, "index", None)
            write_npz(pdir / f"chunk_{chunk.index:05d}.npz", fp, meta, arrays)
            deliver(position[chunk.index], res)

        self.inner.map(
            fn, [chunks[i] for i in todo], description, progress, on_result=store, collect=False
        )
        self._record(n, fp, fn, len(chunks), complete=True)
        return results if collect else None

    def finish(self) -> None:
        """The run completed and its outputs are written: remove the checkpoints."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def close(self) -> None:
        """Close the inner executor."""
        self.inner.close()
