"""MRC images: lazy, memory-mapped access to particle stacks, and map / stack writing.

Particle images are referenced as ``NNNNNN@stack.mrcs`` (1-based image number) in
``rlnImageName``. :class:`ImageSource` resolves each stack once, keeps it memory-mapped
(``mrcfile.mmap``, read-only, permissive for headers without the ``MAP`` id that some
programs write), and reads images grouped by file.

Pixel sizes in particle-stack headers are often wrong, so the STAR / .cs pixel size always
wins; a warning is given once per stack when the header disagrees by more than 1 %.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

import mrcfile
import mrcfile.utils
import numpy as np
import numpy.typing as npt
import pandas as pd

from cryomag.io.atomic import ParticleFileError, ParticleFileNotFoundError, atomic_write
from cryomag.model.particles import ParticleSet
from cryomag.model.validation import warn

__all__ = [
    "MAX_PIXEL_ABS",
    "ImageSource",
    "check_half_maps",
    "check_map_values",
    "image_search_dirs",
    "map_header",
    "parse_image_names",
    "read_map",
    "resolve_image_path",
    "resolve_image_paths",
    "stack_shape",
    "write_stack",
]

#: Relative pixel-size difference between MRC header and STAR above which a warning is given.
PIXEL_SIZE_WARN_TOL = 0.01
#: Stacks an image source keeps memory-mapped at once in a Dask worker.
WORKER_MAX_OPEN_STACKS = 8
_HEADER_BYTES = 1024


# ------------------------------------------------------------------------------ helpers
def parse_image_names(
    names: Sequence[str] | pd.Series, where: str | os.PathLike = "<memory>"
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``rlnImageName`` values into image numbers and file names.

    Parameters
    ----------
    names : sequence of str, length N
        ``"NNNNNN@file.mrcs"`` (1-based image number) or ``"file.mrc"`` (a single image).
    where : str or path
        File the names came from, for error messages.

    Returns
    -------
    numbers : ndarray of int64, shape (N,)
        1-based image number within the file.
    files : ndarray of object (str), shape (N,)
        File names as written (not resolved).

    Raises
    ------
    ParticleFileError
        For a number that is not a positive integer.
    """
    s = pd.Series(names, copy=False).astype(str).reset_index(drop=True)
    parts = s.str.split("@", n=1, expand=True)
    if parts.shape[1] == 1:
        return np.ones(len(s), dtype=np.int64), parts[0].to_numpy(dtype=object)
    has_at = parts[1].notna().to_numpy()
    files = np.where(has_at, parts[1].to_numpy(dtype=object), parts[0].to_numpy(dtype=object))
    num_txt = parts[0].where(has_at, "1")
    numbers = pd.to_numeric(num_txt, errors="coerce").to_numpy(dtype=float)
    bad = ~np.isfinite(numbers) | (numbers < 1) | (numbers != np.round(numbers))
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        raise ParticleFileError(
            f"{where}: particle row {r + 1}, column rlnImageName: {s.iloc[r]!r} does not start "
            "with a positive image number (expected 'NNNNNN@stack.mrcs', 1-based)"
        )
    return numbers.astype(np.int64), files


def image_search_dirs(
    source: str | os.PathLike | None, kind: str = "star", extra: Iterable = ()
) -> list[Path]:
    """Folders searched, in order, for a relative stack name of a particle file.

    Parameters
    ----------
    source : path or None
        The particle file (None for a set built in memory).
    kind : str
        ``"star"``, ``"cs"`` or ``"memory"``.
    extra : iterable of path
        Folders searched first (explicit search folders).

    Returns
    -------
    list of Path
        ``extra``, then for a STAR file as RELION resolves names: the working directory (the
        RELION project folder), the STAR file's folder, its parent and grandparent (a
        ``Refine3D/job012/run_data.star`` lies two levels below the project); for a .cs
        file its folder, its parent (usually the cryoSPARC project folder) and the working
        directory; otherwise the working directory. Duplicates removed.
    """
    dirs = [Path(d) for d in extra]
    cwd = Path.cwd()
    folder = Path(source).resolve().parent if source is not None else None
    if folder is None:
        dirs.append(cwd)
    elif kind == "cs":
        dirs += [folder, folder.parent, cwd]
    else:
        dirs += [cwd, folder, folder.parent, folder.parent.parent]
    return list(dict.fromkeys(dirs))


