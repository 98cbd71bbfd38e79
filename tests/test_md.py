"""Molecular dynamics (issue #8): on-device jax-md engine and ASE path with a small potential trained on real
ethanol: NVE conservation, Langevin temperature, neighbour overflow handled, periodic wrapping, reproducible
seeds, the command's outputs, and clear errors for bad input."""

import numpy as np
import pytest
from conftest import data, train_ethanol_schnet

import so3lib.data as d
from so3lib.md import MDConfig, run_md
from so3lib.training import load_potential


def test_nve_conserves_energy(ethanol_run, ethanol):
    pot, params = load_potential(ethanol_run)
    r = run_md(
        pot,
        params,
        ethanol,
        MDConfig(ensemble="nve", temperature_k=300, steps=1000, dt_fs=0.5, save_every=50),
        progress=False,
    )
    assert r.step[-1] == 1000 and r.stopped is None
    # bound: total energy within 0.5 meV/atom of its start over 1000 steps of 0.5 fs (float64)
    assert np.max(np.abs(r.total_ev - r.total_ev[0])) / 9 < 5e-4, r.total_ev
    assert np.ptp(r.potential_ev) > 20 * np.ptp(r.total_ev)  # the atoms really move


@pytest.mark.slow
def test_nve_soak_20_ps(tmp_path):
    """MD soak with a properly trained potential (SchNet F=32, T=2, 3000 steps on rMD17 ethanol, float64):
    40 000 steps of 0.5 fs NVE (20 ps) without blow-up, the total energy within 2 meV/atom of its start and a
    drift (least-squares slope) below 0.1 meV/atom/ps."""
    training = {"max_steps": 3000, "eval_every_steps": 1000, "learning_rate": 2e-3, "early_stopping_patience": None}
    train_ethanol_schnet(tmp_path / "run", 32, 950, range(950, 1000), training)
    pot, params = load_potential(tmp_path / "run")
    atoms = d.read(d.bundled_path(d.samples.RMD17_ETHANOL_TEST))[0].to_ase()
    md = MDConfig(ensemble="nve", temperature_k=300, steps=40_000, dt_fs=0.5, save_every=200)
    r = run_md(pot, params, atoms, md, progress=False)
    assert r.stopped is None and r.step[-1] == 40_000
    per_atom = (r.total_ev - r.total_ev[0]) / len(atoms)
    assert np.max(np.abs(per_atom)) < 2e-3, np.max(np.abs(per_atom))
    slope_ev_per_ps = np.polyfit(r.step * 0.5e-3, per_atom, 1)[0]
    assert abs(slope_ev_per_ps) < 1e-4, slope_ev_per_ps


def test_langevin_reaches_the_target(ethanol_run, ethanol):
    """Mean kinetic temperature within 10 % of the target (jax-md's BAOAB Langevin, the noise projected off the
    centre of mass; 3N − 3 degrees of freedom)."""
    pot, params = load_potential(ethanol_run)
    cfg = MDConfig(
        ensemble="nvt-langevin", temperature_k=300, steps=4000, dt_fs=0.5, save_every=10, friction_per_ps=50.0
    )
    r = run_md(pot, params, ethanol, cfg, progress=False)
    assert abs(np.mean(r.temperature_k[100:]) - 300) < 0.1 * 300, np.mean(r.temperature_k[100:])


