"""A deterministic, protein-like phantom made of Gaussian pseudo-atoms, with its exact Fourier
transform.

Density (arbitrary units per A^3), positions relative to the map centre::

    rho(x) = sum_j w_j G(x - r_j; sigma_j),   G(x; s) = (2 pi s^2)^(-3/2) exp(-|x|^2 / (2 s^2))

Each atom's Debye-Waller factor is B_j = 8 pi^2 sigma_j^2. The reference transform used
everywhere in cryomag is normalised for a reference voxel size ``a_ref``::

    V(k) = (1 / a_ref^3) sum_j w_j exp(-2 pi^2 sigma_j^2 |k|^2) exp(-2 pi i k . r_j)

which is the DFT (plain voxel sum, phase origin at the centre voxel N/2) of the map
``map(x) = rho(x)`` sampled on a grid of voxel size ``a_ref``, as long as rho is band-limited
to the grid's Nyquist cube. :meth:`Phantom.rasterize` produces exactly that band-limited map:
its DFT equals ``V`` at every grid frequency (the Nyquist planes excepted, see there).

Coordinates: positions and frequencies are (x, y, z); maps are indexed ``[z, y, x]`` and voxel
``(iz, iy, ix)`` sits at ``r = a (ix - N/2, iy - N/2, iz - N/2)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import finufft
import numpy as np
import scipy.fft as sfft

#: Above this many (atom, frequency) pairs the transforms use finufft instead of numpy.
_DIRECT_LIMIT = 2_000_000
_CHUNK = 4_000_000


def b_to_sigma(b_factor_A2: float | np.ndarray) -> np.ndarray:
    """Gaussian width sigma (A) of an isotropic B factor (A^2): sigma = sqrt(B / (8 pi^2))."""
    return np.sqrt(np.asarray(b_factor_A2, float) / (8 * np.pi**2))


@dataclass(frozen=True)
class Phantom:
    """Gaussian pseudo-atom model.

    Parameters
    ----------
    positions_A : ndarray, shape (n, 3)
        Atom centres (x, y, z) in A, relative to the map centre.
    sigma_A : ndarray, shape (n,)
        Gaussian standard deviation of each atom in A (B = 8 pi^2 sigma^2).
    weights : ndarray, shape (n,)
        Integrated density of each atom (e.g. its number of electrons).
    """

    positions_A: np.ndarray
    sigma_A: np.ndarray
    weights: np.ndarray

    def __post_init__(self) -> None:
        pos = np.ascontiguousarray(self.positions_A, dtype=float)
        sig = np.ascontiguousarray(self.sigma_A, dtype=float).reshape(-1)
        w = np.ascontiguousarray(self.weights, dtype=float).reshape(-1)
        if pos.ndim != 2 or pos.shape[1] != 3:
            raise ValueError(f"positions_A must have shape (n, 3), got {pos.shape}")
        if sig.shape != (len(pos),) or w.shape != (len(pos),):
            raise ValueError(
                f"sigma_A {sig.shape} and weights {w.shape} must have shape ({len(pos)},)"
            )
        if np.any(sig <= 0):
            raise ValueError("sigma_A must be > 0")
        object.__setattr__(self, "positions_A", pos)
        object.__setattr__(self, "sigma_A", sig)
        object.__setattr__(self, "weights", w)

    # ----------------------------------------------------------------- building
    @classmethod
    def default(
        cls,
        diameter_A: float = 110.0,
        n_atoms: int = 4000,
        seed: int = 0,
        b_factors_A2: tuple[float, float, float] = (20.0, 30.0, 40.0),
    ) -> Phantom:
        """A compact, non-symmetric, protein-like globule.

        Construction (deterministic given ``seed``): the envelope is the union of three
        ellipsoids of different sizes and orientations (a large body and two smaller lobes),
        scaled so that its largest extent is about ``diameter_A``. Half of the atoms form
        "backbone" chains: self-avoiding random walks with 3.8 A steps and some persistence,
        confined to the envelope (a new chain starts from a random existing bead when a walk is
        stuck). Each backbone bead carries one "side" atom 1.5-2.5 A away. All atoms are at
        least 1.5 A apart, backbone beads at least 3.6 A (non-bonded). Weights are drawn as
        C/N/O/S-like (6, 7, 8, 16 electrons; backbone beads are 6 or 7). B factors grow from the
        core to the surface in three classes (``b_factors_A2``, default 20/30/40 A^2, i.e.
        sigma = 0.50/0.62/0.71 A); few distinct widths keep the projections fast.

        Parameters
        ----------
        diameter_A : float
            Approximate largest extent of the envelope in A.
        n_atoms : int
            Number of pseudo-atoms (even numbers give exactly ``n_atoms``).
        seed : int
            Random seed.
        b_factors_A2 : tuple of 3 floats
            B factors of the core, middle and surface shells.

        Returns
        -------
        Phantom
        """
        if n_atoms < 2:
            raise ValueError("n_atoms must be >= 2")
        rng = np.random.default_rng(seed)
        env = _Envelope.make(rng, diameter_A)
        pos, is_backbone = _grow_chains(rng, env, n_atoms)
        pos = pos - pos.mean(axis=0)
        n = len(pos)
        weights = np.where(
            is_backbone,
            rng.choice([6.0, 7.0], size=n, p=[0.7, 0.3]),
            rng.choice([6.0, 7.0, 8.0, 16.0], size=n, p=[0.5, 0.2, 0.25, 0.05]),
        )
        radius = np.linalg.norm(pos, axis=1)
        rel = radius / radius.max()
        cls_idx = np.digitize(rel, [0.55, 0.8])
        sigma = b_to_sigma(np.asarray(b_factors_A2, float))[cls_idx]
        return cls(pos, sigma, weights)

    # ---------------------------------------------------------------- properties
    @property
    def n_atoms(self) -> int:
        return len(self.positions_A)

    @property
    def b_factors_A2(self) -> np.ndarray:
        """B = 8 pi^2 sigma^2 per atom, shape (n,)."""
        return 8 * np.pi**2 * self.sigma_A**2

    def sigma_classes(self) -> tuple[np.ndarray, np.ndarray]:
        """Distinct atom widths and each atom's class.

        Returns
        -------
        sigmas : ndarray, shape (c,)
        index : ndarray of int, shape (n,)
            ``sigmas[index] == sigma_A``.
        """
        sigmas, index = np.unique(self.sigma_A, return_inverse=True)
        return sigmas, index.reshape(-1)

    def class_strengths(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-class strengths for transforms that share the atom positions.

        Returns
        -------
        sigmas : ndarray, shape (c,)
        strengths : ndarray, shape (c, n)
            ``strengths[c, j] = w_j`` if atom j has width ``sigmas[c]``, else 0.
        """
        sigmas, index = self.sigma_classes()
        strengths = np.zeros((len(sigmas), self.n_atoms))
        strengths[index, np.arange(self.n_atoms)] = self.weights
        return sigmas, strengths

    def radius_A(self, n_sigma: float = 4.0) -> float:
        """Radius (A) of the ball around the centre that holds every atom to ``n_sigma``."""
        return float(np.max(np.linalg.norm(self.positions_A, axis=1) + n_sigma * self.sigma_A))

    # ------------------------------------------------------------------ transforms
    def fourier(
        self, k3: np.ndarray, pixel_size_A: float, eps: float = 1e-12, nthreads: int = 1
    ) -> np.ndarray:
        """Analytic 3D Fourier transform V(k), normalised for a reference voxel size.

        Parameters
        ----------
        k3 : ndarray, shape (m, 3) or (3,)
            Frequencies (kx, ky, kz) in 1/A.
        pixel_size_A : float
            Reference voxel size a_ref (A); V is divided by a_ref^3.
        eps : float
            Relative tolerance of finufft when it is used (large problems).
        nthreads : int
            finufft threads.

        Returns
        -------
        ndarray, complex, shape (m,) (or scalar for a single frequency)
        """
        k = np.asarray(k3, float)
        single = k.ndim == 1
        k = k.reshape(-1, 3)
        sigmas, strengths = self.class_strengths()
        parts = self._class_sums(k, strengths, eps, nthreads)  # (c, m)
        k2 = np.einsum("mi,mi->m", k, k)
        env = np.exp(-2 * np.pi**2 * sigmas[:, None] ** 2 * k2[None, :])
        out = np.einsum("cm,cm->m", env, parts) / pixel_size_A**3
        return out[0] if single else out

    def fourier_gradient(
        self, k3: np.ndarray, pixel_size_A: float, eps: float = 1e-12, nthreads: int = 1
    ) -> np.ndarray:
        """Gradient dV/dk of :meth:`fourier` (complex), in A^-2 per (1/A) i.e. units of V times A.

        dV/dk = (1/a^3) sum_j w_j e^{-2 pi^2 s_j^2 |k|^2} e^{-2 pi i k.r_j}
        (-4 pi^2 s_j^2 k - 2 pi i r_j).

        Parameters
        ----------
        k3 : ndarray, shape (m, 3)
            Frequencies in 1/A.
        pixel_size_A, eps, nthreads
            As in :meth:`fourier`.

        Returns
        -------
        ndarray, complex, shape (m, 3)
        """
        k = np.asarray(k3, float).reshape(-1, 3)
        sigmas, strengths = self.class_strengths()
        c = len(sigmas)
        # strengths w_j and w_j * r_j (x, y, z) for every class: (4c, n)
        st = np.concatenate(
            [strengths] + [strengths * self.positions_A[:, d][None, :] for d in range(3)]
        )
        parts = self._class_sums(k, st, eps, nthreads).reshape(4, c, -1)
        k2 = np.einsum("mi,mi->m", k, k)
        env = np.exp(-2 * np.pi**2 * sigmas[:, None] ** 2 * k2[None, :])  # (c, m)
        plain = -4 * np.pi**2 * sigmas[:, None] ** 2 * env * parts[0]  # (c, m)
        grad = np.empty((len(k), 3), complex)
        for d in range(3):
            grad[:, d] = np.sum(plain * k[None, :, d] + env * (-2j * np.pi) * parts[1 + d], axis=0)
        return grad / pixel_size_A**3

    def _class_sums(
        self, k: np.ndarray, strengths: np.ndarray, eps: float, nthreads: int
    ) -> np.ndarray:
        """sum_j strengths[t, j] exp(-2 pi i k . r_j) for every row t, shape (t, m)."""
        r = self.positions_A
        m = len(k)
        ntr = len(strengths)
        if m == 0:
            return np.zeros((ntr, 0), complex)
        if m * self.n_atoms <= _DIRECT_LIMIT:
            out = np.empty((ntr, m), complex)
            step = max(1, _CHUNK // self.n_atoms)
            for i in range(0, m, step):
                ph = np.exp(-2j * np.pi * (k[i : i + step] @ r.T))  # (chunk, n)
                out[:, i : i + step] = strengths @ ph.T
            return out
        plan = finufft.Plan(3, 3, n_trans=ntr, eps=eps, isign=-1, nthreads=nthreads)
        plan.setpts(
            r[:, 0].copy(),
            r[:, 1].copy(),
            r[:, 2].copy(),
            2 * np.pi * k[:, 0],
            2 * np.pi * k[:, 1],
            2 * np.pi * k[:, 2],
        )
        res = plan.execute(strengths.astype(complex))
        return res.reshape(ntr, m)

    def fourier_grid(self, box: int, pixel_size_A: float, nthreads: int = 1) -> np.ndarray:
        """V on the centred DFT grid of a ``box``^3 map, computed exactly (finufft type 1).

        Parameters
        ----------
        box : int
            Map size N (voxels).
        pixel_size_A : float
            Voxel size a (A); also the normalisation a_ref.

        Returns
        -------
        ndarray, complex, shape (N, N, N)
            ``out[iz, iy, ix] = V(k)``, ``k = (ix - N//2, iy - N//2, iz - N//2) / (N a)``.
        """
        n = int(box)
        extent = n * pixel_size_A
        sigmas, strengths = self.class_strengths()
        r = self.positions_A
        plan = finufft.Plan(
            1, (n, n, n), n_trans=len(sigmas), eps=1e-13, isign=-1, nthreads=nthreads
        )
        # phase 2 pi k.r with k = m / extent; finufft wraps coordinates periodically.
        plan.setpts(*(2 * np.pi * r[:, d] / extent for d in (2, 1, 0)))
        parts = plan.execute(strengths.astype(complex)).reshape(len(sigmas), n, n, n)
        m = (np.arange(n) - n // 2) / extent
        k2 = m[:, None, None] ** 2 + m[None, :, None] ** 2 + m[None, None, :] ** 2
        out = np.zeros((n, n, n), complex)
        for c, s in enumerate(sigmas):
            out += np.exp(-2 * np.pi**2 * s**2 * k2) * parts[c]
        return out / pixel_size_A**3

    def rasterize(self, box: int, pixel_size_A: float, nthreads: int = 1) -> np.ndarray:
        """The band-limited map whose DFT is V at every grid frequency.

        map = real(IDFT(V on the grid)) with the phase origin at voxel N/2. Because the
        Nyquist planes (index -N/2 of an even N) have no partner frequency, their Fourier value
        becomes the Hermitian part (V(k) + conj(V(-k)))/2 folded onto one plane; everywhere else
        the map's DFT equals V exactly (to rounding). Values are density per A^3 (the same units
        as rho), so that ``V_map = DFT(map) = V`` with the 1/a^3 normalisation.

        Parameters
        ----------
        box : int
            Map size N.
        pixel_size_A : float
            Voxel size (A).

        Returns
        -------
        ndarray, float32, shape (N, N, N), indexed [z, y, x]

        Raises
        ------
        ValueError
            If the phantom does not fit in the box (it would wrap around).
        """
        half = box * pixel_size_A / 2
        if self.radius_A() > half:
            raise ValueError(
                f"phantom radius {self.radius_A():.1f} A does not fit in a box of {box} x "
                f"{pixel_size_A} A (half width {half:.1f} A); use a larger box"
            )
        v = self.fourier_grid(box, pixel_size_A, nthreads=nthreads)
        vol = sfft.fftshift(sfft.ifftn(sfft.ifftshift(v), workers=-1).real)
        return vol.astype(np.float32)

    def write_map(
        self, path: str | os.PathLike, box: int, pixel_size_A: float, nthreads: int = 1
    ) -> np.ndarray:
        """Write :meth:`rasterize` as an MRC file (mode 2, voxel size set, origin 0).

        Returns the map written, shape (N, N, N).
        """
        vol = self.rasterize(box, pixel_size_A, nthreads=nthreads)
        write_mrc_map(path, vol, pixel_size_A)
        return vol


def map_fourier(
    volume: np.ndarray, pixel_size_A: float, k3: np.ndarray, eps: float = 1e-12, nthreads: int = 1
) -> np.ndarray:
    """Trigonometric-polynomial transform of a map at arbitrary frequencies.

    V_map(k) = sum_x map(x) exp(-2 pi i k . x), x = a (ix - N/2, iy - N/2, iz - N/2) (a plain
    voxel sum; finufft type 2 3D). At grid frequencies this is the map's DFT.

    Parameters
    ----------
    volume : ndarray, shape (N, N, N), indexed [z, y, x]
    pixel_size_A : float
    k3 : ndarray, shape (m, 3)
        (kx, ky, kz) in 1/A, each component within +-1.5 / a.

    Returns
    -------
    ndarray, complex, shape (m,)
    """
    k = np.asarray(k3, float).reshape(-1, 3)
    a = float(pixel_size_A)
    return finufft.nufft3d2(
        2 * np.pi * a * k[:, 2],
        2 * np.pi * a * k[:, 1],
        2 * np.pi * a * k[:, 0],
        np.asarray(volume, dtype=complex),
        isign=-1,
        eps=eps,
        nthreads=nthreads,
    )


def interpolation_deviation(
    phantom: Phantom,
    box: int,
    pixel_size_A: float,
    n_shells: int = 10,
    n_per_shell: int = 3000,
    seed: int = 0,
    volume: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """How far the rasterised map's off-grid transform V_map(k) is from the analytic V(k).

    Random frequencies, uniform in direction and in |k| within each of ``n_shells`` shells
    between 0 and Nyquist 1/(2a), are drawn; the relative rms deviation
    ``sqrt(sum |V_map - V|^2 / sum |V|^2)`` is returned per shell. At grid frequencies the two
    agree exactly (see :meth:`Phantom.rasterize`); between them V_map is the trigonometric
    (Dirichlet) interpolation of the grid values, which misses the spectrum beyond the Nyquist
    cube and the periodic images.

    Returns
    -------
    k_centres : ndarray, shape (n_shells,)
        Shell centres in units of Nyquist.
    rel_rms : ndarray, shape (n_shells,)
    """
    rng = np.random.default_rng(seed)
    vol = phantom.rasterize(box, pixel_size_A) if volume is None else volume
    k_nyq = 0.5 / pixel_size_A
    edges = np.linspace(0.0, 1.0, n_shells + 1)
    centres = 0.5 * (edges[:-1] + edges[1:])
    out = np.empty(n_shells)
    for i in range(n_shells):
        d = rng.normal(size=(n_per_shell, 3))
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        r = rng.uniform(edges[i], edges[i + 1], n_per_shell) * k_nyq
        k = d * r[:, None]
        vm = map_fourier(vol, pixel_size_A, k)
        va = phantom.fourier(k, pixel_size_A)
        out[i] = np.linalg.norm(vm - va) / np.linalg.norm(va)
    return centres, out


def write_mrc_map(path: str | os.PathLike, vol: np.ndarray, pixel_size_A: float) -> None:
    """Write a 3D map as MRC (float32, voxel size in the header, origin 0), atomically."""
    import mrcfile

    from cryomag.io.atomic import atomic_write

    with atomic_write(Path(path)) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.ascontiguousarray(vol, dtype=np.float32))
            mrc.voxel_size = float(pixel_size_A)
            mrc.header.origin = (0.0, 0.0, 0.0)
            mrc.header.nxstart = mrc.header.nystart = mrc.header.nzstart = 0
            mrc.update_header_stats()


# ---------------------------------------------------------------------- construction
@dataclass
class _Envelope:
    """Union of ellipsoids: centres (e, 3), rotation matrices (e, 3, 3), semi-axes (e, 3)."""

    centres: np.ndarray
    rots: np.ndarray
    axes: np.ndarray

    @classmethod
    def make(cls, rng: np.random.Generator, diameter_A: float) -> _Envelope:
        from scipy.spatial.transform import Rotation

        d = float(diameter_A)
        centres = np.array([[0.0, 0.0, 0.0], [0.22, 0.10, -0.04], [-0.12, 0.17, 0.15]]) * d
        axes = np.array([[0.30, 0.24, 0.21], [0.19, 0.15, 0.13], [0.16, 0.12, 0.15]]) * d
        rots = Rotation.random(3, random_state=rng).as_matrix()
        env = cls(centres, rots, axes)
        # rescale so that the largest extent is the requested diameter
        pts = env.sample(rng, 4000)
        span = _max_extent(pts)
        scale = d / span
        return cls(centres * scale, rots, axes * scale)

    def inside(self, p: np.ndarray) -> np.ndarray:
        """Boolean mask of points (m, 3) inside the union."""
        p = np.atleast_2d(p)
        ok = np.zeros(len(p), bool)
        for c, r, a in zip(self.centres, self.rots, self.axes, strict=True):
            q = (p - c) @ r / a
            ok |= np.einsum("mi,mi->m", q, q) <= 1.0
        return ok

    def sample(self, rng: np.random.Generator, m: int) -> np.ndarray:
        lo = (self.centres - self.axes.max(axis=1, keepdims=True)).min(axis=0)
        hi = (self.centres + self.axes.max(axis=1, keepdims=True)).max(axis=0)
        out: list[np.ndarray] = []
        count = 0
        while count < m:
            p = rng.uniform(lo, hi, size=(4 * m, 3))
            p = p[self.inside(p)]
            out.append(p)
            count += len(p)
        return np.concatenate(out)[:m]


def _max_extent(pts: np.ndarray) -> float:
    """Largest distance between two points of a cloud (exact on the convex-hull-ish subset)."""
    c = pts.mean(axis=0)
    far = pts[np.argsort(np.linalg.norm(pts - c, axis=1))[-300:]]
    diff = far[:, None, :] - far[None, :, :]
    return float(np.sqrt(np.max(np.einsum("abi,abi->ab", diff, diff))))


class _CellList:
    """Spatial hash for minimum-distance checks."""

    def __init__(self, cell: float) -> None:
        self.cell = cell
        self.cells: dict[tuple[int, int, int], list[int]] = {}
        self.points: list[np.ndarray] = []
        self.backbone: list[bool] = []

    def key(self, p: np.ndarray) -> tuple[int, int, int]:
        return (int(p[0] // self.cell), int(p[1] // self.cell), int(p[2] // self.cell))

    def ok(self, p: np.ndarray, min_any: float, min_bb: float, skip: int = -1) -> bool:
        kx, ky, kz = self.key(p)
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                for dz in (-1, 0, 1):
                    for j in self.cells.get((kx + dx, ky + dy, kz + dz), ()):
                        if j == skip:
                            continue
                        d2 = float(np.sum((self.points[j] - p) ** 2))
                        lim = min_bb if self.backbone[j] and min_bb > min_any else min_any
                        if d2 < lim * lim:
                            return False
        return True

    def add(self, p: np.ndarray, backbone: bool) -> int:
        idx = len(self.points)
        self.points.append(p)
        self.backbone.append(backbone)
        self.cells.setdefault(self.key(p), []).append(idx)
        return idx


def _grow_chains(
    rng: np.random.Generator, env: _Envelope, n_atoms: int
) -> tuple[np.ndarray, np.ndarray]:
    """Confined self-avoiding chains with one side atom per bead (see Phantom.default)."""
    step, min_any, min_bb = 3.8, 1.5, 3.6
    n_bead = (n_atoms + 1) // 2
    cells = _CellList(cell=4.0)
    bead_ids: list[int] = []
    starts = env.sample(rng, 64)
    pos = starts[0]
    cells.add(pos, True)
    bead_ids.append(0)
    prev = pos
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    n_fail = 0
    while len(bead_ids) < n_bead:
        placed = False
        for _ in range(40):
            trial = direction + 0.9 * rng.normal(size=3)
            trial /= np.linalg.norm(trial)
            cand = prev + step * trial
            if env.inside(cand)[0] and cells.ok(cand, min_any, min_bb, skip=bead_ids[-1]):
                bead_ids.append(cells.add(cand, True))
                direction = trial
                prev = cand
                placed = True
                break
        if not placed:
            n_fail += 1
            if n_fail > 50 * n_bead:
                raise RuntimeError("phantom construction failed: envelope too small for n_atoms")
            # start a new chain from a random existing bead, or a fresh point
            src = cells.points[bead_ids[rng.integers(len(bead_ids))]]
            cand = src + step * _unit(rng)
            if env.inside(cand)[0] and cells.ok(cand, min_any, min_bb):
                bead_ids.append(cells.add(cand, True))
                prev = cand
                direction = _unit(rng)
    n_side = n_atoms - n_bead
    bead_pos = [cells.points[i] for i in bead_ids]
    done = 0
    i = 0
    while done < n_side:
        base = bead_pos[i % len(bead_pos)]
        for _ in range(60):
            cand = base + rng.uniform(1.5, 2.5) * _unit(rng)
            if cells.ok(cand, min_any, min_any):
                cells.add(cand, False)
                done += 1
                break
        i += 1
        if i > 20 * n_atoms:
            raise RuntimeError("phantom construction failed: no room for side atoms")
    pos = np.array(cells.points)
    return pos, np.array(cells.backbone)


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)