def image_path_candidates(name: str | os.PathLike, search_dirs: Iterable[Path]) -> list[Path]:
    """Every existing file ``search_dirs / name`` in search order, distinct files only."""
    p = Path(name)
    if p.is_absolute():
        return [p] if p.is_file() else []
    found: list[Path] = []
    for d in search_dirs:
        cand = Path(d) / p
        if cand.is_file():
            same = False
            for f in found:
                with contextlib.suppress(OSError):
                    same = same or os.path.samefile(f, cand)
            if not same:
                found.append(cand)
    return found


def resolve_image_path(name: str | os.PathLike, search_dirs: Iterable[Path]) -> Path | None:
    """Find a stack file: absolute as is, else the first of ``search_dirs / name`` that exists.

    Returns ``None`` when no candidate exists.
    """
    p = Path(name)
    if p.is_absolute():
        return p if p.is_file() else None
    for d in search_dirs:
        cand = Path(d) / p
        if cand.is_file():
            return cand
    return None


def resolve_image_paths(
    names: Iterable[str], search_dirs: Sequence[Path], where: str = ""
) -> dict[str, Path]:
    """Resolve stack names (as :func:`resolve_image_path`); warn about ambiguous ones.

    A name that exists in two of ``search_dirs`` as different files resolves to the first;
    one warning (log and :class:`~cryomag.model.validation.DataWarning`) names both files of
    the first such name and how many names are ambiguous. Names not found are left out.
    """
    found: dict[str, Path] = {}
    ambiguous: list[tuple[str, list[Path]]] = []
    for name in names:
        cands = image_path_candidates(name, search_dirs)
        if cands:
            found[name] = cands[0]
        if len(cands) > 1:
            ambiguous.append((name, cands))
    if ambiguous:
        name, cands = ambiguous[0]
        more = f" ({len(ambiguous) - 1} more stack name(s) alike)" if len(ambiguous) > 1 else ""
        warn(
            f"{where + ': ' if where else ''}image stack {name}: using {cands[0]}, but "
            f"{', '.join(str(c) for c in cands[1:])} also exists (a different file){more}; "
            "relative image names resolve from the working directory (the RELION project "
            "folder) first, then beside the particle file",
            stacklevel=4,
        )
    return found


