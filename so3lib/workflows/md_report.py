"""Molecular dynamics with a trained run, and its stability report: the trajectory (extxyz with energy, forces,
velocities, stress and cell: `so3lib.md.io`), md.csv, md_results.json (a verdict stable / heated / failed; the
failure criterion, time and temperature: blow-up, a broken bond or atoms too close for molecules, lattice sites
lost or atoms too close for periodic cells; NVE drift in meV/atom/ps for runs that did not fail; RDF similarity to
the first frame and when it first falls below the threshold, reported but no failure: heating alone lowers it;
steps/s and atom-steps/s) and plots (energy and temperature, the RDF over time, the RDF similarity)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from so3lib import data
from so3lib.training.run_folder import RunFolder, to_json, write_atomic
from so3lib.workflows.common import Options, command_section


class DynamicsOptions(Options):
    """The integration options shared by ``so3lib md`` and the exploration MD of ``so3lib active``; they become
    an `MDConfig` through `md_config`."""

    temperature: float = Field(300.0, gt=0, description="K: initial velocities and thermostat target")
    steps: int = Field(1000, ge=1, description="MD steps (of each trajectory)")
    dt: float = Field(0.5, gt=0, description="time step (fs)")
    save_every: int = Field(10, ge=1, description="save a frame every K steps")
    friction: float = Field(10.0, gt=0, description="Langevin friction (1/ps)")
    tau: float = Field(100.0, gt=0, description="Berendsen / Nosé–Hoover time constant (fs)")
    skin: float = Field(1.0, ge=0, description="neighbour-list skin (Å)")

    def md_config(self, **fields):
        """The `MDConfig` of these options; ``fields`` (MDConfig's names) add to or override them."""
        from so3lib.md import MDConfig

        own = {
            "temperature_k": self.temperature,
            "steps": self.steps,
            "dt_fs": self.dt,
            "save_every": self.save_every,
            "friction_per_ps": self.friction,
            "tau_fs": self.tau,
            "skin_angstrom": self.skin,
        }
        return MDConfig(**{**own, **fields})


class MDOptions(DynamicsOptions):
    """Options of ``so3lib md``."""

    run: str = Field(..., description="a trained so3lib run folder")
    structure: str = Field(..., description="starting structure (any format so3lib reads)")
    frame: int = Field(0, description="frame of --structure")
    supercell: tuple[int, int, int] | None = Field(None, description="repeat the cell n1 n2 n3 times")
    ensemble: Literal["nve", "nvt-langevin", "nvt-nose-hoover", "berendsen", "npt"] = Field(
        "nve", description="ensemble"
    )
    pressure: float | None = Field(None, description="bar: NPT target pressure (with --ensemble npt)")
    ramp: tuple[float, float] | None = Field(None, description="Berendsen ramp T0 T1 (K) over the run")
    barostat_tau: float = Field(500.0, gt=0, description="NPT barostat time constant (fs)")
    seed: int = Field(0, description="seed of the initial velocities and the Langevin noise")
    engine: Literal["jax-md", "ase", "openmm", "lammps"] = Field(
        "jax-md",
        description="on-device jax-md, ASE integrators, OpenMM (openmm extra) or LAMMPS (fix external; lammps extra)",
    )
    rdf_threshold: float = Field(0.8, gt=0, le=1, description="report when the RDF similarity first falls below this")
    rdf_rmax: float = Field(6.0, gt=0, description="RDF range (Å)")
    max_uncertainty: float | None = Field(
        None,
        gt=0,
        description="ensemble runs: the largest atomic force std (eV/Å, calibrated) above which a frame is "
        "uncertain (see --uncertainty-action)",
    )
    uncertainty_action: Literal["stop", "mark"] = Field(
        "stop", description="above --max-uncertainty: stop the run there, or only mark the frames"
    )
    rdf_windows: int = Field(
        5, ge=1, description="--engine lammps, periodic cell: LAMMPS' compute rdf averaged over this many windows"
    )
    rdf_compare: bool = Field(
        False, description="--engine lammps, periodic cell: also run jax-md with the same settings, compare RDFs"
    )
    out: str = Field(..., description="output folder")
    progress: bool = Field(True, description="progress bar")

    @model_validator(mode="after")
    def _pressure(self):
        if self.ensemble == "npt" and self.pressure is None:
            raise ValueError("--ensemble npt needs a target pressure: --pressure BAR")
        if self.ensemble != "npt" and self.pressure is not None:
            raise ValueError(f"--pressure {self.pressure} needs --ensemble npt (got --ensemble {self.ensemble})")
        if self.ensemble == "npt" and self.engine in ("openmm", "lammps"):
            raise ValueError(f"--ensemble npt needs --engine jax-md or ase (the {self.engine} engine has no barostat)")
        return self


def load_structure(path: str, frame: int = 0, supercell=None):
    """ase.Atoms from any file so3lib reads (rMD17/SPICE/mlearn/extxyz/...), optionally repeated."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such structure file")
    # a structure: labels do not matter, so label-like keys so3lib was not told about are no error here
    ds = data.read(p, unnamed_labels="ignore") if data.detect_format(p) == "ase" else data.read(p)
    if not -len(ds) <= frame < len(ds):
        raise data.DataError(p, f"frame {frame} out of range ({len(ds)} frames)")
    atoms = ds[frame].to_ase()
    atoms.calc = None
    if supercell:
        atoms = atoms.repeat(tuple(int(x) for x in supercell))
    return atoms


def analyse(res, numbers, cell, pbc, cfg, rdf_threshold: float, r_max: float) -> tuple[dict, list]:
    """The stability report of an MD result, and the RDF of every saved frame."""
    from so3lib.md import stability, thermo

    frames = res.positions
    cells = res.cells if res.cells is not None else [cell] * len(frames)  # the cell changes under NPT
    g = [stability.rdf(p, c, pbc, r_max)[1] for p, c in zip(frames, cells)]
    sim = np.array([stability.rdf_similarity(x, g[0]) for x in g])
    below = np.nonzero(sim < rdf_threshold)[0]
    tail_t = res.temperature_k[len(res.temperature_k) // 5 :]
    out = {
        "n_atoms": res.n_atoms,
        "steps": int(res.step[-1]),
        "dt_fs": cfg.dt_fs,
        "ensemble": cfg.ensemble,
        "temperature_target_k": cfg.ramp_k or cfg.temperature_k,
        "temperature_mean_k": float(np.mean(tail_t)),
        # block averaging (20 blocks): the mean's standard error, None when too few frames to estimate it
        "temperature_mean_standard_error_k": thermo.mean_and_standard_error(tail_t)[1] if len(tail_t) >= 40 else None,
        "steps_per_s": res.steps_per_s,
        "atom_steps_per_s": res.steps_per_s * res.n_atoms,
        "compile_s": res.compile_s,
        "neighbour_reallocations": res.reallocations,
        "blow_up": res.stopped,
        "rdf_threshold": rdf_threshold,
        "rdf_similarity": sim.tolist(),
        "rdf_below_threshold": None
        if not len(below)
        else {"time_fs": float(res.time_fs[below[0]]), "temperature_k": float(res.temperature_k[below[0]])},
    }
    if res.pressure_bar is not None:  # periodic: mean over the last 80 % of the records, as the temperature
        tail = slice(len(res.pressure_bar) // 5, None)
        out["pressure_target_bar"] = cfg.pressure_bar
        out["pressure_mean_bar"] = float(np.mean(res.pressure_bar[tail]))
        out["volume_initial_a3"] = float(res.volume_a3[0])
        out["volume_mean_a3"] = float(np.mean(res.volume_a3[tail]))
    failure = None
    if not np.all(pbc):
        k = stability.first_broken_bond(frames, numbers)
        out["first_broken_bond"] = (
            None if k is None else {"time_fs": float(res.time_fs[k]), "temperature_k": float(res.temperature_k[k])}
        )
        if k is not None:
            failure = {"criterion": "bond broken (> 1.5 × initial length)", **out["first_broken_bond"]}
    else:  # heated is not broken: a crystal fails when its atoms leave their sites, not when its RDF broadens
        loss = stability.site_loss(frames, cell, pbc)
        lost = np.nonzero(loss > stability.SITE_LOSS_THRESHOLD)[0]
        out["site_loss"] = loss.tolist()
        out["site_loss_threshold"] = stability.SITE_LOSS_THRESHOLD
        if len(lost):
            k = int(lost[0])
            failure = {
                "criterion": f"lattice lost (median distance to the first frame's sites > "
                f"{stability.SITE_LOSS_THRESHOLD} × nearest-neighbour distance)",
                "time_fs": float(res.time_fs[k]),
                "temperature_k": float(res.temperature_k[k]),
            }
    k = stability.first_too_close(frames, numbers, cell, pbc)
    if k is not None and (failure is None or res.time_fs[k] < failure["time_fs"]):
        failure = {
            "criterion": "atoms too close (< 0.5 × the sum of covalent radii)",
            "time_fs": float(res.time_fs[k]),
            "temperature_k": float(res.temperature_k[k]),
        }
    if res.stopped:
        failure = {
            "criterion": "blow-up",
            "message": res.stopped,
            "time_fs": float(res.time_fs[-1]),
            "temperature_k": float(res.temperature_k[-1]),
        }
    if cfg.ensemble == "nve":  # a drift only for a run that did not fail (null otherwise: nothing to measure)
        ok = failure is None
        out["nve_drift_mev_per_atom_per_ps"] = (
            stability.nve_drift_mev_per_atom_per_ps(res.time_fs, res.total_ev, res.n_atoms) if ok else None
        )
        out["nve_total_energy_range_mev_per_atom"] = float(1e3 * np.ptp(res.total_ev) / res.n_atoms) if ok else None
    tail = res.temperature_k[len(res.temperature_k) // 5 :]
    target_end = float(cfg.target_k(np.array(float(res.step[-1]))))
    out["heated"] = bool(np.mean(tail) > 1.1 * target_end)  # 10 % above the target at the end
    out["verdict"] = "failed" if failure is not None else ("heated" if out["heated"] else "stable")
    out["failure"] = failure
    out["stable"] = failure is None
    return out, g


def plots(res, g, r, sim, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "plots").mkdir(parents=True, exist_ok=True)
    t = res.time_fs / 1000.0
    fig, ax = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    ax[0].plot(t, (res.potential_ev - res.potential_ev[0]) / res.n_atoms * 1e3, label="potential")
    ax[0].plot(t, (res.total_ev - res.total_ev[0]) / res.n_atoms * 1e3, label="total")
    ax[0].plot(t, res.kinetic_ev / res.n_atoms * 1e3, label="kinetic", alpha=0.7)
    ax[0].set_ylabel("energy − E(0) (meV/atom)")
    ax[0].legend(fontsize=8)
    ax[1].plot(t, res.temperature_k, color="C3")
    ax[1].set_ylabel("temperature (K)")
    ax[1].set_xlabel("time (ps)")
    ax[0].set_title(title)
    fig.tight_layout()
    fig.savefig(out / "plots" / "energy_temperature.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    picks = np.unique(np.linspace(0, len(g) - 1, min(6, len(g))).astype(int))
    cmap = plt.get_cmap("viridis")
    for i, k in enumerate(picks):
        ax.plot(r, g[k], color=cmap(i / max(len(picks) - 1, 1)), label=f"{t[k]:.2f} ps, {res.temperature_k[k]:.0f} K")
    ax.set_xlabel("r (Å)")
    ax.set_ylabel("g(r)")
    ax.set_title(f"RDF over time: {title}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "plots" / "rdf.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(res.temperature_k, sim, "o-", ms=3)
    ax.set_xlabel("temperature (K)")
    ax.set_ylabel("RDF similarity to frame 0")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out / "plots" / "rdf_similarity.png", dpi=120)
    plt.close(fig)


def write_csv(path: Path, res, monitor=None) -> None:
    """md.csv: one row per saved frame; an ensemble adds energy_std_ev, forces_std_max_ev_per_a, uncertain."""
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    cols = [res.time_fs, res.potential_ev, res.kinetic_ev, res.total_ev, res.temperature_k]
    head = ["step", "time_fs", "potential_ev", "kinetic_ev", "total_ev", "temperature_k"]
    if res.pressure_bar is not None:
        cols, head = cols + [res.volume_a3, res.pressure_bar], head + ["volume_a3", "pressure_bar"]
    w.writerow(head + (["energy_std_ev", "forces_std_max_ev_per_a", "uncertain"] if monitor is not None else []))
    for k, step in enumerate(res.step):
        extra = []
        if monitor is not None:
            extra = [
                f"{monitor.energy_std_ev[k]:.8g}",
                f"{monitor.forces_std_max_ev_per_a[k]:.8g}",
                int(monitor.above[k]),
            ]
        w.writerow([int(step)] + [f"{c[k]:.12g}" for c in cols] + extra)  # µeV on absolute energies
    write_atomic(path, buf.getvalue())


def run(opts: MDOptions) -> dict:
    """Run MD from ``opts.structure`` with the run's best model and write the report; returns it."""
    from so3lib.md import run_md, stability
    from so3lib.training import load_potential

    if opts.engine == "openmm":  # before anything is loaded: a missing engine is a one-line error
        from so3lib.md.openmm import import_openmm

        import_openmm()
    if not Path(opts.run).exists():
        raise FileNotFoundError(f"{opts.run}: no such run folder (train one with so3lib train / md17 / spice)")
    cfg = opts.md_config(
        ensemble=opts.ensemble,
        temperature_k=opts.ramp[0] if opts.ramp else opts.temperature,
        ramp_k=tuple(opts.ramp) if opts.ramp else None,
        pressure_bar=opts.pressure,
        barostat_tau_fs=opts.barostat_tau,
        seed=opts.seed,
    )
    if opts.engine == "lammps":
        from so3lib.md.lammps import import_lammps

        import_lammps()  # a missing engine is reported before anything is loaded
    pot, params = load_potential(opts.run)
    atoms = load_structure(opts.structure, opts.frame, opts.supercell)
    pot.reference.check_species(atoms.numbers, f"{opts.structure} (frame {opts.frame})")
    monitor = _monitor(opts, pot, params, atoms)
    if opts.engine == "ase":
        from so3lib.calculator import So3libCalculator
        from so3lib.md.ase_engine import run_md_ase

        res = run_md_ase(So3libCalculator(pot, params, skin=opts.skin), atoms, cfg, opts.progress, False, monitor)
    elif opts.engine == "openmm":
        from so3lib.calculator import So3libCalculator
        from so3lib.md.openmm import run_md_openmm

        calc = So3libCalculator(pot, params, skin=opts.skin)
        res = run_md_openmm(calc, atoms, cfg, opts.progress, False, monitor=monitor)
    elif opts.engine == "lammps":
        res, lammps_rdf = _run_lammps(opts, cfg, pot, params, atoms, monitor)
    else:
        res = run_md(pot, params, atoms, cfg, opts.progress, raise_on_blowup=False, monitor=monitor)
    out = RunFolder(opts.out, kind="MD").claim()
    import yaml

    write_atomic(out / "config.yaml", yaml.safe_dump({"command": command_section("md", opts)}, sort_keys=False))
    cell, pbc = np.asarray(atoms.cell.array), np.asarray(atoms.pbc)
    report, g = analyse(res, atoms.numbers, cell, pbc, cfg, opts.rdf_threshold, opts.rdf_rmax)
    report.update(
        run=str(opts.run),
        structure=str(opts.structure),
        engine=opts.engine,
        model=pot.model.name,
        config=cfg.model_dump(),
        options=opts.model_dump(mode="json"),
    )
    if monitor is not None:
        report["uncertainty"] = monitor.report(cfg.dt_fs)
    from so3lib.md.io import write_trajectory

    write_trajectory(out / "trajectory.extxyz", atoms, res, monitor)
    write_csv(out / "md.csv", res, monitor)
    r = stability.rdf(res.positions[0], cell, pbc, opts.rdf_rmax)[0]
    plots(res, g, r, np.asarray(report["rdf_similarity"]), out, f"{atoms.get_chemical_formula()} {cfg.ensemble}")
    if opts.engine == "lammps" and np.all(pbc):
        report["lammps_rdf"] = _lammps_rdf_report(opts, cfg, pot, params, atoms, res, lammps_rdf, out)
    write_atomic(out / "md_results.json", to_json(report))
    report["out"] = str(out)
    return report


def _monitor(opts: MDOptions, pot, params, atoms):
    """The ensemble's uncertainty monitor (None for a single model; --max-uncertainty then is an error)."""
    from so3lib.ensemble import gives_spread

    if not gives_spread(pot):
        if opts.max_uncertainty is not None:
            raise ValueError(
                f"--max-uncertainty needs an ensemble run, and {opts.run} is a single model (train it with "
                "--ensemble N, or --readout-heads K for a shallow ensemble)"
            )
        return None
    from so3lib.md.uncertainty import UncertaintyMonitor

    return UncertaintyMonitor(pot, params, atoms, opts.max_uncertainty, opts.uncertainty_action)


RDF_BINS = 100


def _rdf_window_steps(opts: MDOptions, cfg) -> int:
    window = (cfg.steps // opts.rdf_windows) // cfg.save_every * cfg.save_every
    if window < cfg.save_every:
        raise ValueError(
            f"--rdf-windows {opts.rdf_windows}: {cfg.steps} steps saved every {cfg.save_every} give fewer than one "
            "saved frame per window; use fewer windows or more --steps"
        )
    return window


def _run_lammps(opts: MDOptions, cfg, pot, params, atoms, monitor=None):
    """LAMMPS MD; on a periodic cell with LAMMPS' compute rdf in ``--rdf-windows`` windows."""
    from so3lib.calculator import So3libCalculator
    from so3lib.md.lammps import run_md_lammps, run_md_lammps_rdf

    calc = So3libCalculator(pot, params, skin=opts.skin)
    if not np.all(atoms.pbc):
        return run_md_lammps(calc, atoms, cfg, opts.progress, False, monitor), None
    window = _rdf_window_steps(opts, cfg)
    return run_md_lammps_rdf(calc, atoms, cfg, window, opts.rdf_rmax, RDF_BINS, opts.progress, False, monitor)


def _lammps_rdf_report(opts: MDOptions, cfg, pot, params, atoms, res, lammps_rdf, out: Path) -> dict | None:
    """lammps_rdf.csv (r and g of every window), plots/rdf_lammps.png, and with ``--rdf-compare`` the jax-md run
    with the same settings, its window RDFs and their similarity to LAMMPS'."""
    if lammps_rdf is None:
        return None
    import io

    from so3lib.md import rdf_windows, run_md

    window = _rdf_window_steps(opts, cfg)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["r_angstrom"] + [f"g_{t:.0f}K_step{e}" for t, e in zip(lammps_rdf.target_k, lammps_rdf.end_step)])
    for k, r in enumerate(lammps_rdf.r):
        w.writerow([f"{r:.6g}"] + [f"{g:.6g}" for g in lammps_rdf.g[:, k]])
    write_atomic(out / "lammps_rdf.csv", buf.getvalue())
    report = {
        "window_steps": window,
        "r_max_angstrom": opts.rdf_rmax,
        "bins": RDF_BINS,
        "windows": [
            {"end_step": int(e), "target_k": float(t)} for e, t in zip(lammps_rdf.end_step, lammps_rdf.target_k)
        ],
    }
    other = None
    if opts.rdf_compare:
        ref = run_md(pot, params, atoms, cfg, opts.progress, raise_on_blowup=False)
        cell, pbc = np.asarray(atoms.cell.array), np.asarray(atoms.pbc)
        ends = lammps_rdf.end_step[lammps_rdf.end_step <= ref.step[-1]]
        other = rdf_windows.window_rdfs(ref, cell, pbc, ends, window, opts.rdf_rmax, RDF_BINS)
        rows = rdf_windows.compare(lammps_rdf, other, res, ref, window)
        report["windows"] = rows + report["windows"][len(rows) :]
        report["jax_md_blow_up"] = ref.stopped
    title = f"{atoms.get_chemical_formula()} {cfg.ensemble}"
    rdf_windows.plot(lammps_rdf, other, out / "plots" / "rdf_lammps.png", title)
    return report
