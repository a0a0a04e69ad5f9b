"""The forward model's pieces on a fixed set of frequencies, in single precision.

The statistics kernels (:mod:`cryomag.fit.accumulate`) evaluate the forward model of
:mod:`cryomag.physics.forward` for thousands of particles that share one optics group, one M
and one frequency grid. Everything that depends only on the group is computed once here, in
double precision; what depends on the particle is evaluated in float32 with one sin and cos per
pixel. Each piece is tested against the double-precision reference
(tests/test_physics.py: :func:`cryomag.physics.ctf.ctf_split_frames`,
:func:`cryomag.physics.fourier.shift_phase`, and a direct pad -> inverse FFT -> cut -> FFT).

- :class:`GridCTF`: RELION's CTF with the defocus term in the frame of ``ctf_mag`` and the Cs
  term (with the even Zernike terms) at the true frequency u = M k, and its derivatives with
  respect to u; the odd aberrations' factor exp(+i phase_odd(u)) and its derivatives;
- :func:`shift_phase32`: RELION's origin shift exp(+2 pi i k . t);
- :class:`WindowCut`: a spectrum predicted on a larger box (any even size) -> real space -> the
  particle box cut out -> back to the particle's band pixels (the box window);
  :func:`padded_box_px`: how large that box must be for a given delocalisation.
"""

from __future__ import annotations

import numpy as np

from cryomag.physics import fft as _fft
from cryomag.physics.aberrations import has_aberration, zernike_phase
from cryomag.physics.ctf import defocus_matrix, delocalisation_A, electron_wavelength_A

__all__ = ["GridCTF", "WindowCut", "padded_box_px", "padded_rfft2", "shift_phase32"]

_F32 = np.float32
_C64 = np.complex64


