"""OpenMM with a trained so3lib potential: an OpenMM force (OpenMM ≥ 8.3's `PythonForce`) and an MD engine that
records like the jax-md and ASE engines.

    force = openmm_force("runs/ethanol", numbers)        # or (potential, params), or a So3libCalculator
    system.addForce(force)

Units: OpenMM works in nm, kJ/mol, ps, dalton; so3lib in Å, eV, fs, amu (dalton = amu). At the interface
x_Å = 10 x_nm, E_kJ/mol = 96.485 E_eV, F_kJ/mol/nm = 964.85 F_eV/Å, v_nm/ps = 100 v_Å/fs. The force evaluates
`So3libCalculator` (one jitted function per padded size class, the neighbour list reused while no atom moved
more than skin/2), so its energy is the calculator's, per-element reference included.

Ensembles (`run_md_openmm`), mapped onto what OpenMM has:
- ``nve``: velocity Verlet as a `CustomIntegrator` (the jax-md and ASE engines' integrator; OpenMM's own
  `VerletIntegrator` is the leapfrog form of it, with velocities at half steps);
- ``nvt-langevin``: `LangevinMiddleIntegrator`, friction γ;
- ``nvt-nose-hoover``: `NoseHooverIntegrator`, a chain of 3, collision frequency 1/τ;
- ``berendsen``: OpenMM has no Berendsen thermostat, so the same `CustomIntegrator` rescales the velocities
  after each step by λ = sqrt(clip(1 + (Δt/τ)(T₀/T − 1), 0.64, 1.44)) after each step, the jax-md engine's
  formula. (`AndersenThermostat` would be a different, stochastic, ensemble.)
A `CMMotionRemover` keeps the centre of mass at rest, so temperatures use 3N − 3 degrees of freedom, as OpenMM's
thermostats do. Periodic cells are rotated into OpenMM's reduced triclinic form for the run; recorded positions
are rotated back.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from so3lib.md import thermo
from so3lib.md.engine import EV_PER_A3_PER_BAR, MDBlowUp, MDConfig, MDResult, add_record, new_records
from so3lib.units import ENERGY_UNITS_EV

EV_PER_KJ_PER_MOL = ENERGY_UNITS_EV["kj/mol"]  # 1 kJ/mol in eV (0.010364...)
KJ_PER_MOL_PER_EV = 1.0 / EV_PER_KJ_PER_MOL  # 96.485...
ANGSTROM_PER_NM = 10.0
NM_PER_PS_PER_ANGSTROM_PER_FS = 100.0
MISSING = "the openmm engine needs OpenMM ≥ 8.3: pip install 'so3lib[openmm]'"


def import_openmm():
    """The `openmm` module, or an ImportError with the one-line install hint (absent, older than 8.3, or
    without `PythonForce`)."""
    try:
        import openmm
    except ImportError as exc:
        raise ImportError(MISSING) from exc
    version = tuple(int(x) for x in openmm.__version__.split(".")[:2] if x.isdigit())
    if version < (8, 3) or not hasattr(openmm, "PythonForce"):
        raise ImportError(f"{MISSING} (found OpenMM {openmm.__version__})")
    return openmm


def _calculator(model, params=None, skin_angstrom: float = 0.5):
    """A `So3libCalculator` from a run folder, a (Potential, params) pair, or a calculator itself."""
    from so3lib.calculator import So3libCalculator, load_calculator
    from so3lib.potential import Potential

    if isinstance(model, So3libCalculator):
        return model
    if isinstance(model, Potential):
        if params is None:
            raise ValueError("openmm_force(potential, ...) needs the potential's params")
        return So3libCalculator(model, params, skin=skin_angstrom)
    if isinstance(model, (str, Path)):
        return load_calculator(model, skin=skin_angstrom)
    raise TypeError(f"expected a run folder, a Potential or a So3libCalculator, got {type(model).__name__}")


def _numbers(numbers_or_topology) -> np.ndarray:
    """(N,) atomic numbers from an array or an `openmm.app.Topology`."""
    if hasattr(numbers_or_topology, "atoms"):
        z = [a.element.atomic_number if a.element is not None else 0 for a in numbers_or_topology.atoms()]
        if 0 in z:
            raise ValueError(f"topology atom {z.index(0)} has no element: so3lib needs the atomic numbers")
        return np.asarray(z, np.int32)
    return np.asarray(numbers_or_topology, np.int32).reshape(-1)


def openmm_force(
    model,
    numbers,
    params=None,
    *,
    periodic: bool = False,
    skin_angstrom: float = 0.5,
):
    """An OpenMM `PythonForce` of a trained so3lib potential for the system whose particles have atomic numbers
    ``numbers`` (an array (N,) or an `openmm.app.Topology`). ``model``: a run folder (its best EMA parameters), a
    `Potential` with ``params``, or a `So3libCalculator`. ``periodic=True`` takes the cell from the context's
    box vectors (every step; NPT barostats are fine). Energies in kJ/mol (per-element reference included),
    forces in kJ/mol/nm."""
    openmm = import_openmm()
    import ase

    calc = _calculator(model, params, skin_angstrom)
    z = _numbers(numbers)
    calc.potential.reference.check_species(z, "the OpenMM system")
    atoms = ase.Atoms(numbers=z, pbc=periodic)

    def compute(state):
        atoms.positions = state.getPositions(asNumpy=True)._value * ANGSTROM_PER_NM
        if periodic:
            atoms.cell = state.getPeriodicBoxVectors(asNumpy=True)._value * ANGSTROM_PER_NM
        calc.calculate(atoms, ["energy", "forces"])
        e = calc.results["energy"] * KJ_PER_MOL_PER_EV
        f = calc.results["forces"] * (KJ_PER_MOL_PER_EV * ANGSTROM_PER_NM)
        return e, f

    force = openmm.PythonForce(compute)
    force.setUsesPeriodicBoundaryConditions(bool(periodic))
    force.setName("so3lib")
    force.calculator = calc  # keep the calculator (and its compiled function) reachable from the force
    return force


def openmm_box(cell: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(box (3, 3) Å in OpenMM's reduced triclinic form, rotation Q (3, 3)) for a cell (3, 3) Å: the box spans
    the same lattice as ``cell @ Q.T`` (positions in the box frame are ``positions @ Q.T``). A left-handed cell
    becomes right-handed by flipping its third vector (the same lattice)."""
    from ase.cell import Cell

    cell = np.array(cell, float)
    if np.linalg.det(cell) < 0:
        cell[2] = -cell[2]
    box, Q = Cell(cell).standard_form()
    a, b, c = np.array(box, float)
    c = c - b * np.round(c[1] / b[1])
    c = c - a * np.round(c[0] / a[0])
    b = b - a * np.round(b[0] / a[0])
    return np.stack([a, b, c]), np.asarray(Q)


