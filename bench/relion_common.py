"""Helpers shared by the benchmarks: reading + FFT floor, RELION beside cryomag, the machine.

- :func:`floor_seconds`: the read + rfft2 floor of a particle stack (one thread);
- :func:`write_postprocess`: a PostProcess-like STAR that relion_ctf_refine needs for its
  frequency weights (FSC 0.99: the simulations' references are exact);
- :func:`run_relion_ctf_refine`: one round of relion_ctf_refine on a simulated folder
  (``particles.star`` + ``ref.mrc``), its wall time in seconds and its peak RSS (MB);
- :func:`cpu_model`: the machine's processor, printed beside the ratios (the ratio of
  cryomag to RELION moved from 1.31 to 1.53 with the machine alone, bench/RESULTS.md).
"""

from __future__ import annotations

import platform
import resource
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

__all__ = ["cpu_model", "cpu_seconds", "floor_seconds", "run_relion_ctf_refine",
           "write_postprocess"]


def cpu_model() -> str:
    """The processor's model name (Linux: /proc/cpuinfo), else what :mod:`platform` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def floor_seconds(folder: Path, chunk: int = 1024, repeat: int = 3) -> float:
    """Read every image of ``folder/particles.star`` and rfft2 it (float32, one thread).

    Returns
    -------
    float
        Wall time (s): the median of ``repeat`` reads in this process (the first also pages
        the stack in and warms the FFT; one read alone varied 2.8-4.9 s for a 1.3 GB stack).
    """
    import statistics

    import scipy.fft as sfft

    from cryomag.io import ImageSource, read_particles

    ps = read_particles(folder / "particles.star")
    src = ImageSource(ps)
    runs = []
    for _ in range(max(int(repeat), 1)):
        t0 = time.perf_counter()
        for lo in range(0, len(ps), chunk):
            imgs = src.read(np.arange(lo, min(len(ps), lo + chunk))).astype(np.float32)
            sfft.rfft2(imgs, axes=(-2, -1), workers=1)
        runs.append(time.perf_counter() - t0)
    return float(statistics.median(runs))


def write_postprocess(folder: Path, box: int, apix: float) -> Path:
    """A PostProcess-like STAR for relion_ctf_refine's frequency weights (FSC 0.99).

    Parameters
    ----------
    folder : Path
        Where to write ``postprocess_bench.star``.
    box : int
        Particle box (px).
    apix : float
        Pixel size (A).
    """
    lines = ["data_general", "", "_rlnFinalResolution 2.5", "", "data_fsc", "", "loop_",
             "_rlnSpectralIndex #1", "_rlnResolution #2", "_rlnAngstromResolution #3",
             "_rlnFourierShellCorrelationCorrected #4"]  # fmt: skip
    for i in range(box // 2 + 1):
        res = i / (box * apix)
        ang = 1 / res if i else 999.0
        lines.append(f"{i} {res:.6f} {ang:.4f} 0.99")
    path = folder / "postprocess_bench.star"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_relion_ctf_refine(relion_bin: Path, folder: Path, out: Path, box: int, apix: float,
                          fit: list[str], threads: int = 2, star: str = "particles.star"
                          ) -> tuple[float, float, float]:  # fmt: skip
    """One round of relion_ctf_refine on ``folder`` (``star``, ref.mrc as both halves).

    Parameters
    ----------
    relion_bin : Path
        A RELION 5 build's bin folder.
    folder : Path
        The simulated data set.
    out : Path
        Output folder (replaced).
    box, apix : int, float
        Particle box (px) and pixel size (A), for the PostProcess STAR.
    fit : list of str
        The fit's flags, e.g. ``["--fit_aniso"]`` or ``["--fit_defocus", "--fit_mode",
        "fpmff", "--kmin_defocus", "30"]``.
    threads : int
        ``--j``.
    star : str
        The particles' STAR file in ``folder``.

    Returns
    -------
    (float, float, float)
        Wall time (s), the child's peak RSS (MB, ru_maxrss of the children) and its CPU
        time (s, user + system of its threads).
    """
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    pp = write_postprocess(out, box, apix)
    cmd = [str(relion_bin / "relion_ctf_refine"), "--i", star, "--f", str(pp),
           "--m1", "ref.mrc", "--m2", "ref.mrc", "--o", str(out) + "/", *fit,
           "--j", str(threads)]  # fmt: skip
    before = cpu_seconds(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    run = subprocess.run(cmd, cwd=folder, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    cpu_s = cpu_seconds(resource.RUSAGE_CHILDREN) - before
    if run.returncode != 0:
        raise RuntimeError(f"relion_ctf_refine failed:\n{run.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    return elapsed, peak, cpu_s


def cpu_seconds(*who: int) -> float:
    """User + system CPU time (s) of ``who`` (``resource.RUSAGE_SELF``: this process;
    ``resource.RUSAGE_CHILDREN``: its ended and waited-for descendants), summed."""
    return sum(ru.ru_utime + ru.ru_stime for ru in map(resource.getrusage, who))
