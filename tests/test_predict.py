"""Batched prediction (issue #17 item 1): `predict_dataset` equals the ASE calculator frame by frame (energies,
forces, stress of periodic cells), per-atom energies sum to the energy; ``so3lib predict`` writes extxyz that ASE
reads back (single-point calculator, REF_* labels, ensemble spreads as energy_std/forces_std), errors and parity
plots where the file has labels; a training run saves its per-structure test predictions and reports stress
errors where stress labels exist; bad input is a one-line error."""

from __future__ import annotations

import json
import re

import ase.io
import numpy as np
import pytest
from conftest import data
from physics import make_potential

import so3lib.data as d
from so3lib.calculator import So3libCalculator
from so3lib.cli import main
from so3lib.models import make_config
from so3lib.prediction import predict_dataset, write_predictions
from so3lib.training import DataConfig, RunConfig, train
from so3lib.training.saving import save_potential

TIAL = data("materials", "tial_first40.xyz")  # periodic cells with energy, forces and stress (virial) labels
ETHANOL = data("rmd17", "rmd17_ethanol_test_01.npz")
TINY = {"n_atom_basis": 8, "n_interactions": 1, "n_rbf": 8}


@pytest.fixture(scope="module")
def tial():
    return d.read(TIAL).subset(np.arange(7))


@pytest.fixture(scope="module")
def tial_run(tmp_path_factory, tial):
    """An untrained float64 SchNet saved as a run folder (what `so3lib predict` loads)."""
    pot, params = make_potential("schnet", TINY, tial)
    run = tmp_path_factory.mktemp("pred") / "run"
    save_potential(run / "model", pot, params)
    return run, pot, params


@pytest.mark.parametrize("name", ["tial", "ethanol"])
def test_batches_equal_the_calculator(name, tial):
    """Batches of 3 (the last one short) give each frame's calculator results; Σ_i ε_i = E."""
    ds = tial if name == "tial" else d.read(ETHANOL).subset(np.arange(5))
    pot, params = make_potential("schnet", TINY, ds)
    pred = predict_dataset(pot, params, ds, batch_size=3)
    assert ("stress" in pred) == (name == "tial")
    calc = So3libCalculator(pot, params)
    off = ds.offsets
    for i in range(len(ds)):
        atoms = ds[i].to_ase()
        calc.calculate(atoms, ["energy", "forces", "stress"] if name == "tial" else ["energy", "forces"])
        assert pred["energy_ev"][i] == pytest.approx(calc.results["energy"], abs=1e-9)
        np.testing.assert_allclose(
            pred["forces_ev_per_angstrom"][off[i] : off[i + 1]], calc.results["forces"], atol=1e-9
        )
        assert np.sum(pred["atomic_energies_ev"][off[i] : off[i + 1]]) == pytest.approx(pred["energy_ev"][i], abs=1e-9)
        np.testing.assert_allclose(pred["atomic_energies_ev"][off[i] : off[i + 1]], calc.results["energies"], atol=1e-9)
        if name == "tial":
            from ase.stress import full_3x3_to_voigt_6_stress

            np.testing.assert_allclose(full_3x3_to_voigt_6_stress(pred["stress"][i]), calc.results["stress"], atol=1e-9)