def test_langevin_reports_the_momenta_its_noise_acts_on(ethanol_run, ethanol):
    """jax-md's BAOAB Langevin records the momenta right after its O (noise) step, p − (Δt/2)·F: there they are
    canonical, while at the end of the step a mode of frequency ω is (ωΔt)²/4 too cold (−2 % for a C–H
    stretch at 0.5 fs). With a vanishing friction BAOAB is velocity Verlet: the same positions and forces as NVE,
    and the recorded velocities are NVE's half a kick back."""
    pot, params = load_potential(ethanol_run)
    cfg = MDConfig(ensemble="nve", temperature_k=300, steps=60, dt_fs=0.5, save_every=20)
    nve = run_md(pot, params, ethanol, cfg, progress=False)
    cold = cfg.model_copy(update={"ensemble": "nvt-langevin", "friction_per_ps": 1e-15})
    lang = run_md(pot, params, ethanol, cold, progress=False)
    np.testing.assert_allclose(lang.positions, nve.positions, atol=1e-6)
    np.testing.assert_allclose(lang.forces, nve.forces, atol=1e-5)
    from ase import units

    from so3lib.md import thermo

    half_kick = 0.5 * cfg.dt_fs * units.fs * nve.forces[1:] / ethanol.get_masses()[:, None]  # ASE's velocity unit
    assert np.abs(half_kick).max() > 1e-3  # the correction is not negligible
    np.testing.assert_allclose(lang.velocities[1:], nve.velocities[1:] - half_kick, atol=1e-6)
    np.testing.assert_allclose(lang.velocities[0], nve.velocities[0], atol=0)  # the start is the start
    m = ethanol.get_masses()[:, None]
    t_mid = (m * lang.velocities**2).sum(axis=(1, 2)) / thermo.KB_EV_PER_K / 24
    np.testing.assert_allclose(lang.temperature_k, t_mid, rtol=1e-9)


def test_same_seed_same_trajectory(ethanol_run, ethanol):
    pot, params = load_potential(ethanol_run)
    short = MDConfig(ensemble="nvt-langevin", temperature_k=500, steps=200, dt_fs=0.5, save_every=10)
    a, b = (run_md(pot, params, ethanol, short, progress=False) for _ in range(2))
    c = run_md(pot, params, ethanol, short.model_copy(update={"seed": 1}), progress=False)
    np.testing.assert_array_equal(a.positions, b.positions)
    assert not np.allclose(a.positions[-1], c.positions[-1])


def test_neighbour_overflow_is_reallocated(ethanol_run, ethanol, caplog):
    pot, params = load_potential(ethanol_run)
    cfg = MDConfig(ensemble="nve", temperature_k=300, steps=100, dt_fs=0.5, save_every=20)
    ref = run_md(pot, params, ethanol, cfg, progress=False)
    # a list sized for a 10× stretched molecule is far too small: overflow, reallocation, the same trajectory
    r = run_md(pot, params, ethanol, cfg, progress=False, capacity_from=10.0 * ethanol.positions)
    assert r.reallocations == 1 and "overflow" in caplog.text
    np.testing.assert_allclose(r.positions, ref.positions, atol=1e-10)


def test_periodic_wrapping(ethanol_run, ethanol):
    """A molecule straddling the faces of a periodic box moves exactly like the free molecule (mod the box)."""
    pot, params = load_potential(ethanol_run)
    box = ethanol.copy()
    box.set_cell(np.diag([13.0, 13.5, 14.0]))
    box.pbc = True
    box.positions = box.positions - box.positions.mean(axis=0)  # centred on the corner: split over 8 images
    free = ethanol.copy()
    free.positions = box.positions.copy()
    cfg = MDConfig(ensemble="nve", temperature_k=300, steps=200, dt_fs=0.5, save_every=50)
    a = run_md(pot, params, free, cfg, progress=False)
    b = run_md(pot, params, box, cfg, progress=False)
    np.testing.assert_allclose(b.potential_ev, a.potential_ev, rtol=0, atol=1e-9)
    frac = (b.positions - a.positions) @ np.linalg.inv(box.cell.array)
    np.testing.assert_allclose(frac, np.round(frac), atol=1e-8)


