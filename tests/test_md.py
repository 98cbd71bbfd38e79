"""Molecular dynamics (issue #8): on-device jax-md engine and ASE path with a small potential trained on real
ethanol: NVE conservation, Langevin temperature, neighbour overflow handled, periodic wrapping, reproducible
seeds, the command's outputs, and clear errors for bad input."""

import numpy as np
import pytest
from conftest import data

import so3lib.data as d
from so3lib.md import MDConfig, run_md
from so3lib.models import make_config
from so3lib.training import DataConfig, RunConfig, load_potential, train


def _train_ethanol_schnet(out, n_atom_basis: int, n_train: int, val: range, training: dict) -> dict:
    """A float64 SchNet (T=2) trained on the first ``n_train`` frames of the bundled rMD17 ethanol split and
    validated on the frames ``val``."""
    ds = d.read(d.bundled_path(d.samples.RMD17_ETHANOL_TRAIN))
    cfg = RunConfig(
        model=make_config("schnet", n_atom_basis=n_atom_basis, n_interactions=2, dtype="float64"),
        training={"batch_size": 16, "max_epochs": None, **training},
        data=DataConfig(energy_reference="average"),  # one molecule: least squares cannot fix e_Z
    )
    return train(cfg, ds.subset(np.arange(n_train)), ds.subset(np.asarray(val)), None, out_dir=out, progress=False)


@pytest.fixture(scope="session")  # session: built once per worker, whatever the order
def ethanol_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("md") / "run"
    res = _train_ethanol_schnet(
        out, 16, 400, range(900, 950), {"max_steps": 150, "eval_every_steps": 75, "learning_rate": 3e-3}
    )
    assert res["val"]["forces_mae_ev_per_a"] < 1.0
    return out


@pytest.fixture(scope="session")  # session: built once per worker, whatever the order
def ethanol():
    return d.read(d.bundled_path(d.samples.RMD17_ETHANOL_TEST))[0].to_ase()


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
    _train_ethanol_schnet(tmp_path / "run", 32, 950, range(950, 1000), training)
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
    """Mean kinetic temperature within 10 % of the target (jax-md's BAOAB Langevin; 3N degrees of freedom)."""
    pot, params = load_potential(ethanol_run)
    cfg = MDConfig(
        ensemble="nvt-langevin", temperature_k=300, steps=4000, dt_fs=0.25, save_every=10, friction_per_ps=50.0
    )
    r = run_md(pot, params, ethanol, cfg, progress=False)
    assert abs(np.mean(r.temperature_k[100:]) - 300) < 0.1 * 300, np.mean(r.temperature_k[100:])


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
    import ase.io

    assert len(ase.io.read(tmp_path / "jm" / "trajectory.extxyz", ":")) == 11


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


@pytest.mark.slow
@pytest.mark.parametrize("ensemble", ["nvt-langevin", "nvt-nose-hoover", "berendsen"])
def test_thermostats_hold_their_target_in_both_engines(ensemble, tmp_path_factory):
    """Each NVT method holds 300 K on rMD17 aspirin (21 atoms; SchNet F=16, T=2, float64, trained briefly on the
    committed 50-frame slice) in both engines: the mean kinetic temperature (3N − 3 degrees of freedom) over
    10 ps after 1 ps of equilibration within 2 % of the target, and the two engines within 3 % of each other."""
    from so3lib.calculator import So3libCalculator
    from so3lib.md.ase_engine import run_md_ase

    run = tmp_path_factory.getbasetemp() / "aspirin_run"
    if not (run / "best").exists() and not (run / "config.yaml").exists():
        ds = d.read(data("rmd17", "rmd17_aspirin_train_01.npz"))
        val = d.read(data("rmd17", "rmd17_aspirin_test_01.npz"))
        cfg = RunConfig(
            model=make_config("schnet", n_atom_basis=16, n_interactions=2, dtype="float64"),
            training={
                "batch_size": 10,
                "max_epochs": None,
                "max_steps": 600,
                "eval_every_steps": 300,
                "learning_rate": 3e-3,
                "early_stopping_patience": None,
            },
            data=DataConfig(energy_reference="average"),
        )
        train(cfg, ds, val.subset(np.arange(20)), None, out_dir=run, progress=False)
    pot, params = load_potential(run)
    atoms = d.read(data("rmd17", "rmd17_aspirin_test_01.npz"))[0].to_ase()
    md = MDConfig(
        ensemble=ensemble, temperature_k=300, steps=22_000, dt_fs=0.5, save_every=10, tau_fs=50.0, friction_per_ps=20.0
    )
    means = {}
    for engine in ("jax-md", "ase"):
        if engine == "ase":
            r = run_md_ase(So3libCalculator(pot, params, skin=1.0), atoms, md, progress=False)
        else:
            r = run_md(pot, params, atoms, md, progress=False)
        assert r.stopped is None and r.step[-1] == 22_000 and r.n_dof == 60
        means[engine] = float(np.mean(r.temperature_k[r.time_fs >= 1000.0]))
    print(f"\n{ensemble}: mean temperature over 10 ps (K): {means}")
    for engine, t in means.items():
        assert abs(t - 300.0) < 0.02 * 300.0, (engine, means)
    assert abs(means["jax-md"] - means["ase"]) < 0.03 * 300.0, means
