"""A reference map evaluated exactly at arbitrary frequencies (the Fourier slice).

The reference map ``map[z, y, x]`` (voxel size ``a_ref``, centre voxel ``N // 2``) defines

    V(k) = sum_x map(x) exp(-2 pi i k . x),   x = (index - N // 2) * a_ref  (A),

a trigonometric polynomial, evaluated here at arbitrary 3D frequencies k (1/A) with a type-2
non-uniform FFT (finufft: Kaiser-Bessel-like gridding with pre-compensation), not by
trilinear interpolation. Its frequency gradient is the transform of -2 pi i x map(x).

A type-2 transform is (1) the map divided by the gridding kernel's Fourier series,
zero-padded to the upsampled grid and transformed, then (2) each point interpolated from that
grid. Step (1) does not depend on the points: the map keeps its upsampled grid (up to
:data:`FINE_GRID_CACHE_BYTES`) and each evaluation only interpolates, instead of paying the
upsampled grid's 3D FFT in every call (0.11 s for a box-128 map, single thread; more than the
interpolation of a 250-particle chunk).

Who interpolates: the map's values, ducc0's incremental type 2 (``ducc0.nufft.experimental.
incremental_u2nu``: the grid transformed once, then any points; its own kernel and
upsampling, at most :data:`DUCC_SIGMA_MAX`, asked for ``eps / 2``) where ducc0 has it; the
values with the gradient, and the values without ducc0, finufft's ``spreadinterponly`` from
the grid kept here. Measured on a box-128 map (625 central slices of a box-128 particle's
disc, 4.0 M points, one thread, bench/RESULTS.md, issue 14): ducc0 0.35 s, finufft 0.54 s;
relative error per shell against the direct sum 3.3e-5 and 6.3e-5 (eps 1e-3).
"""

from __future__ import annotations

import hashlib
import threading

import finufft
import numpy as np
import scipy.fft as sfft

from cryomag.physics.fft import next_fast_even
from cryomag.physics.geometry import euler_to_matrix

try:  # pragma: no cover - the package present decides
    from ducc0.nufft.experimental import incremental_u2nu as _ducc_u2nu
except ImportError:  # pragma: no cover
    _ducc_u2nu = None

__all__ = [
    "DUCC_SIGMA_BYTES", "DUCC_SIGMA_MAX", "FINE_GRID_CACHE_BYTES", "MapReference",
    "direct_fourier", "slice_values",
]

#: Largest upsampled grid (bytes, the gradient's four volumes together) a map keeps for its
#: evaluations; above it every evaluation makes its own (finufft's plain type 2). A box-128
#: map in single precision keeps 33 MB (131 MB with the gradient); box 400, 1 GB.
FINE_GRID_CACHE_BYTES = 2 << 30
#: Largest upsampling of ducc0's kept grid: 1.5 (a box-128 map's grid 57 MB in single
#: precision; 0.31 s for the 625 slices above) while that grid stays under
#: :data:`DUCC_SIGMA_BYTES`, else 1.25 (finufft's size, box 400: 1 GB; 0.40 s).
DUCC_SIGMA_MAX = 1.5
#: Largest kept grid (bytes) at :data:`DUCC_SIGMA_MAX`: maps up to box ~210 in single precision.
DUCC_SIGMA_BYTES = 256 << 20