def test_ase_path_and_the_command(ethanol_run, ethanol, tmp_path, monkeypatch):
    import json

    from so3lib.cli import invoke
    from so3lib.graph import batching

    calls = []
    orig = batching.NeighbourTable.build
    monkeypatch.setattr(
        batching.NeighbourTable, "build", staticmethod(lambda *a, **k: calls.append(1) or orig(*a, **k))
    )
    rep = invoke(
        [
            "md",
            "--run",
            str(ethanol_run),
            "--structure",
            str(d.bundled_path(d.samples.RMD17_ETHANOL_TEST)),
            "--ensemble",
            "nve",
            "--temperature",
            "300",
            "--steps",
            "200",
            "--dt",
            "0.5",
            "--save-every",
            "20",
            "--engine",
            "ase",
            "--out",
            str(tmp_path / "ase"),
            "--no-progress",
        ]
    )
    assert len(calls) < 50  # the neighbour list is reused within the skin, not rebuilt at every step
    assert abs(rep["nve_total_energy_range_mev_per_atom"]) < 1.0 and rep["stable"]
    rep = invoke(
        [
            "md",
            "--run",
            str(ethanol_run),
            "--structure",
            str(d.bundled_path(d.samples.RMD17_ETHANOL_TEST)),
            "--ensemble",
            "berendsen",
            "--ramp",
            "10",
            "300",
            "--steps",
            "400",
            "--dt",
            "0.5",
            "--save-every",
            "40",
            "--out",
            str(tmp_path / "jm"),
            "--no-progress",
        ]
    )
    for f in (
        "trajectory.extxyz",
        "md.csv",
        "md_results.json",
        "plots/energy_temperature.png",
        "plots/rdf.png",
        "plots/rdf_similarity.png",
    ):
        assert (tmp_path / "jm" / f).exists(), f
    from so3lib.cli import parse

    again = parse(["md", "--config", str(tmp_path / "jm" / "config.yaml"), "--out", str(tmp_path / "jm2")])
    assert again.options.ramp == (10.0, 300.0) and again.options.steps == 400 and again.options.engine == "jax-md"
    saved = json.loads((tmp_path / "jm" / "md_results.json").read_text())
    assert saved["steps"] == 400 and len(saved["rdf_similarity"]) == 11 and saved["atom_steps_per_s"] > 0
    assert saved["temperature_mean_standard_error_k"] is None  # 9 frames: too few to estimate it
    import ase.io

    frames = ase.io.read(tmp_path / "jm" / "trajectory.extxyz", ":")
    assert len(frames) == 11 and saved["verdict"] in ("stable", "heated")
    csv = np.loadtxt(tmp_path / "jm" / "md.csv", delimiter=",", skiprows=1)
    for f, row in zip(frames, csv):  # energy, forces and velocities back through ASE
        assert f.get_potential_energy() == pytest.approx(row[2], abs=1e-6)
        assert f.get_kinetic_energy() == pytest.approx(row[3], rel=1e-5)
        assert f.get_forces().shape == (9, 3) and np.abs(f.get_forces()).max() > 0.01


def test_bad_input(ethanol_run, tmp_path):
    from so3lib.cli import invoke

    with pytest.raises(ValueError, match="time step must be positive"):
        MDConfig(dt_fs=-0.5)
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        invoke(["md", "--run", str(tmp_path / "nope"), "--structure", "x.xyz", "--out", str(tmp_path / "o")])
    li = str(data("materials", "li_mlearn_test.json"))
    with pytest.raises(d.DataError, match=r"elements \[3\] have no energy reference"):
        invoke(["md", "--run", str(ethanol_run), "--structure", li, "--out", str(tmp_path / "o"), "--no-progress"])


def test_a_far_too_large_system_is_refused_before_allocation(ethanol_run, ethanol):
    from so3lib.md.memory import md_memory_bytes

    pot, params = load_potential(ethanol_run)
    big = ethanol.copy()
    big.cell = [20.0, 20.0, 20.0]  # a lattice to repeat along; the result stays a free "molecule" (pbc False)
    big = big.repeat((20, 20, 20))  # 72 000 atoms: 3·N² pair displacements = 62 GB
    assert md_memory_bytes(len(big), None, pot.cutoff + 1.0, False, 4, 8, 1) > 6e10
    with pytest.raises(MemoryError, match=r"72000 atoms need about \d+ GB for MD .* use a smaller --supercell"):
        run_md(pot, params, big, MDConfig(steps=10), progress=False)


def test_blow_up_stops_naming_the_step_and_nose_hoover_runs(ethanol_run, ethanol):
    from so3lib.md import MDBlowUp

    pot, params = load_potential(ethanol_run)
    cfg = MDConfig(ensemble="nvt-nose-hoover", temperature_k=300, steps=200, dt_fs=0.5, save_every=50)
    r = run_md(pot, params, ethanol, cfg, progress=False)
    assert r.step[-1] == 200 and np.all(np.isfinite(r.total_ev)) and 50 < np.mean(r.temperature_k) < 1000
    with pytest.raises(MDBlowUp, match=r"blew up at step \d+ \(t = [\d.]+ fs\): temperature \d+ K above the limit"):
        run_md(pot, params, ethanol, cfg.model_copy(update={"max_temperature_k": 5.0}), progress=False)
    r = run_md(
        pot, params, ethanol, cfg.model_copy(update={"max_temperature_k": 5.0}), progress=False, raise_on_blowup=False
    )
    assert r.stopped and "blew up at step" in r.stopped


