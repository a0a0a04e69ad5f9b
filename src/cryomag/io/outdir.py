"""Output folders: never an input folder, one run at a time, no stale outputs of an earlier run.

Every command that writes a folder (estimate, refit, apply, merge, reconstruct, inspect,
simulate, demo; report writes into the run folder it reports on) opens it with
:func:`output_folder`, which, before any work:

1. refuses an output folder that is the folder of an input file or holds one (at any depth):
   the particle file, a passthrough file, a map, a mask, the image stacks of a particle set,
   a run's statistics;
2. creates the folder and takes its lock, ``OUT/.cryomag.lock`` (pid, host, command, start
   time). A second run into the same folder fails at once, naming the lock and the other
   process; a lock whose process is gone (same host, pid no longer alive) is taken over with
   a warning;
3. cleans a reused folder (policy below);
4. on exit (also after an error or Ctrl-C) records what this run wrote in
   ``OUT/.cryomag-manifest.json`` and releases the lock. The manifest also records what
   produced the folder (:func:`cryomag.runinfo.run_record`: the exact command line, the
   cryomag and Python versions, host, user, working folder), from the start of the run.

Reused output folder: policy
----------------------------
The outputs cryomag itself wrote into the folder in an earlier run are removed at the start,
unless the command resumes (``estimate --resume``): the files and folders listed in the
earlier run's manifest (every file that run created or changed: particles.star / .cs,
results.json, stats/, plots/, maps, logs, report.html, ...). A folder written by a cryomag
version without manifests (it has a ``cryomag.log`` but no manifest) is cleaned of
cryomag's fixed output names (:data:`KNOWN_OUTPUTS`). A run killed before it could write its
manifest (kill -9) leaves a manifest marked incomplete: then every file changed since that
run started is removed. Files cryomag did not write are left alone; ``OUT/.chunks`` (the
checkpoints of ``estimate``) is managed by the estimate itself and never touched here.
``report`` only embeds plots the run wrote (listed in its manifest), never older files.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from cryomag.io.atomic import ParticleFileError
from cryomag.model.validation import warn

__all__ = [
    "KNOWN_OUTPUTS",
    "LOCK_NAME",
    "MANIFEST_NAME",
    "OutputFolderError",
    "check_output_path",
    "check_out_not_input",
    "output_folder",
    "read_manifest",
    "written_by_run",
]

LOCK_NAME = ".cryomag.lock"
MANIFEST_NAME = ".cryomag-manifest.json"
#: Names never cleaned or recorded (the lock, the manifest, estimate's checkpoints).
_PRIVATE = (LOCK_NAME, MANIFEST_NAME, ".chunks")

#: Output names of the commands, removed from a reused folder written by a cryomag version
#: without manifests (recognised by its cryomag.log). Folders end with "/".
KNOWN_OUTPUTS = (
    "particles.star",
    "particles.cs",
    "particles.csg",
    "results.json",
    "stats/",
    "plots/",
    "jobs/",
    "report.html",
    "report_fsc.png",
    "cryomag.log",
    "half1.mrc",
    "half2.mrc",
    "map.mrc",
    "fsc.json",
    "fsc.png",
    "merge.json",
    "pixel_sizes.png",
    "inspect.json",
    "scale_histogram.png",
    "scale_vs_defocus.png",
)


class OutputFolderError(ParticleFileError):
    """The output folder cannot be used (an input folder, locked by another run, ...).

    A :class:`~cryomag.io.atomic.ParticleFileError` (hence a ValueError), like the refusal of
    a writer to overwrite an input."""


# --------------------------------------------------------------------------- inputs
def _resolved(p: str | os.PathLike) -> Path:
    return Path(os.path.realpath(p))


def _input_files(inputs: Iterable, particles=None) -> list[Path]:
    """Input paths (files or folders), the stacks of ``particles`` included, resolved."""
    out = []
    for p in inputs:
        if p is None:
            continue
        out.append(Path(p))
    sets = particles if isinstance(particles, list | tuple) else [particles]
    for ps in sets:
        if ps is None:
            continue
        if ps.source.path is not None:
            out.append(Path(ps.source.path))
        if ps.source.passthrough is not None:
            out.append(Path(ps.source.passthrough))
        out += _stack_files(ps)
    return [_resolved(p) for p in out]


def _stack_files(ps) -> list[Path]:
    """The image stacks a particle set refers to that exist (resolved as ImageSource does)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from cryomag.io.mrc import image_search_dirs, resolve_image_path

    if "rlnImageName" not in ps.particles.columns or len(ps) == 0:
        return []
    col = ps.particles["rlnImageName"]
    try:
        arr = pa.array(col, type=pa.large_string())
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        arr = pa.array(col.astype(str).to_numpy(dtype=object), type=pa.large_string())
    names = pc.unique(pc.replace_substring_regex(arr, "^[^@]*@", "")).to_pylist()
    dirs = image_search_dirs(ps.source.path, ps.source.kind)
    found = []
    for name in names:
        p = resolve_image_path(name, dirs) if name else None
        if p is not None:
            found.append(p)
    return found


