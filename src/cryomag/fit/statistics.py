"""Sufficient statistics of the linearised forward model, accumulated per chunk of particles.

For particle p of an optics group, with the current magnification M0 and its contrast scale
profiled out, the model is

    Y_p(k) ~ s_p P_p(k) + sum_ab Delta_ab G_p,ab(k),   M = M0 + Delta,

where P_p = amp * C_p(k) * V(A_p^T (M0 k, 0)) * exp(2 pi i k.t_p) is the unit-scale prediction
(amp = det(M0) (a_ref / a_g)^2, the CTF C_p held fixed as the input measured it) and
G_p,ab = s_p amp C_p exp(2 pi i k.t_p) dV/du_a (M0 k) k_b its derivative with respect to the
element (a, b) of M. With noise weights w(k) = 1 / sigma^2(|k|) (per optics group, from the
residual power of the previous pass) each particle contributes the small normal-equation
blocks below; every later fit (global per group, per micrograph, per particle, defocus model)
uses only these blocks, never the images again. Parameters are ordered
(Delta00, Delta01, Delta10, Delta11). Sums run over independent Fourier pixels (half plane,
self-conjugate duplicates dropped) in the band kmin <= |k| <= kmax. They are formed in
float32 by :mod:`cryomag.fit.accumulate` and stored in float64.

Per particle (arrays of length N):
    npix    number of pixels used
    yy      sum w |Y|^2
    pp      sum w |P|^2
    py      sum w Re(conj(P) Y)          (s_hat = py / pp, the closed-form scale)
    rr      sum w |Y - s_hat P|^2
    hpg     sum w Re(conj(P) G_ab)       shape (N, 4)
    hgg     sum w Re(conj(G_ab) G_cd)    shape (N, 4, 4)
    bg      sum w Re(conj(G_ab) r)       shape (N, 4), r = Y - s_hat P

With ``extended`` statistics (local particle fits requested) the blocks have 8 columns: 0..3
as above, 4..7 the derivatives through the CTF's defocus term (a particle whose CTF moves
with its own magnification); the group fit uses the first 4. With defocus statistics (the
defocus refined, :mod:`cryomag.fit.defocus`) 3 more columns follow: the derivatives with
respect to the particle's defocus matrix (a00, a01, a11) in the frame of the CTF's defocus
term (7 or 11 columns in all; :func:`column_layout`). A box-periodic pass that searched each
particle's defocus (:mod:`cryomag.fit.defocus_profile`) also has
    dz_profile  the best isotropic defocus change (A) and the curvature of rr / 2 there,
                shape (N, 2); zeros in every other pass.
A pass with defocus columns also has the residual's part of the second derivative of rr / 2
through the CTF's phase (a term Gauss-Newton leaves out; :func:`cryomag.fit.defocus.solve_joint`):
    chi_curv    s sum w g_i g_j Re(conj(P) r), g_i = d chi / d theta_i for the joint fit's
                parameters theta = (M00, M01, M10, M11, a00, a01, a11) (M through the Cs
                term), shape (N, 7, 7); (N, 0, 0) without defocus columns.
Every pass also says, per particle, whether its Gauss-Newton matrix was estimated:
    matrix_estimated  bool (N,): hpg, hgg (and jp, jj, and jy through s jp) are the lean
                matrix's regression estimate, not the particle's own sums
                (:attr:`cryomag.fit.accumulate.KernelOptions.lean_hessian`: the group fit's
                window-aware full passes, every particle but every fourth); the group's
                totals are unbiased, a single particle's matrix is off by a few per cent.

Second order (full passes of the group fit; size 0 in the second axis otherwise), unit
scale, for the group model's J_i = dP/dM_i and K_ij = d2P/dM_i dM_j:
    jp      sum w Re(conj(P) J_i)        shape (N, 4)
    jy      sum w Re(conj(J_i) Y)        shape (N, 4)
    jj      sum w Re(conj(J_i) J_j)      shape (N, 4, 4)
    kyy     sum w Re(conj(K_ij) Y)       shape (N, 4, 4)
    kp      sum w Re(conj(K_ij) P)       shape (N, 4, 4)
    jk      sum w Re(conj(J_e) K_ij)     shape (N, 4, 4, 4)
With them Gauss-Newton re-linearises at a new M without another pass
(:mod:`cryomag.fit.relinearise`).

Per group and radial shell (for the noise model and plots): sum |r|^2, sum |Y|^2,
sum |s P|^2, pixel count. Per group and rfft pixel (for the displacement-field plot):
sum Re(conj(h) h^T) (3 unique) and sum Re(conj(h) r) (2), h = s amp C phase dV/du; only
in a fit's first pass, which the plot shows (later passes: no pixels).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import numpy as np

from cryomag.physics.fourier import rfft_freqs

PARTICLE_FIELDS = (
    "npix", "yy", "pp", "py", "rr", "hpg", "hgg", "bg", "dz_profile", "chi_curv",
    "matrix_estimated",
)  # fmt: skip
#: Second-order statistics of the group model (cryomag.fit.relinearise); shape (N, 0, ...)
#: when a pass did not compute them.
SECOND_ORDER_FIELDS = ("jp", "jy", "jj", "kyy", "kp", "jk")
_SECOND_ORDER_SHAPES = {"jp": (4,), "jy": (4,), "jj": (4, 4), "kyy": (4, 4), "kp": (4, 4),
                        "jk": (4, 4, 4)}  # fmt: skip
SUMMED_FIELDS = ("shell_rr", "shell_yy", "shell_ss", "shell_n", "pix_a", "pix_b", "pix_aberr")


def column_layout(ncol: int, n_aberration: int = 0) -> dict[str, slice | None]:
    """Which columns of hpg, hgg and bg hold what, for statistics with ``ncol`` columns.

    Parameters
    ----------
    ncol : int
        Columns of the statistics.
    n_aberration : int
        Of which the last ``n_aberration`` are group-level aberration parameters
        (:mod:`cryomag.fit.aberrations`; only in the passes of a fit that refines them, see
        :meth:`GroupStatistics.without_aberrations`).

    Returns
    -------
    dict
        ``"mag"``: the 4 elements of M (always 0:4); ``"mag_ctf"``: their derivative through
        the CTF's defocus term (4:8) or None; ``"defocus"``: the defocus matrix (a00, a01,
        a11) (3 columns after those) or None; ``"aberration"``: the aberration parameters
        (the last ``n_aberration``) or None.
    """
    base = ncol - int(n_aberration)
    if base not in (4, 7, 8, 11) or n_aberration < 0:
        raise ValueError(
            f"statistics with {ncol} columns ({n_aberration} of aberrations): expected 4, 7, "
            "8 or 11 besides those"
        )
    return {
        "mag": slice(0, 4),
        "mag_ctf": slice(4, 8) if base >= 8 else None,
        "defocus": slice(base - 3, base) if base in (7, 11) else None,
        "aberration": slice(base, ncol) if n_aberration else None,
    }


#: The rows of ``pix_aberr``, per band pixel, summed over the group's particles (s the
#: particle's scale, P its unit-scale prediction, V the slice, C' = dCTF/dchi, r = Y - s P;
#: RELION's per-pixel phase- and amplitude-error estimates, cryomag.report.plots_aberrations):
#: odd: sum w s Im(conj(P) Y) and sum w s^2 |P|^2 (their ratio: the phase error, rad);
#: even: sum w s Re(conj(C' V) r) and sum w s^2 |C' V|^2 (their ratio: the error of chi, rad).
ABERRATION_MAPS = ("odd_num", "odd_den", "even_num", "even_den")


def empty_second_order(n: int) -> dict[str, np.ndarray]:
    """Placeholders (size 0 in the second axis) for statistics without second order."""
    return {f: np.zeros((n, 0) + shp[1:]) for f, shp in _SECOND_ORDER_SHAPES.items()}


@dataclass
class Band:
    """Frequency band and pixel selection for one optics group.

    Attributes
    ----------
    box : int
        Particle box (px).
    pixel_size_A : float
        Declared pixel size (A).
    kmin, kmax : float
        Band limits in 1/A.
    n_shells : int
        Radial shells for the noise model (uniform in |k| up to Nyquist).
    """

    box: int
    pixel_size_A: float
    kmin: float
    kmax: float
    n_shells: int = 0
    mask: np.ndarray = field(init=False, repr=False)
    kx: np.ndarray = field(init=False, repr=False)
    ky: np.ndarray = field(init=False, repr=False)
    shell: np.ndarray = field(init=False, repr=False)
    shell_all: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        kx, ky = rfft_freqs(self.box, self.pixel_size_A)
        k = np.hypot(kx, ky)
        # independent pixels: drop the ky < 0 half of the self-conjugate columns kx = 0 and
        # (even box) kx = Nyquist
        indep = np.ones_like(k, dtype=bool)
        indep[:, 0] = ky[:, 0] >= 0
        if self.box % 2 == 0:
            indep[:, -1] = ky[:, -1] >= 0
            indep[self.box // 2, :] &= kx[self.box // 2, :] > 0  # ky = -Nyquist row duplicates
        indep[0, 0] = False  # DC carries no shape information
        self.mask = indep & (k >= self.kmin) & (k <= self.kmax)
        self.kx = kx[self.mask]
        self.ky = ky[self.mask]
        if self.n_shells <= 0:
            self.n_shells = self.box // 2
        self.shell_all = self.shell_index(k)
        self.shell = self.shell_all[self.mask]

    def shell_index(self, k: np.ndarray) -> np.ndarray:
        """The radial shell of frequencies |k| (1/A), on any grid: n_shells shells up to the
        particle's Nyquist, the last (n_shells) holding everything beyond."""
        nyq = 0.5 / self.pixel_size_A
        return np.minimum((np.asarray(k) / nyq * self.n_shells).astype(int), self.n_shells)

    @property
    def npix(self) -> int:
        return int(self.mask.sum())

    def shell_centres(self) -> np.ndarray:
        """Centre frequency (1/A) of each radial shell, shape (n_shells + 1,)."""
        nyq = 0.5 / self.pixel_size_A
        return (np.arange(self.n_shells + 1) + 0.5) * nyq / self.n_shells