@pytest.mark.parametrize("ensemble", ["nve", "berendsen"])
def test_both_engines_start_alike_and_agree(ethanol_run, ethanol, ensemble):
    """The same seed gives both engines the same Maxwell–Boltzmann start (exactly 400 K, zero COM momentum), and
    NVE and Berendsen (heating to 500 K, τ = 20 fs) then follow the same trajectory in both (float64)."""
    from so3lib.calculator import So3libCalculator
    from so3lib.md.ase_engine import run_md_ase

    pot, params = load_potential(ethanol_run)
    cfg = MDConfig(ensemble=ensemble, temperature_k=400, steps=60, dt_fs=0.5, save_every=20, tau_fs=20.0)
    if ensemble == "berendsen":
        cfg = cfg.model_copy(update={"ramp_k": None, "temperature_k": 400})
    a = run_md(pot, params, ethanol, cfg, progress=False)
    b = run_md_ase(So3libCalculator(pot, params, skin=1.0), ethanol, cfg, progress=False)
    np.testing.assert_allclose(a.velocities[0], b.velocities[0], rtol=0, atol=1e-12)
    assert a.temperature_k[0] == pytest.approx(400.0, rel=1e-10) and a.n_dof == b.n_dof == 24
    np.testing.assert_allclose((ethanol.get_masses()[:, None] * a.velocities[0]).sum(0), 0.0, atol=1e-12)
    np.testing.assert_allclose(a.positions, b.positions, atol=1e-6)
    np.testing.assert_allclose(a.temperature_k, b.temperature_k, rtol=1e-5)
    np.testing.assert_allclose(a.forces, b.forces, atol=1e-5)
    np.testing.assert_allclose(a.potential_ev, b.potential_ev, atol=1e-6)
    assert np.ptp(a.temperature_k) > 10  # the atoms really move (and for Berendsen, heat)


@pytest.mark.parametrize("engine", ["jax-md", "ase"])
def test_a_time_step_of_50_fs_is_a_failed_run(ethanol_run, tmp_path, engine):
    """dt = 50 fs flings the molecule apart: the step guard stops the run (the temperature limit lifted), the
    report says failed and gives no NVE drift."""
    import json

    from so3lib.cli import invoke

    common = ["--structure", str(d.bundled_path(d.samples.RMD17_ETHANOL_TEST)), "--ensemble", "nve"]
    rep = invoke(
        ["md", "--run", str(ethanol_run), *common, "--steps", "40", "--dt", "50", "--save-every", "10"]
        + ["--engine", engine, "--out", str(tmp_path / "o"), "--no-progress"]
    )
    assert rep["verdict"] == "failed" and not rep["stable"] and rep["failure"]["criterion"] == "blow-up"
    assert "blew up at step 1 (t = 50.0 fs)" in rep["blow_up"]
    assert rep["nve_drift_mev_per_atom_per_ps"] is None and rep["nve_total_energy_range_mev_per_atom"] is None
    saved = json.loads((tmp_path / "o" / "md_results.json").read_text())
    assert saved["nve_drift_mev_per_atom_per_ps"] is None
    pot, params = load_potential(ethanol_run)
    atoms = d.read(d.bundled_path(d.samples.RMD17_ETHANOL_TEST))[0].to_ase()
    cfg = MDConfig(ensemble="nve", steps=40, dt_fs=50.0, save_every=10, max_temperature_k=1e9)
    if engine == "ase":
        from so3lib.calculator import So3libCalculator
        from so3lib.md.ase_engine import run_md_ase

        r = run_md_ase(So3libCalculator(pot, params), atoms, cfg, progress=False, raise_on_blowup=False)
    else:
        r = run_md(pot, params, atoms, cfg, progress=False, raise_on_blowup=False)
    assert (
        "blew up at step 1 (t = 50.0 fs): an atom moved" in r.stopped and "time step 50.0 fs is too large" in r.stopped
    )
    assert len(r.step) == 1  # nothing after the blow-up is recorded
