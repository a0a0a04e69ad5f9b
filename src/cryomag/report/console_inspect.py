"""The terminal report of ``cryomag inspect`` (the dict of
:func:`cryomag.workflows.inspect.inspect_particles`) with rich tables."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from cryomag.report.console import make_console, make_table

__all__ = ["render", "render_mrc"]

#: Above this many groups the report prints one line per group instead of every quantity.
_MAX_DETAILED_GROUPS = 8


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _fmt_matrix(m: list[list[float]]) -> str:
    return "\n".join("[" + " ".join(f"{v:.6f}" for v in row) + "]" for row in m)


def _fmt_vector(v: list[float] | None, digits: int = 3) -> str:
    return "-" if not v else "[" + ", ".join(f"{x:.{digits}f}" for x in v) + "]"


def _group_rows(g: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, text) rows of one group's column in the optics table."""
    p = g["polar"]
    rows = [
        ("name", _fmt(g["name"])),
        ("particles", str(g["n_particles"])),
        ("pixel size (A)", _fmt(g["pixel_size_A"])),
        ("box (px)", _fmt(None if g["box_px"] is None else int(g["box_px"]))),
        ("voltage (kV)", _fmt(g["voltage_kV"], 1)),
        ("Cs (mm)", _fmt(g["cs_mm"], 3)),
        ("Q0", _fmt(g["amplitude_contrast"], 3)),
        ("RELION rlnMagMat", _fmt_matrix(g["magmat_relion"])),
        ("cryoSPARC I + anisomag", _fmt_matrix(g["magmat_cryosparc"])),
        ("major / minor scale", f"{p['major_scale']:.5f} / {p['minor_scale']:.5f}"),
        ("major axis angle (deg)", f"{p['angle_deg']:.2f}"),
        ("rotation part (deg)", f"{p['rotation_deg']:.3f}"),
        ("anisotropy (%)", f"{p['anisotropy_percent']:.3f}"),
        ("pixel size change (%)", f"{p['pixel_size_change_percent']:+.3f}"),
        ("implied true pixel (A)", _fmt(g["true_pixel_size_A"], 5)),
        ("MotionCor2 -Mag", "{:.5f} {:.5f} {:.2f}".format(*g["motioncor2_mag"])),
    ]
    if g["beam_tilt_mrad"] is not None:
        rows.append(("beam tilt X, Y (mrad)", _fmt_vector(g["beam_tilt_mrad"])))
    if g["odd_zernike"] is not None:
        rows.append(("odd Zernike", _fmt_vector(g["odd_zernike"])))
    if g["even_zernike"] is not None:
        rows.append(("even Zernike", _fmt_vector(g["even_zernike"])))
    for name, v in (g["cryosparc_aberrations"] or {}).items():
        varies = " (varies)" if v["varies_within_group"] else ""
        rows.append((f"{name} (mean)", _fmt_vector(v["mean"]) + varies))
    return rows


def render(result: dict[str, Any], console: Console | None = None) -> None:
    """Print the dict of :func:`inspect_particles` with rich tables."""
    console = console or make_console()
    kind = result["group_kind"]
    legacy = " (RELION 3.0, no optics table)" if result["legacy_star"] else ""
    console.print(
        f"[bold]{result['file']}[/bold]: {result['format']}{legacy}, "
        f"{result['n_particles']} particles, {result['n_groups']} {kind}(s)"
    )
    if len(result["groups"]) > _MAX_DETAILED_GROUPS:
        _render_groups_compact(result["groups"], kind, console)
    else:
        _render_groups(result["groups"], kind, console)
    console.print(
        "M maps observed to true frequency (k_ref = M k_obs); a feature at x_true appears at "
        "x_obs = M^T x_true. The image is stretched by 'major' along the major axis angle "
        "(deg from +x towards +y). True pixel = declared / sqrt(det M). MotionCor2 -Mag: "
        "major minor angle of the stretch that undoes it (flip the angle's sign for cryoSPARC "
        "Patch Motion micrographs, which are flipped in Y).",
        style="dim",
    )
    _render_scale(result["scale"], console)
    for key, where in result["outputs"].items():
        console.print(f"wrote {key}: {where}")