@dataclass
class _StatisticsArrays:
    """The arrays of the statistics (see the module docstring), shared by chunk and group."""

    rows: np.ndarray
    npix: np.ndarray
    yy: np.ndarray
    pp: np.ndarray
    py: np.ndarray
    rr: np.ndarray
    hpg: np.ndarray
    hgg: np.ndarray
    bg: np.ndarray
    shell_rr: np.ndarray
    shell_yy: np.ndarray
    shell_ss: np.ndarray
    shell_n: np.ndarray
    #: (3, npix_band): A00, A01, A11 per band pixel, and (2, npix_band): b0, b1, summed over
    #: the particles (the displacement plot); (3, 0) and (2, 0) in the passes after a fit's
    #: first (:attr:`cryomag.fit.accumulate.KernelOptions.pixel_maps`).
    pix_a: np.ndarray
    pix_b: np.ndarray
    jp: np.ndarray | None = None
    jy: np.ndarray | None = None
    jj: np.ndarray | None = None
    kyy: np.ndarray | None = None
    kp: np.ndarray | None = None
    jk: np.ndarray | None = None
    #: (4, npix_band) with aberrations fitted (else size 0): the per-pixel sums of the
    #: phase-error and amplitude-error maps (:data:`ABERRATION_MAPS`).
    pix_aberr: np.ndarray | None = None
    #: (N, 2) the defocus search of a box-periodic pass (:mod:`cryomag.fit.defocus_profile`):
    #: each particle's best isotropic defocus change from the pass's state (A) and the
    #: curvature of rr / 2 there; zeros where not searched.
    dz_profile: np.ndarray | None = None
    #: (N, 7, 7) the residual's term of the second derivative through the CTF's phase
    #: (module docstring); (N, 0, 0) without defocus columns.
    chi_curv: np.ndarray | None = None
    #: (N,) bool: the particle's matrix (hpg, hgg, jp, jj) is the lean matrix's estimate
    #: (module docstring); all False in older statistics files.
    matrix_estimated: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.rows)
        for f, v in empty_second_order(n).items():
            if getattr(self, f) is None:
                setattr(self, f, v)
        if self.pix_aberr is None:
            self.pix_aberr = np.zeros(0)
        if self.dz_profile is None:
            self.dz_profile = np.zeros((n, 2))
        if self.chi_curv is None:
            self.chi_curv = np.zeros((n, 0, 0))
        if self.matrix_estimated is None:
            self.matrix_estimated = np.zeros(n, bool)

    @property
    def layout(self) -> dict[str, slice | None]:
        """The column layout of hpg, hgg, bg (:func:`column_layout`)."""
        return column_layout(self.hgg.shape[-1])

    def as_arrays(self) -> dict[str, np.ndarray]:
        """All fields as a dict of arrays (the storage format, :mod:`cryomag.io.stats`)."""
        return {f: getattr(self, f) for f in self.__dataclass_fields__}

    def take(self, order: np.ndarray) -> Self:
        """The same statistics with the particles ``order`` (indices into these statistics'
        particles: a new order or a subset; the summed fields unchanged), of the same type."""
        per = PARTICLE_FIELDS + (SECOND_ORDER_FIELDS if len(self.jk) == len(self.rows) else ())
        out = self.as_arrays()
        out.update({f: out[f][order] for f in per})
        out["rows"] = self.rows[order]
        return type(self)(**out)


