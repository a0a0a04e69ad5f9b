"""The statistics store of a run: the one owner of how statistics live on disk.

``cryomag estimate`` keeps, per optics group, the sufficient statistics of its last pass
(:mod:`cryomag.fit.statistics`) so that ``cryomag refit`` can fit the local models again
without reading an image. Layout of ``OUT/stats``:

``group_NNN.npz`` (NNN = optics group number)
    every array of :class:`~cryomag.fit.statistics.GroupStatistics` under its field name,
    plus ``mag`` (the fitted M, (2, 2)), ``mag_in`` (the input's M), ``mag_lin`` (the M the
    statistics were linearised at), ``group`` (the number), ``defocus_mean_A`` (the mean
    defocus of each particle as the run's CTF gives it -- the refined one when the defocus was
    refined --, A, shape (N,)) and, with the defocus refined, ``defocus_deviation`` (N, k),
    ``defocus_prior`` (k, k) and ``defocus_last_step`` (N, 3), each particle's defocus change
    (a00, a01, a11, A) in the step after the statistics' pass
    (:class:`cryomag.fit.defocus.JointSolution`; runs before it have none: no change).
``options.json``
    the options of the run (as in results.json).

While a run lasts, the per-particle arrays of each pass are reduced into memory-mapped
``.npy`` files under ``OUT/.chunks/reduced`` (:func:`scratch_allocator`), so that the driver's
memory does not grow with the number of particles; the checkpoints of the chunks use the same
field names (:class:`StatisticsCodec`).
"""

from __future__ import annotations

import itertools
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cryomag.io.atomic import ParticleFileError, atomic_write, read_json, write_json

__all__ = [
    "StatisticsCodec",
    "load_group",
    "load_run",
    "read_options",
    "save_group",
    "scratch_allocator",
    "write_options",
]

#: Arrays stored beside the statistics in group_NNN.npz (the last three only when the
#: defocus was refined: the particles' deviations from their micrograph, their prior
#: covariance and the last step's defocus change).
EXTRA_FIELDS = (
    "mag", "mag_in", "mag_lin", "group", "defocus_mean_A", "defocus_deviation", "defocus_prior",
    "defocus_last_step",
)


def group_path(folder: str | os.PathLike, group: int) -> Path:
    """``folder/group_NNN.npz`` of optics group number ``group``."""
    return Path(folder) / f"group_{int(group):03d}.npz"


def save_group(path: str | os.PathLike, stats, **extras: np.ndarray) -> Path:
    """Write one group's statistics and ``extras`` (see module docstring) atomically."""
    path = Path(path)
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **stats.as_arrays(), **extras)
    return path


def load_group(path: str | os.PathLike):
    """One group's statistics and the extra arrays stored with them.

    Returns
    -------
    stats : GroupStatistics
    extras : dict of str to ndarray
        Those of :data:`EXTRA_FIELDS` present in the file.

    Raises
    ------
    ParticleFileError
        Missing, truncated or foreign file, or missing arrays (the message names the file).
    """
    from cryomag.fit.statistics import SECOND_ORDER_FIELDS, GroupStatistics

    path = Path(path)
    required = [
        f
        for f in GroupStatistics.__dataclass_fields__
        if f not in SECOND_ORDER_FIELDS and f not in OPTIONAL_FIELDS
    ]
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [f for f in required if f not in z.files]
            if missing:
                raise ParticleFileError(
                    f"{path}: not a cryomag statistics file (missing arrays {missing})"
                )
            arrays = {f: z[f] for f in required}
            arrays.update({f: z[f] for f in SECOND_ORDER_FIELDS if f in z.files})
            arrays.update({f: z[f] for f in OPTIONAL_FIELDS if f in z.files})
            extras = {f: z[f] for f in EXTRA_FIELDS if f in z.files}
    except FileNotFoundError:
        raise ParticleFileError(f"{path}: statistics file not found") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise ParticleFileError(
            f"{path}: unreadable statistics file ({exc}); it is truncated or not written by "
            "cryomag estimate: run the estimate again"
        ) from None
    n = len(arrays["rows"])
    bad = [f for f, v in arrays.items() if f not in SUMMED_SHAPES and len(v) != n]
    if bad:
        raise ParticleFileError(f"{path}: arrays {bad} do not have one entry per particle ({n})")
    return GroupStatistics(**arrays), extras