def _velocity_verlet(openmm, dt_ps: float, berendsen: tuple[float, float, int] | None = None):
    """Velocity Verlet as an OpenMM `CustomIntegrator` (velocities and positions at the same time, as in the
    jax-md and ASE engines); with ``berendsen`` = (kT₀ kJ/mol, τ ps, degrees of freedom) the velocities are then
    rescaled by λ = sqrt(clip(1 + (Δt/τ)(kT₀/kT − 1), 0.64, 1.44)), kT = 2 E_kin / n_dof."""
    integ = openmm.CustomIntegrator(dt_ps)
    integ.addUpdateContextState()
    integ.addComputePerDof("v", "v + 0.5*dt*f/m")
    integ.addComputePerDof("x", "x + dt*v")
    integ.addComputePerDof("v", "v + 0.5*dt*f/m")
    if berendsen is not None:
        kt0, tau_ps, n_dof = berendsen
        integ.addGlobalVariable("kT0", kt0)
        integ.addGlobalVariable("tau", tau_ps)
        integ.addGlobalVariable("ndof", float(n_dof))
        integ.addGlobalVariable("ke", 0.0)
        integ.addGlobalVariable("lam", 1.0)
        integ.addComputeSum("ke", "0.5*m*v*v")
        integ.addComputeGlobal("lam", "sqrt(min(1.44, max(0.64, 1 + (dt/tau)*(kT0*ndof/max(2*ke, 1e-30) - 1))))")
        integ.addComputePerDof("v", "v*lam")
    return integ


