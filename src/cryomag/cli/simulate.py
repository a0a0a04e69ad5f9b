"""``cryomag simulate``: write a ground-truth data set (stacks, STAR, reference, truth)."""

from __future__ import annotations

import math
from pathlib import Path

import typer

from cryomag.simulation.config import ConfigError, SimulationConfig


def _floats(text: str, n: int | tuple[int, ...], name: str) -> list[float]:
    counts = (n,) if isinstance(n, int) else n
    try:
        vals = [float(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise typer.BadParameter(
            f"{name}: expected comma-separated numbers, got {text!r}"
        ) from None
    if len(vals) not in counts:
        want = " or ".join(str(c) for c in counts)
        raise typer.BadParameter(f"{name}: expected {want} numbers, got {text!r}")
    return vals


def build_config(
    config: Path | None = None,
    n_particles: int | None = None,
    box: int | None = None,
    apix: float | None = None,
    snr: str | None = None,
    seed: int | None = None,
    aniso: str | None = None,
    kappa: float | None = None,
    mic_scatter: str | None = None,
    particle_scatter: str | None = None,
    scale_spread: float | None = None,
    map_path: Path | None = None,
    write_cs: bool = False,
    true_defocus: bool = False,
    write_true_group_mag: bool = False,
    workers: int | None = None,
) -> SimulationConfig:
    """The configuration of the command: the TOML file (or defaults) overridden by flags."""
    cfg = SimulationConfig.from_toml(config) if config is not None else SimulationConfig()
    if n_particles is not None:
        cfg.n_particles = n_particles
    for g in cfg.optics_groups:
        if box is not None:
            g.box = box
        if apix is not None:
            g.pixel_size_A = apix
        if aniso is not None:
            g.aniso = None if aniso.lower() in ("none", "off", "") else _floats(aniso, 3, "--aniso")
    if snr is not None:
        try:
            cfg.noise.snr = math.inf if snr.lower() in ("inf", "none", "off") else float(snr)
        except ValueError:
            raise typer.BadParameter(f"--snr: expected a number or 'inf', got {snr!r}") from None
    if seed is not None:
        cfg.seed = seed
    if kappa is not None:
        cfg.magnification.kappa_pct_per_um = kappa
    if mic_scatter is not None:
        v = _floats(mic_scatter, (1, 2), "--mic-scatter")
        cfg.magnification.mic_iso_std_pct = v[0]
        cfg.magnification.mic_aniso_std_pct = v[-1]
    if particle_scatter is not None:
        v = _floats(particle_scatter, (1, 2), "--particle-scatter")
        cfg.magnification.particle_iso_std_pct = v[0]
        cfg.magnification.particle_aniso_std_pct = v[-1]
    if scale_spread is not None:
        cfg.scale.spread_pct = scale_spread
    if map_path is not None:
        cfg.phantom.map_path = str(map_path)
    if write_cs:
        cfg.output.write_cs = True
    if true_defocus:
        cfg.output.true_defocus = True
    if write_true_group_mag:
        cfg.output.write_true_group_mag = True
    if workers is not None:
        cfg.render.n_workers = workers
    cfg.validate()
    return cfg


def simulate_command(
    out: Path = typer.Option(..., "--out", help="Output folder (created; must be empty)."),
    config: Path | None = typer.Option(
        None, "--config", help="Simulation TOML (see cryomag.simulation.config); flags override."
    ),
    n_particles: int | None = typer.Option(
        None, "--n-particles", help="Total particles, split evenly over the optics groups."
    ),
    box: int | None = typer.Option(None, "--box", help="Box size (px) of every optics group."),
    apix: float | None = typer.Option(
        None, "--apix", help="Declared pixel size (A/px) of every optics group."
    ),
    snr: str | None = typer.Option(
        None, "--snr", help="Signal-to-noise ratio (band 1/20 A^-1 .. Nyquist); 'inf' = none."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Random seed."),
    aniso: str | None = typer.Option(
        None,
        "--aniso",
        help="Group anisotropic magnification MAJOR,MINOR,ANGLE_DEG (e.g. 1.01,0.99,30); 'none'.",
    ),
    kappa: float | None = typer.Option(
        None, "--kappa", help="Defocus-dependent magnification in % per um of defocus."
    ),
    mic_scatter: str | None = typer.Option(
        None,
        "--mic-scatter",
        help="Per-micrograph magnification scatter std in %: PCT (iso and aniso) or ISO,ANISO.",
    ),
    particle_scatter: str | None = typer.Option(
        None,
        "--particle-scatter",
        help="Per-particle magnification scatter std in %: PCT (iso and aniso) or ISO,ANISO.",
    ),
    scale_spread: float | None = typer.Option(
        None, "--scale-spread", help="Contrast-scale jitter (std of log s) in %."
    ),
    map_path: Path | None = typer.Option(
        None, "--map", help="Use this MRC map as the specimen instead of the phantom."
    ),
    write_cs: bool = typer.Option(False, "--cs", help="Also write particles.cs (cryoSPARC)."),
    true_defocus: bool = typer.Option(
        False, "--true-defocus", help="Write specimen-frame defocus instead of the apparent one."
    ),
    write_true_group_mag: bool = typer.Option(
        False, "--write-true-group-mag", help="Write M_group into rlnMagMat (default identity)."
    ),
    workers: int | None = typer.Option(
        None, "--workers", help="Worker processes (default: one per CPU)."
    ),
    force: bool = typer.Option(False, "--force", help="Write into a non-empty output folder."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar or summary."),
) -> None:
    """Simulate particles with known contrast scale and magnification errors."""
    from cryomag.report.console import make_console, make_table
    from cryomag.simulation.simulator import simulate_dataset, summarize

    try:
        cfg = build_config(
            config,
            n_particles,
            box,
            apix,
            snr,
            seed,
            aniso,
            kappa,
            mic_scatter,
            particle_scatter,
            scale_spread,
            map_path,
            write_cs,
            true_defocus,
            write_true_group_mag,
            workers,
        )
    except ConfigError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    if map_path is not None and not map_path.is_file():
        typer.secho(f"error: --map {map_path}: file not found", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    if out.exists() and not out.is_dir():
        typer.secho(
            f"error: --out {out}: exists and is not a folder", fg=typer.colors.RED, err=True
        )
        raise typer.Exit(2)
    if out.is_dir() and any(out.iterdir()) and not force:
        typer.secho(
            f"error: --out {out}: folder is not empty (use --force to write into it)",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(2)
    protect = [p for p in (config, map_path) if p is not None]
    try:
        from cryomag.io.outdir import output_folder

        with output_folder(out, "simulate", inputs=protect):
            _, truth = simulate_dataset(cfg, out, progress=not quiet, protect=protect)
    except (ConfigError, ValueError, OSError) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    if not quiet:
        console = make_console()
        table = make_table(title=f"cryomag simulate -> {out}", console=console)
        table.add_column("quantity")
        table.add_column("value")
        for label, value in summarize(truth):
            table.add_row(label, value)
        console.print(table)


def register(app: typer.Typer) -> None:
    """Add the ``simulate`` command to the ``cryomag`` application."""
    app.command("simulate")(simulate_command)
