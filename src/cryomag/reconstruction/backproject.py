"""Direct Fourier inversion from given poses: the exact adjoint of the forward model, and its
regularised least-squares inverse.

Forward model (:mod:`cryomag.physics.forward`, CONVENTIONS.md section 1): for particle p
and observed frequency k (1/A, the group's declared pixel size a_g),

    Y_p(k) = a_p C_p(M_p k) V(q_p(k)) exp(+2 pi i k . t_p),   q_p(k) = A_p^T (M_p k, 0),
    V(q) = sum_x f(x) exp(-2 pi i q . x),   x = (index - N // 2) a_out,
    a_p = det(M_p) (a_out / a_g)^2,

with the per-particle contrast scale inside C_p (rlnCtfScalefactor multiplies RELION's CTF).
The map f (N^3 voxels of a_out A) minimising

    sum_p sum_k |Y_p(k) - a_p C_p V(q_p(k)) exp(2 pi i k.t_p)|^2 + f^T Lambda f

solves the normal equations (H + Lambda) f = b with

    b(x)   = sum_j c_j exp(+2 pi i q_j . x),   c_j = a_p C_p Y_p(k) exp(-2 pi i k . t_p),
    H f(x) = sum_y psi(x - y) f(y),          psi(z) = sum_j w_j exp(+2 pi i q_j . z),
    w_j = a_p^2 C_p^2.

``b`` is the exact adjoint (backprojection) of the forward model, ``psi`` its point-spread
function. Both are computed exactly, up to the requested accuracy ``eps``, by finufft type-1
3D transforms (non-uniform frequencies -> uniform real-space grid, Kaiser-Bessel-like
("exponential of semicircle") spreading and its deconvolution done inside finufft): ``b`` on
the N grid, ``psi`` on the 2N grid (offsets x - y span (-N, N)). Only the rfft half plane of
each image is used; the other half (Hermitian partners, q -> -q, c -> conj c) is accounted
for by a multiplicity of 2 and taking the real part. Frequencies with |k| >= the particle's
Nyquist (a circle) or |q| >= the output Nyquist (a sphere) are left out.

Solving: H is a Toeplitz (convolution) operator, applied exactly by zero-padding f to 2N and
multiplying by the FFT of psi (a circulant embedding, pruned FFTs). The system is solved by
preconditioned conjugate gradients (PCG). The preconditioner is the direct Fourier inversion
itself, F = N / (D + lambda) on the 2N Fourier grid: D = FFT_2N(T psi) / N^3, with T the
triangle window prod_d (N - |z_d|), is the weight density sum_j w_j |D_N(k - q_j)|^2 / N^3
smoothed by the (positive) Fejer kernel of the N box: the 3D analogue of T. Chan's optimal
circulant preconditioner for Toeplitz systems. The start is that direct inversion.

Why not stop at the direct inversion (a gridding ratio N / D)? On noise-free projections
(box 32, 300 particles, CTF on) ratio estimators leak the strong low-frequency signal into
the weak high frequencies: against the true map their FSC at 0.8 Nyquist is 0.2-0.55
(Dirichlet or Fejer kernel), 0.67 (triangle window on 2N) or 0.83 (Kaiser-Bessel window),
while 10 PCG iterations give 0.9998. On noisy data 5-10 iterations change the resolved
shells by < 0.5 %. The PCG solution is the regularised least-squares map itself, so no
separate gridding correction is needed: the only approximations are finufft's ``eps`` and
the stopping tolerance. All pixels carry equal weight (no per-group noise whitening).

Regularisation (the Wiener term "1/SNR"): Lambda = P^T C_lambda P, diagonal on the 2N
Fourier grid with lambda(|k|) = mean_shell(D) / SSNR(|k|): SSNR = 1/tau for a constant
``tau``, or from the half-map FSC, SSNR = FSC / (1 - FSC) per shell (RELION's tau2 from the
FSC), doubled for the full map. Frequencies outside the output Nyquist sphere get lambda =
mean D (they are not measured).

Agreement with RELION (tests/test_reconstruct.py): relion_reconstruct --ctf (RELION 3.1.3)
on the same STAR file gives the same map, FSC > 0.999 up to Nyquist on noise-free data,
also with an anisotropic, non-symmetric rlnMagMat (using M^T or M^-1 instead is clearly
worse): both place slices at A^T (M k, 0). Differences: RELION interpolates onto a 2x padded
grid (trilinear) and corrects the weights iteratively instead of solving the least-squares
problem; it applies no Wiener term unless given --fsc; and its map scale differs (by ~3 %
and by det M): cryomag's maps are in the units of the forward model (projecting them with
:func:`cryomag.physics.forward.predict` reproduces the images).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import finufft
import numpy as np
import scipy.fft as sfft

from cryomag.reconstruction.symmetry import symmetry_operators

__all__ = [
    "Backprojector",
    "NormalOperator",
    "SolveInfo",
    "half_plane_pixels",
    "shell_index_2n",
    "wiener_lambda",
]

SSNR_MAX = 1e4
SSNR_MIN = 1e-4


def _fft_workers(nthreads: int) -> int:
    return -1 if nthreads <= 0 else int(nthreads)


class Backprojector:
    """Accumulates the backprojection b and the point-spread function psi of several sets.

    Points are collected in a buffer and transformed in large finufft calls (each call has a
    fixed cost, mostly the FFT of finufft's fine grid): ``flush_points`` sets the size.

    Parameters
    ----------
    box : int
        Output box N (even), voxels.
    pixel_size_A : float
        Output voxel size a_out (A).
    n_sets : int
        Independent accumulators (2 for half maps).
    symmetry : str or ndarray
        RELION point-group name (``"C1"``, ``"C4"``, ``"D7"`` ...) or operators, shape (G, 3, 3).
    eps : float
        finufft relative accuracy (relative to the sum of |strengths| of a call).
    nthreads : int
        Threads for finufft and the FFTs (0 = all cores).
    double : bool
        Double precision transforms and accumulators (implied by eps < 1e-6).
    flush_points : int
        Points per finufft call (the buffer holds 28 bytes per point, 56 in double).

    Notes
    -----
    Memory: ``n_sets * (N^3 * 8 + (2N)^3 * 4)`` bytes for the accumulators (double: 8-byte
    psi), the point buffer, and finufft's fine grid (about (2.5 N)^3 * 8 bytes) and sorting
    index (8 bytes per point) during a call.
    """

    def __init__(
        self,
        box: int,
        pixel_size_A: float,
        n_sets: int = 2,
        symmetry: str | np.ndarray = "C1",
        eps: float = 1e-4,
        nthreads: int = 0,
        double: bool = False,
        flush_points: int = 12_000_000,
    ) -> None:
        if box < 8 or box % 2:
            raise ValueError(f"output box must be an even number >= 8, got {box}")
        if not pixel_size_A > 0:
            raise ValueError(f"output pixel size must be > 0, got {pixel_size_A}")
        self.box = int(box)
        self.pixel_size_A = float(pixel_size_A)
        self.n_sets = int(n_sets)
        self.ops = (
            symmetry_operators(symmetry) if isinstance(symmetry, str) else np.asarray(symmetry)
        )
        self.eps = float(eps)
        self.nthreads = int(nthreads)
        self.double = bool(double) or eps < 1e-6
        self._real = np.float64 if self.double else np.float32
        self._cplx = np.complex128 if self.double else np.complex64
        n, n2 = self.box, 2 * self.box
        self.b = np.zeros((self.n_sets, n, n, n))
        self.psi = np.zeros((self.n_sets, n2, n2, n2), self._real)
        self.n_points = np.zeros(self.n_sets, np.int64)
        self.n_images = np.zeros(self.n_sets, np.int64)
        self.seconds_nufft = 0.0
        self.flush_points = max(int(flush_points), 1)
        self._plans: dict[int, finufft.Plan] = {}
        self._buf: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._fill = 0
        self._set = -1

    @property
    def nyquist(self) -> float:
        """Output Nyquist frequency (1/A)."""
        return 0.5 / self.pixel_size_A

    # ------------------------------------------------------------------ finufft
    def _plan(self, modes: int) -> finufft.Plan:
        plan = self._plans.get(modes)
        if plan is None:
            kw = {"nthreads": self.nthreads} if self.nthreads > 0 else {}
            plan = finufft.Plan(
                1,
                (modes,) * 3,
                eps=max(self.eps, 1e-14 if self.double else 1e-6),
                isign=1,
                dtype="complex128" if self.double else "complex64",
                upsampfac=2.0 if self.eps < 1e-8 else 1.25,
                debug=0,
                spread_debug=0,
                **kw,
            )
            self._plans[modes] = plan
        return plan

    def _transform(self, set_index: int, pts, c, w) -> None:
        t0 = time.perf_counter()
        pb = self._plan(self.box)
        pb.setpts(*pts)
        self.b[set_index] += pb.execute(c).real
        pp = self._plan(2 * self.box)
        pp.setpts(*pts)
        self.psi[set_index] += pp.execute(w).real
        self.n_points[set_index] += len(c)
        self.seconds_nufft += time.perf_counter() - t0

    def flush(self) -> None:
        """Transform the buffered points (called automatically when needed)."""
        if self._buf is None or self._fill == 0:
            return
        k = self._fill
        pts, c, w = self._buf
        self._transform(self._set, [pts[i, :k] for i in range(3)], c[:k], w[:k])
        self._fill = 0

    def release(self) -> None:
        """Flush and free the point buffer and the finufft plans."""
        self.flush()
        self._buf = None
        self._plans.clear()

    def _append(self, set_index: int, q: np.ndarray, c: np.ndarray, w: np.ndarray) -> None:
        """Buffer points (q in 1/A, shape (n, 3)) and strengths, with symmetry copies."""
        if set_index != self._set:
            self.flush()
            self._set = set_index
        g = len(self.ops)
        n = len(q)
        if self._buf is None:
            m = max(self.flush_points, n * g)
            self._buf = (
                np.empty((3, m), self._real),
                np.empty(m, self._cplx),
                np.empty(m, self._cplx),
            )
        if self._fill + n * g > self._buf[1].size:
            self.flush()
            if n * g > self._buf[1].size:
                self._buf = None
                self._append(set_index, q, c, w)
                return
        pts, cb, wb = self._buf
        scale = self._real(2 * np.pi * self.pixel_size_A)
        lim = self._real(np.pi * (1 - 1e-6))
        for op in self.ops.astype(self._real):
            sl = slice(self._fill, self._fill + n)
            # a symmetry-equivalent pose A R samples R^T A^T (u, 0) = (q^T R)^T; finufft axes
            # follow the array axes [z, y, x]
            for dim, axis in enumerate((2, 1, 0)):
                col = q @ op[:, axis] if g > 1 else q[:, axis]
                np.multiply(col, scale, out=pts[dim, sl])
                np.clip(pts[dim, sl], -lim, lim, out=pts[dim, sl])
            cb[sl] = c
            wb[sl] = w
            self._fill += n

    def insert_points(self, set_index: int, q: np.ndarray, c: np.ndarray, w: np.ndarray) -> None:
        """Add points of (half-plane) data to set ``set_index``, with symmetry.

        Parameters
        ----------
        q : ndarray, shape (n, 3)
            Reference-frame frequencies (qx, qy, qz) in 1/A, |q| < output Nyquist (points
            outside must carry zero strengths; they are clipped into the grid's period).
        c : ndarray, complex, shape (n,)
            Numerator strengths (multiplicity included).
        w : ndarray, shape (n,)
            Weights of the point-spread function (multiplicity included).
        """
        if len(q):
            self._append(set_index, np.asarray(q, self._real), c, w)

    def insert(
        self,
        set_index: int,
        spectra: np.ndarray,
        kx: np.ndarray,
        ky: np.ndarray,
        ctf: np.ndarray,
        amplitude: np.ndarray,
        rot: np.ndarray,
        mag: np.ndarray,
        origin_A: np.ndarray,
    ) -> None:
        """Backproject particle spectra (one optics group) into set ``set_index``.

        Parameters
        ----------
        spectra : ndarray, complex, shape (n, P)
            Centred rfft values Y_p(k) of n images at P half-plane pixels (kx >= 0, and
            |k| < the particle's Nyquist; see :func:`half_plane_pixels`).
        kx, ky : ndarray, shape (P,)
            Observed frequencies of those pixels (1/A).
        ctf : ndarray, shape (n, P)
            C_p at each pixel (evaluated at M k; contrast scale included).
        amplitude : ndarray, shape (n,)
            a_p = det(M_p) (a_out / a_g)^2.
        rot : ndarray, shape (n, 3, 3)
            RELION matrices A_p.
        mag : ndarray, shape (n, 2, 2)
            Matrices M_p placing the slice (k_ref = M k_obs).
        origin_A : ndarray, shape (n, 2)
            rlnOriginX/YAngst (A).
        """
        n = spectra.shape[0]
        if n == 0:
            return
        real, cplx = self._real, self._cplx
        kx = np.asarray(kx, real)
        ky = np.asarray(ky, real)
        m = np.asarray(mag, real)
        a = np.asarray(rot, real)
        ux = m[:, 0, 0, None] * kx + m[:, 0, 1, None] * ky
        uy = m[:, 1, 0, None] * kx + m[:, 1, 1, None] * ky
        q = ux[..., None] * a[:, None, 0, :] + uy[..., None] * a[:, None, 1, :]
        del ux, uy
        valid = np.einsum("npk,npk->np", q, q) < real(self.nyquist**2)
        mult = np.where(kx == 0, real(1), real(2))
        t = np.asarray(origin_A, real)
        arg = real(-2 * np.pi) * (t[:, 0:1] * kx + t[:, 1:2] * ky)
        phase = np.empty(arg.shape, cplx)
        np.cos(arg, out=phase.real)
        np.sin(arg, out=phase.imag)
        del arg
        ac = (np.asarray(amplitude, real)[:, None] * np.asarray(ctf, real)) * valid
        c = (ac * mult) * np.asarray(spectra, cplx) * phase
        w = ac * ac * mult
        del phase, ac
        self._append(set_index, q.reshape(-1, 3), c.ravel(), w.ravel())
        self.n_images[set_index] += n

    def operator(self, sets: int | list[int]) -> NormalOperator:
        """The normal operator of one set or the sum of several."""
        self.flush()
        idx = [sets] if isinstance(sets, int) else list(sets)
        psi = self.psi[idx[0]].astype(np.float64)
        for i in idx[1:]:
            psi += self.psi[i]
        return NormalOperator(psi, self.pixel_size_A, self.nthreads)

    def rhs(self, sets: int | list[int]) -> np.ndarray:
        """The backprojection b of one set or the sum of several, shape (N, N, N)."""
        self.flush()
        idx = [sets] if isinstance(sets, int) else list(sets)
        return self.b[idx].sum(axis=0)


def half_plane_pixels(box: int, pixel_size_A: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rfft pixels used for reconstruction: |k| < Nyquist (a circle).

    Returns
    -------
    mask : ndarray of bool, shape (box, box // 2 + 1)
    kx, ky : ndarray, shape (P,)
        Frequencies (1/A) of the selected pixels, in ``mask`` order (row-major).
    """
    fy = sfft.fftfreq(box, d=pixel_size_A)
    fx = sfft.rfftfreq(box, d=pixel_size_A)
    ky, kx = np.meshgrid(fy, fx, indexing="ij")
    mask = kx * kx + ky * ky < (0.5 / pixel_size_A) ** 2
    return mask, kx[mask], ky[mask]


def shell_index_2n(box: int) -> np.ndarray:
    """Shell index round(|k| N a) on the 2N rfft grid (N-grid shell units), (2N, 2N, N + 1)."""
    n2 = 2 * box
    fz = sfft.fftfreq(n2)
    fx = sfft.rfftfreq(n2)
    r = np.sqrt(fz[:, None, None] ** 2 + fz[None, :, None] ** 2 + fx[None, None, :] ** 2)
    return np.round(r * box).astype(np.int32)


@dataclass
class SolveInfo:
    """Convergence record of one PCG solve."""

    iterations: int
    residual: float
    converged: bool
    seconds: float
    history: list


class NormalOperator:
    """H = P^T C_psi P (exact Toeplitz normal operator) and its Fejer preconditioner.

    Parameters
    ----------
    psi : ndarray, shape (2N, 2N, 2N)
        Point-spread function, index j <-> offset (j - N) a_out.
    pixel_size_A : float
    nthreads : int
        FFT workers (0 = all cores).
    """

    def __init__(self, psi: np.ndarray, pixel_size_A: float, nthreads: int = 0) -> None:
        n2 = psi.shape[0]
        n = n2 // 2
        self.box = n
        self.pixel_size_A = float(pixel_size_A)
        self.workers = _fft_workers(nthreads)
        self.psihat = sfft.rfftn(sfft.ifftshift(psi), workers=self.workers).real.astype(np.float32)
        tri = np.maximum(n - np.abs(np.arange(n2) - n), 0).astype(np.float64)
        win = psi * tri[:, None, None]
        win *= tri[None, :, None]
        win *= tri[None, None, :]
        self.density = (
            sfft.rfftn(sfft.ifftshift(win), workers=self.workers).real / float(n) ** 3
        ).astype(np.float32)
        self.shells = shell_index_2n(n)

    def __add__(self, other: NormalOperator) -> NormalOperator:
        out = object.__new__(NormalOperator)
        out.box, out.pixel_size_A, out.workers = self.box, self.pixel_size_A, self.workers
        out.psihat = self.psihat + other.psihat
        out.density = self.density + other.density
        out.shells = self.shells
        return out

    def shell_mean_density(self) -> np.ndarray:
        """Mean of the Fejer-smoothed weight density D per shell, shape (N // 2 + 1,)."""
        nsh = self.box // 2 + 1
        s = np.minimum(self.shells, nsh).ravel()
        num = np.bincount(s, self.density.ravel().astype(np.float64), minlength=nsh + 1)
        cnt = np.bincount(s, minlength=nsh + 1)
        return (num / np.maximum(cnt, 1))[:nsh]

    def lambda_grid(self, lam_shell: np.ndarray, lam_outside: float) -> np.ndarray:
        """lambda on the 2N rfft grid from per-shell values (shells 0 .. N/2 - 1)."""
        nsh = self.box // 2
        table = np.append(np.asarray(lam_shell, np.float64)[:nsh], lam_outside)
        return table[np.minimum(self.shells, nsh)].astype(np.float32)

    # -------------------------------------------------------------- operators
    def _circ(self, f: np.ndarray, spectrum: np.ndarray) -> np.ndarray:
        """crop(IFFT(spectrum * FFT(pad(f)))): a 2N circulant applied to an N^3 map.

        The map is zero-padded at the end of each axis (a circulant commutes with shifts) and
        the transforms are pruned axis by axis: zero rows are not transformed forward and
        cropped rows are not transformed back (about 60 % of a full 2N FFT pair).
        """
        n, w = self.box, self.workers
        a = sfft.rfft(np.asarray(f, np.float32), n=2 * n, axis=2, workers=w)
        a = sfft.fft(a, n=2 * n, axis=1, workers=w, overwrite_x=True)
        a = sfft.fft(a, n=2 * n, axis=0, workers=w, overwrite_x=True)
        a *= spectrum
        a = sfft.ifft(a, axis=0, workers=w, overwrite_x=True)[:n]
        a = sfft.ifft(a, axis=1, workers=w, overwrite_x=True)[:, :n]
        return sfft.irfft(a, n=2 * n, axis=2, workers=w)[:, :, :n].astype(np.float64)

    def apply(self, f: np.ndarray, lam: np.ndarray) -> np.ndarray:
        """(H + Lambda) f for a map f, shape (N, N, N)."""
        return self._circ(f, self.psihat + lam)

    def precondition(self, r: np.ndarray, lam: np.ndarray) -> np.ndarray:
        """P^T (D + lambda)^-1 P r: the direct Fourier inversion of a backprojection r."""
        return self._circ(r, 1.0 / (self.density + lam))

    def solve(
        self,
        b: np.ndarray,
        lam: np.ndarray,
        x0: np.ndarray | None = None,
        max_iter: int = 40,
        tol: float = 1e-3,
    ) -> tuple[np.ndarray, SolveInfo]:
        """Solve (H + Lambda) f = b by preconditioned conjugate gradients.

        Parameters
        ----------
        b : ndarray, shape (N, N, N)
            Backprojection.
        lam : ndarray, shape (2N, 2N, N + 1)
            Regularisation on the 2N rfft grid (see :meth:`lambda_grid`).
        x0 : ndarray, optional
            Start (default: the preconditioner applied to b, i.e. direct inversion). A start
            computed with a much smaller lambda slows convergence down.
        max_iter : int
            Iterations at most (0 returns the direct inversion).
        tol : float
            Stop when ||b - (H + Lambda) x|| <= tol ||b||.

        Returns
        -------
        f : ndarray, shape (N, N, N)
        info : SolveInfo
        """
        t0 = time.perf_counter()
        spec_m = (1.0 / (self.density + lam)).astype(np.float32)
        x = self._circ(b, spec_m) if x0 is None else np.array(x0, np.float64)
        bnorm = float(np.linalg.norm(b)) or 1.0
        if max_iter <= 0:
            return x, SolveInfo(0, float("nan"), False, time.perf_counter() - t0, [])
        spec_a = (self.psihat + lam).astype(np.float32)
        r = b - self._circ(x, spec_a)
        z = self._circ(r, spec_m)
        p = z.copy()
        rz = float(np.vdot(r, z))
        history = [float(np.linalg.norm(r)) / bnorm]
        it = 0
        while it < max_iter and history[-1] > tol:
            ap = self._circ(p, spec_a)
            alpha = rz / float(np.vdot(p, ap))
            x += alpha * p
            r -= alpha * ap
            it += 1
            history.append(float(np.linalg.norm(r)) / bnorm)
            if history[-1] <= tol:
                break
            z = self._circ(r, spec_m)
            rz_new = float(np.vdot(r, z))
            p *= rz_new / rz
            p += z
            rz = rz_new
        info = SolveInfo(it, history[-1], history[-1] <= tol, time.perf_counter() - t0, history)
        return x, info


def wiener_lambda(op: NormalOperator, ssnr: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """Regularisation lambda(|k|) = mean_shell(D) / SSNR(|k|) on the 2N grid.

    Parameters
    ----------
    op : NormalOperator
    ssnr : ndarray, shape (N // 2,), or float
        Spectral signal-to-noise ratio of the map per shell (clipped to [1e-4, 1e4]).

    Returns
    -------
    lam : ndarray, shape (2N, 2N, N + 1)
    lam_shell : ndarray, shape (N // 2,)
    """
    nsh = op.box // 2
    dbar = op.shell_mean_density()
    s = np.clip(np.broadcast_to(np.asarray(ssnr, float), (nsh,)), SSNR_MIN, SSNR_MAX)
    floor = 1e-6 * float(dbar[:nsh].max())
    lam_shell = np.maximum(dbar[:nsh] / s, floor)
    outside = float(dbar[:nsh].mean()) if np.isfinite(dbar[:nsh].mean()) else 1.0
    return op.lambda_grid(lam_shell, max(outside, floor)), lam_shell
