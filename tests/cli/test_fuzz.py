"""Issue 15: random corruptions of a small STAR / .cs / MRC set fed to every command.

A tiny valid data set (20 particles, box 32, with .cs) and one estimate run of it are made
once; each case copies them, applies one corruption chosen with a fixed seed (NaN / inf /
huge / negative / zero / non-numeric values in random cells of the STAR or the .cs, deleted
columns, an extra or a missing value in a row, truncated or mode-changed MRC files, a NaN or
huge pixel, zero / NaN / constant maps, garbage text) and runs one command through the CLI.
Every case must end in one of two ways:

- exit code != 0 with exactly one ``error: ...`` line and no Python traceback, or
- exit code 3 (a fit failed its quality checks) with results.json saying so, or
- exit code 0 with outputs free of NaN / inf (results.json, fsc.json, merge.json, every
  column of a written STAR that an engine uses, every written map).

Cases whose traceback lies in the estimation engine (files being rewritten in another branch)
are marked xfail with the reason, so that they are fixed there.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from typer.testing import CliRunner

from cryomag.cli.main import app
from cryomag.io.cryosparc import load_cs_array
from cryomag.simulation.config import OpticsGroupConfig, SimulationConfig
from cryomag.simulation.simulator import simulate_dataset

BAD_NUMBERS = ["nan", "inf", "-inf", "1e300", "-1e300", "0", "-1", "-2.5", "abc", "1e-300"]


# ------------------------------------------------------------------------------ data
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The valid data set (``data/``) and an estimate run of it (``run/``)."""
    root = tmp_path_factory.mktemp("fuzz")
    cfg = SimulationConfig(seed=7)
    cfg.optics_groups = [
        OpticsGroupConfig(
            pixel_size_A=2.0,
            aniso=[1.01, 0.99, 30.0],
            box=32,
            n_particles=20,
            particles_per_micrograph=10,
        )
    ]
    cfg.defocus.min_um, cfg.defocus.max_um = 0.5, 1.0
    cfg.noise.snr = 1.0
    cfg.phantom.diameter_A, cfg.phantom.n_atoms = 40.0, 300
    cfg.output.write_cs = True
    cfg.render.n_workers = 1
    simulate_dataset(cfg, root / "data", progress=False)
    r = CliRunner().invoke(app, _estimate_args(root / "data", root / "run", "particles.star"))
    assert r.exit_code == 0, r.output
    return root


def _estimate_args(data: Path, out: Path, particles: str, fit: str = "scale,aniso,micrograph"):
    return ["estimate", "-i", str(data / particles), "--ref", str(data / "ref.mrc"), "--out",
            str(out), "--j", "1", "--max-iter", "6", "--tol", "1e-4", "--defocus-tol", "5",
            "--warm-start", "0", "--no-plots", "-q", "--fit", fit]  # fmt: skip


