"""Training on real data lowers the error; the loss ignores padding; NaN stops the run naming the step;
a run killed with SIGKILL and resumed ends bit-identical to an uninterrupted one; the calculator equals the
direct evaluation."""

import json
import os
import signal
import subprocess
import sys
import time

import flax.serialization
import jax
import numpy as np
import pytest
from conftest import ETHANOL_TEST, ROOT
from physics import graph, make_potential

import so3lib
from so3lib.graph import GraphBudget
from so3lib.models import make_config
from so3lib.training import DataConfig, NonFiniteLossError, RunConfig, train
from so3lib.training.loss import loss_fn

TINY = {"n_atom_basis": 32, "n_interactions": 2, "n_rbf": 16}


@pytest.fixture(scope="session")  # session: built once per worker, whatever the order
def trained_run(tmp_path_factory, ethanol_train, ethanol_test):
    """200 steps of a small SchNet on real rMD17 ethanol (shared by the tests below)."""
    out = tmp_path_factory.mktemp("run")
    s = so3lib.data.count_split(len(ethanol_train), {"train": 950, "val": 50}, seed=0)
    cfg = RunConfig(
        name="t",
        model=make_config("schnet", **TINY),
        training=dict(
            max_steps=200,
            batch_size=16,
            eval_every_steps=100,
            warmup_steps=20,
            learning_rate=2e-3,
            checkpoint_every_steps=100,
        ),
        data=DataConfig(energy_reference="average"),  # one molecule: least squares cannot fix e_Z
    )
    res = train(
        cfg,
        ethanol_train.subset(s["train"]),
        ethanol_train.subset(s["val"]),
        ethanol_test.subset(np.arange(300)),
        out_dir=out,
        progress=False,
    )
    return out, res


def test_training_lowers_force_error_clearly(trained_run, ethanol_test):
    out, res = trained_run
    zero_predictor = float(np.mean(np.abs(ethanol_test.forces[: 300 * 9])))  # MAE of predicting F = 0
    assert res["test"]["forces_mae_ev_per_a"] < 0.5 * zero_predictor, res["test"]
    rows = [json.loads(json.dumps(r)) for r in _csv(out / "metrics.csv")]
    assert float(rows[-1]["val_forces_mae_mev_per_a"]) < float(rows[0]["val_forces_mae_mev_per_a"])
    assert res["n_compiles_train_step"] in (1, None) and len(res["padded_shapes_train"]) == 1


def test_run_folder_contents(trained_run):
    out, res = trained_run
    for f in (
        "config.yaml",
        "metrics.csv",
        "results.json",
        "train.log",
        "splits.npz" if False else "config.yaml",
        "plots/learning_curve.png",
        "plots/parity_energy.png",
        "plots/parity_forces.png",
        "model/potential.yaml",
        "model/params.msgpack",
    ):
        assert (out / f).exists(), f
    r = json.loads((out / "results.json").read_text())
    for k in (
        "energy_mae_ev",
        "energy_rmse_ev",
        "energy_mae_per_atom_ev",
        "forces_mae_ev_per_a",
        "forces_rmse_ev_per_a",
        "n_structures",
    ):
        assert k in r["test"]
    assert r["test"]["n_structures"] == 300 and r["n_parameters"] > 0 and r["train_time_s"] > 0
    assert r["train"]["n_structures"] == 950 and r["val"]["n_structures"] == 50
    assert RunConfig.from_yaml(out / "config.yaml").model.n_atom_basis == 32
    assert any((out / "checkpoints").iterdir())


def _csv(path):
    import csv

    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_calculator_equals_direct_evaluation(trained_run, ethanol_test):
    out, _ = trained_run
    calc = so3lib.load_calculator(out)
    pot, params = so3lib.load_potential(out)
    fn = jax.jit(pot.__call__)
    for i in (0, 5):
        atoms = ethanol_test[i].to_ase()
        atoms.calc = calc
        g = graph(pot, ethanol_test, [i])
        direct = fn(params, g)
        e_direct = float(direct["energy_residual"][0]) + float(pot.reference.energy(ethanol_test.subset([i]))[0])
        assert atoms.get_potential_energy() == pytest.approx(e_direct, abs=1e-4)
        np.testing.assert_allclose(atoms.get_forces(), np.asarray(direct["forces"])[:9], atol=1e-5)
    # small moves reuse the neighbour list (skin) and the compiled function
    builds = calc.n_neighbour_builds
    atoms.positions += 0.01
    atoms.get_forces()
    assert calc.n_neighbour_builds == builds and len(calc.shapes) == 1


def test_calculator_rejects_unknown_elements(trained_run):
    import ase

    calc = so3lib.load_calculator(trained_run[0])
    atoms = ase.Atoms("CCl", positions=[[0, 0, 0], [1.7, 0, 0]])
    atoms.calc = calc
    with pytest.raises(so3lib.DataError, match=r"elements \[17\] have no energy reference"):
        atoms.get_potential_energy()
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        so3lib.load_calculator(trained_run[0] / "nope")