class GridCTF:
    """RELION's CTF of one optics group's particles on fixed observed frequencies.

    chi = pi lambda d^T Adef d - (pi/2) Cs lambda^3 |u|^4 + phase shift, with d = ctf_mag k
    (the frame of the measured defocus) and u = mag k (the true frequency); the CTF is
    env sin(chi + alpha) = env (sqrt(1 - Q0^2) sin chi + Q0 cos chi), alpha = atan(Q0 /
    sqrt(1 - Q0^2)), env = scale exp(-B |d|^2 / 4).

    Parameters
    ----------
    kx, ky : ndarray, shape (npix,)
        Observed frequencies (1/A).
    mag : ndarray, shape (2, 2)
        M (k_ref = M k_obs): the frame of the Cs term.
    ctf_mag : ndarray, shape (2, 2), or None
        The frame of the defocus term (None: ``mag``).
    voltage_kv, cs_mm, amplitude_contrast : float
        The group's optics.
    even_zernike : sequence of float
        rlnEvenZernike (rad): chi -= phase_even(u), in the Cs term's attributes
        (``cs``, ``gcs``, ``hcs``), since both act at the true frequency u.
    odd_zernike : sequence of float
        The odd terms RELION applies, beam tilt included
        (:meth:`cryomag.physics.forward.OpticsParams.odd_coefficients`): the prediction is
        multiplied by ``odd`` = exp(+i phase_odd(u)) (:meth:`apply_odd`).

    Attributes
    ----------
    dx, dy : ndarray, shape (npix,)
        d = ctf_mag k (1/A).
    dq : ndarray, shape (3, npix)
        d_x^2, 2 d_x d_y, d_y^2: d^T Adef d = (a00, a01, a11) . dq.
    cs : ndarray, shape (npix,)
        The Cs term of chi (rad).
    d2 : ndarray, shape (npix,)
        |d|^2 (B-factor envelope).
    gcs : ndarray, shape (2, npix)
        d chi_Cs / du_a (A).
    hcs : ndarray, shape (3, npix)
        d2 chi_Cs / du_a du_c for (xx, xy, yy) (A^2).
    lam : float
        Electron wavelength (A).
    odd : ndarray, complex64, shape (npix,), or None
        exp(+i phase_odd(u)); None without odd terms (nothing is computed).
    godd, hodd : ndarray, shapes (2, npix) and (3, npix), or None
        d phase_odd / du_a (rad A) and d2 phase_odd / du_a du_c for (xx, xy, yy) (rad A^2).
    """

    def __init__(self, kx, ky, mag, ctf_mag, voltage_kv: float, cs_mm: float,
                 amplitude_contrast: float, *, even_zernike=(),
                 odd_zernike=()) -> None:  # fmt: skip
        m = np.asarray(mag, float)
        self.lam = lam = float(electron_wavelength_A(voltage_kv))
        cs_a = cs_mm * 1e7
        q0 = float(amplitude_contrast)
        self.alpha = float(np.arctan2(q0, np.sqrt(1 - q0 * q0)))
        ux = m[0, 0] * kx + m[0, 1] * ky
        uy = m[1, 0] * kx + m[1, 1] * ky
        cm = m if ctf_mag is None else np.asarray(ctf_mag, float)
        dx = cm[0, 0] * kx + cm[0, 1] * ky
        dy = cm[1, 0] * kx + cm[1, 1] * ky
        u2 = ux * ux + uy * uy
        c3 = -2 * np.pi * cs_a * lam**3  # d chi_cs / du = c3 |u|^2 u
        self.dq = np.stack([dx * dx, 2 * dx * dy, dy * dy])
        self.cs = -0.5 * np.pi * cs_a * lam**3 * u2 * u2
        self.d2 = dx * dx + dy * dy
        self.dx, self.dy = dx, dy
        self.gcs = np.stack([c3 * u2 * ux, c3 * u2 * uy])
        self.hcs = np.stack(
            [c3 * (u2 + 2 * ux * ux), c3 * 2 * ux * uy, c3 * (u2 + 2 * uy * uy)]
        )
        if has_aberration(even_zernike):  # chi -= phase_even(u): with the Cs term, at u
            ph, g, h = zernike_phase(even_zernike, ux, uy, "even", derivatives=2)
            self.cs = self.cs - ph
            self.gcs = self.gcs - g
            self.hcs = self.hcs - h
        self.odd = self.godd = self.hodd = None
        if has_aberration(odd_zernike):
            ph, self.godd, self.hodd = zernike_phase(odd_zernike, ux, uy, "odd", derivatives=2)
            self.odd = np.exp(1j * ph).astype(_C64)

    @property
    def reach_A(self) -> float:
        """How far the Cs, even and odd aberration terms move signal at most over these
        pixels (A): max of (|d chi_cs / du| + |d phase_odd / du|) / (2 pi) (stationary
        phase; the defocus term's part is :func:`cryomag.physics.ctf.delocalisation_A`)."""
        g = np.hypot(self.gcs[0], self.gcs[1])
        if self.godd is not None:
            g = g + np.hypot(self.godd[0], self.godd[1])
        return float(g.max() / (2 * np.pi)) if g.size else 0.0

    def delocalisation_A(self, defocus_A, k: float) -> np.ndarray:
        """How far the CTF with a defocus ``defocus_A`` (A, its magnitude) moves signal at
        most (A), the defocus term taken at frequency ``k`` (1/A): lambda |dz| k
        (:func:`cryomag.physics.ctf.delocalisation_A`) plus :attr:`reach_A`."""
        return delocalisation_A(defocus_A, self.lam, 0.0, k) + self.reach_A

    def __call__(self, defocus_u_A, defocus_v_A, angle_deg, phase_shift_deg, bfactor_A2,
                 scale):  # fmt: skip
        """The CTF of particles (each argument shape (b,)).

        Returns
        -------
        ctf : ndarray, float32, shape (b, npix)
        slope : ndarray, float32, shape (b, npix)
            dCTF / dchi.
        adef : ndarray, shape (b, 2, 2)
            The astigmatism matrices (A).
        """
        adef = defocus_matrix(defocus_u_A, defocus_v_A, angle_deg)
        coef = np.stack([adef[:, 0, 0], adef[:, 0, 1], adef[:, 1, 1]], 1) * (np.pi * self.lam)
        chi = coef @ self.dq + self.cs[None]
        chi += (np.deg2rad(np.asarray(phase_shift_deg, float)) + self.alpha)[:, None]
        chi = chi.astype(_F32)
        env = np.asarray(scale, float)[:, None]
        b = np.asarray(bfactor_A2, float)
        if np.any(b != 0):
            env = env * np.exp(-0.25 * b[:, None] * self.d2[None])
        env = env.astype(_F32)
        return env * np.sin(chi), env * np.cos(chi), adef

    def apply_odd(self, v: np.ndarray, dv: list[np.ndarray] | None = None,
                  hv: list[np.ndarray] | None = None):  # fmt: skip
        """The odd factor applied to a model V and its u-derivatives: V' = o V with
        o = exp(i phase_odd(u)), dV'/du_a = o (dV_a + i g_a V),
        d2V'/du_a du_c = o (H_ac + i g_a dV_c + i g_c dV_a + (i h_ac - g_a g_c) V).

        Parameters
        ----------
        v : ndarray, complex64, shape (b, npix)
        dv : list of 2 ndarrays (b, npix), optional
            dV/du_x, dV/du_y.
        hv : list of 3 ndarrays (b, npix), optional
            d2V/du2 for (xx, xy, yy); needs ``dv``.

        Returns
        -------
        The same structure (v alone, (v, dv) or (v, dv, hv)), unchanged without odd terms.
        """
        if self.odd is None:
            if dv is None:
                return v
            return (v, dv) if hv is None else (v, dv, hv)
        o = self.odd
        ig = [(1j * self.godd[a]).astype(_C64) for a in range(2)]
        v2 = o * v
        if dv is None:
            return v2
        dv2 = [o * (dv[a] + ig[a] * v) for a in range(2)]
        if hv is None:
            return v2, dv2
        out = []
        for i, (a, c) in enumerate(((0, 0), (0, 1), (1, 1))):
            cross = (1j * self.hodd[i] - self.godd[a] * self.godd[c]).astype(_C64)
            out.append(o * (hv[i] + ig[a] * dv[c] + ig[c] * dv[a] + cross * v))
        return v2, dv2, out

    def of(self, geom):
        """:meth:`__call__` with the CTF columns of a ParticleGeometry."""
        return self(geom.defocus_u_A, geom.defocus_v_A, geom.defocus_angle_deg,
                    geom.phase_shift_deg, geom.bfactor_A2, geom.ctf_scale)  # fmt: skip

    def chi_defocus_grad(self, adef: np.ndarray) -> list[np.ndarray]:
        """d chi_defocus / du_a = 2 pi lambda (Adef d)_a, float32 (b, npix) for a = x, y.

        (The derivative with respect to d; it equals that with respect to u when the defocus
        term moves with M, ctf_mag = mag.)
        """
        c = 2 * np.pi * self.lam
        return [
            (c * (adef[:, a, 0, None] * self.dx + adef[:, a, 1, None] * self.dy)).astype(_F32)
            for a in range(2)
        ]