def test_predict_command_writes_what_ase_reads_back(tial_run, tial, tmp_path, capsys):
    run, pot, params = tial_run
    src = tmp_path / "tial7.extxyz"
    ase.io.write(src, [tial[i].to_ase() for i in range(len(tial))], format="extxyz")
    out = tmp_path / "p" / "tial_pred.extxyz"
    argv = ["predict", str(run), str(src), "--out", str(out), "--batch-size", "4", "--no-progress"]
    assert main(argv) == 0
    expect = predict_dataset(pot, params, tial, batch_size=2)
    frames = ase.io.read(out, ":")
    assert len(frames) == len(tial)
    for i, atoms in enumerate(frames):
        a, b = tial.offsets[i], tial.offsets[i + 1]
        assert atoms.get_potential_energy() == pytest.approx(expect["energy_ev"][i], abs=1e-6)
        np.testing.assert_allclose(atoms.get_forces(), expect["forces_ev_per_angstrom"][a:b], atol=1e-6)
        np.testing.assert_allclose(atoms.get_potential_energies(), expect["atomic_energies_ev"][a:b], atol=1e-6)
        from ase.stress import full_3x3_to_voigt_6_stress

        np.testing.assert_allclose(atoms.get_stress(), full_3x3_to_voigt_6_stress(expect["stress"][i]), atol=1e-7)
        assert atoms.info["REF_energy"] == pytest.approx(tial.energy[i], abs=1e-6)
        np.testing.assert_allclose(atoms.arrays["REF_forces"], tial.forces[a:b], atol=1e-6)
        np.testing.assert_allclose(atoms.info["REF_stress"], full_3x3_to_voigt_6_stress(tial.stress[i]), atol=1e-7)
    summary = json.loads(out.with_suffix(".json").read_text())
    m = summary["metrics"]
    e_err = np.abs(expect["energy_ev"] - tial.energy)
    assert m["energy_ev"]["mae"] == pytest.approx(e_err.mean(), rel=1e-9) and m["energy_ev"]["count"] == 7
    s_err = np.abs(expect["stress"] - tial.stress)
    assert (
        m["stress_ev_per_a3"]["mae"] == pytest.approx(s_err.mean(), rel=1e-9) and m["stress_ev_per_a3"]["count"] == 63
    )
    assert set(summary["plots"]) == {"energy", "forces"} and all(
        (tmp_path / "p" / f"tial_pred_parity_{k}.png").stat().st_size > 0 for k in ("energy", "forces")
    )
    assert main(argv) == 0  # its own files are replaced
    foreign = tmp_path / "p" / "mine.extxyz"
    foreign.write_text("not so3lib's")
    capsys.readouterr()
    assert main(["predict", str(run), str(src), "--out", str(foreign), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "mine.extxyz: exists and was not written by so3lib predict" in err
    assert foreign.read_text() == "not so3lib's"


def test_ensemble_spreads_are_written_where_ase_finds_them(tial_run, tial, tmp_path):
    """energy_std in info, forces_std in arrays (the keys an ensemble adds to the predictions)."""
    _, pot, params = tial_run
    pred = predict_dataset(pot, params, tial, batch_size=8)
    n = int(tial.offsets[-1])
    pred["energy_std"] = np.linspace(0.01, 0.07, len(tial))
    pred["forces_std"] = np.linspace(0.0, 1.0, n)
    frames = ase.io.read(write_predictions(tmp_path / "e.extxyz", tial, pred), ":")
    for i, atoms in enumerate(frames):
        assert atoms.info["energy_std"] == pytest.approx(pred["energy_std"][i])
        np.testing.assert_allclose(
            atoms.arrays["forces_std"], pred["forces_std"][tial.offsets[i] : tial.offsets[i + 1]]
        )
    again = ase.io.read(
        write_predictions(tmp_path / "f.extxyz", tial, {k: v for k, v in pred.items() if "std" not in k}), ":"
    )
    assert "energy_std" not in again[0].info and "forces_std" not in again[0].arrays


def test_elements_the_run_does_not_cover_are_one_line_errors(tial_run, tmp_path, capsys):
    run, _, _ = tial_run
    out = tmp_path / "x.extxyz"
    assert main(["predict", str(run), str(ETHANOL), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert re.fullmatch(
        r"so3lib: error: \S+rmd17_ethanol_test_01\.npz, key 'numbers': elements \[1, 6, 8\] have no energy reference "
        r"\(the model knows \[13, 22\]\)",
        err,
    ), err
    assert not out.exists()


def test_training_saves_test_predictions_and_stress_errors(tmp_path):
    """A run without a stress term in the loss still reports the test stress errors; test_predictions.extxyz
    holds every test structure with its labels, and its energies give the reported test MAE."""
    ds = d.read(TIAL)
    cfg = RunConfig(
        model=make_config("schnet", **TINY),
        training={"batch_size": 4, "max_steps": 2, "max_epochs": None, "eval_every_steps": 2},
        data=DataConfig(energy_reference="average"),
    )
    tr, va, te = ds.subset(np.arange(20)), ds.subset(np.arange(20, 26)), ds.subset(np.arange(26, 40))
    res = train(cfg, tr, va, te, out_dir=tmp_path / "run", progress=False)
    assert (
        res["test"]["stress_mae_ev_per_a3"] > 0
        and res["test"]["stress_rmse_ev_per_a3"] >= res["test"]["stress_mae_ev_per_a3"]
    )
    frames = ase.io.read(tmp_path / "run" / "test_predictions.extxyz", ":")
    assert len(frames) == 14
    e_pred = np.array([a.get_potential_energy() for a in frames])
    e_ref = np.array([a.info["REF_energy"] for a in frames])
    np.testing.assert_allclose(e_ref, te.energy, atol=1e-6)
    assert np.mean(np.abs(e_pred - e_ref)) == pytest.approx(res["test"]["energy_mae_ev"], rel=1e-4)
    s_pred = np.array([a.get_stress(voigt=False) for a in frames])
    assert np.mean(np.abs(s_pred - te.stress)) == pytest.approx(res["test"]["stress_mae_ev_per_a3"], rel=1e-3)