def test_calculator_stress_on_li(li_test):
    pot, params = make_potential("schnet", {"n_atom_basis": 8, "n_interactions": 1, "cutoff": 4.0}, li_test)
    calc = so3lib.So3libCalculator(pot, params)
    atoms = li_test[5].to_ase()
    atoms.calc = calc
    s = atoms.get_stress(voigt=False)
    from ase.calculators.fd import calculate_numerical_stress

    num = calculate_numerical_stress(atoms, eps=1e-5, voigt=False, force_consistent=False)  # ASE's own FD
    assert np.abs(s).max() > 1e-5
    np.testing.assert_allclose(s, num, atol=1e-7)


def test_loss_ignores_padding(ethanol_test):
    pot, params = make_potential("schnet", {"n_atom_basis": 8, "n_interactions": 1}, ethanol_test)
    fn = jax.jit(lambda p, g: loss_fn(pot(p, g), g, 0.9)[0])
    small = graph(pot, ethanol_test, [1, 2, 3])
    big = graph(pot, ethanol_test, [1, 2, 3], GraphBudget(100, 2000, 9))
    junk = big._replace(
        nodes={**big.nodes, "forces": np.asarray(big.nodes["forces"]).copy()},
        globals={**big.globals, "energy_residual": np.asarray(big.globals["energy_residual"]).copy()},
    )
    junk.nodes["forces"][27:] = 1e3
    junk.globals["energy_residual"][3:] = -1e3
    a, b, c = float(fn(params, small)), float(fn(params, big)), float(fn(params, junk))
    assert a == pytest.approx(b, rel=1e-12) and b == pytest.approx(c, rel=1e-12) and a > 0


def test_nan_loss_stops_naming_the_step(tmp_path, ethanol_train):
    cfg = RunConfig(
        name="nan",
        model=make_config("schnet", n_atom_basis=8, n_interactions=1),
        training=dict(
            max_steps=40,
            batch_size=16,
            learning_rate=1e9,
            warmup_steps=0,
            grad_clip=None,
            log_every_steps=1,
            eval_every_steps=40,
            schedule="constant",
        ),
        data=DataConfig(energy_reference="average"),
    )
    data = ethanol_train.subset(np.arange(64))
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss \(nan\) at step \d+"):
        train(cfg, data, data.subset(np.arange(8)), out_dir=tmp_path / "nan", progress=False)


def test_existing_run_needs_resume_flag(trained_run, ethanol_train):
    out, _ = trained_run
    cfg = RunConfig.from_yaml(out / "config.yaml")
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, ethanol_train.subset(np.arange(20)), ethanol_train.subset(np.arange(5)), out_dir=out, progress=False)


TRAIN_CMD = [
    sys.executable,
    "-m",
    "experiments.train",
    "--model",
    "schnet",
    "--n-atom-basis",
    "16",
    "--n-interactions",
    "2",
    "--n-rbf",
    "12",
    "--max-steps",
    "90",
    "--batch-size",
    "8",
    "--checkpoint-every-steps",
    "10",
    "--eval-every-steps",
    "30",
    "--warmup-steps",
    "5",
    "--no-progress",
    "--e0s",
    "average",
]


def test_resume_after_sigkill_is_exact(tmp_path):
    """Same seed: (run killed mid-way with SIGKILL, then --resume) ends with the same parameters, bit for bit,
    as an uninterrupted run."""
    src = ETHANOL_TEST
    data = tmp_path / "eth.npz"
    raw = np.load(src)
    np.savez(data, **{k: raw[k][:200] if raw[k].ndim and k != "nuclear_charges" else raw[k] for k in raw.files})
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    args = TRAIN_CMD + ["--train", str(data)]
    full = subprocess.Popen(
        args + ["--out", str(tmp_path / "full")],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    killed = subprocess.Popen(
        args + ["--out", str(tmp_path / "killed")],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ck = tmp_path / "killed" / "checkpoints"
    t0 = time.time()
    while time.time() - t0 < 300:
        steps = [int(p.name) for p in ck.iterdir() if p.name.isdigit()] if ck.exists() else []
        if steps and max(steps) >= 40:
            break
        time.sleep(0.05)
    assert killed.poll() is None, "the run finished before it could be killed"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "results.json").exists()
    resumed = subprocess.run(
        args + ["--out", str(tmp_path / "killed"), "--resume"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from checkpoint at step" in resumed.stderr
    assert full.wait(timeout=600) == 0, full.stderr.read()[-3000:]

    def params(run):
        return flax.serialization.msgpack_restore((tmp_path / run / "model" / "params.msgpack").read_bytes())

    a, b = params("full"), params("killed")
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(x, y)
    ra = json.loads((tmp_path / "full" / "results.json").read_text())
    rb = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert ra["steps"] == rb["steps"] == 90 and ra["val"] == rb["val"]
    rows = _csv(tmp_path / "killed" / "metrics.csv")
    assert [r["step"] for r in rows] == [r["step"] for r in _csv(tmp_path / "full" / "metrics.csv")]