@dataclass
class ChunkStatistics(_StatisticsArrays):
    """Statistics of one chunk (see module docstring); rows are particle indices ``rows``."""

    @classmethod
    def from_blocks(cls, blocks: list[dict], rows: np.ndarray) -> ChunkStatistics:
        """Concatenate per-particle fields of blocks (dicts) and sum the rest."""
        per = {f: np.concatenate([q[f] for q in blocks]) for f in PARTICLE_FIELDS}
        if all("jk" in q for q in blocks):
            per.update({f: np.concatenate([q[f] for q in blocks]) for f in SECOND_ORDER_FIELDS})
        summed = {f: sum(q[f] for q in blocks) for f in SUMMED_FIELDS}
        return cls(rows=np.asarray(rows), **per, **summed)

    @classmethod
    def concatenate(cls, parts: list[ChunkStatistics], rows: np.ndarray) -> ChunkStatistics:
        """The statistics of consecutive sub-chunks as one chunk."""
        return cls.from_blocks([p.__dict__ for p in parts], rows)


@dataclass
class GroupStatistics(_StatisticsArrays):
    """Statistics of every particle of one optics group, reduced from its chunks.

    Per-particle arrays follow the order of ``rows`` (sorted). Shell and pixel arrays are
    summed over the group in a fixed (row) order, in float64.
    """

    @property
    def has_second_order(self) -> bool:
        """Whether the pass accumulated the second-order statistics (every particle)."""
        return self.jk.shape[1:] == (4, 4, 4) and len(self.jk) == len(self.rows)

    @classmethod
    def reduce(cls, chunks: list[ChunkStatistics]) -> GroupStatistics:
        """Concatenate per-particle blocks and sum the rest, in the order of first rows."""
        chunks = sorted(chunks, key=lambda c: int(c.rows[0]) if len(c.rows) else -1)
        cat = {f: np.concatenate([getattr(c, f) for c in chunks]) for f in PARTICLE_FIELDS}
        if all(c.jk.shape[1:] == (4, 4, 4) for c in chunks):
            cat.update(
                {f: np.concatenate([getattr(c, f) for c in chunks]) for f in SECOND_ORDER_FIELDS}
            )
        rows = np.concatenate([c.rows for c in chunks])
        order = np.argsort(rows, kind="stable")
        summed = {}
        for f in SUMMED_FIELDS:
            acc = np.zeros_like(getattr(chunks[0], f), dtype=float)
            for c in chunks:
                acc = acc + getattr(c, f)
            summed[f] = acc
        return cls(rows=rows[order], **{f: v[order] for f, v in cat.items()}, **summed)

    def without_aberrations(self, n_aberration: int) -> GroupStatistics:
        """The same statistics without their last ``n_aberration`` columns (the aberration
        parameters of a pass that refines them): what every fit besides the group's joint
        step (local models, quality, the statistics store) reads. Itself when 0."""
        if not n_aberration:
            return self
        keep = self.hgg.shape[-1] - int(n_aberration)
        arrays = self.as_arrays()
        arrays["hpg"] = np.ascontiguousarray(self.hpg[:, :keep])
        arrays["bg"] = np.ascontiguousarray(self.bg[:, :keep])
        arrays["hgg"] = np.ascontiguousarray(self.hgg[:, :keep, :keep])
        return GroupStatistics(**arrays)

    def scale(self) -> np.ndarray:
        """Closed-form contrast scale per particle, s = py / pp, shape (N,)."""
        return np.where(self.pp > 0, self.py / np.where(self.pp > 0, self.pp, 1), np.nan)

    def chi2_per_pixel(self) -> float:
        """Weighted residual power per complex pixel (1 when the noise model is exact)."""
        return float(self.rr.sum() / max(self.npix.sum(), 1))

    def scale_error(self) -> np.ndarray:
        """Standard error of :meth:`scale` (complex noise: var = chi2 / (2 pp)), shape (N,)."""
        return np.sqrt(self.chi2_per_pixel() / (2 * np.maximum(self.pp, 1e-300)))

    def noise_power(self) -> np.ndarray:
        """Residual power per shell, E|r|^2; shells without pixels get the nearest value."""
        with np.errstate(invalid="ignore", divide="ignore"):
            pw = self.shell_rr / self.shell_n
        good = np.isfinite(pw) & (pw > 0)
        if not good.any():
            return np.ones_like(pw)
        idx = np.arange(len(pw))
        return np.interp(idx, idx[good], pw[good])



