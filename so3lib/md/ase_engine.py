"""The ASE path: any `ase.md` integrator driven by `So3libCalculator` (neighbour list reused within a skin),
recorded like the on-device engine so both feed the same analysis.

Same conventions as the on-device engine (`so3lib.md.thermo`): the Maxwell–Boltzmann start of the same seed,
n_dof = 3N − 3, held by a `FixCom` constraint (ASE then counts 3N − 3 in ``get_temperature``, so NVTBerendsen
and Langevin target the temperature so3lib reports); ASE's NoseHooverChainNVT counts 3N in its chain, so it is
given a chain thermostat built for 3N − 3 degrees of freedom. The blow-up guards are `so3lib.md.guards`'."""

from __future__ import annotations

import time

import numpy as np

from so3lib.md import guards, thermo
from so3lib.md.engine import MDBlowUp, MDConfig, MDResult
from so3lib.md.thermo import KB_EV_PER_K


def _nose_hoover(atoms, dt: float, temperature_k: float, tdamp: float, n_dof: int):
    """ASE's NoseHooverChainNVT whose chain drives the kinetic energy to n_dof·kT/2 (ASE's own counts 3N)."""
    from ase.md.nose_hoover_chain import NoseHooverChainNVT, NoseHooverChainThermostat

    dyn = NoseHooverChainNVT(atoms, dt, temperature_K=temperature_k, tdamp=tdamp)
    old = getattr(dyn, "_thermostat", None)
    if not isinstance(old, NoseHooverChainThermostat):
        raise ImportError("this ASE version's NoseHooverChainNVT has no chain thermostat to set the degrees of freedom")
    # the chain counts 3·num_atoms_global degrees of freedom in its force, its first mass and its energy
    dyn._thermostat = NoseHooverChainThermostat(
        num_atoms_global=n_dof / 3, masses=dyn.masses, temperature_K=temperature_k, tdamp=tdamp, tchain=old._tchain
    )
    return dyn


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
    from ase.constraints import FixCom
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
    if atoms.constraints:
        raise ValueError(
            f"the structure has constraints {[type(c).__name__ for c in atoms.constraints]}: so3lib's MD holds "
            "only the centre of mass fixed (3N − 3 degrees of freedom); remove them"
        )
    if cfg.ramp_k is not None and cfg.ensemble == "nvt-nose-hoover":
        raise ValueError("a temperature ramp with nvt-nose-hoover needs the jax-md engine (ASE's chain has no ramp)")
    atoms = atoms.copy()
    atoms.calc = calc
    calc.potential.reference.check_species(atoms.numbers, f"structure {atoms.get_chemical_formula()}")
    n = len(atoms)
    dof = thermo.degrees_of_freedom(n)
    t0k = float(cfg.target_k(np.array(0.0)))
    atoms.set_momenta(thermo.maxwell_boltzmann_momenta(atoms.get_masses(), t0k, cfg.seed), apply_constraint=False)
    if cfg.ensemble != "npt":  # ASE's MTK barostat takes no constraints; it conserves the (zero) total momentum
        atoms.set_constraint(FixCom())
        assert atoms.get_number_of_degrees_of_freedom() == dof
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
            fixcm=False,  # FixCom instead (ASE's advice): the noise is projected off the COM, mass-weighted
            rng=np.random.default_rng(cfg.seed),
        )
    elif cfg.ensemble == "nvt-nose-hoover":
        dyn = _nose_hoover(atoms, dt, t0k, cfg.tau_fs * units.fs, dof)
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

        dyn = NVTBerendsen(atoms, dt, temperature_K=t0k, taut=cfg.tau_fs * units.fs, fixcm=False)

    def temperature():
        return float(thermo.kinetic_temperature_k(atoms.get_momenta(), atoms.get_masses(), dof))

    def pressure_bar() -> float | None:
        if not periodic:
            return None
        return float(-np.mean(atoms.get_stress(voigt=True, include_ideal_gas=True)[:3]) / units.bar)

    def record():
        rec["pos"].append(atoms.positions.copy())
        rec["F"].append(atoms.get_forces(apply_constraint=False).copy())
        rec["v"].append(atoms.get_velocities())
        rec["cell"].append(atoms.cell.array.copy())
        rec["P"].append(pressure_bar())
        if periodic:
            rec["S"].append(atoms.get_stress(voigt=False).copy())

    rec = {"step": [0], "pot": [atoms.get_potential_energy()], "kin": [atoms.get_kinetic_energy()]}
    rec.update(T=[temperature()], pos=[], F=[], v=[], S=[], cell=[], P=[])
    record()
    per_step = {"T": [], "disp": []}

    def observe():  # every step: the guards see each step's temperature and largest displacement |v|·dt
        per_step["T"].append(temperature())
        per_step["disp"].append(float(np.max(np.linalg.norm(atoms.get_velocities(), axis=1))) * dt)

    dyn.attach(observe, interval=1)
    fragments0 = None if periodic else guards.n_fragments(atoms.positions, calc.potential.cutoff)
    e0 = rec["pot"][0] + rec["kin"][0]

    stopped, step = None, 0
    halt = monitor is not None and monitor(0, rec["pos"][0])
    t_start = time.perf_counter()
    with tqdm(total=cfg.steps, desc=f"MD (ASE) {cfg.ensemble}", unit="step", disable=not progress) as bar:
        while step < cfg.steps and not halt:
            k = min(cfg.save_every, cfg.steps - step)
            if cfg.ramp_k is not None and hasattr(dyn, "set_temperature"):
                dyn.set_temperature(temperature_K=float(cfg.target_k(np.array(step + k))))
            per_step["T"].clear(), per_step["disp"].clear()
            dyn.run(k)
            temp, epot = temperature(), atoms.get_potential_energy()
            ts, ds = (np.asarray(per_step[q][-k:] or [np.nan]) for q in ("T", "disp"))
            err = abs(epot + atoms.get_kinetic_energy() - e0) / n if cfg.ensemble == "nve" else None
            fail = guards.failure(cfg, ts, ds, atoms.positions, epot, err, fragments0, calc.potential.cutoff)
            if fail is not None:
                j, what = fail
                at = step + j + 1
                stopped = (
                    f"MD blew up at step {at} (t = {at * cfg.dt_fs:.1f} fs): {what}; last recorded temperature "
                    f"{rec['T'][-1]:.0f} K"
                )
                break
            step += k
            rec["step"].append(step)
            rec["pot"].append(epot)
            rec["kin"].append(atoms.get_kinetic_energy())
            rec["T"].append(temp)
            record()
            bar.update(k)
            if monitor is not None and monitor(step, rec["pos"][-1]):
                break
    if stopped and raise_on_blowup:
        raise MDBlowUp(stopped)
    steps = np.asarray(rec["step"])
    m = len(steps)  # a blow-up stops before its chunk is recorded
    return MDResult(
        step=steps,
        time_fs=steps * cfg.dt_fs,
        potential_ev=np.asarray(rec["pot"]),
        kinetic_ev=np.asarray(rec["kin"]),
        temperature_k=np.asarray(rec["T"]),
        positions=np.stack(rec["pos"][:m]),
        n_atoms=n,
        wall_s=time.perf_counter() - t_start,
        compile_s=0.0,
        reallocations=0,
        stopped=stopped,
        cells=np.stack(rec["cell"][:m]) if periodic else None,
        pressure_bar=np.asarray(rec["P"][:m], float) if periodic else None,
        forces=np.stack(rec["F"][:m]),
        velocities=np.stack(rec["v"][:m]),
        stress=np.stack(rec["S"][:m]) if periodic else None,
        n_dof=dof,
    )


__all__ = ["run_md_ase", "KB_EV_PER_K"]