def _integrator(openmm, cfg: MDConfig, n_dof: int):
    """The OpenMM integrator for ``cfg.ensemble`` (see the module docstring), and a function setting its target
    temperature (K) for a ramp (None for NVE)."""
    dt_ps = cfg.dt_fs * 1e-3
    t0 = float(cfg.target_k(np.array(0.0)))
    if cfg.ensemble == "nve":
        return _velocity_verlet(openmm, dt_ps), None
    if cfg.ensemble == "nvt-langevin":
        integ = openmm.LangevinMiddleIntegrator(t0, cfg.friction_per_ps, dt_ps)
        integ.setRandomNumberSeed(cfg.seed % (2**31 - 1) + 1)  # OpenMM's seed 0 means "pick one at random"
        return integ, integ.setTemperature
    if cfg.ensemble == "nvt-nose-hoover":
        integ = openmm.NoseHooverIntegrator(t0, 1e3 / cfg.tau_fs, dt_ps, 3)
        return integ, integ.setTemperature
    r_kj = _gas_constant_kj(openmm)
    integ = _velocity_verlet(openmm, dt_ps, (r_kj * t0, cfg.tau_fs * 1e-3, n_dof))
    return integ, lambda t_k: integ.setGlobalVariableByName("kT0", r_kj * float(t_k))


def _gas_constant_kj(openmm) -> float:
    """OpenMM's k_B in kJ/mol/K (the value its thermostats use)."""
    unit = openmm.unit
    return unit.MOLAR_GAS_CONSTANT_R.value_in_unit(unit.kilojoule_per_mole / unit.kelvin)


def initial_velocities(atoms, temperature_k: float, seed: int) -> np.ndarray:
    """(N, 3) Å/fs: `so3lib.md.thermo`'s Maxwell–Boltzmann start at ``temperature_k`` from ``seed`` (COM momentum
    removed mass-weighted, exactly at the temperature with 3N − 3 degrees of freedom): the same velocities as the
    other engines for the same seed."""
    from ase import units

    from so3lib.md import thermo

    masses = atoms.get_masses()
    return thermo.maxwell_boltzmann_momenta(masses, temperature_k, seed) / masses[:, None] * units.fs