#: Arrays of GroupStatistics that are sums over the group (not one entry per particle).
SUMMED_SHAPES = ("shell_rr", "shell_yy", "shell_ss", "shell_n", "pix_a", "pix_b", "pix_aberr")
#: Arrays a statistics file may lack (written by older versions).
OPTIONAL_FIELDS = ("pix_aberr", "dz_profile", "chi_curv", "matrix_estimated")


def write_options(folder: str | os.PathLike, options: dict) -> Path:
    """``folder/options.json``: the run's options."""
    return write_json(Path(folder) / "options.json", options)


def read_options(run: str | os.PathLike) -> dict:
    """The options of a run (``RUN/stats/options.json``); {} for runs that have none."""
    path = Path(run) / "stats" / "options.json"
    if not path.is_file():
        return {}
    return read_json(path, "the options of a cryomag estimate run")


def load_run(run: str | os.PathLike, group_numbers) -> tuple[dict, dict, dict]:
    """Statistics, matrices and input defocus per optics group number from ``RUN/stats``.

    Returns
    -------
    stats : dict of int to GroupStatistics
    mags : dict of int to (M_in, M_lin, M)
    defocus : dict of int to dict
        ``"mean_A"``: mean defocus per particle (A) or None; with the defocus refined also
        ``"deviation"``, ``"prior"`` and ``"last_step"`` (None for runs before it).
    """
    folder = Path(run) / "stats"
    if not folder.is_dir():
        raise ParticleFileError(f"{folder}: no stored statistics (run cryomag estimate first)")
    stats, mags, dz = {}, {}, {}
    for num in group_numbers:
        path = group_path(folder, num)
        if not path.exists():
            continue
        st, ex = load_group(path)
        if not {"mag", "mag_in", "mag_lin"} <= set(ex):
            raise ParticleFileError(f"{path}: the matrices mag, mag_in, mag_lin are missing")
        stats[int(num)] = st
        mags[int(num)] = (ex["mag_in"], ex["mag_lin"], ex["mag"])
        dz[int(num)] = {
            "mean_A": ex.get("defocus_mean_A"),
            "deviation": ex.get("defocus_deviation"),
            "prior": ex.get("defocus_prior"),
            "last_step": ex.get("defocus_last_step"),
        }
    if not stats:
        raise ParticleFileError(f"{folder}: no group_NNN.npz files for the run's optics groups")
    return stats, mags, dz


def scratch_allocator(folder: str | os.PathLike) -> Callable[[], Callable]:
    """A factory of allocators of memory-mapped arrays in ``folder`` (one per pass).

    ``scratch_allocator(folder)()`` returns ``allocate(group, field, shape, dtype)`` for
    :class:`cryomag.fit.statistics.StatisticsReducer`; each call of the factory starts a new
    pass's files (``pass_NNN_gGGG_FIELD.npy``). The files live until the folder is removed.
    """
    folder = Path(folder)
    counter = itertools.count(1)

    def new_pass():
        n = next(counter)

        def allocate(group: int, name: str, shape: tuple, dtype) -> np.ndarray:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"pass_{n:03d}_g{int(group):03d}_{name}.npy"
            # a plain ndarray view: arithmetic on it gives ndarrays, not memmaps
            return np.asarray(np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape))

        return allocate

    return new_pass


class StatisticsCodec:
    """Chunk results of a statistics pass (lists of ChunkStatistics) <-> named arrays, for
    the checkpoints (:mod:`cryomag.execution.checkpoint`)."""

    def encode(self, result: list) -> tuple[dict[str, np.ndarray], dict]:
        arrays = {}
        for i, st in enumerate(result):
            arrays.update({f"{i}.{k}": np.asarray(v) for k, v in st.as_arrays().items()})
        return arrays, {"n": len(result)}

    def decode(self, arrays: dict[str, np.ndarray], meta: dict) -> list:
        from cryomag.fit.statistics import ChunkStatistics

        out = []
        for i in range(int(meta["n"])):
            pre = f"{i}."
            fields = {k[len(pre) :]: v for k, v in arrays.items() if k.startswith(pre)}
            out.append(ChunkStatistics(**fields))
        return out
