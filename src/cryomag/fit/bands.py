"""Frequency bands, window padding and first noise model of each optics group.

Everything here is decided once per run, before the first pass:

- the band kmin <= |k| <= kmax (1/A) whose pixels the statistics use (:func:`make_bands`);
- the window padding of the prediction (:func:`auto_window_pad`): how much larger than the
  particle box the model is predicted before the box is cut out, so that the signal the CTF
  moves out of the box is modelled;
- the noise weights of the first pass, from the images' own radial power
  (:func:`initial_noise`); later passes weight by the residual power of the previous one.
"""

from __future__ import annotations

import numpy as np

from cryomag.fit.statistics import Band
from cryomag.model.particles import ParticleSet

__all__ = ["auto_window_pad", "initial_noise", "make_bands"]


def make_bands(
    ps: ParticleSet,
    ref_nyquist: float,
    low_res_A: float = 20.0,
    high_res_A: float | None = None,
    fsc_res_A: float | None = None,
) -> dict[int, Band]:
    """The frequency band of each optics group (by group number).

    Parameters
    ----------
    ps : ParticleSet
    ref_nyquist : float
        Nyquist frequency of the reference(s) (1/A; the smallest when there are several).
    low_res_A : float
        Frequencies below 1 / low_res_A are not used (0: none cut).
    high_res_A : float, optional
        The high-frequency limit (A). Default: the half-map FSC = 0.143 resolution
        ``fsc_res_A`` when given, else 0.9 of the smaller of the particles' Nyquist and the
        reference's (divided by the group's largest magnification singular value x 1.05, so
        that M k stays inside the reference).
    """
    bands = {}
    for g in ps.group_numbers():
        g = int(g)
        o = ps.optics_params(g)
        nyq = 0.5 / o.pixel_size_A
        smax = float(np.linalg.svd(ps.mag_matrix(g), compute_uv=False).max())
        kmax_default = 0.9 * min(nyq, ref_nyquist / (smax * 1.05))
        if high_res_A is not None:
            kmax = 1.0 / high_res_A
        elif fsc_res_A is not None:
            kmax = min(1.0 / fsc_res_A, kmax_default)
        else:
            kmax = kmax_default
        kmin = 1.0 / low_res_A if low_res_A > 0 else 0.0
        if kmax <= kmin:
            raise ValueError(f"optics group {g}: empty band {1 / kmin:.2f}-{1 / kmax:.2f} A")
        bands[g] = Band(o.box, o.pixel_size_A, kmin, kmax)
    return bands


def auto_window_pad(ps: ParticleSet, group: int, band: Band, cap: int = 3) -> int:
    """Padding factor that keeps the CTF-delocalised signal of a group in the model.

    The CTF moves signal at frequency k by up to D = lambda dz k + Cs lambda^3 k^3 (A), plus
    what the aberration terms add (:attr:`cryomag.physics.grid.GridCTF.reach_A`); D_max at
    the group's largest defocus and the band's k_max. A particle of diameter d <= L
    (L = box * pixel size) then reaches d / 2 + D_max from the box centre. The prediction is
    periodic with period pad * L, so nothing wraps back into the cut-out box while
    d / 2 + D_max < pad L - L / 2, i.e. pad >= 1 + D_max / L for a particle that fills the
    box: pad = ceil(1 + D_max / L), capped at ``cap`` for speed (cost grows as pad^2); 1 (the
    box-periodic model) when D_max < L / 4.
    Measured (box 64 at 1.3 A, defocus 2-3 um, M = I, 3,000 particles): the box-periodic model
    read the isotropic magnification 0.58 % high (12 sigma), pad 2 0.32 %, pad 6 -0.003 %
    (0.4 sigma). Set the padding explicitly for such extreme boxes.
    """
    from cryomag.physics.grid import GridCTF

    o = ps.optics_params(group)
    rows = ps.group_rows(group)
    dz = np.abs(ps.defocus_uva()[rows, :2]).max(axis=1)
    if not len(dz):
        return 1
    ctf = GridCTF(band.kx, band.ky, ps.mag_matrix(group), None, o.voltage_kv, o.cs_mm,
                  o.amplitude_contrast, even_zernike=o.even_coefficients(),
                  odd_zernike=o.odd_coefficients())  # fmt: skip
    d_max = float(ctf.delocalisation_A(dz.max(), band.kmax))
    length = o.box * o.pixel_size_A
    if d_max < length / 4:
        return 1
    return int(min(cap, np.ceil(1 + d_max / length)))


def initial_noise(spectra: np.ndarray, band: Band) -> np.ndarray:
    """Radial power of images (signal + noise): the weights of a group's first pass.

    Parameters
    ----------
    spectra : ndarray, complex, shape (n, box, box // 2 + 1)
        Centred rfft2 of some of the group's images (a radial average: a few hundred are
        plenty).
    band : Band

    Returns
    -------
    ndarray, shape (n_shells + 1,)
        Mean |Y|^2 per shell; shells without pixels get the largest value.
    """
    p = (np.abs(spectra) ** 2).mean(axis=0)
    nsh = band.n_shells + 1
    num = np.bincount(band.shell_all.ravel(), p.ravel(), minlength=nsh)
    cnt = np.bincount(band.shell_all.ravel(), minlength=nsh)
    with np.errstate(invalid="ignore", divide="ignore"):
        pw = num / cnt
    pw[~np.isfinite(pw) | (pw <= 0)] = (
        np.nanmax(pw[np.isfinite(pw)]) if np.isfinite(pw).any() else 1
    )
    return pw