def _render_groups(groups: list[dict[str, Any]], kind: str, console: Console) -> None:
    """Every quantity of every group: quantities as rows, groups as columns."""
    per_table = max(1, (console.width - 26) // 25)  # group columns that fit the terminal
    for start in range(0, len(groups), per_table):
        chunk = groups[start : start + per_table]
        table = make_table(title=f"{kind}s" if start == 0 else None, console=console)
        table.add_column("")
        for g in chunk:
            table.add_column(f"{kind} {g['optics_group']}", justify="right")
        columns = [dict(_group_rows(g)) for g in chunk]
        labels = dict.fromkeys(label for col in columns for label in col)
        for label in labels:
            table.add_row(label, *(col.get(label, "-") for col in columns))
        console.print(table)


def _render_groups_compact(groups: list[dict[str, Any]], kind: str, console: Console) -> None:
    """One line per group, for files with many (exposure) groups; details in inspect.json."""
    table = make_table(
        title=f"{len(groups)} {kind}s (all values: inspect.json with --out)", console=console
    )
    for label in ("group", "n", "A/px", "major", "minor", "angle", "pix %", "MotionCor2 -Mag"):
        table.add_column(label, justify="right")
    for g in groups:
        p = g["polar"]
        table.add_row(
            str(g["optics_group"]),
            str(g["n_particles"]),
            _fmt(g["pixel_size_A"]),
            f"{p['major_scale']:.5f}",
            f"{p['minor_scale']:.5f}",
            f"{p['angle_deg']:.1f}",
            f"{p['pixel_size_change_percent']:+.3f}",
            "{:.4f} {:.4f} {:.1f}".format(*g["motioncor2_mag"]),
        )
    console.print(table)


def _render_scale(sc: dict[str, Any], console: Console) -> None:
    console.rule("per-particle scale")
    console.print(sc["explanation"])
    if not sc["present"]:
        console.print(f"[yellow]{sc['message']}[/yellow]")
        return
    q = sc["quantiles"]
    table = make_table(title=f"{sc['source']}: {sc['n']} particles", console=console)
    for label in ("min", "5 %", "25 %", "50 %", "75 %", "95 %", "max", "mean"):
        table.add_column(label, justify="right")
    table.add_row(*(f"{q[k]:.3f}" for k in q), f"{sc['mean']:.3f}")
    console.print(table)
    o = sc["outliers"]
    rows = ", ".join(f"{e['row']} ({e['scale']:.3f})" for e in o["examples"])
    more = " ..." if o["count"] > len(o["examples"]) else ""
    console.print(
        f"outliers {o['rule']} = [{o['fences'][0]:.3f}, {o['fences'][1]:.3f}]: "
        f"{o['count']} ({o['n_low']} low, {o['n_high']} high)"
        + (f"; rows {rows}{more}" if rows else "")
    )
    sp = sc["spearman_vs_defocus"]
    if sp is None:
        console.print("Spearman correlation with mean defocus: undefined (constant defocus)")
    else:
        console.print(
            f"Spearman correlation with mean defocus: rho = {sp['rho']:+.3f} "
            f"(p = {sp['p_value']:.2g})"
        )
    m = sc["micrographs"]
    if m is None:
        console.print("per-micrograph spread: no micrograph names in the file")
    else:
        console.print(
            f"per-micrograph spread over {m['n_micrographs']} micrographs "
            f"(from {m['micrograph_key']}; "
            f"median {m['particles_per_micrograph_median']:.0f} particles each): "
            f"std of micrograph medians {_fmt(m['std_of_micrograph_medians'], 3)}, "
            f"pooled within-micrograph std {_fmt(m['pooled_within_micrograph_std'], 3)}, "
            f"sampling alone would give {_fmt(m.get('sampling_std_of_medians'), 3)}"
            + (f"; {m['interpretation']}" if "interpretation" in m else "")
        )


def render_mrc(result: dict[str, Any], console: Console | None = None) -> None:
    """Print the dict of :func:`cryomag.workflows.inspect.inspect_mrc`."""
    console = console or make_console()
    h = result["header"]
    nx, ny, nz = h["shape_xyz"]
    what = {"map": f"map {nx} x {ny} x {nz} voxels", "stack": f"stack of {nz} images of "
            f"{nx} x {ny} px", "image": f"one image of {nx} x {ny} px"}[result["kind"]]  # fmt: skip
    console.print(f"[bold]{result['file']}[/bold]: MRC {what}")
    table = make_table(title="header", console=console)
    table.add_column("")
    table.add_column("value", justify="right")
    vs = h["voxel_size_A"]
    rows = [
        ("mode", f"{h['mode']} ({h['dtype'] or 'unknown'})"),
        ("voxel size x, y, z (A)", ", ".join(f"{v:g}" for v in vs)),
        ("cell (A)", ", ".join(f"{v:g}" for v in h["cell_A"])),
        ("sampling mx, my, mz", ", ".join(str(v) for v in h["sampling_mxyz"])),
        ("origin (A)", ", ".join(f"{v:g}" for v in h["origin_A"])),
        ("nstart", ", ".join(str(v) for v in h["nstart"])),
        ("axis order (mapc, mapr, maps)", ", ".join(str(v) for v in h["axis_order_crs"])),
        ("space group (ispg)", str(h["ispg"])),
        ("extended header (bytes)", str(h["extended_header_bytes"])),
        ("header dmin / dmax / dmean / rms", " / ".join(
            f"{h['header_stats'][k]:.6g}" for k in ("dmin", "dmax", "dmean", "rms"))),
        ("file size (bytes)", str(result["size_check"]["actual_bytes"])),
    ]  # fmt: skip
    for label in h["labels"]:
        rows.append(("label", label))
    v = result["values"]
    if v is not None:
        rows += [
            ("values min / max", f"{_fmt(v['min'], 6)} / {_fmt(v['max'], 6)}"),
            ("values mean / std", f"{_fmt(v['mean'], 6)} / {_fmt(v['std'], 6)}"),
            ("NaN / Inf", f"{v['nan_count']} / {v['inf_count']}"),
        ]
    else:
        rows.append(("values", "not read (see the warnings)"))
    for label, text in rows:
        table.add_row(label, text)
    console.print(table)
    compared = result.get("particles")
    if compared:
        for g in compared["optics_groups"]:
            console.print(
                f"{compared['file']} optics group {g['optics_group']}: rlnImagePixelSize "
                f"{g['pixel_size_A']:g} A, rlnImageSize {g['box_px']} px"
            )
    for w in result["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {w}")
    if not result["warnings"]:
        console.print("no warnings")
    for key, where in result["outputs"].items():
        console.print(f"wrote {key}: {where}")