def shift_phase32(origin_A: np.ndarray, kx: np.ndarray, ky: np.ndarray) -> np.ndarray:
    """exp(+2 pi i k . t) per particle (RELION's origin sign), complex64 (b, npix).

    Parameters
    ----------
    origin_A : ndarray, shape (b, 2)
        rlnOriginXAngst, rlnOriginYAngst (A).
    kx, ky : ndarray, shape (npix,)
        Observed frequencies (1/A).
    """
    o = np.asarray(origin_A, float).reshape(-1, 2)
    arg = ((2 * np.pi * o) @ np.stack([kx, ky])).astype(_F32)
    out = np.empty(arg.shape, _C64)
    out.real = np.cos(arg)
    out.imag = np.sin(arg)
    return out


class WindowCut:
    """Spectra on the disc of a padded grid -> the particle box's band pixels.

    A model predicted on a larger grid than the particle box (``big`` px, every frequency up
    to the particle's Nyquist, the disc) is taken to real space, the centred box is cut
    out, and the cut is transformed back and sampled at the band pixels: the signal the CTF
    moves out of the box is then missing from the prediction as it is from the data.

    The inverse transform is made in two stages so that only the cut's rows are finished:
    the complex transform along y over every column, then the real one along x for the box's
    rows only (the same arithmetic as a full irfft2 for those rows, half of its second stage);
    the disc is put onto the grid by one gather (``np.take``) rather than a scatter.

    Parameters
    ----------
    box : int
        Particle box (px).
    big : int
        The padded grid's size (px), even and > ``box``; any such size, not only multiples
        of the box.
    disc_flat : ndarray of int
        Flat rfft indices of the disc pixels on the padded grid.
    band_idx : ndarray of int
        Flat rfft indices of the band pixels on the particle grid.
    """

    def __init__(self, box: int, big: int, disc_flat: np.ndarray, band_idx: np.ndarray):
        self.box = int(box)
        self.big = int(big)
        if self.big <= self.box or self.big % 2:
            raise ValueError(f"padded grid {big} px: expected an even size above the box {box}")
        self.disc_flat = disc_flat
        self.band_idx = band_idx
        big = self.big
        # grid pixel -> its disc value, or the appended zero
        self._gather = np.full(big * (big // 2 + 1), len(disc_flat))
        self._gather[disc_flat] = np.arange(len(disc_flat))
        self._rows = _corner_rows(self.box, big)
        # the adjoint's factor per disc pixel: box^2 / big^2, halved on the columns kx = 0
        # and kx = big / 2 (:meth:`adjoint`)
        col = disc_flat % (big // 2 + 1)
        w = np.full(len(disc_flat), self.box**2 / big**2)
        w[(col == 0) | (col == big // 2)] *= 0.5
        self.adjoint_weight = w.astype(_F32)

    def grid(self, values: np.ndarray) -> np.ndarray:
        """Disc values (b, n_disc) onto the padded rfft grid, (b, big, big // 2 + 1)."""
        nb, big = len(values), self.big
        ext = np.concatenate([values.astype(_C64, copy=False), np.zeros((nb, 1), _C64)], 1)
        return np.take(ext, self._gather, axis=1).reshape(nb, big, big // 2 + 1)

    def __call__(self, values: np.ndarray) -> np.ndarray:
        """``values`` (b, n_disc) complex64 -> (b, n_band) complex64."""
        nb = len(values)
        big, box = self.big, self.box
        cols = _fft.ifft(self.grid(values), axis=-2)
        img = _fft.irfft(cols[:, self._rows], n=big, axis=-1)
        # the centred box of an unshifted image: its four corners (rows already cut)
        lo, hi = box - box // 2, box // 2  # x >= 0 and x < 0 parts
        cut = np.empty((nb, box, box), img.dtype)
        cut[:, :, :lo] = img[:, :, :lo]
        cut[:, :, lo:] = img[:, :, big - hi :]
        spec = _fft.rfft2(cut)
        return spec.reshape(nb, -1)[:, self.band_idx]

    def adjoint(self, values: np.ndarray, weighted: bool = True) -> np.ndarray:
        """The cut's adjoint: band values R (b, n_band) -> disc values A (b, n_disc) with
        ``Re sum_band conj(cut(c)) R == Re sum_disc conj(c) A`` for every ``c``.

        With R the weighted residual w r, ``Re sum conj(c_i) A`` is the windowed model's
        gradient sum ``Re sum_band w conj(cut(c_i)) r`` of any column c_i on the disc, at
        the cost of one transform pair whatever the number of columns.

        The band holds one pixel of each conjugate pair (its self-conjugate columns kx = 0
        and, for an even box, kx = Nyquist, only their ky >= 0 half), so its sums are half
        the full plane's: R placed on the box's rfft grid with those columns doubled is the
        half-plane of the full-plane function whose inverse transform rho gives
        ``sum_band = box^2 / 2 sum_x cut(c)(x) rho(x)``; the cut's image is the big image's
        corner, so that is ``box^2 / (2 big^2) Re sum_full conj(F(rho padded)) C``, and the
        padded disc's half plane counts its kx = 0 and kx = big / 2 columns once (the
        factor 1/2 there), every other column for itself and its mirror.

        ``weighted`` False: without that last factor per disc pixel (:attr:`adjoint_weight`),
        for a caller that folds it into its own sums.
        """
        nb, box, big = len(values), self.box, self.big
        grid = np.zeros((nb, box * (box // 2 + 1)), _C64)
        grid[:, self.band_idx] = values
        grid = grid.reshape(nb, box, box // 2 + 1)
        grid[:, :, 0] *= 2
        if box % 2 == 0:
            grid[:, :, -1] *= 2
        rho = _fft.irfft2(grid, box)
        spec = padded_rfft2(rho, big).reshape(nb, -1)[:, self.disc_flat]
        return spec * self.adjoint_weight if weighted else spec


def padded_box_px(box: int, pixel_size_A: float, delocalisation_A, max_box: int) -> np.ndarray:
    """The smallest padded grid (px) that holds a particle's CTF-delocalised signal.

    A particle of diameter d <= L (L = box x pixel size) whose CTF moves signal by up to D
    (:func:`cryomag.physics.ctf.delocalisation_A`) reaches d / 2 + D from the box centre.
    Predicted on a grid of B px (period B x pixel size), nothing wraps back into the cut-out
    box while d / 2 + D < B x pixel size - L / 2, i.e. B >= box + D / pixel size for a
    particle that fills the box. The size is rounded up to an even number with no prime
    factor above 5 (fast transforms), and is at most ``max_box`` (and at least the next such
    size above the box).

    Parameters
    ----------
    box : int
        Particle box (px).
    pixel_size_A : float
        Pixel size (A).
    delocalisation_A : float or ndarray
        D of each particle (A).
    max_box : int
        Largest padded size (px), e.g. the group's window padding times the box.

    Returns
    -------
    ndarray of int, the shape of ``delocalisation_A``
    """
    box, max_box = int(box), int(max_box)
    need = box + np.ceil(np.asarray(delocalisation_A, float) / float(pixel_size_A))
    values, inverse = np.unique(np.maximum(need, box + 1), return_inverse=True)
    sizes = np.array([min(_fft.next_fast_even(int(v)), max_box) for v in values], int)
    return sizes[inverse].reshape(need.shape)


def _corner_rows(box: int, big: int) -> np.ndarray:
    """Rows (or columns) of an unshifted big image that hold an unshifted box image's."""
    lo, hi = box - box // 2, box // 2
    return np.r_[0:lo, big - hi : big]


def padded_rfft2(q: np.ndarray, big: int) -> np.ndarray:
    """rfft2 of unshifted box images zero-padded to big x big (the box in the centre).

    The same arithmetic as ``rfft2`` of the padded image, without transforming its rows
    of zeros: the real transform along x of the box's rows, then the complex one along y.

    Parameters
    ----------
    q : ndarray, float32, shape (b, box, box)
        Unshifted images (origin at index 0).
    big : int
        Padded size (px).

    Returns
    -------
    ndarray, complex64, shape (b, big, big // 2 + 1)
    """
    nb, box = q.shape[0], q.shape[-1]
    lo, hi = box - box // 2, box // 2
    rows = np.zeros((nb, box, big), q.dtype)
    rows[:, :, :lo] = q[:, :, :lo]
    rows[:, :, big - hi :] = q[:, :, lo:]
    # the rows' transforms straight into the grid's corner rows (no scatter of a copy)
    out = np.empty((nb, big, big // 2 + 1), np.result_type(q.dtype, np.complex64))
    out[:, lo : big - hi] = 0
    _fft.rfft(rows[:, :lo], axis=-1, out=out[:, :lo])
    _fft.rfft(rows[:, lo:], axis=-1, out=out[:, big - hi :])
    return _fft.fft(out, axis=-2)
