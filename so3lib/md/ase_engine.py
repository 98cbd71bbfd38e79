"""The ASE path: any `ase.md` integrator driven by `So3libCalculator` (neighbour list reused within a skin),
recorded like the on-device engine so both feed the same analysis."""

from __future__ import annotations

import time

import numpy as np

from so3lib.md.engine import KB_EV_PER_K, MDBlowUp, MDConfig, MDResult


def run_md_ase(
    calc, atoms, cfg: MDConfig, progress: bool = True, raise_on_blowup: bool = True, monitor=None
) -> MDResult:
    """MD of ``atoms`` with the ASE integrator matching ``cfg.ensemble`` (VelocityVerlet, Langevin,
    NoseHooverChainNVT, NVTBerendsen with the target updated for a ramp, IsotropicMTKNPT: the isotropic
    Martyna–Tuckerman–Klein barostat with Nosé–Hoover chains on the calculator's stress, as the on-device engine).
    For a periodic cell the cell and the pressure P = −tr(σ)/3 with the ideal-gas term (bar) are recorded.
    ``monitor(step, positions) -> bool`` is called on every saved frame (step 0 included); True stops the run
    after that frame."""
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
    from tqdm.auto import tqdm

    if len(atoms) < 2:
        raise ValueError(
            f"MD needs at least 2 atoms, the structure has {len(atoms)} (a single atom does not move once its "
            "centre-of-mass velocity is removed)"
        )
    periodic = bool(np.all(atoms.pbc))
    if cfg.ensemble == "npt" and not periodic:
        raise ValueError(
            f"NPT (--pressure {cfg.pressure_bar} bar) needs a cell periodic in all three directions; "
            f"structure {atoms.get_chemical_formula()} has pbc={np.asarray(atoms.pbc).tolist()}"
        )
    atoms = atoms.copy()
    atoms.calc = calc
    calc.potential.reference.check_species(atoms.numbers, f"structure {atoms.get_chemical_formula()}")
    t0k = float(cfg.target_k(np.array(0.0)))
    MaxwellBoltzmannDistribution(atoms, temperature_K=t0k, rng=np.random.default_rng(cfg.seed))
    Stationary(atoms)
    dt = cfg.dt_fs * units.fs
    if cfg.ensemble == "nve":
        from ase.md.verlet import VelocityVerlet

        dyn = VelocityVerlet(atoms, dt)
    elif cfg.ensemble == "nvt-langevin":
        from ase.md.langevin import Langevin

        dyn = Langevin(
            atoms,
            dt,
            temperature_K=t0k,
            friction=cfg.friction_per_ps * 1e-3 / units.fs,
            rng=np.random.default_rng(cfg.seed),
        )
    elif cfg.ensemble == "nvt-nose-hoover":
        from ase.md.nose_hoover_chain import NoseHooverChainNVT

        dyn = NoseHooverChainNVT(atoms, dt, temperature_K=t0k, tdamp=cfg.tau_fs * units.fs)
    elif cfg.ensemble == "npt":
        from ase.md.nose_hoover_chain import IsotropicMTKNPT

        dyn = IsotropicMTKNPT(
            atoms,
            dt,
            temperature_K=t0k,
            pressure_au=cfg.pressure_bar * units.bar,
            tdamp=cfg.tau_fs * units.fs,
            pdamp=cfg.barostat_tau_fs * units.fs,
        )
    else:
        from ase.md.nvtberendsen import NVTBerendsen

        dyn = NVTBerendsen(atoms, dt, temperature_K=t0k, taut=cfg.tau_fs * units.fs)
    n = len(atoms)
    dof = max(3 * n - 3, 1)  # as the on-device engine: centre-of-mass motion removed
    temperature = lambda: 2.0 * atoms.get_kinetic_energy() / (dof * KB_EV_PER_K)  # noqa: E731

    def pressure_bar() -> float | None:
        if not periodic:
            return None
        return float(-np.mean(atoms.get_stress(voigt=True, include_ideal_gas=True)[:3]) / units.bar)

    rec = {
        "step": [0],
        "pot": [atoms.get_potential_energy()],
        "kin": [atoms.get_kinetic_energy()],
        "T": [temperature()],
        "pos": [atoms.positions.copy()],
        "cell": [atoms.cell.array.copy()],
        "P": [pressure_bar()],
    }
    stopped, step = None, 0
    halt = monitor is not None and monitor(0, rec["pos"][0])
    t_start = time.perf_counter()
    with tqdm(total=cfg.steps, desc=f"MD (ASE) {cfg.ensemble}", unit="step", disable=not progress) as bar:
        while step < cfg.steps and not halt:
            k = min(cfg.save_every, cfg.steps - step)
            if cfg.ramp_k is not None and hasattr(dyn, "set_temperature"):
                dyn.set_temperature(temperature_K=float(cfg.target_k(np.array(step + k))))
            dyn.run(k)
            step += k
            temp = temperature()
            epot = atoms.get_potential_energy()
            if (
                not (np.isfinite(temp) and np.isfinite(epot) and np.isfinite(atoms.positions).all())
                or temp > cfg.max_temperature_k
            ):
                stopped = (
                    f"MD blew up by step {step} (t = {step * cfg.dt_fs:.1f} fs): temperature {temp:.0f} K, "
                    f"potential energy {epot:.4g} eV"
                )
                break
            rec["step"].append(step)
            rec["pot"].append(epot)
            rec["kin"].append(atoms.get_kinetic_energy())
            rec["T"].append(temp)
            rec["pos"].append(atoms.positions.copy())
            rec["cell"].append(atoms.cell.array.copy())
            rec["P"].append(pressure_bar())
            bar.update(k)
            if monitor is not None and monitor(step, rec["pos"][-1]):
                break
    if stopped and raise_on_blowup:
        raise MDBlowUp(stopped)
    steps = np.asarray(rec["step"])
    return MDResult(
        step=steps,
        time_fs=steps * cfg.dt_fs,
        potential_ev=np.asarray(rec["pot"]),
        kinetic_ev=np.asarray(rec["kin"]),
        temperature_k=np.asarray(rec["T"]),
        positions=np.stack(rec["pos"]),
        n_atoms=n,
        wall_s=time.perf_counter() - t_start,
        compile_s=0.0,
        reallocations=0,
        stopped=stopped,
        cells=np.stack(rec["cell"]) if periodic else None,
        pressure_bar=np.asarray(rec["P"], float) if periodic else None,
    )


__all__ = ["run_md_ase", "KB_EV_PER_K"]