#: ``allocate(group, field, shape, dtype) -> array`` for the per-particle arrays of a group.
Allocator = Callable[[int, str, tuple, Any], np.ndarray]


def _allocate_in_memory(group: int, name: str, shape: tuple, dtype) -> np.ndarray:
    return np.empty(shape, dtype)


class StatisticsReducer:
    """Reduce a pass's chunk statistics per group as they arrive, in any order.

    Per-particle arrays are written into arrays allocated once per group (``allocate``: in
    memory by default, or memory-mapped files, so that the driver's memory does not grow with
    the number of particles); the summed arrays are added in the order of the chunks' first
    rows, holding back only chunks that finish ahead of an earlier one. The result is the
    same, bit for bit, as :meth:`GroupStatistics.reduce` of every chunk's statistics.

    Parameters
    ----------
    chunks : sequence of Chunk
        The chunks of the pass (``group``: the optics group number; ``rows``: sorted
        particle rows); within a group their row ranges must not interleave.
    allocate : callable, optional
        ``allocate(group, field, shape, dtype)``.
    """

    def __init__(self, chunks: Sequence[Any], allocate: Allocator | None = None) -> None:
        self._allocate = allocate or _allocate_in_memory
        by_group: dict[int, list] = {}
        for c in chunks:
            by_group.setdefault(int(c.group), []).append(c)
        self._groups: dict[int, dict] = {}
        for g, lst in by_group.items():
            lst = sorted(lst, key=lambda c: c.rows[0] if len(c.rows) else -1)
            rows = np.sort(np.concatenate([np.asarray(c.rows, int) for c in lst]))
            self._groups[g] = {
                "rows": rows,
                "order": [c.index for c in lst],  # chunk indices in first-row order
                "next": 0,
                "pending": {},  # chunk index -> summed arrays of its statistics
                "arrays": None,
                "second": True,
                "filled": 0,
                "sums": None,
            }

    def add(self, chunk: Any, result: list[ChunkStatistics]) -> None:
        """Take one chunk's statistics (``on_result`` of an executor's map)."""
        grp = self._groups[int(chunk.group)]
        parts = sorted(
            (st for st in result if len(st.rows)), key=lambda st: int(st.rows[0])
        )  # the halves of a chunk interleave: their first rows give reduce()'s order
        for st in parts:
            self._place(int(chunk.group), grp, st)
        grp["pending"][chunk.index] = [{f: getattr(st, f) for f in SUMMED_FIELDS} for st in parts]
        order = grp["order"]
        while grp["next"] < len(order) and order[grp["next"]] in grp["pending"]:
            for sums in grp["pending"].pop(order[grp["next"]]):
                if grp["sums"] is None:
                    grp["sums"] = {f: np.zeros_like(v, dtype=float) for f, v in sums.items()}
                for f, v in sums.items():
                    grp["sums"][f] = grp["sums"][f] + v
            grp["next"] += 1

    def _place(self, g: int, grp: dict, st: ChunkStatistics) -> None:
        n = len(grp["rows"])
        second = st.jk.shape[1:] == (4, 4, 4)
        if grp["arrays"] is None:
            names = PARTICLE_FIELDS + (SECOND_ORDER_FIELDS if second else ())
            grp["arrays"] = {
                f: self._allocate(g, f, (n,) + getattr(st, f).shape[1:], getattr(st, f).dtype)
                for f in names
            }
        grp["second"] = grp["second"] and second
        pos = np.searchsorted(grp["rows"], st.rows)
        for f, arr in grp["arrays"].items():
            if f in SECOND_ORDER_FIELDS and not second:
                continue
            arr[pos] = getattr(st, f)
        grp["filled"] += len(pos)

    def finish(self) -> dict[int, GroupStatistics]:
        """The statistics of every group (by optics group number)."""
        out = {}
        for g, grp in self._groups.items():
            if grp["next"] != len(grp["order"]) or grp["filled"] != len(grp["rows"]):
                raise RuntimeError(
                    f"optics group {g}: {grp['filled']} of {len(grp['rows'])} particles "
                    "reduced; a chunk result is missing"
                )
            arrays = dict(grp["arrays"])
            if not grp["second"]:
                for f in SECOND_ORDER_FIELDS:
                    arrays.pop(f, None)
            out[g] = GroupStatistics(rows=grp["rows"], **arrays, **grp["sums"])
        return out