class MapReference:
    """A 3D reference map evaluated exactly at arbitrary frequencies.

    Parameters
    ----------
    volume : ndarray, shape (N, N, N)
        Map values indexed [z, y, x].
    pixel_size_A : float
        Voxel size a_ref in A.
    eps : float
        Requested relative accuracy of the non-uniform FFT (finufft's ``eps``; ducc0 is
        asked for eps / 2, its errors being nearer its request); errors are relative to the
        overall norm, so weak high-frequency shells see larger relative errors: use 1e-7 or
        below for maps whose power falls steeply.
    nthreads : int
        Threads for the non-uniform FFT (0 = all cores).
    cache_fine_grid : bool
        Keep the upsampled grids between evaluations (see the module docstring); False:
        finufft's plain type 2 in every call.
    """

    def __init__(
        self,
        volume: np.ndarray,
        pixel_size_A: float,
        eps: float = 1e-6,
        nthreads: int = 0,
        cache_fine_grid: bool = True,
    ) -> None:
        vol = np.asarray(volume)
        if vol.ndim != 3 or len(set(vol.shape)) != 1:
            raise ValueError(f"reference map must be a cube, got shape {vol.shape}")
        self.box = int(vol.shape[0])
        self.pixel_size_A = float(pixel_size_A)
        self.eps = float(eps)
        self.nthreads = int(nthreads)
        self.nyquist = 0.5 / self.pixel_size_A
        self._dtype = np.complex128 if eps < 1e-5 else np.complex64
        self._value = np.ascontiguousarray(vol.astype(self._dtype))
        self._grad_stack: np.ndarray | None = None
        self.cache_fine_grid = bool(cache_fine_grid)
        self._fine: dict[bool, np.ndarray | None] = {}
        # ducc0's interpolator of the values: (threads it was made with, the object or None)
        self._ducc: tuple[int, object] | None = None
        self._ducc_lock = threading.Lock()
        # finufft modes are -N/2..N/2-1 in natural order (modeord 0): voxel index i has mode
        # i - N//2 for even N; odd N handled by an explicit roll
        if self.box % 2:
            raise ValueError("reference map box must be even")

    @property
    def _with_grad(self) -> np.ndarray:
        """The map and its gradient volumes d/dk_x, d/dk_y, d/dk_z, shape (4, N, N, N).

        Built on first use (only :meth:`evaluate` and :meth:`evaluate_planes` with
        ``gradient`` need it): the transform of -2 pi i x map(x) per axis.
        """
        if self._grad_stack is None:
            v = self._value
            # coordinate of voxel index i along each axis (A); x -> last axis, z -> first
            c = (np.arange(self.box) - self.box // 2) * self.pixel_size_A
            k = (-2j * np.pi * c).astype(self._dtype)
            self._grad_stack = np.ascontiguousarray(
                np.stack([v, v * k[None, None, :], v * k[None, :, None], v * k[:, None, None]])
            )
        return self._grad_stack

    # -------------------------------------------------- shipping (cryomag.execution.payload)
    def __reduce__(self):
        """Pickle as the real volume in the evaluation precision (float32 at eps >= 1e-5),
        not as the complex evaluation buffers: half the bytes, and the rebuilt map evaluates
        bit for bit as this one."""
        real = np.float64 if self._dtype == np.complex128 else np.float32
        vol = np.ascontiguousarray(self._value.real, dtype=real)
        return (type(self), (vol, self.pixel_size_A, self.eps, self.nthreads,
                             self.cache_fine_grid))  # fmt: skip

    def __cryomag_token__(self) -> str:
        """Content digest: the map travels once per worker process."""
        h = hashlib.sha1(repr((self.box, self.pixel_size_A, self.eps)).encode())
        h.update(memoryview(np.ascontiguousarray(self._value)).cast("B"))
        return h.hexdigest()

    def __cryomag_on_worker__(self, threads: int) -> None:
        """Evaluate with the worker's thread count."""
        self.nthreads = int(threads)

    @property
    def _upsampfac(self) -> float:
        return 1.25 if self.eps >= 1e-9 else 2.0

    def _fine_grid(self, gradient: bool) -> np.ndarray | None:
        """The upsampled grid of the map (or of its gradient stack, (4, nf, nf, nf)): the map
        divided by the gridding kernel's Fourier series, zero-padded and transformed, i.e.
        what finufft's type 2 interpolates from. Built on first use and kept; None when
        ``cache_fine_grid`` is off or it would exceed :data:`FINE_GRID_CACHE_BYTES`."""
        if not self.cache_fine_grid:
            return None
        if gradient not in self._fine:
            n, ntr = self.box, 4 if gradient else 1
            nf = _fine_size(n, self._upsampfac)
            if ntr * nf**3 * np.dtype(self._dtype).itemsize > FINE_GRID_CACHE_BYTES:
                self._fine[gradient] = None
                return None
            fs = _kernel_series(n, nf, self.eps, self._upsampfac)
            deconv = 1.0 / (fs[:, None, None] * fs[None, :, None] * fs[None, None, :])
            src = self._with_grad if gradient else self._value[None]
            out = np.empty((ntr, nf, nf, nf), self._dtype)
            lo = nf // 2 - n // 2
            cut = slice(lo, lo + n)
            workers = self.nthreads if self.nthreads > 0 else None
            for t in range(ntr):
                pad = np.zeros((nf, nf, nf), self._dtype)
                pad[cut, cut, cut] = src[t] * deconv
                # G_m = sum_k F_k exp(-i k x_m), modes k and grid points m both centred
                pad = sfft.fftn(sfft.ifftshift(pad), overwrite_x=True, workers=workers)
                out[t] = sfft.fftshift(pad)
            self._fine[gradient] = out if gradient else out[0]
        return self._fine[gradient]

    def _ducc_interpolator(self):
        """ducc0's incremental type 2 of the map's values (its upsampled grid made once), or
        None: no ducc0, no kept grids (``cache_fine_grid``), a grid beyond
        :data:`FINE_GRID_CACHE_BYTES`, or an accuracy beyond ducc0's (single precision
        eps / 2 > 1e-6, double > 2e-13, and a kernel within its upsampling). Made again
        when the thread count changed (a worker that inherited the driver's)."""
        eps = 0.5 * self.eps
        single = self._dtype == np.complex64
        if _ducc_u2nu is None or not self.cache_fine_grid or eps <= (1e-6 if single else 2e-13):
            return None
        if self._ducc is not None and self._ducc[0] == self.nthreads:
            return self._ducc[1]
        item = np.dtype(self._dtype).itemsize
        sigma_max = DUCC_SIGMA_MAX
        if (sigma_max * self.box) ** 3 * item > DUCC_SIGMA_BYTES:
            sigma_max = 1.25
        if _fine_size(self.box, sigma_max) ** 3 * item > FINE_GRID_CACHE_BYTES:
            return None
        try:
            obj = _ducc_u2nu(
                grid=self._value, forward=True, epsilon=eps, nthreads=self.nthreads,
                sigma_min=1.19, sigma_max=sigma_max,
            )  # fmt: skip
        except RuntimeError:  # no kernel of ducc0's for this accuracy within sigma_max
            obj = None
        self._ducc = (self.nthreads, obj)
        return obj

    def _ducc_values(self, interp, coord: np.ndarray) -> np.ndarray:
        """The map's values (npts,) by ducc0's ``interp`` (:meth:`_ducc_interpolator`) at
        points ``coord`` (npts, 3), the columns z, y, x in rad."""
        real = np.float64 if self._dtype == np.complex128 else np.float32
        coord = np.ascontiguousarray(coord, dtype=real)
        with self._ducc_lock:  # one call at a time on one object (ducc0's rule)
            return interp.get_points(coord=coord)

    def _transform(self, pts, gradient: bool) -> np.ndarray:
        """finufft type 2 of the map (and its gradient volumes) at points (z, y, x) in rad.

        Returns shape (npts,) or, with ``gradient``, (4, npts): V, dV/dkx, dV/dky, dV/dkz.
        """
        fine = self._fine_grid(gradient)
        plan = finufft.Plan(
            2,
            (self.box,) * 3 if fine is None else fine.shape[-3:],
            n_trans=4 if gradient else 1,
            eps=self.eps,
            isign=-1,
            dtype="complex128" if self._dtype == np.complex128 else "complex64",
            nthreads=self.nthreads,
            upsampfac=self._upsampfac,
            spread_sort=0,  # slice points come in grid order: sorting costs more than it saves
            spreadinterponly=0 if fine is None else 1,
        )
        plan.setpts(*pts)
        if fine is not None:
            return plan.execute(fine)
        return plan.execute(self._with_grad if gradient else self._value)

    def evaluate(self, k3: np.ndarray, gradient: bool = False):
        """V at frequencies ``k3`` and optionally dV/dk.

        Parameters
        ----------
        k3 : ndarray, shape (n, 3)
            Frequencies (kx, ky, kz) in 1/A.
        gradient : bool
            Also return the gradient.

        Returns
        -------
        value : ndarray, complex, shape (n,)
        grad : ndarray, complex, shape (n, 3), only when ``gradient`` (d/dkx, d/dky, d/dkz)

        Frequencies beyond the map's Nyquist sphere get 0 (no information there).
        """
        k3 = np.asarray(k3, float)
        n = k3.shape[0]
        real = np.float64 if self._dtype == np.complex128 else np.float32
        scale = 2 * np.pi * self.pixel_size_A
        # finufft point order matches the array axes [z, y, x]
        pz = (k3[:, 2] * scale).astype(real)
        py = (k3[:, 1] * scale).astype(real)
        px = (k3[:, 0] * scale).astype(real)
        inside = (k3 * k3).sum(axis=1) <= self.nyquist**2
        if n == 0:
            empty = np.zeros(0, complex)
            return (empty, np.zeros((0, 3), complex)) if gradient else empty
        # wrap into [-pi, pi): points beyond the cube are zeroed anyway
        for p in (pz, py, px):
            np.clip(p, -np.pi, np.pi * (1 - 1e-7), out=p)
        interp = None if gradient else self._ducc_interpolator()
        if interp is not None:
            out = self._ducc_values(interp, np.stack((pz, py, px), axis=-1))
        else:
            out = self._transform((pz, py, px), gradient)
        out = np.asarray(out, dtype=np.complex128)
        if not gradient:
            return np.where(inside, out, 0)
        value = np.where(inside, out[0], 0)
        grad = np.where(inside[:, None], out[1:].T, 0)
        return value, grad

    def evaluate_planes(
        self,
        rot: np.ndarray,
        ux: np.ndarray,
        uy: np.ndarray,
        gradient: bool = False,
    ):
        """V on central planes, V(A_p^T (u, 0)), and optionally the in-plane gradient.

        Faster than :meth:`evaluate` for slices: the 3D points are formed in the transform's
        precision without intermediate (n, npix, 3) arrays, and the sphere test uses |u|
        (rotations keep it).

        Parameters
        ----------
        rot : ndarray, shape (N, 3, 3)
            Rotation matrices A_p (RELION: a map point r projects to (A r)_xy).
        ux, uy : ndarray, shape (npix,) (shared by all planes) or (N, npix)
            In-plane frequencies (1/A).
        gradient : bool
            Also return dV/du_x, dV/du_y.

        Returns
        -------
        value : ndarray, complex, shape (N, npix)
        grad : ndarray, complex, shape (N, npix, 2), only when ``gradient``
        """
        rot = np.asarray(rot, float)
        n = rot.shape[0]
        real = np.float64 if self._dtype == np.complex128 else np.float32
        ux = np.asarray(ux, float)
        uy = np.asarray(uy, float)
        npix = ux.shape[-1]
        inside = ux * ux + uy * uy <= self.nyquist**2
        all_inside = bool(inside.all())
        if not all_inside:
            ux = np.where(inside, ux, 0.0)
            uy = np.where(inside, uy, 0.0)
        # C-ordered (N, npix) points (a cast of the broadcast frequencies would be Fortran
        # ordered and copied again by ravel)
        uxr = ux.astype(real) if ux.ndim == 1 else np.ascontiguousarray(ux, dtype=real)
        uyr = uy.astype(real) if uy.ndim == 1 else np.ascontiguousarray(uy, dtype=real)
        a = (rot * (2 * np.pi * self.pixel_size_A)).astype(real)
        # map axis j (x, y, z) coordinate of the point: u_x A[0, j] + u_y A[1, j]
        if n == 0 or npix == 0:
            empty = np.zeros((n, npix), complex)
            return (empty, np.zeros((n, npix, 2), complex)) if gradient else empty
        # the points' (z, y, x) as the columns of one array (ducc0's layout), or as three
        # arrays (finufft's)
        interp = None if gradient else self._ducc_interpolator()
        pts = np.empty((n, npix, 3), real) if interp is not None else []
        for c, j in enumerate((2, 1, 0)):
            p = np.multiply(a[:, 0, j, None], uxr, out=pts[..., c] if interp is not None else None)
            p += a[:, 1, j, None] * uyr
            if interp is None:
                pts.append(p.ravel())
        if interp is not None:
            out = self._ducc_values(interp, pts.reshape(-1, 3))
        else:
            out = self._transform(pts, gradient)
        out = out.reshape((4 if gradient else 1), n, npix)
        value = out[0]
        if not all_inside:  # in place: no copy of the (N, npix) values
            if inside.ndim == 1:
                value[:, ~inside] = 0
            else:
                value[~inside] = 0
        if not gradient:
            return value
        # chain rule: dV/du_a = sum_j A[a, j] dV/dk_j (out[1:] = d/dkx, d/dky, d/dkz)
        r = rot.astype(real)
        gu = np.empty((n, npix, 2), out.dtype)
        for i in range(2):
            gu[..., i] = (
                out[1] * r[:, i, 0, None] + out[2] * r[:, i, 1, None] + out[3] * r[:, i, 2, None]
            )
        if not all_inside:
            gu = np.where(inside[..., None], gu, 0)
        return value, gu


def _fine_size(n: int, upsampfac: float) -> int:
    """The upsampled grid's size: the smallest even size with no prime factor above 5 that
    is at least ``upsampfac`` n and holds the widest kernel (2 x 16 points)."""
    return next_fast_even(max(int(np.ceil(upsampfac * n)), 32))


def _kernel_series(n: int, nf: int, eps: float, upsampfac: float) -> np.ndarray:
    """The Fourier series of finufft's 3D gridding kernel at the modes -n/2..n/2-1 of an
    upsampled grid of nf points (one axis; the kernel is a product of three).

    finufft's own kernel (its width and shape depend on eps, the upsampling and the
    dimension) is sampled by spreading a unit point onto a small grid at R = 8 sub-grid
    offsets; the series is the Riemann sum of those samples at spacing 1 / R grid points
    (the kernel's continuous transform to the accuracy finufft's own series has; tested
    against finufft's type 2 and the direct sum, tests/physics/test_physics.py).
    """
    small, sub = 32, 8
    c = small // 2
    one, zero = np.ones(1, np.complex128), np.zeros(1)
    kw = {"n_modes": (small,) * 3, "eps": eps, "isign": -1, "upsampfac": upsampfac,
          "spreadinterponly": 1}  # fmt: skip
    phi0 = finufft.nufft3d1(zero, zero, zero, one, **kw)[c, c, c].real ** (1 / 3)
    t, vals = [], []
    for j in range(sub):
        x0 = 2 * np.pi / small * j / sub
        g = finufft.nufft3d1(np.array([x0]), zero, zero, one, **kw)
        t.append(np.arange(small) - c - j / sub)  # grid units from the point
        vals.append(g[:, c, c].real / phi0**2)  # the point's x runs along the first axis
    t, vals = np.concatenate(t), np.concatenate(vals)
    k = np.arange(n) - n // 2
    return (vals[None, :] * np.cos(2 * np.pi * k[:, None] * t[None, :] / nf)).sum(1) / sub


def direct_fourier(volume: np.ndarray, pixel_size_A: float, k3: np.ndarray) -> np.ndarray:
    """Slow direct evaluation of V(k) = sum_x map(x) exp(-2 pi i k.x), for tests.

    Parameters
    ----------
    volume : ndarray, shape (N, N, N), [z, y, x]
    k3 : ndarray, shape (n, 3), (kx, ky, kz) in 1/A

    Returns
    -------
    ndarray, complex, shape (n,)
    """
    n = volume.shape[0]
    c = (np.arange(n) - n // 2) * pixel_size_A
    out = np.empty(len(k3), complex)
    for i, (kx, ky, kz) in enumerate(np.asarray(k3, float)):
        ex = np.exp(-2j * np.pi * kx * c)
        ey = np.exp(-2j * np.pi * ky * c)
        ez = np.exp(-2j * np.pi * kz * c)
        out[i] = np.einsum("zyx,z,y,x->", volume, ez, ey, ex)
    return out


def slice_values(
    reference: MapReference,
    euler_deg: np.ndarray,
    mag: np.ndarray,
    kx: np.ndarray,
    ky: np.ndarray,
    gradient: bool = False,
):
    """Central-slice values V(A^T (M k, 0)) and optionally their gradient w.r.t. u = M k.

    Parameters
    ----------
    euler_deg : ndarray, shape (N, 3)
    mag : ndarray, shape (N, 2, 2) or (2, 2)
    kx, ky : ndarray, shape (npix,)
        Observed frequencies (1/A).

    Returns
    -------
    value : ndarray, complex, shape (N, npix)
    grad : ndarray, complex, shape (N, npix, 2)
        dV/du_x, dV/du_y at u = M k (only when ``gradient``).
    """
    n = len(euler_deg)
    a = euler_to_matrix(np.asarray(euler_deg, float).reshape(n, 3))
    m = np.asarray(mag, float)
    kx = np.asarray(kx, float)
    ky = np.asarray(ky, float)
    if m.ndim == 2:  # one matrix for every particle: the in-plane points are shared
        ux = m[0, 0] * kx + m[0, 1] * ky
        uy = m[1, 0] * kx + m[1, 1] * ky
    else:
        ux = m[:, 0, 0, None] * kx[None] + m[:, 0, 1, None] * ky[None]
        uy = m[:, 1, 0, None] * kx[None] + m[:, 1, 1, None] * ky[None]
    return reference.evaluate_planes(a, ux, uy, gradient=gradient)
