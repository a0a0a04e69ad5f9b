"""``cryomag report``: one self-contained HTML page of a run.

The page (``report.html`` in the run folder) shows, from what the commands wrote:

- the inputs and the exact command lines (``command:`` lines of ``cryomag.log``, the
  ``command`` field of results.json / fsc.json, the ``command_line`` of the folder's manifest;
  "not recorded" when absent) with the cryomag version(s) that wrote them, and the options of
  the estimation (results.json ``options``);
- per optics group: M with its standard errors, the polar form (major / minor scale, axis
  angle, pixel-size change) and cryoSPARC's anisomag; the contrast-scale quantiles;
- every PNG in ``DIR/plots`` (and ``DIR/fsc.png`` for a reconstruction folder);
- with ``--before`` / ``--after`` reconstruction folders (``cryomag reconstruct`` outputs):
  both half-map FSC curves on one plot (also saved as ``DIR/report_fsc.png``), the
  resolutions at FSC = 0.143 and 0.5, and the resolution gain.

Images are embedded as base64 data URIs and the style sheet is inline: the page needs no
other file, no script and no network, so it can be mailed or archived as it is.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["ReportResult", "build_report", "load_reconstruction", "plot_fsc_curves"]

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       margin: 2em auto; max-width: 1100px; color: #1d1d1f; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.8em; }
h3 { font-size: 1.05em; margin-bottom: 0.3em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #d0d0d0; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; }
td.l, th.l { text-align: left; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; font-size: 0.85em;
      white-space: pre-wrap; word-break: break-all; }
figure { display: inline-block; margin: 0.5em 1em 1em 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #e0e0e0; }
figcaption { font-size: 0.85em; color: #555; }
.summary { background: #eef6ee; border: 1px solid #b9d9b9; padding: 0.6em 1em; }
.muted { color: #777; }
.warn { color: #a15c00; }
table.mat { margin: 0; border: none; }
table.mat td { border: none; padding: 0 0.4em; white-space: nowrap; }
"""


@dataclass
class ReportResult:
    """What :func:`build_report` wrote."""

    path: Path
    images: list[Path] = field(default_factory=list)
    resolution_before_A: float | None = None
    resolution_after_A: float | None = None

    @property
    def gain_A(self) -> float | None:
        """Resolution gain (A), before - after (positive = better after)."""
        if self.resolution_before_A is None or self.resolution_after_A is None:
            return None
        return self.resolution_before_A - self.resolution_after_A


