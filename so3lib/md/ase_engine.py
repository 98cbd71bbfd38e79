"""The ASE path: any `ase.md` integrator driven by `So3libCalculator` (neighbour list reused within a skin),
recorded like the on-device engine so both feed the same analysis.

Same conventions as the on-device engine (`so3lib.md.thermo`): the Maxwell–Boltzmann start of the same seed,
n_dof = 3N − 3, held by a `FixCom` constraint (ASE then counts 3N − 3 in ``get_temperature``, so NVTBerendsen
and Langevin target the temperature so3lib reports); ASE's NoseHooverChainNVT and IsotropicMTKNPT count 3N in
their chain, so both are given a chain built for 3N − 3 degrees of freedom (`chain_thermostat`; NPT takes no
constraint, and keeps the zero total momentum of the start). NPT is isotropic only (ASE's and jax-md's MTK
barostats scale the cell uniformly; an anisotropic or triclinic-flexible barostat is not offered). The blow-up
guards are `so3lib.md.guards`'."""

from __future__ import annotations

import time

import numpy as np

from so3lib.md import guards, thermo
from so3lib.md.engine import MDBlowUp, MDConfig, MDResult, add_record, new_records
from so3lib.md.thermo import KB_EV_PER_K


def chain_thermostat(masses: np.ndarray, temperature_k: float, tdamp: float, n_dof: int, tchain: int = 3):
    """ASE's Nosé–Hoover chain (`NoseHooverChainThermostat`) built for ``n_dof`` degrees of freedom: its first
    thermostat's force Σp²/m − n_dof·kT vanishes at the kinetic temperature so3lib reports, so the chain drives
    E_kin to n_dof·kT/2. (ASE's integrators build it with 3N, which with the total momentum zero and conserved
    settles a molecule at T·3N/(3N − 3).) ``masses`` (N, 1) amu; ``tdamp`` in ASE's time unit."""
    from ase.md.nose_hoover_chain import NoseHooverChainThermostat

    # the chain counts 3·num_atoms_global degrees of freedom in its force, its first mass and its energy
    return NoseHooverChainThermostat(
        num_atoms_global=n_dof / 3, masses=masses, temperature_K=temperature_k, tdamp=tdamp, tchain=tchain
    )


def _with_chain_for(dyn, temperature_k: float, tdamp: float, n_dof: int):
    """``dyn`` (ASE's NoseHooverChainNVT or IsotropicMTKNPT) with its chain replaced by `chain_thermostat`."""
    from ase.md.nose_hoover_chain import NoseHooverChainThermostat

    old = getattr(dyn, "_thermostat", None)
    if not isinstance(old, NoseHooverChainThermostat):
        raise ImportError(f"{type(dyn).__name__} of this ASE version has no chain thermostat to set its dof on")
    dyn._thermostat = chain_thermostat(dyn.masses, temperature_k, tdamp, n_dof, old._tchain)
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
        from ase.md.nose_hoover_chain import NoseHooverChainNVT

        tdamp = cfg.tau_fs * units.fs
        dyn = _with_chain_for(NoseHooverChainNVT(atoms, dt, temperature_K=t0k, tdamp=tdamp), t0k, tdamp, dof)
    elif cfg.ensemble == "npt":
        from ase.md.nose_hoover_chain import IsotropicMTKNPT

        tdamp = cfg.tau_fs * units.fs
        dyn = IsotropicMTKNPT(
            atoms,
            dt,
            temperature_K=t0k,
            pressure_au=cfg.pressure_bar * units.bar,
            tdamp=tdamp,
            pdamp=cfg.barostat_tau_fs * units.fs,
        )
        # its chain, too, counts 3N; the total momentum is zero and conserved, so 3N − 3 (the barostat's
        # 1 + 1/N coupling factor stays ASE's: an O(1/N²) difference)
        dyn = _with_chain_for(dyn, t0k, tdamp, dof)
    else:
        from ase.md.nvtberendsen import NVTBerendsen

        dyn = NVTBerendsen(atoms, dt, temperature_K=t0k, taut=cfg.tau_fs * units.fs, fixcm=False)

    def temperature():
        return float(thermo.kinetic_temperature_k(atoms.get_momenta(), atoms.get_masses(), dof))

    def pressure_bar() -> float | None:
        if not periodic:
            return None
        return float(-np.mean(atoms.get_stress(voigt=True, include_ideal_gas=True)[:3]) / units.bar)

    def record(step: int) -> None:
        add_record(
            rec,
            step=step,
            potential_ev=atoms.get_potential_energy(),
            kinetic_ev=atoms.get_kinetic_energy(),
            temperature_k=temperature(),
            positions=atoms.positions.copy(),
            forces=atoms.get_forces(apply_constraint=False).copy(),
            velocities=atoms.get_velocities(),
            cells=atoms.cell.array.copy() if periodic else None,
            pressure_bar=pressure_bar(),
            stress=atoms.get_stress(voigt=False).copy() if periodic else None,
        )

    rec = new_records()
    record(0)
    per_step = {"T": [], "disp": []}

    def observe():  # every step: the guards see each step's temperature and largest displacement |v|·dt
        per_step["T"].append(temperature())
        per_step["disp"].append(float(np.max(np.linalg.norm(atoms.get_velocities(), axis=1))) * dt)

    dyn.attach(observe, interval=1)
    fragments0 = None if periodic else guards.n_fragments(atoms.positions, calc.potential.cutoff)
    e0 = rec["potential_ev"][0] + rec["kinetic_ev"][0]

    stopped, step = None, 0
    halt = monitor is not None and monitor(0, rec["positions"][0])
    t_start = time.perf_counter()
    with tqdm(total=cfg.steps, desc=f"MD (ASE) {cfg.ensemble}", unit="step", disable=not progress) as bar:
        while step < cfg.steps and not halt:
            k = min(cfg.save_every, cfg.steps - step)
            if cfg.ramp_k is not None and hasattr(dyn, "set_temperature"):
                dyn.set_temperature(temperature_K=float(cfg.target_k(np.array(step + k))))
            per_step["T"].clear(), per_step["disp"].clear()
            dyn.run(k)
            epot = atoms.get_potential_energy()
            ts, ds = (np.asarray(per_step[q][-k:] or [np.nan]) for q in ("T", "disp"))
            err = abs(epot + atoms.get_kinetic_energy() - e0) / n if cfg.ensemble == "nve" else None
            fail = guards.failure(cfg, ts, ds, atoms.positions, epot, err, fragments0, calc.potential.cutoff)
            if fail is not None:
                j, what = fail
                at = step + j + 1
                stopped = (
                    f"MD blew up at step {at} (t = {at * cfg.dt_fs:.1f} fs): {what}; last recorded temperature "
                    f"{rec['temperature_k'][-1]:.0f} K"
                )
                break
            step += k
            record(step)
            bar.update(k)
            if monitor is not None and monitor(step, rec["positions"][-1]):
                break
    if stopped and raise_on_blowup:
        raise MDBlowUp(stopped)
    return MDResult.from_records(rec, cfg.dt_fs, n, wall_s=time.perf_counter() - t_start, stopped=stopped, n_dof=dof)


__all__ = ["run_md_ase", "KB_EV_PER_K"]