# ----------------------------------------------------------------------- corruptions
def _star_rows(text: str) -> tuple[list[str], int, list[str]]:
    """Lines, index of the first particle row, the particle labels."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("data_particles"))
    labels, i = [], start + 1
    while not lines[i].startswith("_"):
        i += 1
    while lines[i].startswith("_"):
        labels.append(lines[i].split()[0][1:])
        i += 1
    return lines, i, labels


def star_cell(rng, folder: Path, table: str = "particles") -> str:
    path = folder / "particles.star"
    lines, first, labels = _star_rows(path.read_text())
    if table == "optics":
        o = next(i for i, ln in enumerate(lines) if ln.startswith("data_optics"))
        j = o + 1
        olabels = []
        while not lines[j].startswith("_"):
            j += 1
        while lines[j].startswith("_"):
            olabels.append(lines[j].split()[0][1:])
            j += 1
        numeric = [k for k, lab in enumerate(olabels) if "Name" not in lab]
        k = int(rng.choice(numeric))
        vals = lines[j].split()
        vals[k] = str(rng.choice(BAD_NUMBERS))
        lines[j] = " ".join(vals)
        what = f"optics {olabels[k]} = {vals[k]}"
    else:
        n = sum(1 for ln in lines[first:] if ln.strip())
        r = first + int(rng.integers(n))
        numeric = [k for k, lab in enumerate(labels) if not lab.endswith("Name")]
        k = int(rng.choice(numeric))
        vals = lines[r].split()
        vals[k] = str(rng.choice(BAD_NUMBERS))
        lines[r] = " ".join(vals)
        what = f"row {r - first + 1} {labels[k]} = {vals[k]}"
    path.write_text("\n".join(lines) + "\n")
    return what


def star_optics(rng, folder):
    return star_cell(rng, folder, "optics")


#: Extreme values the validation accepts: the engines must give a clean result or error.
EDGE_VALUES = {
    "rlnVoltage": ["20", "3000"],
    "rlnSphericalAberration": ["0", "50"],
    "rlnAmplitudeContrast": ["0", "0.999"],
    "rlnImagePixelSize": ["0.05", "100"],
    "rlnDefocusU": ["200000", "-200000", "0"],
    "rlnDefocusV": ["200000", "0"],
    "rlnCtfBfactor": ["500", "-500"],
    "rlnCtfScalefactor": ["100", "-100", "1e-300"],
    "rlnOriginXAngst": ["64", "-64"],
    "rlnAngleTilt": ["1e300", "180"],
    "rlnPhaseShift": ["1e300", "180"],
    "rlnMagMat00": ["1.45", "0.1"],
}


def star_edge(rng, folder: Path) -> str:
    """An extreme but valid value in one column (every row, or one)."""
    path = folder / "particles.star"
    lines, first, labels = _star_rows(path.read_text())
    col = str(rng.choice(list(EDGE_VALUES)))
    value = str(rng.choice(EDGE_VALUES[col]))
    if col in labels:
        k = labels.index(col)
        rows = range(first, len(lines)) if rng.random() < 0.5 else [first + int(rng.integers(20))]
        for r in rows:
            if lines[r].strip():
                vals = lines[r].split()
                vals[k] = value
                lines[r] = " ".join(vals)
    else:  # an optics column
        o = next(i for i, ln in enumerate(lines) if ln.startswith("data_optics"))
        j, olabels = o + 1, []
        while not lines[j].startswith("_"):
            j += 1
        while lines[j].startswith("_"):
            olabels.append(lines[j].split()[0][1:])
            j += 1
        vals = lines[j].split()
        vals[olabels.index(col)] = value
        lines[j] = " ".join(vals)
    path.write_text("\n".join(lines) + "\n")
    return f"{col} = {value}"


def star_drop_column(rng, folder: Path) -> str:
    path = folder / "particles.star"
    lines, first, labels = _star_rows(path.read_text())
    k = int(rng.integers(len(labels)))
    head = first - len(labels)
    del lines[head + k]
    for r in range(first - 1, len(lines)):
        if lines[r].strip():
            vals = lines[r].split()
            del vals[k]
            lines[r] = " ".join(vals)
    path.write_text("\n".join(lines) + "\n")
    return f"column {labels[k]} deleted"


def star_row_count(rng, folder: Path) -> str:
    path = folder / "particles.star"
    lines, first, _ = _star_rows(path.read_text())
    r = first + int(rng.integers(3)) * int(rng.integers(2)) * 7  # often the first row
    vals = lines[r].split()
    if rng.random() < 0.5:
        vals.append("1.0")
        what = "extra value"
    else:
        vals.pop(int(rng.integers(len(vals))))
        what = "missing value"
    lines[r] = " ".join(vals)
    path.write_text("\n".join(lines) + "\n")
    return f"{what} in row {r - first + 1}"


def garbage(rng, folder: Path, name: str = "particles.star") -> str:
    path = folder / name
    data = path.read_bytes()
    if rng.random() < 0.5:
        cut = int(rng.integers(1, len(data)))
        path.write_bytes(data[:cut])
        return f"{name} truncated at {cut}"
    junk = rng.integers(0, 256, size=int(rng.integers(10, 400)), dtype=np.uint8).tobytes()
    pos = int(rng.integers(len(data)))
    path.write_bytes(data[:pos] + junk + data[pos + len(junk) :])
    return f"{name}: {len(junk)} garbage bytes at {pos}"


def garbage_cs(rng, folder):
    return garbage(rng, folder, "particles.cs")


def cs_cell(rng, folder: Path) -> str:
    path = folder / "particles.cs"
    arr = np.array(load_cs_array(path), copy=True)
    fields = [
        f for f in arr.dtype.names if arr.dtype[f].base.kind == "f" and not f.startswith("blob/")
    ] + ["blob/psize_A"]
    f = str(rng.choice(fields))
    r = int(rng.integers(len(arr)))
    value = float(rng.choice([np.nan, np.inf, -np.inf, 1e38, -1e38, 0.0, -1.0, -3.0]))
    col = arr[f]
    if col.ndim > 1:
        col[r, int(rng.integers(col.shape[1]))] = value
    else:
        col[r] = value
    with open(path, "wb") as fh:
        np.save(fh, arr)
    return f"{f}[{r}] = {value}"


def cs_drop_field(rng, folder: Path) -> str:
    path = folder / "particles.cs"
    arr = load_cs_array(path)
    f = str(rng.choice([n for n in arr.dtype.names if n != "uid"]))
    keep = [n for n in arr.dtype.names if n != f]
    out = np.empty(len(arr), dtype=[(n, arr.dtype[n]) for n in keep])
    for n in keep:
        out[n] = arr[n]
    with open(path, "wb") as fh:
        np.save(fh, out)
    return f"field {f} deleted"


def _stack(folder: Path) -> Path:
    return next((folder / "Particles").glob("*.mrcs"))


def stack_truncate(rng, folder: Path) -> str:
    p = _stack(folder)
    data = p.read_bytes()
    cut = int(rng.integers(100, len(data) - 1))
    p.write_bytes(data[:cut])
    return f"{p.name} truncated at {cut}"


def stack_mode(rng, folder: Path) -> str:
    p = _stack(folder)
    data = bytearray(p.read_bytes())
    mode = int(rng.choice([0, 1, 6, 12, 4]))
    data[12:16] = np.int32(mode).tobytes()
    p.write_bytes(bytes(data))
    return f"{p.name} mode {mode}"


def stack_pixel(rng, folder: Path) -> str:
    p = _stack(folder)
    with mrcfile.open(p, "r+") as m:
        i = int(rng.integers(m.data.shape[0]))
        value = float(rng.choice([np.nan, np.inf, 1e30]))
        m.data[i, int(rng.integers(32)), int(rng.integers(32))] = value
    return f"{p.name} image {i + 1} pixel {value}"


def map_values(rng, folder: Path) -> str:
    p = folder / "ref.mrc"
    with mrcfile.open(p, "r+") as m:
        kind = str(rng.choice(["zero", "nan", "constant", "inf"]))
        if kind == "zero":
            m.data[...] = 0
        elif kind == "constant":
            m.data[...] = 3.0
        else:
            m.data[tuple(rng.integers(0, 32, 3))] = np.nan if kind == "nan" else np.inf
    return f"ref.mrc {kind}"


def map_file(rng, folder: Path) -> str:
    if rng.random() < 0.5:
        return garbage(rng, folder, "ref.mrc")
    data = bytearray((folder / "ref.mrc").read_bytes())
    data[12:16] = np.int32(int(rng.choice([0, 1, 3]))).tobytes()
    (folder / "ref.mrc").write_bytes(bytes(data))
    return "ref.mrc mode changed"


# corruptions of a finished run (for refit, report, apply)
def run_results(rng, run: Path) -> str:
    return garbage(rng, run, "results.json")


def run_star(rng, run: Path) -> str:
    return star_cell(rng, run)


def run_options(rng, run: Path) -> str:
    return garbage(rng, run / "stats", "options.json")


def run_npz(rng, run: Path) -> str:
    p = next((run / "stats").glob("group_*.npz"))
    data = p.read_bytes()
    p.write_bytes(data[: int(rng.integers(10, len(data) - 10))])
    return f"{p.name} truncated"


DATA_CORRUPTIONS = {
    "star_cell": star_cell,
    "star_optics": star_optics,
    "star_edge": star_edge,
    "star_drop_column": star_drop_column,
    "star_row_count": star_row_count,
    "star_garbage": garbage,
    "cs_cell": cs_cell,
    "cs_drop_field": cs_drop_field,
    "cs_garbage": garbage_cs,
    "stack_truncate": stack_truncate,
    "stack_mode": stack_mode,
    "stack_pixel": stack_pixel,
    "map_values": map_values,
    "map_file": map_file,
}
RUN_CORRUPTIONS = {
    "run_results": run_results,
    "run_star": run_star,
    "run_options": run_options,
    "run_npz": run_npz,
}

#: Which commands each corruption is fed to (the ones that read the corrupted file).
COMMANDS = {
    "star_cell": ["estimate", "reconstruct", "merge", "inspect"],
    "star_optics": ["estimate", "reconstruct", "merge", "inspect"],
    "star_edge": ["estimate", "reconstruct", "merge_estimate"],
    "star_drop_column": ["estimate", "reconstruct", "inspect", "merge"],
    "star_row_count": ["estimate", "inspect", "reconstruct"],
    "star_garbage": ["reconstruct", "inspect"],
    "cs_cell": ["estimate_cs", "reconstruct_cs", "merge", "inspect_cs"],
    "cs_drop_field": ["estimate_cs", "inspect_cs"],
    "cs_garbage": ["inspect_cs", "merge"],
    "stack_truncate": ["estimate", "reconstruct"],
    "stack_mode": ["estimate", "reconstruct"],
    "stack_pixel": ["estimate", "reconstruct", "merge_estimate"],
    "map_values": ["estimate", "estimate_half", "merge_estimate"],
    "map_file": ["estimate", "estimate_half"],
    "run_results": ["report", "apply"],
    "run_star": ["refit", "apply", "report"],
    "run_options": ["refit"],
    "run_npz": ["refit"],
}

#: (corruption, command, seed) whose failure is a traceback in the estimation engine:
#: expected to fail until the engine (rewritten in another branch) handles them.
ENGINE_XFAIL: dict[tuple[str, str], str] = {}


#: Cases per (corruption, command) (default 2): more for the random cells.
REPEATS = {
    "star_cell": 4,
    "cs_cell": 4,
    "star_optics": 3,
    "star_edge": 4,
    "run_npz": 1,
    "run_options": 1,
}


def _cases():
    rng = np.random.default_rng(20261204)
    cases = []
    for name, commands in COMMANDS.items():
        for command in commands:
            for _ in range(REPEATS.get(name, 2)):
                seed = int(rng.integers(1 << 31))
                marks = []
                if (name, command) in ENGINE_XFAIL:
                    marks.append(
                        pytest.mark.xfail(reason=ENGINE_XFAIL[(name, command)], strict=False)
                    )
                cases.append(pytest.param(name, command, seed, id=f"{name}-{command}-{seed}",
                                          marks=marks))  # fmt: skip
    return cases


# -------------------------------------------------------------------------- commands
def _args(command: str, data: Path, run: Path, out: Path) -> list[str]:
    star, cs = data / "particles.star", data / "particles.cs"
    return {
        "estimate": _estimate_args(data, out, "particles.star", "scale,aniso"),
        "estimate_cs": _estimate_args(data, out, "particles.cs", "scale,aniso"),
        "estimate_half": [*_estimate_args(data, out, "particles.star", "scale,aniso")[:3],
                          "--half-maps", str(data / "ref.mrc"), str(data / "half2.mrc"),
                          *_estimate_args(data, out, "particles.star", "scale,aniso")[5:]],
        "reconstruct": ["reconstruct", "-i", str(star), "--out", str(out), "--max-iter", "2",
                        "-q"],
        "reconstruct_cs": ["reconstruct", "-i", str(cs), "--out", str(out), "--max-iter", "2",
                           "-q"],
        "merge": ["merge", str(star), str(cs), "--no-estimate", "--out", str(out), "-q"],
        "merge_estimate": ["merge", str(star), "--ref", str(data / "ref.mrc"), "--out",
                           str(out), "-q"],
        "inspect": ["inspect", str(star)],
        "inspect_cs": ["inspect", str(cs)],
        "apply": ["apply", str(run), "--out", str(out), "--cs", "--model", "micrograph", "-q"],
        "refit": ["refit", str(run), "--out", str(out), "--fit", "micrograph", "--no-plots"],
        "report": ["report", str(run)],
    }[command]  # fmt: skip


def _nonfinite_json(obj, path: str = "") -> list[str]:
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _nonfinite_json(v, f"{path}.{k}")]
    if isinstance(obj, list):
        return [p for i, v in enumerate(obj) for p in _nonfinite_json(v, f"{path}[{i}]")]
    if isinstance(obj, float) and not math.isfinite(obj):
        return [path]
    return []


def _check_outputs(out: Path) -> list[str]:
    """Every NaN / inf in the outputs written under ``out``.

    STAR files: the columns an engine uses (the validation rules: defocus, scale, matrices,
    poses ...); other columns are carried over unchanged from the input (a CTFFIND ``inf``
    in rlnCtfMaxResolution is data, not a result; cmag* columns of a run are apply's input,
    where NaN marks a particle without a local fit). The fitted numbers are in the JSON files.
    """
    from cryomag.io import read_star
    from cryomag.model.validation import OPTICS_RULES, PARTICLE_RULES

    checked = set(PARTICLE_RULES) | set(OPTICS_RULES)

    bad = []
    if not out.exists():
        return bad
    for f in out.rglob("*.json"):
        if f.name.startswith("."):
            continue
        bad += [f"{f}{p}" for p in _nonfinite_json(json.loads(f.read_text()))]
    for f in out.rglob("particles.star"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ps = read_star(f)
        for t in (ps.particles, ps.optics):
            cols = [c for c in t.columns if c in checked]
            num = t[cols].select_dtypes("number")
            cols = num.columns[~np.isfinite(num.to_numpy(float)).all(axis=0)].tolist()
            bad += [f"{f}: {c}" for c in cols]
    for f in out.rglob("*.mrc"):
        with mrcfile.open(f, permissive=True) as m:
            if not np.isfinite(m.data).all():
                bad.append(f"{f}: non-finite voxels")
    return bad


@pytest.mark.parametrize(("corruption", "command", "seed"), _cases())
def test_corruption_gives_clear_error_or_clean_result(base, tmp_path, corruption, command, seed):
    rng = np.random.default_rng(seed)
    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(base / "data", data)
    shutil.copytree(base / "run", run)
    # (the run's particles.star names its stacks relative to itself: ../data/Particles/...)
    shutil.copy(data / "ref.mrc", data / "half2.mrc")  # a valid second half map
    if corruption in RUN_CORRUPTIONS:
        what = RUN_CORRUPTIONS[corruption](rng, run)
    else:
        what = DATA_CORRUPTIONS[corruption](rng, data)
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = CliRunner().invoke(app, _args(command, data, run, out))
    text = r.output
    assert "Traceback" not in text, f"{what}: traceback\n{text}"
    if r.exit_code == 3:  # a fit failed its quality checks: written, flagged, not applied
        summary = json.loads(next(out.rglob("results.json")).read_text())
        assert summary["verdict"] == "failed" and summary["problems"], f"{what}: {text}"
    elif r.exit_code != 0:
        assert isinstance(r.exception, SystemExit), (
            f"{what}: {command} raised {r.exception!r} instead of a clean error\n{text}"
        )
        errors = [ln for ln in text.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1, f"{what}: expected one 'error:' line, got\n{text}"
        assert len(errors[0]) > 20
    elif command == "report":  # writes only the page (the run's files are its inputs)
        assert re.search(r"wrote .*report\.html", text) and (run / "report.html").is_file()
    else:
        bad = _check_outputs(out)
        assert not bad, f"{what}: {command} exit 0 with non-finite outputs {bad}"