def run_md_openmm(
    model,
    atoms,
    cfg: MDConfig,
    progress: bool = True,
    raise_on_blowup: bool = True,
    params=None,
    platform: str = "Reference",
    monitor=None,
) -> MDResult:
    """MD of ``atoms`` (ase.Atoms; molecule, or periodic in all three directions) in OpenMM with the integrator
    matching ``cfg.ensemble``; ``model`` as in `openmm_force`. ``platform``: the OpenMM platform (the default
    "Reference" is double precision; the so3lib force dominates the cost). Records what the jax-md and ASE
    engines record (energies, temperature, positions, forces, velocities; cell, stress and pressure of a periodic
    cell) and applies `so3lib.md.guards` at every saved frame (OpenMM runs the ``save_every`` steps between two
    frames on its own, so a blow-up is named by the frame after it). ``monitor(step, positions) -> bool``: as in
    `run_md` (see `so3lib.md.uncertainty`)."""
    openmm = import_openmm()
    from ase import units
    from tqdm.auto import tqdm

    from so3lib.md import guards

    unit = openmm.unit
    n = len(atoms)
    if n < 2:
        raise ValueError(
            f"MD needs at least 2 atoms, the structure has {n} (a single atom does not move once its "
            "centre-of-mass velocity is removed)"
        )
    if cfg.ensemble == "npt":
        raise ValueError("--ensemble npt: the openmm engine has no barostat here; use --engine jax-md or ase")
    calc = _calculator(model, params, cfg.skin_angstrom)
    calc.potential.reference.check_species(atoms.numbers, f"structure {atoms.get_chemical_formula()}")
    periodic = bool(np.all(atoms.pbc))
    if np.any(atoms.pbc) and not periodic:
        raise ValueError(f"mixed boundary conditions pbc={atoms.pbc.tolist()} are not supported by OpenMM")
    Q = np.eye(3)
    system = openmm.System()
    for m in atoms.get_masses():
        system.addParticle(float(m))
    box = None
    if periodic:
        box, Q = openmm_box(atoms.cell.array)
        system.setDefaultPeriodicBoxVectors(*(openmm.Vec3(*v) for v in box / ANGSTROM_PER_NM))
    system.addForce(openmm_force(calc, atoms.numbers, periodic=periodic))
    system.addForce(openmm.CMMotionRemover(1))
    n_dof = thermo.degrees_of_freedom(n)
    integ, set_target = _integrator(openmm, cfg, n_dof)
    context = openmm.Context(system, integ, openmm.Platform.getPlatformByName(platform))
    context.setPositions(atoms.positions @ Q.T / ANGSTROM_PER_NM)
    v0 = initial_velocities(atoms, float(cfg.target_k(np.array(0.0))), cfg.seed)
    context.setVelocities(v0 @ Q.T * NM_PER_PS_PER_ANGSTROM_PER_FS)
    box_atoms = atoms.copy()  # the structure as the force sees it (OpenMM's frame), for the stress
    box_atoms.calc = None
    if periodic:
        box_atoms.cell = box
    volume_a3 = abs(float(np.linalg.det(atoms.cell.array))) if periodic else None
    rec = new_records()

    def frame(step: int) -> dict:
        """The record at ``step``, in the structure's frame (one force evaluation; a periodic cell two, the
        second with the stress)."""
        s = context.getState(getEnergy=True, getPositions=True, getVelocities=True, getForces=True)
        ke_ev = s.getKineticEnergy().value_in_unit(unit.kilojoule_per_mole) * EV_PER_KJ_PER_MOL
        x_box = s.getPositions(asNumpy=True).value_in_unit(unit.nanometer) * ANGSTROM_PER_NM
        v = s.getVelocities(asNumpy=True).value_in_unit(unit.nanometer / unit.picosecond) @ Q
        f = s.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer) @ Q
        out = dict(
            step=step,
            potential_ev=s.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) * EV_PER_KJ_PER_MOL,
            kinetic_ev=ke_ev,
            temperature_k=2.0 * ke_ev / (n_dof * thermo.KB_EV_PER_K),
            positions=x_box @ Q,
            forces=f * EV_PER_KJ_PER_MOL / ANGSTROM_PER_NM,
            velocities=v / NM_PER_PS_PER_ANGSTROM_PER_FS / units.fs,  # Å/fs → ASE's unit
            cells=atoms.cell.array.copy() if periodic else None,
            pressure_bar=None,
            stress=None,
        )
        if periodic and np.isfinite(x_box).all():
            box_atoms.positions = x_box
            calc.calculate(box_atoms, ["energy", "forces", "stress"])
            from ase.stress import voigt_6_to_full_3x3_stress

            sigma = Q.T @ voigt_6_to_full_3x3_stress(calc.results["stress"]) @ Q  # eV/Å³, ASE's sign
            out["stress"] = sigma
            out["pressure_bar"] = (2.0 * ke_ev - np.trace(sigma) * volume_a3) / (3.0 * volume_a3) / EV_PER_A3_PER_BAR
        return out

    t0 = time.perf_counter()
    add_record(rec, **frame(0))  # the first force evaluation compiles the potential
    compile_s = time.perf_counter() - t0
    fragments0 = None if periodic else guards.n_fragments(atoms.positions, calc.potential.cutoff)
    e0 = rec["potential_ev"][0] + rec["kinetic_ev"][0]
    stopped, step = None, 0
    halt = monitor is not None and monitor(0, rec["positions"][0])
    t_start = time.perf_counter()
    with tqdm(total=cfg.steps, desc=f"MD (OpenMM) {cfg.ensemble}", unit="step", disable=not progress) as bar:
        while step < cfg.steps and not halt:
            k = min(cfg.save_every, cfg.steps - step)
            if cfg.ramp_k is not None and set_target is not None:
                set_target(float(cfg.target_k(np.array(step + k))))
            try:
                integ.step(k)
                now = frame(step + k)
            except Exception as exc:  # NaN coordinates (OpenMMException) or the calculator refusing them
                msg = " ".join(str(exc).split())
                stopped = f"MD blew up by step {step + k} (t = {(step + k) * cfg.dt_fs:.1f} fs): {msg}"
                break
            fail = guards.frame_failure(cfg, now, e0, n, fragments0, calc.potential.cutoff)
            if fail is not None:
                stopped = (
                    f"MD blew up by step {step + k} (t = {(step + k) * cfg.dt_fs:.1f} fs): {fail}; last recorded "
                    f"temperature {rec['temperature_k'][-1]:.0f} K"
                )
                break
            step += k
            add_record(rec, **now)
            bar.update(k)
            bar.set_postfix(T=f"{now['temperature_k']:.0f}K", refresh=False)
            if monitor is not None and monitor(step, now["positions"]):
                break
    wall = time.perf_counter() - t_start
    if stopped and raise_on_blowup:
        raise MDBlowUp(stopped)
    return MDResult.from_records(rec, cfg.dt_fs, n, wall_s=wall, compile_s=compile_s, stopped=stopped, n_dof=n_dof)


__all__ = ["openmm_force", "run_md_openmm", "openmm_box", "import_openmm", "initial_velocities"]
