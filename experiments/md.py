"""Molecular dynamics with a trained so3lib run, and a stability report.

usage: python -m experiments.md --run RUN_DIR --structure FILE [--frame 0] [--supercell 3 3 3]
           --ensemble {nve,nvt-langevin,nvt-nose-hoover,berendsen} (--temperature T | --ramp T0 T1)
           --steps N --dt FS [--save-every K] [--engine jax-md|ase] [--rdf-threshold 0.8] --out DIR

Writes DIR/trajectory.extxyz (every K steps), md.csv (time, potential, kinetic and total energy,
temperature), md_results.json (NVE drift in meV/atom/ps, RDF similarity to the first frame and when it first
falls below the threshold, the first broken bond for molecules, failure time and temperature, steps/s and
atom-steps/s) and plots/energy_temperature.png, plots/rdf.png, plots/rdf_similarity.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

import so3lib.data as data
from so3lib.md import MDConfig, run_md, stability


def load_structure(path: str, frame: int = 0, supercell=None):
    """ase.Atoms from any file so3lib reads (rMD17/SPICE/mlearn/extxyz/...), optionally repeated."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such structure file")
    ds = data.read(p)
    if not -len(ds) <= frame < len(ds):
        raise data.DataError(p, f"frame {frame} out of range ({len(ds)} frames)")
    atoms = ds[frame].to_ase()
    atoms.calc = None
    if supercell:
        atoms = atoms.repeat(tuple(int(x) for x in supercell))
    return atoms


