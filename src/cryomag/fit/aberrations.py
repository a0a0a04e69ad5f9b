"""Which optical aberrations are fitted per optics group, their basis on the grid, and how
they are written back in RELION's terms.

The fitted parameters are group-level, like M, and enter the statistics as one more plain
column each (:mod:`cryomag.fit.accumulate`): the derivative of the particle's prediction
with respect to the parameter at the pass's values. Every term is evaluated at the true
frequency u = M k (RELION evaluates the CTF's Cs and Zernike terms and the odd phase at
M k, see ``CONVENTIONS_VERIFIED.md`` 9.1-9.2).

Odd terms multiply the prediction by exp(+i phi_odd(u)) (RELION's
``ObservationModel::getPhaseCorrection``, ``obs_model.cpp`` ~1215-1262 at 5.0.1):

- ``tilt``: beam tilt (t_x, t_y) in mrad, phi = -2 pi Cs lambda^2 |u|^2 (u . t) with Cs in A
  and t in rad (``TiltHelper::insertTilt``, ``tilt_helper.cpp:557-574``: the tilt becomes
  odd Zernike coefficients c1 += 2 Z3x, c4 += Z3x, Z3x = -pi Cs[mm] 2e4 lambda^2 t_x / 3;
  their sum is exactly this cubic phase). Needs Cs > 0.
- ``trefoil``: RELION's odd Zernike coefficients of Z(-3,3) (index 2) and Z(3,3) (index 5),
  rad, with the unnormalised radius |u| in 1/A: Z(3,3) = u_x^3 - 3 u_x u_y^2,
  Z(-3,3) = 3 u_x^2 u_y - u_y^3.

Even terms shift RELION's gamma by sum c_j Z_j(u) (``obs_model.cpp`` ~1279-1298,
``ctf.h`` getCTF: gamma = ... + gammaOffset, CTF = -sin(gamma)); cryomag's
chi = pi lambda d^T Adef d - (pi/2) Cs lambda^3 |u|^4 + phase shift (CTF = sin(chi + alpha))
is -gamma, so an even coefficient c lowers chi by c Z(u):

- ``cs``: the spherical aberration (mm): d chi / d Cs = -(pi/2) 1e7 lambda^3 |u|^4;
- ``tetrafoil``: Z(-4,4) (index 4) = 4 u_x^3 u_y - 4 u_x u_y^3, Z(4,4) (index 8) =
  u_x^4 - 6 u_x^2 u_y^2 + u_y^4;
- ``astig4``: secondary astigmatism Z(-2,4) (index 5) = (4 |u|^2 - 3) 2 u_x u_y, Z(2,4)
  (index 7) = (4 |u|^2 - 3)(u_x^2 - u_y^2) (RELION's radial polynomial R_4^2 = 4 r^4 - 3 r^2
  with r = |u| in 1/A, unnormalised).

Z(0,4) is not a separate term: with r unnormalised it is 6 r^4 - 6 r^2 + 1, which the Cs term
(r^4), the defocus (r^2) and the phase shift (1) already span.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cryomag.physics.aberrations import even_index_to_mn, odd_index_to_mn, zernike_cart

__all__ = [
    "ABERRATION_GROUPS",
    "AberrationTerms",
    "parse_aberrations",
]

#: Each user-facing name -> its parameters (name, kind, unit).
ABERRATION_GROUPS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "tilt": (("beam_tilt_x", "odd", "mrad"), ("beam_tilt_y", "odd", "mrad")),
    "trefoil": (("odd_zernike_2", "odd", "rad"), ("odd_zernike_5", "odd", "rad")),
    "cs": (("cs", "even", "mm"),),
    "tetrafoil": (("even_zernike_4", "even", "rad"), ("even_zernike_8", "even", "rad")),
    "astig4": (("even_zernike_5", "even", "rad"), ("even_zernike_7", "even", "rad")),
}
#: Shortcuts accepted by :func:`parse_aberrations`.
_SHORTCUTS = {
    "odd": ("tilt", "trefoil"),
    "even": ("cs", "tetrafoil", "astig4"),
    "all": ("tilt", "trefoil", "cs", "tetrafoil", "astig4"),
    "none": (),
}


def _tilt_phase(ux: np.ndarray, uy: np.ndarray, lam_A: float) -> tuple[np.ndarray, np.ndarray]:
    """RELION's beam-tilt phase per mm of Cs and per mrad of tilt x and y:
    -2 pi (1e7 A/mm) lambda^2 |u|^2 u (1e-3 rad/mrad) (``TiltHelper::insertTilt``)."""
    c = -2 * np.pi * 1e7 * lam_A**2 * 1e-3 * (ux * ux + uy * uy)
    return c * ux, c * uy


def parse_aberrations(spec: str | tuple | list | None) -> tuple[str, ...]:
    """The aberration groups named by ``spec`` ("tilt,trefoil", "odd", "all", ...), in the
    canonical order of :data:`ABERRATION_GROUPS`; () for None, "" or "none"."""
    if spec is None:
        return ()
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    chosen: set[str] = set()
    for raw in items:
        name = str(raw).strip().lower()
        if not name:
            continue
        if name in _SHORTCUTS:
            chosen.update(_SHORTCUTS[name])
        elif name in ABERRATION_GROUPS:
            chosen.add(name)
        else:
            known = ", ".join([*ABERRATION_GROUPS, *_SHORTCUTS])
            raise ValueError(f"unknown aberration {raw!r}: expected a comma-separated list of "
                             f"{known}")  # fmt: skip
    return tuple(g for g in ABERRATION_GROUPS if g in chosen)


@dataclass(frozen=True)
class AberrationTerms:
    """The fitted aberration parameters of a group, in a fixed order.

    Parameters
    ----------
    groups : tuple of str
        Names of :data:`ABERRATION_GROUPS` (from :func:`parse_aberrations`).
    """

    groups: tuple[str, ...] = ()

    @property
    def params(self) -> tuple[tuple[str, str, str], ...]:
        """(name, kind "odd"/"even", unit) of every parameter, in column order."""
        return tuple(p for g in self.groups for p in ABERRATION_GROUPS[g])

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p[0] for p in self.params)

    def __len__(self) -> int:
        return len(self.params)

    @property
    def odd(self) -> np.ndarray:
        """Boolean mask of the odd parameters, shape (K,)."""
        return np.array([p[1] == "odd" for p in self.params], bool)

    def basis(self, ux: np.ndarray, uy: np.ndarray, lam_A: float, cs_mm: float) -> np.ndarray:
        """Derivative of the phase with respect to each parameter at true frequencies u.

        Parameters
        ----------
        ux, uy : ndarray, shape (npix,)
            u = M k (1/A).
        lam_A : float
            Electron wavelength (A).
        cs_mm : float
            The group's spherical aberration (mm), for the beam tilt's phase.

        Returns
        -------
        ndarray, float64, shape (K, npix)
            For an odd parameter d phi_odd / d theta (the prediction's factor is
            exp(+i phi_odd)); for an even one d chi / d theta (cryomag's chi, the argument of
            the CTF's sine). Units: rad per mrad, rad per (rad A^n) of the Zernike
            coefficient, rad per mm.
        """
        ux = np.asarray(ux, float)
        uy = np.asarray(uy, float)
        u2 = ux * ux + uy * uy
        rows = []
        for name, _, _ in self.params:
            if name in ("beam_tilt_x", "beam_tilt_y"):
                if not cs_mm > 0:
                    raise ValueError(
                        f"beam tilt needs a spherical aberration > 0 (Cs = {cs_mm} mm): its "
                        "phase is -2 pi Cs lambda^2 |u|^2 (u . tilt)"
                    )
                rows.append(cs_mm * _tilt_phase(ux, uy, lam_A)[0 if name.endswith("x") else 1])
            elif name == "cs":
                rows.append(-0.5 * np.pi * 1e7 * lam_A**3 * u2 * u2)
            else:  # odd_zernike_i: + Z_i (the phase's factor); even_zernike_i: - Z_i (chi)
                kind, i = name.rsplit("_", 1)[0], int(name.rsplit("_", 1)[1])
                if kind == "odd_zernike":
                    rows.append(zernike_cart(*odd_index_to_mn(i), ux, uy))
                else:
                    rows.append(-zernike_cart(*even_index_to_mn(i), ux, uy))
        return np.stack(rows) if rows else np.zeros((0, len(ux)))

    def parts(self, ux: np.ndarray, uy: np.ndarray, lam_A: float, cs_mm: float,
              beam_tilt_mrad=(0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Each parameter's derivative of chi (even part) and of phi_odd (odd part).

        Like :meth:`basis`, split by where the parameter acts; the spherical aberration acts
        in both when a beam tilt is present, since RELION's tilt phase is proportional to Cs
        (d phi_tilt / d Cs = -2 pi 1e7 lambda^2 |u|^2 (u . t) 1e-3, t in mrad).

        Returns
        -------
        even, odd : ndarray, float64, shape (K, npix)
        """
        b = self.basis(ux, uy, lam_A, cs_mm)
        odd_mask = self.odd
        even = np.where(odd_mask[:, None], 0.0, b)
        odd = np.where(odd_mask[:, None], b, 0.0)
        tx, ty = (float(v) for v in beam_tilt_mrad)
        if (tx or ty) and "cs" in self.names:
            px, py = _tilt_phase(np.asarray(ux, float), np.asarray(uy, float), lam_A)
            odd[self.names.index("cs")] = tx * px + ty * py
        return even, odd

    def apply(self, optics, delta: np.ndarray):
        """``optics`` with the parameters changed by ``delta`` (K,), each in its unit.

        Parameters
        ----------
        optics : OpticsParams
        delta : ndarray, shape (K,)

        Returns
        -------
        OpticsParams
            Beam tilt (mrad), Cs (mm) and the Zernike lists (RELION order, padded with
            zeros to the index changed) updated.
        """
        import dataclasses

        tilt = list(optics.beam_tilt_mrad)
        odd, even = list(optics.odd_zernike), list(optics.even_zernike)
        cs = float(optics.cs_mm)
        for (name, _, _), d in zip(self.params, np.asarray(delta, float), strict=True):
            if name == "cs":
                cs += d
            elif name.startswith("beam_tilt_"):
                tilt[0 if name.endswith("x") else 1] += d
            else:
                target = odd if name.startswith("odd") else even
                i = int(name.rsplit("_", 1)[1])
                target.extend([0.0] * (i + 1 - len(target)))
                target[i] += d
        return dataclasses.replace(
            optics, cs_mm=cs, beam_tilt_mrad=(float(tilt[0]), float(tilt[1])),
            odd_zernike=tuple(odd), even_zernike=tuple(even),
        )  # fmt: skip

    def values(self, optics) -> np.ndarray:
        """The parameters' values in ``optics`` (an OpticsParams), shape (K,), each in its
        unit (a Zernike index beyond the list is 0)."""
        out = []
        for name, _, _ in self.params:
            if name == "cs":
                out.append(float(optics.cs_mm))
            elif name.startswith("beam_tilt_"):
                out.append(float(optics.beam_tilt_mrad[0 if name.endswith("x") else 1]))
            else:
                lst = optics.odd_zernike if name.startswith("odd") else optics.even_zernike
                i = int(name.rsplit("_", 1)[1])
                out.append(float(lst[i]) if i < len(lst) else 0.0)
        return np.asarray(out, float)
