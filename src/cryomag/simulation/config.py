"""Configuration of the ground-truth simulator: dataclasses, TOML in and out, validation.

A configuration is a :class:`SimulationConfig` with nested sections. In TOML::

    seed = 0
    n_particles = 2000            # optional: overrides the groups' n_particles (split evenly)

    [[optics_groups]]
    name = "opticsGroup1"
    pixel_size_A = 1.3            # declared (written) pixel size
    true_pixel_size_A = 1.3       # optional; M_group includes pixel_size_A / true_pixel_size_A
    aniso = [1.01, 0.99, 30.0]    # optional (major, minor, angle_deg)
    box = 128
    n_particles = 500
    particles_per_micrograph = 50

    [defocus]
    min_um = 0.8
    ...

Every key is checked: unknown keys, wrong types and out-of-range values raise
:class:`ConfigError` with the key's dotted path (``optics_groups[1].box``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w


class ConfigError(ValueError):
    """An invalid simulation configuration; the message names the offending key."""


@dataclass
class OpticsGroupConfig:
    """One optics group (one detector / pixel size / box).

    Attributes
    ----------
    name : str
        rlnOpticsGroupName.
    pixel_size_A : float
        Declared pixel size (A/px), written as rlnImagePixelSize; frequencies of the written
        images are computed with it.
    true_pixel_size_A : float or None
        The physical pixel size; None = same as declared. Adds the isotropic factor
        pixel_size_A / true_pixel_size_A to M_group (RELION: M = p_declared / p_true).
    aniso : (major, minor, angle_deg) or None
        Anisotropic magnification R(angle) diag(major, minor) R(angle)^T (see
        :func:`cryomag.simulation.simulator.aniso_matrix`); None (or left out of the TOML) =
        none. The default configuration's single group has [1.01, 0.99, 30.0].
    box : int
        Particle box (px), even.
    voltage_kv, cs_mm, amplitude_contrast, phase_shift_deg : float
        Microscope optics (true values, also written).
    n_particles : int
        Particles in this group.
    particles_per_micrograph : int
        Particles per micrograph (the last micrographs may hold one fewer).
    beam_tilt_mrad : [x, y] or None
        Beam tilt (mrad), RELION's rlnBeamTiltX/Y (turned into odd terms by insertTilt).
    odd_zernike, even_zernike : list of float or None
        RELION's rlnOddZernike / rlnEvenZernike (rad, RELION order; see
        :mod:`cryomag.physics.aberrations`). All aberrations are applied as RELION models
        them, at the true frequency u = M k (odd: the image times exp(+i phase_odd(u)); even:
        in the CTF's chi), and written to the optics table in RELION's columns.
    """

    name: str = "opticsGroup1"
    pixel_size_A: float = 1.3
    true_pixel_size_A: float | None = None
    aniso: list[float] | None = None
    box: int = 128
    voltage_kv: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.1
    phase_shift_deg: float = 0.0
    n_particles: int = 500
    particles_per_micrograph: int = 50
    beam_tilt_mrad: list[float] | None = None
    odd_zernike: list[float] | None = None
    even_zernike: list[float] | None = None


@dataclass
class DefocusConfig:
    """Defocus model (specimen frame, A positive = underfocus).

    Attributes
    ----------
    min_um, max_um : float
        Each micrograph's mean defocus is uniform in [min_um, max_um] micrometres.
    particle_std_A : float
        Per-particle defocus spread within a micrograph (Gaussian std, A): particle height in
        the ice.
    astig_mean_A : float
        DefocusU - DefocusV per micrograph, uniform in [0, 2 astig_mean_A]; the astigmatism
        angle is uniform in [-90, 90) degrees.
    ice_tilt_A : float
        Height difference across a micrograph from a tilted ice layer (A over the micrograph
        width, random direction per micrograph): added to the particles' heights as a plane
        in their coordinates (a patch CTF model can follow it, one value per micrograph
        cannot).
    written : str
        What the STAR file's defocus is, as real CTF estimation gives it (always apparent,
        i.e. measured on the distorted images, unless ``output.true_defocus``):
        ``"particle"``: each particle's own apparent defocus (exact, the default);
        ``"micrograph"``: one value per micrograph (the mean apparent defocus and astigmatism
        of its particles, as CTFFIND or Patch CTF on the whole micrograph) plus the
        estimation error; ``"patch"``: a plane over the micrograph fitted to its particles'
        apparent defocus (a smooth patch model) plus the estimation error.
    estimation_error_A : float
        Standard deviation of the error of the written mean defocus per micrograph (A), for
        ``written`` = micrograph or patch.
    astig_error_A : float
        Standard deviation of the error of each component of the written astigmatism
        (the traceless part of the defocus matrix, A) per micrograph.
    """

    min_um: float = 0.8
    max_um: float = 2.5
    particle_std_A: float = 200.0
    astig_mean_A: float = 300.0
    ice_tilt_A: float = 0.0
    written: str = "particle"
    estimation_error_A: float = 0.0
    astig_error_A: float = 0.0


@dataclass
class MagnificationConfig:
    """Magnification effects; M_p = m_def * M_mic * M_part * M_group (k_ref = M_p k_obs).

    Attributes
    ----------
    kappa_pct_per_um : float
        Defocus-dependent magnification, m_def = 1 + kappa (dz_p - dz_ref), in percent per
        micrometre of defocus (stored in truth as 1/A).
    dz_ref_um : float or None
        Reference defocus of that model; None = middle of the defocus range.
    mic_iso_std_pct, mic_aniso_std_pct : float
        Per-micrograph scatter: M_mic = (1 + d) I + [[a, b], [b, -a]], d ~ N(0, iso), a, b ~
        N(0, aniso) (percent).
    particle_iso_std_pct, particle_aniso_std_pct : float
        The same per particle (M_part).
    """

    kappa_pct_per_um: float = 0.0
    dz_ref_um: float | None = None
    mic_iso_std_pct: float = 0.0
    mic_aniso_std_pct: float = 0.0
    particle_iso_std_pct: float = 0.0
    particle_aniso_std_pct: float = 0.0


@dataclass
class ScaleConfig:
    """Per-particle contrast scale s_p = exp(-(t_mic - ice_mean_A) / ice_mfp_A) * jitter,
    jitter lognormal with log-std spread_pct / 100, the whole normalised to sample mean 1.

    Attributes
    ----------
    spread_pct : float
        Standard deviation of log(jitter), percent (0 = no jitter).
    ice_mean_A, ice_std_A : float
        Ice thickness per micrograph ~ N(mean, std), clipped at 0.2 * mean (A).
    ice_mfp_A : float
        Attenuation length (A) of the elastic signal with ice thickness (inelastic mean free
        path, ~3500 A at 300 kV). 0 or inf disables the ice effect.
    """

    spread_pct: float = 30.0
    ice_mean_A: float = 300.0
    ice_std_A: float = 100.0
    ice_mfp_A: float = 3500.0


@dataclass
class PoseConfig:
    """Poses (uniform on SO(3)) and origins.

    Attributes
    ----------
    shift_std_A : float
        Gaussian std of rlnOriginX/YAngst (A).
    shift_max_A : float
        Origins are clipped to +- this (A).
    """

    shift_std_A: float = 3.0
    shift_max_A: float = 10.0


@dataclass
class NoiseConfig:
    """Coloured Gaussian noise.

    The noise power spectrum (per DFT pixel) is
    ``E|N(k)|^2 = box^2 sigma_white^2 (1 + lowfreq_amp exp(-(|k| lowfreq_width_A)^2))``.
    ``snr`` is the ratio of signal to noise power averaged over DFT pixels with
    1/band_low_A <= |k| <= Nyquist (a particle of scale 1, averaged over random poses and the
    group's defocus distribution, measured on ``n_pilot`` pilot renderings). inf = no noise.
    """

    snr: float = 0.05
    band_low_A: float = 20.0
    lowfreq_amp: float = 1.0
    lowfreq_width_A: float = 50.0
    n_pilot: int = 32


@dataclass
class PhantomConfig:
    """The specimen: the built-in phantom, or a real map.

    Attributes
    ----------
    diameter_A, n_atoms, seed : phantom parameters (see Phantom.default).
    map_path : str or None
        Use this MRC map instead (its header voxel size is the reference pixel size).
    ref_pixel_size_A : float or None
        Voxel size of the written reference (ref.mrc) and a_ref of the normalisation;
        None = first group's declared pixel size. Ignored with ``map_path``.
    ref_box : int or None
        Box of ref.mrc; None = first group's box (enlarged to fit the phantom).
    """

    diameter_A: float = 110.0
    n_atoms: int = 4000
    seed: int = 0
    map_path: str | None = None
    ref_pixel_size_A: float | None = None
    ref_box: int | None = None


@dataclass
class OutputConfig:
    """What is written.

    Attributes
    ----------
    true_defocus : bool
        Write the specimen-frame defocus instead of the apparent (observed-frame) one.
    write_true_group_mag : bool
        Write M_group into rlnMagMat (default: identity, the estimator must find M).
    write_cs : bool
        Also write particles.cs.
    half_sets : str
        "alternate" (1, 2, 1, 2, ...) or "random".
    micrograph_size_px : int
        Micrograph size for rlnCoordinateX/Y.
    """

    true_defocus: bool = False
    write_true_group_mag: bool = False
    write_cs: bool = False
    half_sets: str = "alternate"
    micrograph_size_px: int = 4096


@dataclass
class RenderConfig:
    """Numerics.

    Attributes
    ----------
    eps : float
        finufft relative tolerance.
    margin_A : float
        Extra period of the fine grid beyond the no-wrap bound (A).
    n_workers : int
        Worker processes (0 = one per CPU).
    batch : int
        Particles per projection batch.
    antialias_start : float
        The detector's anti-aliasing filter W(k_obs) is 1 up to this fraction of Nyquist (per
        axis) and rolls off (raised cosine) to 0 at Nyquist; 1.0 = hard cut. Frequencies with
        |k_x|, |k_y| <= antialias_start * Nyquist follow the forward model exactly.
    """

    eps: float = 1e-7
    margin_A: float = 16.0
    antialias_start: float = 0.9
    n_workers: int = 0
    batch: int = 16


@dataclass
class SimulationConfig:
    """Everything the simulator needs; defaults give a small realistic data set (500
    particles, box 128 at 1.3 A, 1 % anisotropic magnification, 30 % contrast spread,
    SNR 0.05)."""

    seed: int = 0
    n_particles: int | None = None
    optics_groups: list[OpticsGroupConfig] = field(
        default_factory=lambda: [OpticsGroupConfig(aniso=[1.01, 0.99, 30.0])]
    )
    defocus: DefocusConfig = field(default_factory=DefocusConfig)
    magnification: MagnificationConfig = field(default_factory=MagnificationConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    pose: PoseConfig = field(default_factory=PoseConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    phantom: PhantomConfig = field(default_factory=PhantomConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    render: RenderConfig = field(default_factory=RenderConfig)

    # ------------------------------------------------------------------ TOML
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SimulationConfig:
        """Build and validate from a nested dict (as parsed from TOML)."""
        cfg = _from_dict(cls, data, "")
        cfg.validate()
        return cfg

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> SimulationConfig:
        """Read a TOML file; errors name the file and the key."""
        p = Path(path)
        try:
            with open(p, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"{p}: configuration file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: not valid TOML: {exc}") from None
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{p}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """Nested dict with None values left out (TOML has no null)."""
        return _strip_none(dataclasses.asdict(self))

    def to_toml(self, path: str | os.PathLike | None = None) -> str:
        """TOML text of this configuration; also written to ``path`` if given."""
        text = tomli_w.dumps(self.to_dict())
        if path is not None:
            from cryomag.io.atomic import atomic_write

            with atomic_write(Path(path)) as tmp:
                Path(tmp).write_text(text)
        return text

    # ------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check ranges; raise :class:`ConfigError` naming the key."""
        if not self.optics_groups:
            raise ConfigError("optics_groups: at least one optics group is required")
        if self.n_particles is not None and self.n_particles < len(self.optics_groups):
            raise ConfigError(
                f"n_particles: must be >= the number of optics groups "
                f"({len(self.optics_groups)}), got {self.n_particles}"
            )
        for i, g in enumerate(self.optics_groups):
            key = f"optics_groups[{i}]"
            _positive(g.pixel_size_A, f"{key}.pixel_size_A")
            if g.true_pixel_size_A is not None:
                _positive(g.true_pixel_size_A, f"{key}.true_pixel_size_A")
            if g.aniso is not None:
                if len(g.aniso) != 3:
                    raise ConfigError(
                        f"{key}.aniso: expected [major, minor, angle_deg], got {g.aniso}"
                    )
                _positive(g.aniso[0], f"{key}.aniso[0] (major)")
                _positive(g.aniso[1], f"{key}.aniso[1] (minor)")
            if g.beam_tilt_mrad is not None and len(g.beam_tilt_mrad) != 2:
                raise ConfigError(
                    f"{key}.beam_tilt_mrad: expected [x, y] in mrad, got {g.beam_tilt_mrad}"
                )
            for k in ("beam_tilt_mrad", "odd_zernike", "even_zernike"):
                vals = getattr(g, k)
                if vals is not None and not all(math.isfinite(float(v)) for v in vals):
                    raise ConfigError(f"{key}.{k}: values must be finite numbers, got {vals}")
            if g.box < 16 or g.box % 2:
                raise ConfigError(f"{key}.box: must be an even number >= 16, got {g.box}")
            _positive(g.voltage_kv, f"{key}.voltage_kv")
            if g.cs_mm < 0:
                raise ConfigError(f"{key}.cs_mm: must be >= 0, got {g.cs_mm}")
            if not 0 <= g.amplitude_contrast <= 1:
                raise ConfigError(
                    f"{key}.amplitude_contrast: must be in [0, 1], got {g.amplitude_contrast}"
                )
            if g.n_particles < 1:
                raise ConfigError(f"{key}.n_particles: must be >= 1, got {g.n_particles}")
            if g.particles_per_micrograph < 1:
                raise ConfigError(
                    f"{key}.particles_per_micrograph: must be >= 1, "
                    f"got {g.particles_per_micrograph}"
                )
        names = [g.name for g in self.optics_groups]
        if len(set(names)) != len(names):
            raise ConfigError(f"optics_groups[].name: names must be unique, got {names}")
        d = self.defocus
        if not 0 <= d.min_um <= d.max_um:
            raise ConfigError(
                f"defocus.min_um/max_um: need 0 <= min_um <= max_um, got {d.min_um}, {d.max_um}"
            )
        for k in ("particle_std_A", "astig_mean_A", "ice_tilt_A", "estimation_error_A",
                  "astig_error_A"):  # fmt: skip
            _nonneg(getattr(d, k), f"defocus.{k}")
        if d.written not in ("particle", "micrograph", "patch"):
            raise ConfigError(
                f"defocus.written: must be 'particle', 'micrograph' or 'patch', got {d.written!r}"
            )
        m = self.magnification
        for k in (
            "mic_iso_std_pct",
            "mic_aniso_std_pct",
            "particle_iso_std_pct",
            "particle_aniso_std_pct",
        ):
            _nonneg(getattr(m, k), f"magnification.{k}")
            if getattr(m, k) > 20:
                raise ConfigError(f"magnification.{k}: {getattr(m, k)} % is unphysically large")
        if abs(m.kappa_pct_per_um) > 20:
            raise ConfigError(
                f"magnification.kappa_pct_per_um: {m.kappa_pct_per_um} is unphysically large"
            )
        s = self.scale
        _nonneg(s.spread_pct, "scale.spread_pct")
        _positive(s.ice_mean_A, "scale.ice_mean_A")
        _nonneg(s.ice_std_A, "scale.ice_std_A")
        _nonneg(s.ice_mfp_A, "scale.ice_mfp_A")
        _nonneg(self.pose.shift_std_A, "pose.shift_std_A")
        _nonneg(self.pose.shift_max_A, "pose.shift_max_A")
        n = self.noise
        if not (n.snr > 0):
            raise ConfigError(f"noise.snr: must be > 0 (inf = noise-free), got {n.snr}")
        _positive(n.band_low_A, "noise.band_low_A")
        _nonneg(n.lowfreq_amp, "noise.lowfreq_amp")
        _positive(n.lowfreq_width_A, "noise.lowfreq_width_A")
        if n.n_pilot < 1:
            raise ConfigError(f"noise.n_pilot: must be >= 1, got {n.n_pilot}")
        p = self.phantom
        _positive(p.diameter_A, "phantom.diameter_A")
        if p.n_atoms < 2:
            raise ConfigError(f"phantom.n_atoms: must be >= 2, got {p.n_atoms}")
        if p.ref_pixel_size_A is not None:
            _positive(p.ref_pixel_size_A, "phantom.ref_pixel_size_A")
        if p.ref_box is not None and (p.ref_box < 16 or p.ref_box % 2):
            raise ConfigError(f"phantom.ref_box: must be an even number >= 16, got {p.ref_box}")
        if self.output.half_sets not in ("alternate", "random"):
            raise ConfigError(
                f"output.half_sets: must be 'alternate' or 'random', got {self.output.half_sets!r}"
            )
        if self.output.micrograph_size_px < 2 * max(g.box for g in self.optics_groups):
            raise ConfigError("output.micrograph_size_px: must be at least twice the largest box")
        r = self.render
        if not 1e-14 < r.eps < 1e-2:
            raise ConfigError(f"render.eps: must be in (1e-14, 1e-2), got {r.eps}")
        _nonneg(r.margin_A, "render.margin_A")
        if r.n_workers < 0:
            raise ConfigError(f"render.n_workers: must be >= 0, got {r.n_workers}")
        if not 0.0 < r.antialias_start <= 1.0:
            raise ConfigError(f"render.antialias_start: must be in (0, 1], got {r.antialias_start}")
        if r.batch < 1:
            raise ConfigError(f"render.batch: must be >= 1, got {r.batch}")

    def group_particle_counts(self) -> list[int]:
        """Particles per optics group (``n_particles`` split evenly when it is set)."""
        if self.n_particles is None:
            return [g.n_particles for g in self.optics_groups]
        ng = len(self.optics_groups)
        base, extra = divmod(self.n_particles, ng)
        return [base + (1 if i < extra else 0) for i in range(ng)]


# ---------------------------------------------------------------------- helpers
def _positive(v: float, key: str) -> None:
    if not (v > 0) or not math.isfinite(v):
        raise ConfigError(f"{key}: must be a finite number > 0, got {v}")


def _nonneg(v: float, key: str) -> None:
    if not (v >= 0):
        raise ConfigError(f"{key}: must be >= 0, got {v}")


def _strip_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_strip_none(v) for v in obj]
    return obj


def _from_dict(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path or '<top>'}: expected a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown key (allowed: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        key = f"{path}.{name}" if path else name
        kwargs[name] = _convert(hints[name], value, key)
    return cls(**kwargs)


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, key)
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = args
        return [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover
