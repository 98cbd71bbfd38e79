"""OpenMM (issue #16, part 4): the so3lib force inside OpenMM gives the calculator's energies and forces on real
frames (rMD17 ethanol, mlearn Li cells incl. triclinic ones), in OpenMM's units; velocity Verlet in OpenMM follows
the ASE engine's trajectory from the same seed and conserves energy, recording the same forces, velocities, cell,
stress and pressure; the blow-up guards and the uncertainty monitor act on every saved frame; `so3lib md --engine
openmm` writes the same outputs; a missing OpenMM is a one-line error. (The thermostats at 300 K:
test_md_thermostats.py, slow.)"""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, check_guards_and_monitor, data

import so3lib.data as d
from so3lib.calculator import So3libCalculator, load_calculator
from so3lib.md import MDConfig

openmm = pytest.importorskip("openmm", minversion="8.3")
from so3lib.md.openmm import openmm_box, openmm_force, run_md_openmm  # noqa: E402

KJ_PER_MOL_PER_EV = 96.485332  # CODATA, independent of the constant the module uses
ETHANOL_TEST = d.bundled_path(d.samples.RMD17_ETHANOL_TEST)


@pytest.fixture(scope="module")
def li_potential():
    """An untrained float64 SchNet (F=8, T=1) with its scale and reference fitted on the mlearn Li test cells: the
    tests compare OpenMM with the calculator on the same model, which needs no training."""
    from physics import make_potential

    ds = d.read(data("materials", "li_mlearn_test.json"))
    return make_potential("schnet", {"n_atom_basis": 8, "n_interactions": 1, "cutoff": 4.0}, ds)


def _context(force, masses, box_angstrom=None):
    system = openmm.System()
    for m in masses:
        system.addParticle(float(m))
    if box_angstrom is not None:
        system.setDefaultPeriodicBoxVectors(*(openmm.Vec3(*v) for v in np.asarray(box_angstrom) / 10.0))
    system.addForce(force)
    return openmm.Context(system, openmm.VerletIntegrator(1e-3), openmm.Platform.getPlatformByName("Reference"))


def _energy_forces(ctx, positions_angstrom):
    """(E kJ/mol, F (N, 3) kJ/mol/nm) from OpenMM at positions in Å."""
    ctx.setPositions(np.asarray(positions_angstrom) / 10.0)
    s = ctx.getState(getEnergy=True, getForces=True)
    unit = openmm.unit
    e = s.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    return e, s.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)


def test_openmm_energies_and_forces_equal_the_calculator_on_ethanol_frames(ethanol_run):
    from openmm import app

    frames = d.read(ETHANOL_TEST)
    ref = load_calculator(ethanol_run)
    top = app.Topology()
    residue = top.addResidue("ETH", top.addChain())
    first = frames[0].to_ase()
    for z in first.numbers:
        top.addAtom(str(z), app.Element.getByAtomicNumber(int(z)), residue)
    ctx = _context(openmm_force(ethanol_run, top), first.get_masses())  # atomic numbers from a Topology
    for k in (0, 7, 150, 499, 998):
        atoms = frames[k].to_ase()
        e, f = _energy_forces(ctx, atoms.positions)
        atoms.calc = ref
        # float32 tolerance (the model is float64; what differs is only the unit conversion)
        np.testing.assert_allclose(e, atoms.get_potential_energy() * KJ_PER_MOL_PER_EV, rtol=1e-7)
        np.testing.assert_allclose(f, atoms.get_forces() * KJ_PER_MOL_PER_EV * 10.0, rtol=1e-6, atol=1e-3)
    # OpenMM's force is −dE/dx in OpenMM's own units (kJ/mol, nm): central differences, float64
    x = frames[3].to_ase().positions / 10.0
    _, f = _energy_forces(ctx, x * 10.0)
    h = 1e-6  # nm
    for i, c in ((0, 0), (2, 1), (5, 2), (8, 0)):
        xp, xm = x.copy(), x.copy()
        xp[i, c] += h
        xm[i, c] -= h
        fd = -(_energy_forces(ctx, xp * 10.0)[0] - _energy_forces(ctx, xm * 10.0)[0]) / (2 * h)
        assert abs(fd - f[i, c]) < 1e-4 * max(1.0, abs(f[i, c])), (i, c, fd, f[i, c])


def test_openmm_energies_and_forces_equal_the_calculator_in_periodic_cells(li_potential):
    """mlearn Li: cubic 53/54-atom cells, a hexagonal (γ = 60°) and an oblique (γ = 107.5°) slab cell and a
    2-atom cell smaller than the cutoff. OpenMM gets the cell rotated into its reduced triclinic form; a cell
    sheared to c + a − b (the same lattice) and rotated gives the same energy."""
    frames = d.read(data("materials", "li_mlearn_test.json"))
    pot, params = li_potential
    ref = So3libCalculator(pot, params)
    rng = np.random.default_rng(0)
    for k in (0, 4, 24, 25, 26):
        atoms = frames[k].to_ase()
        atoms.calc = ref
        e_ref, f_ref = atoms.get_potential_energy(), atoms.get_forces()
        box, Q = openmm_box(atoms.cell.array)
        assert box[0, 1] == box[0, 2] == box[1, 2] == 0 and np.all(np.diag(box) > 0)
        assert abs(box[1, 0]) <= box[0, 0] / 2 and abs(box[2, 0]) <= box[0, 0] / 2 and abs(box[2, 1]) <= box[1, 1] / 2
        force = (
            openmm_force(pot, atoms.numbers, params, periodic=True)
            if k == 0
            else openmm_force(ref, atoms.numbers, periodic=True)
        )
        ctx = _context(force, atoms.get_masses(), box)
        e, f = _energy_forces(ctx, atoms.positions @ Q.T)
        np.testing.assert_allclose(e, e_ref * KJ_PER_MOL_PER_EV, rtol=1e-7)
        np.testing.assert_allclose(f @ Q, f_ref * KJ_PER_MOL_PER_EV * 10.0, rtol=1e-6, atol=1e-3)
        # the same crystal described by another basis of its lattice, in another orientation
        a, b, c = atoms.cell.array
        R, _ = np.linalg.qr(rng.standard_normal((3, 3)))
        box2, Q2 = openmm_box(np.stack([a, b, c + a - b]) @ R.T)
        ctx2 = _context(openmm_force(ref, atoms.numbers, periodic=True), atoms.get_masses(), box2)
        e2, _ = _energy_forces(ctx2, atoms.positions @ R.T @ Q2.T)
        np.testing.assert_allclose(e2, e_ref * KJ_PER_MOL_PER_EV, rtol=1e-7)


def test_nve_follows_the_ase_engine_and_conserves_energy(ethanol_run, ethanol):
    """Velocity Verlet in OpenMM and in ASE from the same Maxwell–Boltzmann velocities (same seed): the same
    trajectory (a wrong length, time, mass or velocity unit would separate them at once), and the total energy
    stays within 1 meV/atom over 400 steps of 0.5 fs, its fluctuation shrinking as Δt² (velocity Verlet's
    shadow Hamiltonian) when the step is halved."""
    from so3lib.md.ase_engine import run_md_ase

    cfg = MDConfig(ensemble="nve", temperature_k=300, steps=400, dt_fs=0.5, save_every=20)
    calc = load_calculator(ethanol_run, skin=1.0)
    r = run_md_openmm(calc, ethanol, cfg, progress=False)
    a = run_md_ase(load_calculator(ethanol_run, skin=1.0), ethanol, cfg, progress=False)
    assert r.stopped is None and r.step[-1] == 400
    np.testing.assert_allclose(r.positions, a.positions, atol=1e-6)
    np.testing.assert_allclose(r.total_ev, a.total_ev, atol=1e-6)
    np.testing.assert_allclose(r.temperature_k, a.temperature_k, rtol=1e-6)
    # the same record as the other engines: forces (eV/Å) and velocities (ASE's unit) of every saved frame
    np.testing.assert_allclose(r.forces, a.forces, atol=1e-5)
    np.testing.assert_allclose(r.velocities, a.velocities, rtol=0, atol=1e-7 * np.abs(a.velocities).max())
    assert r.n_dof == a.n_dof == 24 and r.cells is None and r.stress is None
    assert np.max(np.abs(r.total_ev - r.total_ev[0])) / len(ethanol) < 1e-3, r.total_ev
    assert np.ptp(r.potential_ev) > 20 * np.ptp(r.total_ev)  # the atoms really move
    assert calc.n_neighbour_builds < 40  # the neighbour list is reused within the skin
    half = run_md_openmm(calc, ethanol, cfg.model_copy(update={"dt_fs": 0.25, "steps": 800, "save_every": 40}))
    # Δt² would give 4; the range of a short trace is noisy
    assert 3.0 < np.ptp(r.total_ev) / np.ptp(half.total_ev) < 6.0, (np.ptp(r.total_ev), np.ptp(half.total_ev))


def test_a_periodic_run_records_what_the_ase_engine_records(ethanol_run, ethanol):
    """Ethanol in a sheared periodic cell (OpenMM runs it rotated into its reduced form): the cell, the model's
    stress (ASE's sign) and the virial pressure of every saved frame equal the ASE engine's, in the structure's
    frame, from the same start."""
    from so3lib.md.ase_engine import run_md_ase

    box = ethanol.copy()
    box.cell = [[11.0, 0.0, 0.5], [1.5, 11.5, 0.0], [-1.0, 2.0, 12.0]]
    box.pbc = True
    cfg = MDConfig(ensemble="nve", temperature_k=300, steps=40, dt_fs=0.5, save_every=20)
    r = run_md_openmm(load_calculator(ethanol_run, skin=1.0), box, cfg, progress=False)
    a = run_md_ase(load_calculator(ethanol_run, skin=1.0), box, cfg, progress=False)
    np.testing.assert_allclose(r.positions, a.positions, atol=1e-6)
    np.testing.assert_allclose(r.cells, a.cells, atol=1e-12)
    assert np.abs(a.stress).max() > 1e-4  # a real stress
    np.testing.assert_allclose(r.stress, a.stress, rtol=0, atol=1e-6 * np.abs(a.stress).max())
    np.testing.assert_allclose(r.pressure_bar, a.pressure_bar, rtol=1e-5)
    np.testing.assert_allclose(r.forces, a.forces, atol=1e-5)


def test_guards_and_the_monitor_act_on_every_saved_frame(ethanol_run, ethanol):
    """dt = 50 fs flings the molecule apart: `so3lib.md.guards` stops the OpenMM run at the first saved frame
    (nothing after it recorded); a monitor is called on every saved frame and stops the run where it says so."""
    calc = load_calculator(ethanol_run)
    check_guards_and_monitor(run_md_openmm, calc, ethanol)


def test_the_command_with_openmm_and_a_reproducible_langevin(ethanol_run, ethanol, tmp_path):
    from so3lib.cli import invoke

    out = tmp_path / "omm"
    rep = invoke(
        ["md", "--run", str(ethanol_run), "--structure", str(ETHANOL_TEST), "--ensemble", "berendsen"]
        + ["--ramp", "100", "300", "--steps", "200", "--dt", "0.5", "--save-every", "4", "--engine", "openmm"]
        + ["--out", str(out), "--no-progress"]
    )
    for f in ("trajectory.extxyz", "md.csv", "md_results.json", "plots/energy_temperature.png", "plots/rdf.png"):
        assert (out / f).exists(), f
    saved = json.loads((out / "md_results.json").read_text())
    assert saved["engine"] == "openmm" and saved["steps"] == 200 and len(saved["rdf_similarity"]) == 51
    # the mean temperature of the last 80 % of the frames with its block-averaged standard error
    from so3lib.md import thermo

    temps = np.loadtxt(out / "md.csv", delimiter=",", skiprows=1)[:, 5][51 // 5 :]
    assert saved["temperature_mean_k"] == pytest.approx(np.mean(temps), rel=1e-9)
    se = thermo.mean_and_standard_error(temps)[1]
    assert se > 0 and saved["temperature_mean_standard_error_k"] == pytest.approx(se, rel=1e-6)
    assert rep["stable"] and saved["atom_steps_per_s"] > 0
    # Langevin: the same seed gives the same trajectory, another seed another one
    cfg = MDConfig(ensemble="nvt-langevin", temperature_k=500, steps=60, dt_fs=0.5, save_every=20)
    calc = load_calculator(ethanol_run)
    a, b = (run_md_openmm(calc, ethanol, cfg, progress=False) for _ in range(2))
    c = run_md_openmm(calc, ethanol, cfg.model_copy(update={"seed": 1}), progress=False)
    np.testing.assert_array_equal(a.positions, b.positions)
    assert not np.allclose(a.positions[-1], c.positions[-1])


def test_bad_input_and_a_blow_up(ethanol_run, ethanol):
    from so3lib.md import MDBlowUp

    calc = load_calculator(ethanol_run)
    slab = ethanol.copy()
    slab.cell, slab.pbc = np.diag([12.0, 12.0, 12.0]), [True, True, False]
    with pytest.raises(ValueError, match=r"mixed boundary conditions pbc=\[True, True, False\] are not supported"):
        run_md_openmm(calc, slab, MDConfig(steps=10), progress=False)
    with pytest.raises(ValueError, match="MD needs at least 2 atoms, the structure has 1"):
        run_md_openmm(calc, ethanol[:1], MDConfig(steps=10), progress=False)
    with pytest.raises(d.DataError, match=r"elements \[3\] have no energy reference"):
        openmm_force(calc, [3, 3])
    with pytest.raises(ValueError, match="needs the potential's params"):
        openmm_force(calc.potential, ethanol.numbers)
    cfg = MDConfig(ensemble="nvt-nose-hoover", temperature_k=300, steps=40, dt_fs=0.5, save_every=20)
    with pytest.raises(MDBlowUp, match=r"blew up by step 20 \(t = 10.0 fs\): temperature \d+ K"):
        run_md_openmm(calc, ethanol, cfg.model_copy(update={"max_temperature_k": 5.0}), progress=False)


def test_a_missing_openmm_is_a_one_line_error(ethanol_run, tmp_path):
    code = (
        "import sys\n"
        "sys.modules['openmm'] = None  # as if OpenMM were not installed\n"
        "from so3lib.cli import main\n"
        f"sys.exit(main(['md', '--run', {str(ethanol_run)!r}, '--structure', {str(ETHANOL_TEST)!r}, "
        f"'--engine', 'openmm', '--steps', '10', '--out', {str(tmp_path / 'md')!r}]))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "so3lib: error: the openmm engine needs OpenMM ≥ 8.3: pip install 'so3lib[openmm]'"
    ]
    assert not (tmp_path / "md").exists()  # nothing was started
