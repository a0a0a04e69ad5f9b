"""One pass over the images: the function an executor maps over the chunks.

A :class:`StatisticsPass` holds the particle table, the image source, the reference(s), the
frequency bands and an immutable :class:`PassSpec` (the current M, noise model and kernel
settings of every optics group). Applied to a chunk (rows of one optics group) it reads the
images, transforms them and returns the chunk's sufficient statistics
(:func:`cryomag.fit.accumulate.chunk_statistics`), one item per half set when half maps are
used. It is small to pickle: the table, the images and the maps travel once per worker
(:mod:`cryomag.execution.payload`); a new pass only ships a new specification.

Memory per worker (bytes; particle box B, reference box N, chunk size c, window padding p,
b = 8 bytes per complex value at eps >= 1e-5, else 16)::

    reference   2 N^3 b     the map and its gradient volumes (4 N^3 b more only with
                            the exact gradient), built once per process
              + 4 N^3       the shipped float32 volume (kept by Dask with the task)
              + 2 N^3 b     finufft's upsampled grid (1.25^3) while a batch is evaluated
    chunk       c B^2 4     the spectra (single precision; the images are read and
                            transformed SPECTRA_BLOCK_BYTES at a time)
              + c B^2 p^2 5 the slice values (and with the exact gradient 3x more)
              + < 16e6 x 20 one batch of 3D points and values (accumulate.MAX_POINTS)
              + 32 B^2 p^2 100   one block of 2D arithmetic (32 / p^2 particles at p > 1)

e.g. N = B = 128, c = 1024, p = 1: 34 + 8 + 34 + 67 + 84 + 133 + 52 MB ~ 0.41 GB plus the
worker's own (:mod:`cryomag.execution`); measured peak RSS of a local worker of the default
fit on 20,000 such particles (window-aware, each particle's padding up to 2): 0.73 GB
(bench/RESULTS.md, issue 14).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cryomag.fit.aberrations import AberrationTerms
from cryomag.fit.accumulate import KernelOptions, chunk_statistics
from cryomag.fit.statistics import Band, ChunkStatistics
from cryomag.physics.forward import OpticsParams
from cryomag.physics.fourier import centered_rfft2

__all__ = ["SPECTRA_BLOCK_BYTES", "GroupPass", "PassSpec", "StatisticsPass", "reference_for"]

#: A chunk's images are read and transformed this many bytes of float32 images at a time
#: (at least one image), into the chunk's spectra: the images and their centred copy are
#: then heap blocks reused through the chunk instead of two chunk-sized arrays (fresh
#: memory-mapped pages for every chunk above glibc's mmap threshold, slow on first touch in
#: a virtual machine: a worker's first full-pass chunk of 625 box-128 particles 0.1-0.2 s
#: faster, bench/RESULTS.md, issue 14). Each image's transform is the same bit for bit:
#: the transforms are per image.
SPECTRA_BLOCK_BYTES = 4 << 20


@dataclass(frozen=True)
class GroupPass:
    """How one optics group is evaluated in a pass.

    Attributes
    ----------
    mag : ndarray, shape (2, 2)
        Current M (k_ref = M k_obs): the linearisation point of the statistics.
    ctf_mag : ndarray, shape (2, 2), or None
        Frame of the CTF's defocus term (the input's M: the CTF held as measured); None: the
        whole CTF moves with M (defocus in the specimen frame).
    noise : ndarray, shape (n_shells + 1,)
        Noise power per shell; the statistics weight by its inverse.
    window_pad : int
        1: box-periodic prediction; > 1: window-aware (see
        :func:`cryomag.fit.accumulate.chunk_statistics`).
    second_order : int
        0: no second-order statistics; n >= 1: with them, the curvature sums from every
        n-th particle.
    rows : ndarray, shape (n,), optional
        The group's particle rows (sorted), when ``defocus`` is given.
    defocus : ndarray, shape (n, 3), optional
        Each particle's current defocus (DefocusU, DefocusV in A, angle in degrees, in the
        frame of the CTF's defocus term), overriding the table's (the defocus refined in
        earlier passes).
    optics : OpticsParams, optional
        The group's optics overriding the table's (the aberrations refined in earlier
        passes).
    aberrations : AberrationTerms, optional
        The aberration parameters whose columns the pass accumulates
        (:mod:`cryomag.fit.aberrations`).
    lean : bool
        Only what the group fit of M needs (a warm-start pass): none of the pass's exact
        gradient, defocus columns or extended columns (those only when the CTF moves with
        M, which the group fit needs), whatever :class:`PassSpec` asks for.
    defocus_profile : bool
        Also search each particle's isotropic defocus on its likelihood (box-periodic;
        :mod:`cryomag.fit.defocus_profile`): the joint fits' first pass and warm probes,
        and the held-defocus probe of the group fit's warm passes.
    pixel_maps : bool
        Also the per-pixel sums of the displacement plot (``pix_a``, ``pix_b``;
        :class:`cryomag.fit.accumulate.KernelOptions`): a fit's first pass.
    extended : bool
        The local models' columns (M through the CTF's defocus term) when
        :class:`PassSpec` asks for them; False: a pass whose statistics only step the
        group and the defocus (a joint fit's box-periodic first pass, never its last). When
        the CTF moves with M they are the group model's own and stay.
    lean_hessian : bool
        The window-aware group model's matrix exact only on the curvature particles
        (:class:`cryomag.fit.accumulate.KernelOptions`; where it applies).
    """

    mag: np.ndarray
    ctf_mag: np.ndarray | None
    noise: np.ndarray
    window_pad: int = 1
    second_order: int = 0
    rows: np.ndarray | None = None
    defocus: np.ndarray | None = None
    optics: OpticsParams | None = None
    aberrations: AberrationTerms | None = None
    lean: bool = False
    defocus_profile: bool = False
    pixel_maps: bool = True
    extended: bool = True
    lean_hessian: bool = False


@dataclass(frozen=True)
class PassSpec:
    """Everything a pass computes with besides its inputs (immutable).

    Attributes
    ----------
    groups : dict of int to GroupPass
        By optics group number.
    extended : bool
        Also the derivatives through the CTF's defocus term (local models).
    exact_gradient : bool
        The reference's gradient from three more 3D transforms (else from the slice image).
    ctf_moves : bool
        The group model's CTF moves with M (defocus in the specimen frame).
    nthreads : int
        Threads of the image FFTs (0 = all cores; the 3D transforms use the reference's).
    defocus : bool
        Also the derivatives with respect to each particle's defocus matrix (the defocus
        refined, :mod:`cryomag.fit.defocus`).
    upsample_slices : bool
        The window-aware model's padded-grid slice values upsampled from the particle grid
        (:class:`cryomag.fit.accumulate.KernelOptions`).
    adaptive_window : bool
        With ``upsample_slices``: each particle's window-aware prediction on the smallest
        padded grid that holds its delocalised signal, at most the group's ``window_pad``
        times the box (:class:`cryomag.fit.accumulate.KernelOptions`).
    """

    groups: dict
    extended: bool = False
    exact_gradient: bool = False
    ctf_moves: bool = False
    nthreads: int = 0
    defocus: bool = False
    upsample_slices: bool = False
    adaptive_window: bool = False


def reference_for(refs: dict, half: int):
    """The reference of half set ``half`` (1, 2; 0 = the full map)."""
    if 1 in refs and 2 in refs:
        return refs[half if half in (1, 2) else 1]
    return refs[0]


class StatisticsPass:
    """The statistics of one chunk at a pass specification (see the module docstring).

    Parameters
    ----------
    particles : ParticleSet
    refs : dict of int to MapReference
        Key 0: the full map; keys 1 and 2: half maps (half set p is compared with map p).
    images : ImageSource-like
        ``read(rows) -> float32 (n, box, box)``.
    bands : dict of int to Band
        By optics group number.
    spec : PassSpec
    """

    def __init__(self, particles, refs: dict, images, bands: dict[int, Band], spec: PassSpec):
        self.ps = particles
        self.refs = refs
        self.images = images
        self.bands = bands
        self.spec = spec
        self.halves = particles.half_sets()

    def spectra(self, rows: np.ndarray) -> np.ndarray:
        """Centred rfft2 of the images of ``rows``, complex64, (n, box, box // 2 + 1).

        Read and transformed :data:`SPECTRA_BLOCK_BYTES` of images at a time."""
        # as many FFT threads as the 3D transforms use (1 in a Dask worker by default)
        workers = self.spec.nthreads if self.spec.nthreads > 0 else None

        def transform(sel: np.ndarray) -> np.ndarray:
            # float32 images as read are transformed without a copy
            return centered_rfft2(np.asarray(self.images.read(sel), dtype=np.float32),
                                  workers=workers)  # fmt: skip

        rows = np.asarray(rows)
        first = transform(rows[:1])  # its size sets the blocks'
        if len(rows) <= 1:
            return first
        box = first.shape[-2]
        step = max(1, SPECTRA_BLOCK_BYTES // (4 * box * box))
        out = np.empty((len(rows), *first.shape[1:]), first.dtype)
        out[:1] = first
        for lo in range(1, len(rows), step):
            out[lo : lo + step] = transform(rows[lo : lo + step])
        return out

    def checkpoint_info(self) -> dict:
        """What the checkpoints record about this pass: M of each group."""
        groups = self.spec.groups
        return {"M": {str(g): np.asarray(p.mag, float).tolist() for g, p in groups.items()}}

    def __call__(self, chunk) -> list[ChunkStatistics]:
        rows = np.asarray(chunk.rows)
        g = int(chunk.group)
        gp: GroupPass = self.spec.groups[g]
        spectra = self.spectra(rows)
        lean = gp.lean
        options = KernelOptions(
            window_pad=gp.window_pad,
            extended=self.spec.extended and (self.spec.ctf_moves or (gp.extended and not lean)),
            exact_gradient=self.spec.exact_gradient and not lean,
            second_order=gp.second_order,
            ctf_moves=self.spec.ctf_moves,
            defocus=self.spec.defocus and not lean,
            aberrations=gp.aberrations,
            upsample_slices=self.spec.upsample_slices,
            adaptive_window=self.spec.adaptive_window and self.spec.upsample_slices,
            defocus_profile=gp.defocus_profile,
            pixel_maps=gp.pixel_maps,
            lean_hessian=gp.lean_hessian,
        )
        out = []
        halves = self.halves[rows]
        for half in np.unique(halves) if (1 in self.refs and 2 in self.refs) else [0]:
            sel = halves == half if half else np.ones(len(rows), bool)
            geom = self.ps.geometry(rows[sel], gp.mag, gp.ctf_mag)
            if gp.defocus is not None:
                pos = np.searchsorted(gp.rows, rows[sel])
                geom.defocus_u_A = gp.defocus[pos, 0]
                geom.defocus_v_A = gp.defocus[pos, 1]
                geom.defocus_angle_deg = gp.defocus[pos, 2]
            out.append(
                chunk_statistics(
                    reference_for(self.refs, int(half)),
                    spectra[sel],
                    geom,
                    gp.optics if gp.optics is not None else self.ps.optics_params(g),
                    self.bands[g],
                    gp.noise,
                    rows[sel],
                    options,
                )
            )
        return out