# ------------------------------------------------------------------------------ plots
def plot_fsc_curves(
    curves: list[tuple[str, np.ndarray, np.ndarray]],
    path: Path,
    title: str | None = None,
    thresholds: tuple[float, ...] = (0.143, 0.5),
) -> Path:
    """Plot FSC curves against resolution and save a PNG.

    Parameters
    ----------
    curves : list of (label, freq, fsc)
        ``freq`` in 1/A, shape (n,); ``fsc``, shape (n,).
    path : path
        PNG to write (atomically).
    title : str, optional
    thresholds : tuple of float
        Horizontal reference lines.

    Returns
    -------
    Path
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cryomag.io.atomic import atomic_write

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    fmax = 0.0
    for label, f, c in curves:
        f = np.asarray(f, float)
        ax.plot(f, np.asarray(c, float), lw=1.6, label=label)
        fmax = max(fmax, float(f.max()) if f.size else 0.0)
    for t in thresholds:
        ax.axhline(t, color="grey", ls="--", lw=0.8)
        ax.text(fmax, t, f" {t:g}", va="bottom", ha="right", fontsize=8, color="grey")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xlim(0, fmax if fmax > 0 else 1)
    ax.set_ylim(-0.1, 1.05)
    ax.set_xlabel("spatial frequency (1/A)")
    ax.set_ylabel("Fourier shell correlation")
    if fmax > 0:
        top = ax.twiny()
        top.set_xlim(ax.get_xlim())
        ticks = [t for t in ax.get_xticks() if 0 < t <= fmax]
        top.set_xticks(ticks)
        top.set_xticklabels([f"{1 / t:.3g}" for t in ticks])
        top.set_xlabel("resolution (A)")
    if title:
        fig.suptitle(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    path = Path(path)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- readers
def load_reconstruction(folder: str | Path) -> dict:
    """Read a ``cryomag reconstruct`` folder's fsc.json (plus its command from the log).

    Raises
    ------
    FileNotFoundError
        When the folder has no fsc.json.
    ValueError
        When fsc.json lacks the FSC curve.
    """
    from cryomag.io.atomic import read_json

    folder = Path(folder)
    path = folder / "fsc.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder}: no fsc.json (expected the output folder of cryomag reconstruct)"
        )
    data = read_json(path, "the fsc.json of cryomag reconstruct")
    for key in ("frequency_1_per_A", "fsc"):
        if key not in data:
            raise ValueError(f"{path}: no {key!r} (expected cryomag reconstruct's fsc.json)")
    try:
        f = np.asarray(data["frequency_1_per_A"], dtype=float)
        c = np.asarray(data["fsc"], dtype=float)
        r = float(data.get("resolution_A", 1.0))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: the FSC curve is not numbers ({err})") from err
    if f.ndim != 1 or f.shape != c.shape or not (np.isfinite(f).all() and np.isfinite(r)):
        raise ValueError(
            f"{path}: frequency_1_per_A and fsc must be lists of numbers of one length, and "
            "resolution_A a finite number"
        )
    data["folder"] = str(folder)
    if not data.get("command"):
        cmds = _log_commands(folder / "cryomag.log")
        data["command"] = cmds[-1] if cmds else None
    return data


def _log_inputs(log: Path) -> list[str]:
    """Particle files named in a cryomag.log ("... particles from PATH")."""
    if not log.is_file():
        return []
    found = []
    for line in log.read_text(errors="replace").splitlines():
        m = re.search(r"particles from (\S+)", line)
        if m and m.group(1).rstrip(",") not in found:
            found.append(m.group(1).rstrip(","))
    return found


def _log_commands(log: Path) -> list[str]:
    if not log.is_file():
        return []
    out = []
    for line in log.read_text(errors="replace").splitlines():
        m = re.search(r"\bcommand:\s*(.+)$", line)
        if m:
            out.append(m.group(1).strip())
    return out


def _log_versions(log: Path) -> list[str]:
    """cryomag versions named in a cryomag.log ("cryomag X, Python ...")."""
    if not log.is_file():
        return []
    out = []
    for line in log.read_text(errors="replace").splitlines():
        m = re.search(r"\bINFO cryomag (\S+), Python", line)
        if m and m.group(1) not in out:
            out.append(m.group(1))
    return out


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'
        f"<figcaption>{html.escape(alt)}</figcaption></figure>"
    )


def _fmt(v, nd: int = 4) -> str:
    if v is None:
        return "&ndash;"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    try:
        f = float(v)
    except (TypeError, ValueError):
        return html.escape(str(v))
    if not np.isfinite(f):
        return "&ndash;"
    return f"{f:.{nd}f}"


def _matrix_pm(m, e) -> str:
    """A 2 x 2 matrix with standard errors as a small borderless table."""
    m = np.asarray(m, float)
    e = np.asarray(e, float) if e is not None else np.zeros_like(m)
    rows = "".join(
        "<tr>" + "".join(f"<td>{m[i, j]:.5f}&plusmn;{e[i, j]:.5f}</td>" for j in range(2)) + "</tr>"
        for i in range(2)
    )
    return f'<table class="mat">{rows}</table>'


# ----------------------------------------------------------------------------- sections
def _section_inputs(run: Path, results: dict | None, recs: list[tuple[str, dict]]) -> str:
    parts = ["<h2>Inputs and command lines</h2>"]
    inputs = [(str(run), p) for p in _log_inputs(run / "cryomag.log")]
    for label, rec in recs:
        inputs += [
            (f"{label}: {rec['folder']}", p)
            for p in _log_inputs(Path(rec["folder"]) / "cryomag.log")
        ]
    if inputs:
        rows = "".join(
            f'<tr><td class="l">{html.escape(a)}</td><td class="l">{html.escape(b)}</td></tr>'
            for a, b in inputs
        )
        parts.append(
            f'<table><tr><th class="l">run</th><th class="l">particles read</th></tr>{rows}</table>'
        )
    cmds = []
    if results and results.get("command"):
        cmds.append(results["command"])
    cmds += [c for c in _log_commands(run / "cryomag.log") if c not in cmds]
    versions = _log_versions(run / "cryomag.log")
    if results and results.get("cryomag_version"):
        versions.insert(0, str(results["cryomag_version"]))
    from cryomag.io.outdir import read_manifest

    man = read_manifest(run)
    if man is not None:  # every output folder records what produced it (cryomag.runinfo)
        if man.get("command_line") and man["command_line"] not in cmds:
            cmds.append(man["command_line"])
        if man.get("cryomag_version"):
            versions.append(str(man["cryomag_version"]))
    for _, rec in recs:
        if rec.get("command") and rec["command"] not in cmds:
            cmds.append(rec["command"])
        versions += _log_versions(Path(rec["folder"]) / "cryomag.log")
    if cmds:
        parts.append("<p>Commands that produced these results (run them to reproduce):</p>")
        parts.append("<pre>" + html.escape("\n".join(cmds)) + "</pre>")
    else:
        parts.append('<p class="muted">Command lines: not recorded in the run folder.</p>')
    versions = list(dict.fromkeys(versions))
    if versions:
        parts.append(
            f"<p>Written by cryomag {html.escape(', '.join(versions))}"
            + (" (more than one version: compare with care)" if len(versions) > 1 else "")
            + ".</p>"
        )
    if results and results.get("options"):
        rows = "".join(
            f'<tr><td class="l">{html.escape(str(k))}</td>'
            f'<td class="l">{html.escape(json.dumps(v))}</td></tr>'
            for k, v in results["options"].items()
        )
        parts.append(f"<h3>Estimation options</h3><table>{rows}</table>")
    log = run / "cryomag.log"
    if log.is_file():
        lines = log.read_text(errors="replace").splitlines()
        keep = lines[:60]
        more = f"\n... ({len(lines) - 60} more lines)" if len(lines) > 60 else ""
        parts.append(
            "<details><summary>cryomag.log</summary><pre>"
            + html.escape("\n".join(keep) + more)
            + "</pre></details>"
        )
    return "\n".join(parts)


def _section_groups(results: dict) -> str:
    groups = results.get("groups") or []
    parts = ["<h2>Per-group results</h2>"]
    if not groups:
        parts.append('<p class="muted">results.json has no per-group results.</p>')
        return "\n".join(parts)
    parts.append(
        "<p>RELION convention: k_ref = M k_obs (rlnMagMat). Uncertainties are standard "
        "errors. Polar form: the observed image is stretched by <i>major</i> along the axis at "
        "<i>angle</i> (degrees from +x) and by <i>minor</i> across it; the pixel-size change "
        "is sqrt(det M) - 1 (positive: the declared pixel size is too large).</p>"
    )
    head = (
        "<tr><th>optics group</th><th>particles</th><th>M &plusmn; s.e.</th><th>major</th>"
        "<th>minor</th><th>angle (deg)</th><th>pixel size change (%)</th>"
        "<th>cryoSPARC anisomag</th><th>iterations</th><th>band (A)</th></tr>"
    )
    rows = []
    for g in groups:
        p = g.get("polar") or {}
        band = g.get("band_A")
        rows.append(
            "<tr>"
            f"<td>{_fmt(g.get('optics_group'))}</td><td>{_fmt(g.get('n_particles'))}</td>"
            f'<td class="l">{_matrix_pm(g["M"], g.get("M_standard_error")) if "M" in g else ""}'
            "</td>"
            f"<td>{_fmt(p.get('major_scale'), 5)}</td><td>{_fmt(p.get('minor_scale'), 5)}</td>"
            f"<td>{_fmt(p.get('angle_deg'), 1)}</td>"
            f"<td>{_fmt(p.get('pixel_size_change_percent'), 3)}</td>"
            f"<td>{html.escape(str(np.round(np.asarray(g.get('cryosparc_anisomag', [])), 5).tolist()))}</td>"  # noqa: E501
            f"<td>{_fmt(g.get('iterations'))}</td>"
            f"<td>{html.escape(' - '.join(_fmt(b, 1) for b in band)) if band else ''}</td>"
            "</tr>"
        )
    parts.append(f"<table>{head}{''.join(rows)}</table>")
    parts += [_particle_deviations(g) for g in groups if _deviations_of(g)]
    sc = results.get("scale") or {}
    q = sc.get("quantiles") or {}
    if q:
        cells = "".join(f"<td>{_fmt(v, 3)}</td>" for v in q.values())
        heads = "".join(f"<th>{html.escape(str(k))}</th>" for k in q)
        parts.append(
            "<h3>Per-particle contrast scale (1 = mean particle)</h3>"
            f"<table><tr><th>quantile</th>{heads}</tr><tr><th>scale</th>{cells}</tr></table>"
            f"<p>Median standard error: {_fmt(sc.get('median_standard_error'), 3)}</p>"
        )
    return "\n".join(parts)


def _deviations_of(group: dict) -> dict | None:
    return ((group.get("defocus") or {}).get("particle_deviations")) or None


def _particle_deviations(group: dict) -> str:
    """A group's particles' deviations from their micrograph (results.json's
    ``defocus.particle_deviations``): spread +- s.e. per parameter and the correlation with
    the first; with the defocus first and every correlation near 1, what that means."""
    from cryomag.fit.defocus import PARAMETER_LABELS as labels
    from cryomag.fit.defocus import follows_heights

    d = _deviations_of(group) or {}
    names = d.get("parameters") or []
    spread, se = d.get("spread_A") or [], d.get("spread_se_A") or []
    corr = np.asarray(d.get("correlation") or np.eye(len(names)), float)
    heights = bool(names) and names[0] == "defocus_A"
    rows = "".join(
        f"<tr><td>{html.escape(labels.get(n, n), quote=False)}</td>"
        f"<td>{_fmt(spread[i] if i < len(spread) else None, 1)} &plusmn; "
        f"{_fmt(se[i] if i < len(se) else None, 1)}</td>"
        f"<td>{_fmt(corr[0, i], 2) if corr.shape == (len(names), len(names)) else ''}</td></tr>"
        for i, n in enumerate(names)
    )
    note = ""
    if follows_heights(names, corr):
        note = ("<p>The astigmatism's deviations follow the defocus's: a particle's height h "
                "changes the CTF's defocus matrix in the measured frame by h M<sup>T</sup>M, "
                "so an anisotropic magnification gives each height its astigmatism. They are "
                "one cause, not independent scatter.</p>")  # fmt: skip
    if not d.get("converged", True):
        note += ('<p class="warn">The spread did not converge: the particles&#39; shrunk '
                 "defocus is not the fit&#39;s fixed point.</p>")  # fmt: skip
    what = "; the heights in the ice" if heights else ""
    return (
        f"<h3>Optics group {_fmt(group.get('optics_group'))}: the particles' deviations from "
        f"their micrograph{what} (empirical Bayes)</h3>"
        "<table><tr><th>parameter</th><th>spread (A) &plusmn; s.e.</th>"
        f"<th>correlation with the first</th></tr>{rows}</table>{note}"
    )


def _section_resolution(
    run: Path, recs: list[tuple[str, dict]], images: list[Path]
) -> tuple[str, float | None, float | None]:
    parts = ["<h2>Resolution</h2>"]
    curves = [
        (label, np.asarray(r["frequency_1_per_A"]), np.asarray(r["fsc"])) for label, r in recs
    ]
    png = plot_fsc_curves(
        [
            (f"{label} ({r.get('resolution_A', float('nan')):.2f} A)", f, c)
            for (label, r), (_, f, c) in zip(recs, curves, strict=True)
        ],
        run / "report_fsc.png",
        title="Half-map FSC",
    )
    images.append(png)
    head = (
        "<tr><th class='l'>reconstruction</th><th class='l'>folder</th><th>particles</th>"
        "<th>symmetry</th><th>mag</th><th>scale</th><th>box</th><th>voxel (A)</th>"
        "<th>FSC 0.143 (A)</th><th>FSC 0.5 (A)</th></tr>"
    )
    rows = []
    for label, r in recs:
        rows.append(
            f"<tr><td class='l'>{html.escape(label)}</td>"
            f"<td class='l'>{html.escape(str(r.get('folder', '')))}</td>"
            f"<td>{_fmt(r.get('n_particles'))}</td><td>{html.escape(str(r.get('symmetry', '')))}"
            f"</td><td>{html.escape(str(r.get('mag', '')))}</td>"
            f"<td>{html.escape(str(r.get('scale', '')))}</td><td>{_fmt(r.get('box'))}</td>"
            f"<td>{_fmt(r.get('pixel_size_A'), 4)}</td><td>{_fmt(r.get('resolution_A'), 2)}</td>"
            f"<td>{_fmt(r.get('resolution_0.5_A'), 2)}</td></tr>"
        )
    parts.append(f"<table>{head}{''.join(rows)}</table>")
    before = after = None
    labels = [label for label, _ in recs]
    if "before" in labels and "after" in labels:
        before = float(dict(recs)["before"]["resolution_A"])
        after = float(dict(recs)["after"]["resolution_A"])
        gain = before - after
        parts.append(
            f'<p class="summary">Resolution gain: <b>{gain:+.2f} A</b> '
            f"({before:.2f} A before, {after:.2f} A after correction, FSC = 0.143; "
            f"{100 * gain / before:+.1f} %).</p>"
        )
    parts.append(_img(png, "Half-map FSC of the reconstructions (report_fsc.png)"))
    return "\n".join(parts), before, after


# ---------------------------------------------------------------------------- builder
def build_report(
    run_dir: str | Path,
    before: str | Path | None = None,
    after: str | Path | None = None,
    out: str | Path | None = None,
    title: str | None = None,
) -> ReportResult:
    """Write one self-contained HTML page for a run folder.

    Parameters
    ----------
    run_dir : path
        A ``cryomag estimate`` folder (results.json, plots/, cryomag.log) or a
        ``cryomag reconstruct`` folder (fsc.json), or any folder with plots/.
    before, after : path, optional
        ``cryomag reconstruct`` folders without and with the correction.
    out : path, optional
        HTML file to write (default ``run_dir/report.html``).
    title : str, optional

    Returns
    -------
    ReportResult
        Path written, embedded images, resolutions before / after.

    Raises
    ------
    FileNotFoundError
        Missing run folder or a reconstruction folder without fsc.json.
    """
    from cryomag.io.atomic import read_json
    from cryomag.io.outdir import check_output_path, output_folder, written_by_run

    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: run folder not found")
    out_path = Path(out) if out is not None else run / "report.html"
    # never write over a file the report reads (RUN/results.json, a plot, a log...)
    check_output_path(out_path, [run, before, after])
    with output_folder(run, "report", clean=False, record="append", option="run folder"):
        return _build_report(run, before, after, out_path, title, read_json, written_by_run)


def _build_report(run, before, after, out_path, title, read_json, written_by_run) -> ReportResult:
    """:func:`build_report` once the run folder is locked."""
    from cryomag import __version__
    from cryomag.io.atomic import atomic_write

    results = None
    if (run / "results.json").is_file():
        results = read_json(run / "results.json", "the results.json of cryomag estimate")
    recs: list[tuple[str, dict]] = []
    given = {Path(p).resolve() for p in (before, after) if p is not None}
    if (run / "fsc.json").is_file() and run.resolve() not in given:
        recs.append(("this run", load_reconstruction(run)))
    if before is not None:
        recs.append(("before", load_reconstruction(before)))
    if after is not None:
        recs.append(("after", load_reconstruction(after)))

    images: list[Path] = []
    body = []
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    heading = title or f"cryomag report: {run.resolve().name}"
    body.append(f"<h1>{html.escape(heading)}</h1>")
    body.append(
        f'<p class="muted">Folder {html.escape(str(run.resolve()))}; written {now} by '
        f"cryomag {html.escape(__version__)}.</p>"
    )
    res_html = ""
    rb = ra = None
    if recs:
        res_html, rb, ra = _section_resolution(run, recs, images)
    if rb is not None and ra is not None:
        body.append(
            f'<p class="summary">Correction gain: FSC = 0.143 resolution {rb:.2f} A &rarr; '
            f"{ra:.2f} A (<b>{rb - ra:+.2f} A</b>).</p>"
        )
    body.append(_section_inputs(run, results, recs))
    if results is not None:
        try:
            body.append(_section_groups(results))
        except (TypeError, KeyError, AttributeError, ValueError, IndexError) as err:
            raise ValueError(
                f"{run / 'results.json'}: unexpected content ({type(err).__name__}: {err}); "
                "expected the results.json of cryomag estimate"
            ) from err
    if res_html:
        body.append(res_html)
    pngs = sorted((run / "plots").glob("*.png")) if (run / "plots").is_dir() else []
    if (run / "fsc.png").is_file():
        pngs.append(run / "fsc.png")
    # only what the run itself wrote (its manifest), never a plot left by an earlier run
    stale = [p for p in pngs if not written_by_run(run, p)]
    pngs = [p for p in pngs if p not in stale]
    body.append("<h2>Plots</h2>")
    if stale:
        body.append(
            f'<p class="muted">{len(stale)} older plot(s) in this folder, not written by this '
            "run, are not shown.</p>"
        )
    if pngs:
        for p in pngs:
            body.append(_img(p, str(p.relative_to(run))))
            images.append(p)
    else:
        body.append('<p class="muted">No plots in this folder.</p>')
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(heading)}</title><style>{_CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
    with atomic_write(out_path) as tmp:
        Path(tmp).write_text(page, encoding="utf-8")
    return ReportResult(out_path, images, rb, ra)