def check_out_not_input(
    out: str | os.PathLike, inputs: Iterable = (), particles=None, option: str = "--out"
) -> None:
    """Refuse an output folder that is, or holds, the folder of an input.

    Parameters
    ----------
    out : path
        The output folder (it need not exist).
    inputs : iterable of path or None
        Input files or folders.
    particles : ParticleSet or list of them, optional
        Their source files and image stacks are inputs too.
    option : str
        The command-line option naming the folder, for the message.

    Raises
    ------
    OutputFolderError
        When an input lies in ``out`` (directly or below it), or ``out`` is an input itself.
    """
    out_r = _resolved(out)
    if Path(out).exists() and not Path(out).is_dir():
        raise OutputFolderError(f"{option} {out}: exists and is not a folder")
    for f in _input_files(inputs, particles):
        if f == out_r:
            raise OutputFolderError(f"{option} {out}: is an input ({f}); write to a new folder")
        if out_r in f.parents:
            where = "is the folder of" if f.parent == out_r else "holds"
            raise OutputFolderError(
                f"{option} {out}: {where} the input {f}; write to a folder that holds no input"
            )


def check_output_path(
    path: str | os.PathLike, protected: Iterable = (), option: str = "--out"
) -> None:
    """Refuse an output file that is an input or an existing file of a protected folder.

    ``protected``: files and folders read by the command; an existing ``path`` inside a
    protected folder is refused unless it is an HTML page (a report written earlier).
    """
    p = Path(path)
    if p.is_dir():
        raise OutputFolderError(f"{option} {path}: is a folder (expected an HTML file name)")
    pr = _resolved(p)
    for q in protected:
        if q is None:
            continue
        qr = _resolved(q)
        if pr == qr:
            raise OutputFolderError(f"{option} {path}: is an input ({q}); choose another file")
        if p.exists() and qr in pr.parents and p.suffix.lower() not in (".html", ".htm"):
            raise OutputFolderError(
                f"{option} {path}: is a file of {q} that the report reads (or another "
                "existing file); choose a new file name (e.g. report.html)"
            )


