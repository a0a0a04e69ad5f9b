"""Checkpoints of passes over the images: resumable runs.

:class:`CheckpointExecutor` wraps an executor. Every chunk result is written atomically as it
arrives to ``OUT/.chunks/pass_NNN/chunk_NNNNN.npz`` together with the fingerprint of its
pass: a digest of everything the pass computes from -- the particle table, the image source,
the reference(s) and every other field of the pass object (frequency bands, which carry the
resolution limits; the current M of each group; the noise model) -- plus the chunk's rows
and the cryomag version (see :class:`cryomag.execution.executor.Payload`).

When a pass is complete its chunk files are replaced by ``pass_NNN/pass.npz``: the reduction
of each optics group's statistics (``GroupStatistics.reduce``), stored as the result of the
group's first chunk, the group's other chunks returning no statistics. The engine's reduction
of that single item gives back exactly the same numbers, so a completed pass costs
``N x ~250 bytes`` on disk instead of all its chunks. ``OUT/.chunks/state.json`` lists the
passes with their fingerprints, status and the M per group they were run at.

Resuming (``--resume``) replays the run: each pass recomputes its fingerprint from the current
state; a completed pass with the same fingerprint is read back whole, which reproduces the
same M for the next pass; the pass in progress reuses its finished chunks and computes only
the rest. A fingerprint that differs (other inputs or options) discards the stored passes
from there on. Writes are atomic, so a run killed at any point (SIGKILL, Ctrl-C, a job
reaching its walltime) leaves only complete files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cryomag.execution.executor import (
    Executor,
    Payload,
    ResultCallback,
    cryomag_version,
)
from cryomag.io.atomic import atomic_write

log = logging.getLogger("cryomag")

FORMAT_VERSION = 1


# ---------------------------------------------------------------------------- encoding
def _class_path(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}:{cls.__qualname__}"


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


def encode_result(result: Any) -> tuple[dict[str, np.ndarray], dict]:
    """Arrays and metadata of a chunk result: a dataclass of arrays or a list of them."""
    items = result if isinstance(result, list) else [result]
    arrays: dict[str, np.ndarray] = {}
    classes = []
    for i, item in enumerate(items):
        if not dataclasses.is_dataclass(item) or isinstance(item, type):
            raise TypeError(
                f"checkpoints store dataclasses of arrays (or lists of them), got {type(item)}"
            )
        classes.append(_class_path(item))
        for f in dataclasses.fields(item):
            arrays[f"{i}.{f.name}"] = np.asarray(getattr(item, f.name))
    return arrays, {"list": isinstance(result, list), "classes": classes}


def decode_result(arrays: dict[str, np.ndarray], meta: dict) -> Any:
    """The inverse of :func:`encode_result`."""
    items = []
    for i, path in enumerate(meta["classes"]):
        cls = _load_class(path)
        items.append(cls(**{f.name: arrays[f"{i}.{f.name}"] for f in dataclasses.fields(cls)}))
    return items if meta["list"] else items[0]


def write_npz(path: Path, fingerprint: str, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    """Write arrays with their fingerprint and metadata, atomically."""
    with atomic_write(path) as tmp:
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


# ---------------------------------------------------------------------------- consolidation
def consolidate_statistics(chunks: Sequence[Any], results: list[Any]) -> list[Any] | None:
    """The results of a pass of ``cryomag estimate`` reduced per optics group.

    Each group's :class:`~cryomag.fit.statistics.ChunkStatistics` are reduced with
    ``GroupStatistics.reduce`` and returned as the result of the group's first chunk (the
    others get ``[]``). Reducing that single item again returns the same arrays bit for bit
    (sums start from zero; the rows are already sorted), so the engine sees the same
    statistics. Returns None for results of another kind (then nothing is consolidated).
    """
    from cryomag.fit.statistics import ChunkStatistics, GroupStatistics

    if not all(
        isinstance(r, list) and all(isinstance(x, ChunkStatistics) for x in r) for r in results
    ):
        return None
    first: dict[int, int] = {}
    by_group: dict[int, list] = {}
    for i, (c, r) in enumerate(zip(chunks, results, strict=True)):
        first.setdefault(c.group, i)
        by_group.setdefault(c.group, []).extend(r)
    out: list[Any] = [[] for _ in chunks]
    for g, lst in by_group.items():
        if not lst:
            continue
        red = GroupStatistics.reduce(lst)
        out[first[g]] = [
            ChunkStatistics(**{f.name: getattr(red, f.name) for f in dataclasses.fields(red)})
        ]
    return out


# ---------------------------------------------------------------------------- executor
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
    consolidate : callable, optional
        ``consolidate(chunks, results) -> results or None``: the compact form of a completed
        pass (default :func:`consolidate_statistics`); None keeps every chunk file.

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
        consolidate: Callable[[Sequence[Any], list[Any]], list[Any] | None]
        | None = consolidate_statistics,
    ) -> None:
        self.inner = inner
        self.folder = Path(folder)
        self.resume = bool(resume)
        self.consolidate = consolidate
        self.name = f"{inner.name}, checkpoints in {self.folder}"
        self._pass = 0
        self._replaying = True  # every pass so far was read back whole
        self._state: dict = {"format": FORMAT_VERSION, "passes": []}
        #: per pass: chunks read back and computed (for logs and tests)
        self.counts: list[dict] = []

    def describe(self) -> str:
        return f"{self.inner.describe()}; checkpoints in {self.folder}"

    # ------------------------------------------------------------------ helpers
    def _pass_dir(self, n: int) -> Path:
        return self.folder / f"pass_{n:03d}"

    def _fingerprint(self, fn: Any, chunks: Sequence[Any]) -> str:
        import hashlib

        h = hashlib.sha1()
        h.update(f"cryomag {cryomag_version()} checkpoint {FORMAT_VERSION}\n".encode())
        h.update(Payload(fn).token.encode())
        for c in chunks:
            h.update(f"{getattr(c, 'index', '')}:{getattr(c, 'group', '')}:".encode())
            h.update(np.asarray(getattr(c, "rows", ()), np.int64).tobytes())
        return h.hexdigest()

    def _write_state(self) -> None:
        with atomic_write(self.folder / "state.json") as tmp:
            Path(tmp).write_text(json.dumps(self._state, indent=1))

    def _start(self) -> None:
        if self.folder.exists() and not self.resume:
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.resume:
            with contextlib.suppress(OSError, ValueError):
                self._state = json.loads((self.folder / "state.json").read_text())
            # temporary files of writes cut short by SIGKILL (atomic_write's naming)
            for tmp in self.folder.rglob(".*.tmp-*"):
                with contextlib.suppress(OSError):
                    tmp.unlink()
        self._state.setdefault("passes", [])

    def _record(self, n: int, fp: str, fn: Any, n_chunks: int, complete: bool) -> None:
        entry = {
            "pass": n,
            "fingerprint": fp,
            "chunks": n_chunks,
            "complete": complete,
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        mags = getattr(fn, "mags", None)
        if mags is not None:
            entry["M"] = np.asarray(mags, float).tolist()
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

    def _load_complete(self, pdir: Path, fp: str, chunks: Sequence[Any]) -> list[Any] | None:
        got = read_npz(pdir / "pass.npz")
        if got is None or got[0] != fp:
            return None
        _, meta, arrays = got
        if meta.get("n_chunks") != len(chunks):
            return None
        out: list[Any] = []
        for i in range(len(chunks)):
            sub = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(f"{i}/")}
            out.append(decode_result(sub, meta["results"][i]))
        return out

    def _save_complete(self, pdir: Path, fp: str, compact: list[Any]) -> None:
        arrays: dict[str, np.ndarray] = {}
        metas = []
        for i, res in enumerate(compact):
            a, m = encode_result(res) if res != [] else ({}, {"list": True, "classes": []})
            arrays.update({f"{i}/{k}": v for k, v in a.items()})
            metas.append(m)
        write_npz(pdir / "pass.npz", fp, {"n_chunks": len(compact), "results": metas}, arrays)

    # ------------------------------------------------------------------ Executor
    def map(
        self,
        fn: Callable[[Any], Any],
        chunks: Sequence[Any],
        description: str = "particles",
        progress: bool = True,
        on_result: ResultCallback | None = None,
    ) -> list[Any]:
        """Like the inner executor's map, reading and writing checkpoints (see class)."""
        chunks = list(chunks)
        if self._pass == 0:
            self._start()
        self._pass += 1
        n = self._pass
        pdir = self._pass_dir(n)
        fp = self._fingerprint(fn, chunks)
        results: list[Any] = [None] * len(chunks)
        have = [False] * len(chunks)
        if self.resume and self._replaying and pdir.exists():
            whole = self._load_complete(pdir, fp, chunks)
            if whole is not None:
                log.info("%s: all %d chunks read from %s", description, len(chunks), pdir)
                self.counts.append({"pass": n, "read": len(chunks), "computed": 0})
                return whole
            for i, c in enumerate(chunks):
                got = read_npz(pdir / f"chunk_{c.index:05d}.npz")
                if got is not None and got[0] == fp:
                    results[i] = decode_result(got[2], got[1])
                    have[i] = True
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
        todo = [c for c, h in zip(chunks, have, strict=True) if not h]
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

        def store(chunk: Any, res: Any) -> None:
            arrays, meta = encode_result(res)
            meta["chunk"] = getattr(chunk, "index", None)
            write_npz(pdir / f"chunk_{chunk.index:05d}.npz", fp, meta, arrays)
            if on_result is not None:
                on_result(chunk, res)

        computed = self.inner.map(fn, todo, description, progress, on_result=store)
        it = iter(computed)
        for i, h in enumerate(have):
            if not h:
                results[i] = next(it)
        if self.consolidate is not None:
            compact = self.consolidate(chunks, results)
            if compact is not None:
                self._save_complete(pdir, fp, compact)
                for f in pdir.glob("chunk_*.npz"):
                    with contextlib.suppress(OSError):
                        f.unlink()
        self._record(n, fp, fn, len(chunks), complete=True)
        return results

    def finish(self) -> None:
        """The run completed and its outputs are written: remove the checkpoints."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def close(self) -> None:
        """Close the inner executor."""
        self.inner.close()