def analyse(res, numbers, cell, pbc, cfg: MDConfig, rdf_threshold: float, r_max: float) -> dict:
    frames = res.positions
    g = [stability.rdf(p, cell, pbc, r_max)[1] for p in frames]
    sim = np.array([stability.rdf_similarity(x, g[0]) for x in g])
    below = np.nonzero(sim < rdf_threshold)[0]
    out = {
        "n_atoms": res.n_atoms,
        "steps": int(res.step[-1]),
        "dt_fs": cfg.dt_fs,
        "ensemble": cfg.ensemble,
        "temperature_target_k": cfg.ramp_k or cfg.temperature_k,
        "temperature_mean_k": float(np.mean(res.temperature_k[len(res.temperature_k) // 5 :])),
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
    if cfg.ensemble == "nve":
        out["nve_drift_mev_per_atom_per_ps"] = stability.nve_drift_mev_per_atom_per_ps(
            res.time_fs, res.total_ev, res.n_atoms
        )
        out["nve_total_energy_range_mev_per_atom"] = float(1e3 * np.ptp(res.total_ev) / res.n_atoms)
    failure = None
    if not np.all(pbc):
        k = stability.first_broken_bond(frames, numbers)
        out["first_broken_bond"] = (
            None if k is None else {"time_fs": float(res.time_fs[k]), "temperature_k": float(res.temperature_k[k])}
        )
        if k is not None:
            failure = {"criterion": "bond broken (> 1.5 × initial length)", **out["first_broken_bond"]}
    elif len(below):
        failure = {"criterion": f"RDF similarity < {rdf_threshold}", **out["rdf_below_threshold"]}
    if res.stopped:
        failure = {
            "criterion": "blow-up",
            "message": res.stopped,
            "time_fs": float(res.time_fs[-1]),
            "temperature_k": float(res.temperature_k[-1]),
        }
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


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a trained so3lib run folder")
    ap.add_argument("--structure", required=True, help="starting structure (any format so3lib reads)")
    ap.add_argument("--frame", type=int, default=0)
    ap.add_argument("--supercell", type=int, nargs=3, default=None)
    ap.add_argument("--ensemble", default="nve", choices=["nve", "nvt-langevin", "nvt-nose-hoover", "berendsen"])
    temp = ap.add_mutually_exclusive_group()
    temp.add_argument("--temperature", type=float, default=300.0, help="K (initial velocities; thermostat target)")
    temp.add_argument("--ramp", type=float, nargs=2, default=None, metavar=("T0", "T1"))
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--dt", type=float, default=0.5, help="time step (fs)")
    ap.add_argument("--save-every", type=int, default=10)
    ap.add_argument("--friction", type=float, default=10.0, help="Langevin friction (1/ps)")
    ap.add_argument("--tau", type=float, default=100.0, help="Berendsen / Nosé–Hoover time constant (fs)")
    ap.add_argument("--skin", type=float, default=1.0, help="neighbour-list skin (Å)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engine", default="jax-md", choices=["jax-md", "ase"])
    ap.add_argument("--rdf-threshold", type=float, default=0.8)
    ap.add_argument("--rdf-rmax", type=float, default=6.0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    from so3lib.training import load_potential

    if not Path(a.run).exists():
        raise FileNotFoundError(f"{a.run}: no such run folder (train one with python -m experiments.md17 / train)")
    cfg = MDConfig(
        ensemble=a.ensemble,
        temperature_k=a.ramp[0] if a.ramp else a.temperature,
        ramp_k=tuple(a.ramp) if a.ramp else None,
        steps=a.steps,
        dt_fs=a.dt,
        save_every=a.save_every,
        friction_per_ps=a.friction,
        tau_fs=a.tau,
        skin_angstrom=a.skin,
        seed=a.seed,
    )
    pot, params = load_potential(a.run)
    atoms = load_structure(a.structure, a.frame, a.supercell)
    pot.reference.check_species(atoms.numbers, f"{a.structure} (frame {a.frame})")
    if a.engine == "ase":
        from so3lib.calculator import So3libCalculator
        from so3lib.md.ase_engine import run_md_ase

        res = run_md_ase(So3libCalculator(pot, params, skin=a.skin), atoms, cfg, not a.no_progress, False)
    else:
        res = run_md(pot, params, atoms, cfg, not a.no_progress, raise_on_blowup=False)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cell, pbc = np.asarray(atoms.cell.array), np.asarray(atoms.pbc)
    report, g = analyse(res, atoms.numbers, cell, pbc, cfg, a.rdf_threshold, a.rdf_rmax)
    report.update(
        run=str(a.run), structure=str(a.structure), engine=a.engine, model=pot.model.name, config=cfg.model_dump()
    )
    import ase.io

    frames = []
    for k, p in enumerate(res.positions):
        f = atoms.copy()
        f.positions = p
        f.info.update(
            time_fs=float(res.time_fs[k]),
            potential_energy_ev=float(res.potential_ev[k]),
            temperature_k=float(res.temperature_k[k]),
        )
        frames.append(f)
    ase.io.write(out / "trajectory.extxyz", frames, format="extxyz")
    with open(out / "md.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", "time_fs", "potential_ev", "kinetic_ev", "total_ev", "temperature_k"])
        for row in zip(res.step, res.time_fs, res.potential_ev, res.kinetic_ev, res.total_ev, res.temperature_k):
            w.writerow([int(row[0])] + [f"{x:.8g}" for x in row[1:]])
    r = stability.rdf(res.positions[0], cell, pbc, a.rdf_rmax)[0]
    plots(res, g, r, np.asarray(report["rdf_similarity"]), out, f"{atoms.get_chemical_formula()} {cfg.ensemble}")
    (out / "md_results.json").write_text(json.dumps(report, indent=2, default=str))
    verdict = "stable" if report["stable"] else f"FAILED: {report['failure']}"
    print(
        f"MD {cfg.ensemble} {res.step[-1]} steps, {report['steps_per_s']:.0f} steps/s "
        f"({report['atom_steps_per_s']:.3g} atom-steps/s); {verdict}"
    )
    if "nve_drift_mev_per_atom_per_ps" in report:
        print(f"NVE drift {report['nve_drift_mev_per_atom_per_ps']:.3f} meV/atom/ps")
    print(f"results: {out / 'md_results.json'}")
    return report


if __name__ == "__main__":
    main()
