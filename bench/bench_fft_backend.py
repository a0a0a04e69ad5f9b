"""The statistics kernel's transforms with each FFT backend (:mod:`cryomag.physics.fft`).

Prints, in one run, the median time of each transform the window-aware kernel makes per
block (4 particles of box 128, window padding 2, one thread) with scipy.fft and with ducc0,
and their ratio; then one chunk of the kernel (``--chunk``: 512 particles of a simulated set
with the defaults of a full pass) with each backend.

Usage::

    python bench/bench_fft_backend.py [--repeat 7] [--chunk]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from cryomag.physics import fft


def _median_ms(f, n: int, repeat: int) -> float:
    f()
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        runs.append((time.perf_counter() - t0) / n)
    return 1e3 * statistics.median(runs)


def transforms(repeat: int) -> None:
    rng = np.random.default_rng(0)
    b, box, big = 4, 128, 256
    grid = (rng.standard_normal((b, big, big // 2 + 1)) * (1 + 1j)).astype(np.complex64)
    rows = (rng.standard_normal((b, box, big // 2 + 1)) * (1 + 1j)).astype(np.complex64)
    img = rng.standard_normal((b, box, box)).astype(np.float32)
    wide = rng.standard_normal((b, box, big)).astype(np.float32)
    cases = {
        "complex along y, 4 x 256 x 129": lambda: fft.ifft(grid.copy(), axis=-2),
        "real inverse of rows, 4 x 128 x 129 -> 256": lambda: fft.irfft(rows, n=big, axis=-1),
        "real along x, 4 x 128 x 256": lambda: fft.rfft(wide, axis=-1),
        "rfft2, 4 x 128 x 128": lambda: fft.rfft2(img),
    }
    backends = ["scipy"] + (["ducc0"] if fft._ducc is not None else [])
    print(f"{'transform (ms per call, median of ' + str(repeat) + ')':48s}"
          + "".join(f"{b:>10s}" for b in backends) + "   ducc0 / scipy")  # fmt: skip
    for name, f in cases.items():
        t = {}
        for be in backends:
            old = fft.use_backend(be)
            t[be] = _median_ms(f, 200, repeat)
            fft.use_backend(old)
        ratio = f"{t['ducc0'] / t['scipy']:.2f}" if "ducc0" in t else "-"
        print(f"{name:48s}" + "".join(f"{t[b]:10.3f}" for b in backends) + f"   {ratio}")


def chunk(repeat: int) -> None:
    import tempfile
    from pathlib import Path

    from bench_speed import dataset

    from cryomag.execution import make_chunks
    from cryomag.fit.bands import auto_window_pad, initial_noise, make_bands
    from cryomag.fit.passes import GroupPass, PassSpec, StatisticsPass
    from cryomag.io import ImageSource, read_particles
    from cryomag.workflows.estimate import load_references

    folder = dataset(Path(tempfile.gettempdir()) / "cryomag-bench", 5000)
    ps = read_particles(folder / "particles.star")
    refs, _ = load_references(folder / "ref.mrc", eps=1e-3, nthreads=1)
    bands = make_bands(ps, refs[0].nyquist, 20.0, None)
    g = int(ps.group_numbers()[0])
    pad = auto_window_pad(ps, g, bands[g])
    ch = make_chunks(ps.particle_group_numbers(), 512, balance=1)[0]
    probe = StatisticsPass(ps, refs, ImageSource(ps), bands, PassSpec({}, nthreads=1))
    noise = initial_noise(probe.spectra(np.asarray(ch.rows)[:256]), bands[g])
    gp = GroupPass(ps.mag_matrix(g), ps.mag_matrix(g), noise, pad, second_order=4)
    p = StatisticsPass(ps, refs, ImageSource(ps), bands,
                       PassSpec({g: gp}, nthreads=1, upsample_slices=True))  # fmt: skip
    t = {}
    for be in ["scipy"] + (["ducc0"] if fft._ducc is not None else []):
        old = fft.use_backend(be)
        t[be] = _median_ms(lambda: p(ch), 1, repeat) / len(ch)
        fft.use_backend(old)
    print(f"one chunk of the full pass (512 particles, pad {pad}), ms per particle: "
          + ", ".join(f"{b} {v:.2f}" for b, v in t.items())
          + (f"; ducc0 / scipy {t['ducc0'] / t['scipy']:.2f}" if "ducc0" in t else ""))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--chunk", action="store_true", help="also one chunk of the kernel")
    a = ap.parse_args()
    print(f"date {time.strftime('%Y-%m-%d %H:%M')}, backend by default: {fft.BACKEND}")
    transforms(a.repeat)
    if a.chunk:
        chunk(max(a.repeat // 2, 3))


if __name__ == "__main__":
    main()