# ----------------------------------------------------------------------------- lock
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _lock_text(command: str) -> str:
    return json.dumps(
        {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
    )


def _read_lock(lock: Path) -> dict | None:
    try:
        data = json.loads(lock.read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def acquire_lock(out: Path, command: str) -> Path:
    """Create ``out/.cryomag.lock`` atomically; take over a stale one; else raise.

    Raises
    ------
    OutputFolderError
        When another live process holds the lock (the message names the lock, the pid, the
        host and the command).
    """
    lock = out / LOCK_NAME
    text = _lock_text(command)
    for _ in range(3):
        tmp = out / f".cryomag.lock.{os.getpid()}.{secrets.token_hex(4)}"
        tmp.write_text(text)
        try:
            os.link(tmp, lock)  # atomic: fails when the lock exists
            return lock
        except FileExistsError:
            pass
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raw = None
        with contextlib.suppress(OSError):
            raw = lock.read_text()
        info = _read_lock(lock)
        host = socket.gethostname()
        if info is not None and info.get("host") == host and _pid_alive(int(info.get("pid", -1))):
            raise OutputFolderError(
                f"{out}: another cryomag run is writing into this folder (lock file {lock}: "
                f"pid {info.get('pid')} on {host}, {info.get('command')!r}, since "
                f"{info.get('started')}); wait for it to finish or choose another --out"
            )
        if info is not None and info.get("host") != host:
            raise OutputFolderError(
                f"{out}: another cryomag run may be writing into this folder (lock file "
                f"{lock}: pid {info.get('pid')} on host {info.get('host')}, "
                f"{info.get('command')!r}, since {info.get('started')}); if that run is gone, "
                "delete the lock file"
            )
        # stale (dead pid on this host) or unreadable: take it over, unless it changed meanwhile
        who = (
            f"pid {info.get('pid')} ({info.get('command')!r}, since {info.get('started')})"
            if info
            else "an unreadable lock"
        )
        warn(f"{out}: taking over the stale lock {lock} of {who}, no longer running")
        with contextlib.suppress(OSError):
            if lock.read_text() == raw:
                lock.unlink()
    raise OutputFolderError(f"{out}: could not take the lock {lock}; retry")


def release_lock(lock: Path) -> None:
    """Remove ``lock`` if this process holds it."""
    info = _read_lock(lock)
    if (
        info is not None
        and info.get("pid") == os.getpid()
        and info.get("host") == socket.gethostname()
    ):
        with contextlib.suppress(OSError):
            lock.unlink()


# ------------------------------------------------------------------------- manifest
def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The manifest of the last cryomag run in ``folder`` (None when absent or unreadable)."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("files"), list) else None


def written_by_run(folder: str | os.PathLike, path: str | os.PathLike) -> bool:
    """True when the last run in ``folder`` wrote ``path`` (always True without a manifest)."""
    man = read_manifest(folder)
    if man is None:
        return True
    try:
        rel = Path(path).resolve().relative_to(Path(folder).resolve()).as_posix()
    except ValueError:
        return True
    return rel in set(man["files"])


def _run_record() -> dict:
    """What produced the folder (:func:`cryomag.runinfo.run_record`)."""
    from cryomag.runinfo import run_record

    return run_record()


def _write_manifest(out: Path, data: dict) -> None:
    tmp = out / f".{MANIFEST_NAME}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, out / MANIFEST_NAME)


def _snapshot(out: Path) -> tuple[dict[str, tuple[int, int]], set[str]]:
    """{relative file path: (mtime_ns, size)} and the relative folders under ``out``."""
    files, dirs = {}, set()
    for root, dnames, fnames in os.walk(out):
        rel_root = Path(root).relative_to(out)
        if rel_root == Path("."):
            dnames[:] = [d for d in dnames if d not in _PRIVATE]
        for d in dnames:
            dirs.add((rel_root / d).as_posix())
        for f in fnames:
            rel = (rel_root / f).as_posix()
            if (
                rel in _PRIVATE
                or rel.startswith(".cryomag.lock.")
                or rel.startswith(f".{MANIFEST_NAME}.")
            ):
                continue
            with contextlib.suppress(OSError):
                st = os.lstat(Path(root) / f)
                files[rel] = (st.st_mtime_ns, st.st_size)
    return files, dirs


def _inside(out_r: Path, rel: str) -> Path | None:
    """``out / rel`` when it lies inside ``out`` (no '..', no link leading out), else None."""
    if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
        return None
    p = out_r / rel
    if _resolved(p.parent) != out_r and out_r not in _resolved(p.parent).parents:
        return None
    return p


def _clean(out: Path, protected: list[Path]) -> list[str]:
    """Remove the previous cryomag run's outputs from ``out`` (see the module docstring)."""
    out_r = _resolved(out)
    man = read_manifest(out)
    files: list[str] = []
    dirs: list[str] = []
    if man is not None:
        files += [str(f) for f in man.get("files", [])]
        dirs += [str(d) for d in man.get("dirs", [])]
        if not man.get("complete", False):
            started = float(man.get("started", time.time()))
            now, _ = _snapshot(out)
            files += [f for f, (mt, _) in now.items() if mt / 1e9 >= started - 1.0]
    elif (out / "cryomag.log").is_file():
        for name in KNOWN_OUTPUTS:
            if name.endswith("/"):
                d = out / name.rstrip("/")
                if d.is_dir() and not d.is_symlink():
                    for root, _, fnames in os.walk(d):
                        files += [(Path(root) / f).relative_to(out).as_posix() for f in fnames]
                    dirs.append(name.rstrip("/"))
            elif (out / name).is_file():
                files.append(name)
    removed = []
    prot = {_resolved(p) for p in protected}
    for rel in dict.fromkeys(files):
        p = _inside(out_r, rel)
        if p is None or rel.split("/")[0] in _PRIVATE:
            continue
        if not (p.is_file() or p.is_symlink()):
            continue
        if _resolved(p) in prot:
            continue
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(rel)
    # folders the earlier run created, deepest first, when now empty
    for rel in sorted(set(dirs), key=lambda d: -d.count("/")):
        p = _inside(out_r, rel)
        if p is not None and p.is_dir() and not p.is_symlink():
            with contextlib.suppress(OSError):
                p.rmdir()
    return removed


@contextlib.contextmanager
def output_folder(
    out: str | os.PathLike | None,
    command: str,
    *,
    inputs: Iterable = (),
    particles=None,
    resume: bool = False,
    clean: bool = True,
    record: str = "replace",
    option: str = "--out",
) -> Iterator[Path | None]:
    """Open ``out`` for one command: refuse input folders, lock, clean, record (see module).

    Parameters
    ----------
    out : path or None
        The output folder; None: nothing is checked or created (yields None).
    command : str
        The command (for the lock and the manifest), e.g. ``"estimate"``.
    inputs : iterable of path or None
        Input files and folders: ``out`` must not be, or hold, any of them.
    particles : ParticleSet or list of them, optional
        Their source files and image stacks are inputs too.
    resume : bool
        Keep the earlier run's outputs (``estimate --resume``); the manifest then lists both
        runs' files.
    clean : bool
        Remove the earlier run's outputs (unless ``resume``). False for ``report``, which
        writes into the folder of the run it reports on.
    record : str
        ``"replace"``: the manifest lists this run's files; ``"append"``: they are added to
        the earlier run's manifest (``report``).
    option : str
        The command-line option of the folder, for messages.

    Yields
    ------
    Path or None
        ``out`` as a Path.

    Raises
    ------
    OutputFolderError
        An input folder, a file in place of the folder, or a folder locked by a live run.
    """
    if out is None:
        yield None
        return
    out = Path(out)
    input_paths = _input_files(inputs, particles)
    if clean or record == "replace":
        check_out_not_input(out, input_paths, option=option)
    elif out.exists() and not out.is_dir():
        raise OutputFolderError(f"{option} {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputFolderError(f"{option} {out}: cannot create the folder ({err})") from err
    lock = acquire_lock(out, command)
    try:
        prev = read_manifest(out)
        if clean and not resume:
            _clean(out, input_paths)
            prev = None
        started = time.time()
        before, dirs_before = _snapshot(out)
        run = _run_record()
        if record == "replace":
            earlier = list(prev["files"]) if (prev and resume) else []
            _write_manifest(
                out,
                {
                    "command": command,
                    "started": started,
                    "complete": False,
                    "files": earlier,
                    "dirs": list(prev.get("dirs", [])) if (prev and resume) else [],
                    **run,
                },
            )
    except BaseException:
        release_lock(lock)
        raise
    try:
        yield out
    finally:
        try:
            after, dirs_after = _snapshot(out)
            new = [f for f, st in after.items() if before.get(f) != st]
            new_dirs = sorted(dirs_after - dirs_before)
            if record == "replace":
                earlier = [f for f in (prev["files"] if (prev and resume) else []) if f in after]
                data = {
                    "command": command,
                    "started": started,
                    "finished": time.time(),
                    "complete": True,
                    "files": sorted(set(earlier) | set(new)),
                    "dirs": sorted(
                        set(new_dirs) | set(prev.get("dirs", []) if (prev and resume) else [])
                    ),
                    **run,
                }
            else:
                cur = read_manifest(out)
                if cur is None:
                    data = {
                        "command": command,
                        "started": started,
                        "finished": time.time(),
                        "complete": True,
                        "files": sorted(new),
                        "dirs": new_dirs,
                        **run,
                    }
                else:
                    data = dict(cur)
                    data["files"] = sorted(set(cur["files"]) | set(new))
                    data["dirs"] = sorted(set(cur.get("dirs", [])) | set(new_dirs))
            _write_manifest(out, data)
        except OSError:
            pass
        finally:
            release_lock(lock)