def _read_header(path: Path):
    """The MRC header record of ``path`` (permissive about a missing MAP id / machine stamp)."""
    if not path.is_file():
        raise ParticleFileNotFoundError(f"{path}: MRC file not found")
    size = path.stat().st_size
    if size < _HEADER_BYTES:
        raise ParticleFileError(
            f"{path}: truncated MRC file: {size} bytes, shorter than the 1024-byte header"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mrcfile.open(path, mode="r", permissive=True, header_only=True) as m:
            header = m.header.copy()
    return header


#: MRC modes of real-valued data (complex modes 3 and 4 are not images or maps).
_REAL_MODES = {0: "int8", 1: "int16", 2: "float32", 6: "uint16", 12: "float16"}


def _check_size(path: Path, header) -> tuple[int, int, int, np.dtype]:
    """(nz, ny, nx, dtype) from ``header``; raise unless the file has exactly that many bytes.

    A file shorter than its header promises is truncated; a longer one (or a shorter one whose
    size fits another mode) has a header whose mode disagrees with the data: reading it would
    give wrong values, so both are refused, naming the mode and the expected and actual size.
    """
    nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
    mode = int(header.mode)
    try:
        dtype = mrcfile.utils.data_dtype_from_header(header)
    except ValueError as err:
        raise ParticleFileError(f"{path}: unsupported MRC mode {mode} ({err})") from err
    if mode not in _REAL_MODES:
        raise ParticleFileError(
            f"{path}: MRC mode {mode} ({dtype}) is not real-valued image data (expected mode "
            f"{', '.join(f'{m} ({t})' for m, t in _REAL_MODES.items())})"
        )
    if min(nx, ny, nz) < 1:
        raise ParticleFileError(f"{path}: MRC header gives size {nx} x {ny} x {nz}")
    extended = int(header.nsymbt)
    n_values = nx * ny * nz
    expected = _HEADER_BYTES + extended + n_values * dtype.itemsize
    actual = path.stat().st_size
    if actual == expected:
        return nz, ny, nx, dtype
    data_bytes = actual - _HEADER_BYTES - extended
    fits = [
        f"mode {m} ({t})"
        for m, t in _REAL_MODES.items()
        if m != mode and data_bytes == n_values * np.dtype(t).itemsize
    ]
    fit_hint = f"; the size fits {' or '.join(fits)}" if fits else ""
    if actual < expected and not fits:
        raise ParticleFileError(
            f"{path}: truncated MRC file: header promises {nz} section(s) of {nx} x {ny} "
            f"in mode {mode} ({dtype}) ({expected} bytes in all), the file has {actual} bytes"
        )
    raise ParticleFileError(
        f"{path}: MRC header mode {mode} ({dtype}, {dtype.itemsize} bytes per value) and size "
        f"{nx} x {ny} x {nz} need {expected} bytes, the file has {actual} bytes: the header "
        f"disagrees with the data{fit_hint} (expected a file of exactly {expected} bytes)"
    )


def stack_shape(path: str | os.PathLike) -> tuple[int, int, int]:
    """Number of images and image size of an MRC stack, from its header.

    Parameters
    ----------
    path : path
        MRC / MRCS file (a single 2D image counts as a stack of one).

    Returns
    -------
    (n, ny, nx) : tuple of int
        Images (sections) and rows x columns per image, in pixels.

    Raises
    ------
    ParticleFileNotFoundError, ParticleFileError
        Missing or truncated file, unsupported mode.
    """
    path = Path(path)
    nz, ny, nx, _ = _check_size(path, _read_header(path))
    return nz, ny, nx


def _open_mmap(path: Path):
    """Memory-map an MRC file read-only; permissive only when the strict read fails."""
    _check_size(path, _read_header(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            m = mrcfile.mmap(path, mode="r", permissive=False)
        except ValueError:
            m = mrcfile.mmap(path, mode="r", permissive=True)
    if m.data is None:
        m.close()
        raise ParticleFileError(f"{path}: could not read the MRC data block")
    return m


#: Largest |pixel value| accepted in an image (beyond it the transforms overflow float32).
MAX_PIXEL_ABS = 1e20


def _check_pixels(block: np.ndarray, path: Path, index0: np.ndarray) -> None:
    """Refuse NaN, inf or absurdly large pixels; ``block`` (n, ny, nx) holds images ``index0``.

    The message names the stack and the 1-based image number in it (min and max of the block
    first: they propagate NaN, so valid data costs two reductions).
    """
    if block.size == 0:
        return
    hi, lo = float(block.max()), float(block.min())
    if np.isfinite(hi) and np.isfinite(lo) and max(hi, -lo) <= MAX_PIXEL_ABS:
        return
    flat = block.reshape(len(block), -1)
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(flat) | (np.abs(flat) > MAX_PIXEL_ABS)
    i = int(np.flatnonzero(bad.any(axis=1))[0])
    v = float(flat[i][bad[i]][0])
    what = "a non-finite pixel" if not np.isfinite(v) else "a pixel of absurd magnitude"
    raise ParticleFileError(
        f"{path}: image {int(index0[i]) + 1} has {what} ({v!r}) (expected finite pixel "
        f"values, |value| <= {MAX_PIXEL_ABS:g})"
    )


# --------------------------------------------------------------------------- ImageSource
class ImageSource:
    """Lazy, memory-mapped access to the particle images of a :class:`ParticleSet`.

    Parameters
    ----------
    ps : ParticleSet
        Needs ``rlnImageName``; box and pixel size come from the optics table.
    search_dirs : sequence of path, optional
        Folders searched first for relative stack names. Then, by source
        (:func:`image_search_dirs`): for a STAR file, as RELION does, the working directory
        (the RELION project folder) first, then the STAR file's folder, its parent and
        grandparent (``Refine3D/job012/run_data.star``); a .cs file's folder, its parent
        (usually the cryoSPARC project folder) and the working directory; for in-memory sets
        the working directory. When a name exists in two of these folders as different
        files, the first is used and a warning names both.
    max_open : int
        Most stacks kept open (memory-mapped) at once; least recently used are closed.

    Notes
    -----
    The object can be pickled (e.g. sent to Dask workers): open files are not pickled and are
    reopened on first use.

    Examples
    --------
    >>> src = ImageSource(ps)  # doctest: +SKIP
    >>> imgs = src.read([0, 1, 2])  # float32, shape (3, box, box)
    """

    def __init__(
        self,
        ps: ParticleSet,
        search_dirs: Sequence[str | os.PathLike] | None = None,
        max_open: int = 256,
    ) -> None:
        self.ps = ps
        self.max_open = int(max_open)
        if "rlnImageName" not in ps.particles.columns:
            raise ParticleFileError(
                f"{ps.name}: particle table has no column rlnImageName (expected "
                "'NNNNNN@stack.mrcs'); cannot read images"
            )
        numbers, self._files = parse_image_names(ps.particles["rlnImageName"], ps.name)
        self._index0 = numbers - 1
        gidx = ps.group_index()
        self._group = ps.particles["rlnOpticsGroup"].to_numpy(int)
        self._box = ps.optics["rlnImageSize"].to_numpy(float).astype(int)[gidx]
        self._apix = ps.optics["rlnImagePixelSize"].to_numpy(float)[gidx]
        self.search_dirs = image_search_dirs(
            ps.source.path, ps.source.kind, extra=search_dirs or ()
        )
        self._resolved: dict[str, Path] = {}
        self._open: OrderedDict[Path, object] = OrderedDict()
        self._checked: set[Path] = set()
        # resolve every stack now (in this process, so that a warning about a name found in
        # two folders reaches the user, not a worker); missing ones raise when read
        self._resolved.update(
            resolve_image_paths(pd.unique(self._files), self.search_dirs, ps.name)
        )

    # -------------------------------------------------------------------- basics
    def __len__(self) -> int:
        return len(self._index0)

    @property
    def box(self) -> int:
        """The box size in pixels when all particles share one (else ParticleFileError)."""
        boxes = np.unique(self._box)
        if boxes.size != 1:
            raise ParticleFileError(
                f"{self.ps.name}: optics groups have different boxes {boxes.tolist()}"
            )
        return int(boxes[0])

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state

    # -------------------------------------------------- shipping (cryomag.execution.payload)
    def __cryomag_token__(self) -> str:
        """Content digest: the source travels once per worker process (with its table)."""
        return hashlib.sha1(
            "\0".join(
                [self.ps.__cryomag_token__(), str(self.max_open), *map(str, self.search_dirs)]
            ).encode()
        ).hexdigest()

    def __cryomag_on_worker__(self, threads: int) -> None:
        """Keep fewer stacks mapped in a worker: their resident pages count in its memory,
        which Dask's memory limit watches."""
        self.max_open = min(self.max_open, WORKER_MAX_OPEN_STACKS)

    def close(self) -> None:
        """Close every open stack."""
        for m in self._open.values():
            with contextlib.suppress(Exception):
                m.close()
        self._open.clear()

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    # -------------------------------------------------------------------- files
    def path_of(self, row: int) -> Path:
        """The resolved stack path of particle row ``row`` (0-based)."""
        name = self._files[row]
        p = self._resolved.get(name)
        if p is None:
            p = resolve_image_path(name, self.search_dirs)
            if p is None:
                raise ParticleFileNotFoundError(
                    f"{self.ps.name}: particle row {row + 1}: image stack {name} not found "
                    f"(looked in {', '.join(str(d) for d in self.search_dirs)})"
                )
            self._resolved[name] = p
        return p

    def _mmap(self, path: Path, row: int):
        m = self._open.get(path)
        if m is not None:
            self._open.move_to_end(path)
            return m
        m = _open_mmap(path)
        if path not in self._checked:
            self._checked.add(path)
            vs = float(m.voxel_size.x)
            apix = float(self._apix[row])
            if vs > 0 and abs(vs / apix - 1.0) > PIXEL_SIZE_WARN_TOL:
                warnings.warn(
                    f"{path}: MRC header pixel size {vs:g} A differs from the "
                    f"{'STAR' if self.ps.source.kind == 'star' else 'particle file'} pixel "
                    f"size {apix:g} A (optics group {self._group[row]}); using {apix:g} A",
                    stacklevel=3,
                )
        self._open[path] = m
        while len(self._open) > self.max_open:
            _, old = self._open.popitem(last=False)
            with contextlib.suppress(Exception):
                old.close()
        return m

    # --------------------------------------------------------------------- read
    def read(self, indices: npt.ArrayLike) -> np.ndarray:
        """Read particle images.

        Parameters
        ----------
        indices : array_like of int, shape (n,)
            0-based rows of ``ps.particles`` (a scalar reads one image, still 3D output).
            All must belong to optics groups with the same box size.

        Returns
        -------
        ndarray of float32, shape (n, box, box)
            Images in file order of rows (y) and columns (x), as stored.

        Raises
        ------
        ParticleFileNotFoundError
            Missing stack.
        ParticleFileError
            Image number beyond the stack, truncated file, non-square images, or a stack
            whose image size differs from the optics group's rlnImageSize. Messages name the
            file and the particle row.
        """
        rows = np.atleast_1d(np.asarray(indices, dtype=np.int64))
        if rows.ndim != 1:
            raise ValueError(f"indices must be 1D, got shape {rows.shape}")
        n_all = len(self)
        if rows.size and (rows.min() < 0 or rows.max() >= n_all):
            bad = rows[(rows < 0) | (rows >= n_all)][0]
            raise IndexError(f"{self.ps.name}: particle row {bad} out of range 0..{n_all - 1}")
        if rows.size == 0:
            b = np.unique(self._box)
            return np.empty((0, b[0], b[0]) if b.size == 1 else (0, 0, 0), np.float32)
        boxes = np.unique(self._box[rows])
        if boxes.size != 1:
            raise ParticleFileError(
                f"{self.ps.name}: the requested rows span optics groups with boxes "
                f"{boxes.tolist()}; read each box size separately"
            )
        box = int(boxes[0])
        out = np.empty((rows.size, box, box), np.float32)
        codes, uniq = pd.factorize(self._files[rows])
        order = np.argsort(codes, kind="stable")
        splits = np.flatnonzero(np.diff(codes[order])) + 1
        for pos in np.split(order, splits):
            first = int(rows[pos[0]])
            path = self.path_of(first)
            m = self._mmap(path, first)
            data = m.data
            if data.ndim == 2:
                data = data[None]
            elif data.ndim != 3:
                raise ParticleFileError(
                    f"{path}: expected a stack of 2D images, the data has shape {data.shape} "
                    f"(particle row {first + 1})"
                )
            k, ny, nx = data.shape
            if ny != nx:
                raise ParticleFileError(
                    f"{path}: images are {nx} x {ny} pixels (particle row {first + 1}); "
                    "non-square boxes are unsupported"
                )
            if nx != box:
                raise ParticleFileError(
                    f"{path}: images are {nx} x {nx} pixels but particle row {first + 1} is in "
                    f"optics group {self._group[first]} with rlnImageSize {box}"
                )
            j = self._index0[rows[pos]]
            over = np.flatnonzero(j >= k)
            if over.size:
                r = int(rows[pos[over[0]]])
                raise ParticleFileError(
                    f"{path}: stack has {k} images, particle row {r + 1} asks for image "
                    f"{int(j[over[0]]) + 1}"
                )
            srt = np.argsort(j, kind="stable")
            block = out[pos[srt]] = data[j[srt]]
            _check_pixels(out[pos[srt]] if block.dtype != np.float32 else block, path, j[srt])
        return out

    def read_one(self, row: int) -> np.ndarray:
        """One image, float32, shape (box, box)."""
        return self.read([row])[0]


# -------------------------------------------------------------------------- writing / maps
def write_stack(
    path: str | os.PathLike,
    images: npt.ArrayLike,
    pixel_size_A: float,
    inputs: Iterable[str | os.PathLike | None] = (),
) -> None:
    """Write images as an MRC stack (mode 2, float32), atomically.

    Parameters
    ----------
    path : path
        Destination (``.mrcs`` by convention).
    images : array_like, shape (n, box, box) or (box, box)
        Images; converted to float32.
    pixel_size_A : float
        Pixel size in A written to the header (voxel size x, y, z).
    inputs : iterable of path
        Files that must not be overwritten (e.g. the stack the images were read from).
    """
    arr = np.asarray(images, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"images must have shape (n, box, box), got {arr.shape}")
    if not (np.isfinite(pixel_size_A) and pixel_size_A > 0):
        raise ValueError(f"{path}: pixel size must be > 0 A, got {pixel_size_A}")
    with atomic_write(path, inputs=inputs) as tmp:
        with mrcfile.new(tmp, overwrite=True) as m:
            m.set_data(np.ascontiguousarray(arr))
            m.set_image_stack()
            m.voxel_size = float(pixel_size_A)
            m.update_header_stats()


def check_map_values(volume: np.ndarray, label: str, kind: str = "map") -> None:
    """Refuse a map that cannot be a reference: non-finite or absurd values, all zero, constant.

    Parameters
    ----------
    volume : ndarray
        The map (any shape).
    label : str
        What it is, first in the message (the file, "X masked by Y").
    kind : str
        ``"map"``: refuse NaN/inf, all zero and constant maps. ``"mask"``: refuse NaN/inf and
        an empty (all zero) mask; a constant non-zero mask is accepted. ``"any"``: NaN/inf
        and all zero (what no map and no mask may be).

    Raises
    ------
    ParticleFileError
    """
    v = np.asarray(volume)
    if kind not in ("any", "map", "mask"):
        raise ValueError(f"kind must be 'any', 'map' or 'mask', got {kind!r}")
    noun = "map" if kind == "any" else kind
    if v.size == 0:
        raise ParticleFileError(f"{label}: the {noun} has no voxels")
    finite = np.isfinite(v)
    if not finite.all():
        idx = np.unravel_index(int(np.flatnonzero(~finite.ravel())[0]), v.shape)
        raise ParticleFileError(
            f"{label}: the {noun} has {int((~finite).sum())} non-finite voxel(s) (first "
            f"{float(v[idx])!r} at [z, y, x] = {[int(i) for i in idx]}); expected finite values"
        )
    hi, lo = float(v.max()), float(v.min())
    if max(hi, -lo) > MAX_PIXEL_ABS:
        big = np.unravel_index(int(np.argmax(np.abs(v))), v.shape)
        raise ParticleFileError(
            f"{label}: the {noun} has a voxel of absurd magnitude ({float(v[big])!r} at "
            f"[z, y, x] = {[int(i) for i in big]}); expected |value| <= {MAX_PIXEL_ABS:g} "
            "(a corrupt file?)"
        )
    if hi == 0.0 and lo == 0.0:
        expected = {
            "any": "a map with density (or a mask with some voxels > 0)",
            "map": "a map with density",
            "mask": "a mask with some voxels > 0",
        }[kind]
        raise ParticleFileError(f"{label}: every voxel is 0; expected {expected}")
    if kind == "map" and hi == lo:
        raise ParticleFileError(
            f"{label}: the map is constant (every voxel {hi:g}); expected a map with density"
        )


def read_map(
    path: str | os.PathLike, pixel_size_A: float | None = None, *, kind: str = "any"
) -> tuple[np.ndarray, float]:
    """Read a 3D map (or mask), refusing non-finite or empty data.

    Parameters
    ----------
    path : path
        MRC map.
    pixel_size_A : float, optional
        Overrides the header voxel size.
    kind : str
        ``"any"`` (default): refuse NaN/inf and an all-zero volume (a map or a mask);
        ``"map"``: also a constant map; ``"mask"``: as ``"any"`` (a constant mask of ones is
        valid). See :func:`check_map_values`.

    Returns
    -------
    volume : ndarray of float32, shape (n, n, n)
        Indexed [z, y, x].
    pixel_size_A : float
        Voxel size in A (header or the override).

    Raises
    ------
    ParticleFileNotFoundError
        Missing file.
    ParticleFileError
        Truncated file or one whose header mode disagrees with its size, not 3D, non-cubic
        map, NaN / inf voxels, all zero (or constant with ``kind="map"``), no pixel size in
        the header (and no override), or anisotropic voxels. The message names the file.
    """
    if kind not in ("any", "map", "mask"):
        raise ValueError(f"kind must be 'any', 'map' or 'mask', got {kind!r}")
    path = Path(path)
    header = _read_header(path)
    nz, ny, nx, _ = _check_size(path, header)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mrcfile.open(path, mode="r", permissive=True) as m:
            if m.data is None:
                raise ParticleFileError(f"{path}: could not read the MRC data block")
            vol = np.asarray(m.data, dtype=np.float32).copy()
            vs = m.voxel_size
            # float32 header values -> shortest decimal (2.64, not 2.6400001049)
            voxel = tuple(float(str(np.float32(v))) for v in (vs.x, vs.y, vs.z))
    if vol.ndim != 3:
        raise ParticleFileError(f"{path}: expected a 3D map, got data of shape {vol.shape}")
    if not (nx == ny == nz):
        raise ParticleFileError(
            f"{path}: map is {nx} x {ny} x {nz} voxels; non-cubic maps are unsupported "
            "(expected n x n x n)"
        )
    check_map_values(vol, str(path), kind)
    if pixel_size_A is not None:
        if not (np.isfinite(pixel_size_A) and pixel_size_A > 0):
            raise ValueError(f"{path}: pixel size must be > 0 A, got {pixel_size_A}")
        return vol, float(pixel_size_A)
    if not (np.isfinite(voxel[0]) and voxel[0] > 0):
        raise ParticleFileError(
            f"{path}: the MRC header has no voxel size ({voxel[0]:g} A); set it in the header "
            "(e.g. relion_image_handler --i IN --o OUT --angpix A, or mrcfile's voxel_size)"
        )
    if max(abs(v / voxel[0] - 1.0) for v in voxel) > 1e-3:
        raise ParticleFileError(
            f"{path}: anisotropic voxel size {voxel} A; expected equal x, y, z sizes"
        )
    return vol, voxel[0]


def map_header(path: str | os.PathLike) -> tuple[tuple[int, int, int], float]:
    """(nz, ny, nx) and the x voxel size (A) of an MRC map, from its header (no data read)."""
    path = Path(path)
    header = _read_header(path)
    nz, ny, nx, _ = _check_size(path, header)
    mx = int(header.mx)
    vs = float(str(np.float32(float(header.cella.x) / mx))) if mx > 0 else 0.0
    return (nz, ny, nx), vs


def check_half_maps(path1: str | os.PathLike, path2: str | os.PathLike) -> None:
    """Two half maps must have the same box and voxel size; the message names both files."""
    (s1, v1), (s2, v2) = map_header(path1), map_header(path2)
    if s1 != s2:
        raise ParticleFileError(
            f"half maps differ in size: {path1} is {' x '.join(map(str, s1[::-1]))} voxels, "
            f"{path2} is {' x '.join(map(str, s2[::-1]))} (expected two maps of one box)"
        )
    if v1 > 0 and v2 > 0 and abs(v1 / v2 - 1) > 1e-3:
        raise ParticleFileError(
            f"half maps differ in voxel size: {path1} has {v1:g} A, {path2} has {v2:g} A "
            "(expected the same voxel size)"
        )


def rebase_image_names(
    ps: ParticleSet, dest_folder: str | os.PathLike | None, warn_ambiguous: bool = False
) -> None:
    """Rewrite ``rlnImageName`` so that the stacks resolve from a STAR written to ``dest_folder``.

    Each stack is resolved as :class:`ImageSource` would for the set's source file; names
    are then written relative to ``dest_folder`` (absolute when no relative path exists, or
    when ``dest_folder`` is None). Stacks that cannot be found are left as they are
    (metadata-only sets stay valid). ``warn_ambiguous``: warn when a name exists in two
    search folders as different files (see :func:`resolve_image_path`).
    """
    if "rlnImageName" not in ps.particles.columns:
        return
    numbers, files = parse_image_names(ps.particles["rlnImageName"], ps.name)
    dirs = image_search_dirs(ps.source.path, ps.source.kind)
    dest = None if dest_folder is None else Path(dest_folder).resolve()
    mapping: dict[str, str] = {}
    uniq = pd.unique(files)
    resolved = (
        resolve_image_paths(uniq, dirs, ps.name)
        if warn_ambiguous
        else {n: p for n in uniq if (p := resolve_image_path(n, dirs)) is not None}
    )
    for name in uniq:
        found = resolved.get(name)
        if found is None:
            mapping[name] = name
            continue
        if dest is None:
            mapping[name] = found.resolve().as_posix()
            continue
        try:
            mapping[name] = Path(os.path.relpath(found.resolve(), dest)).as_posix()
        except ValueError:
            mapping[name] = found.resolve().as_posix()
    new_files = pd.Series(files).map(mapping).to_numpy(dtype=object)
    ps.particles["rlnImageName"] = [f"{n:06d}@{f}" for n, f in zip(numbers, new_files, strict=True)]
