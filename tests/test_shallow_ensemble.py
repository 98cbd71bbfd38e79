"""Shallow ensembles (issue #17 item 3, the cheap alternative): one model whose last readout layer has K heads.
Default tier: the mean's forces are −∂E/∂r of the mean energy (float64 finite differences), each head's forces
those of its own energy; the heads differ, so the spread is not zero; ``so3lib predict`` writes
energy_std/forces_std where ASE reads them; configs round-trip and one-output models keep their parameters;
contradicting options are one-line errors. Slow tier: the stress of the mean and the mean-only path of MD; the
Gaussian NLL lowers the held-out NLL of the spread below mean-only training while the force error falls; a
shallow SchNet trained on real rMD17 ethanol end to end: calibration on the validation set, the spread ranking
the force errors on original MD17 ethanol, MD stopping above --max-uncertainty."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from conftest import check_spread_calibrated, data
from physics import fd_forces, fd_stress, graph, jitted

import so3lib.data as d
from so3lib import ensemble as E
from so3lib.calculator import So3libCalculator, load_calculator
from so3lib.cli import main
from so3lib.data import fit_energy_reference
from so3lib.models import make_config
from so3lib.potential import Potential, fit_scale_shift, make_potential
from so3lib.shallow_ensemble import ShallowEnsemblePotential
from so3lib.training import DataConfig, RunConfig, TrainingConfig, load_potential, train
from so3lib.training.saving import save_potential

TINY = {"schnet": {"n_atom_basis": 8, "n_interactions": 1, "n_rbf": 8}}
ETHANOL = data("rmd17", "rmd17_ethanol_test_01.npz")


def shallow(ds, heads: int = 4, name: str = "schnet", seed: int = 0):
    """An untrained float64 shallow ensemble (energy reference 'average') and its parameters."""
    cfg = make_config(name, dtype="float64", readout_heads=heads, **TINY.get(name, {})).fit(ds)
    ref = fit_energy_reference(ds, method="average")
    pot = make_potential(cfg, ref, *fit_scale_shift(ds, ref))
    return pot, pot.init(jax.random.PRNGKey(seed), graph(pot, ds, [0]))


@pytest.fixture(scope="module")
def ethanol():
    return d.read(ETHANOL)


def test_forces_are_minus_the_gradient_of_the_mean_energy(ethanol):
    pot, params = shallow(ethanol)
    assert isinstance(pot, ShallowEnsemblePotential) and pot.n_heads == 4
    s = ethanol[2]
    out = jitted(pot)(params, graph(pot, ethanol, [2]))
    np.testing.assert_allclose(np.asarray(out["forces"])[[0, 4, 8]], fd_forces(pot, params, s, [0, 4, 8]), atol=1e-7)
    np.testing.assert_allclose(out["forces"], np.mean(out["forces_members"], axis=0), atol=1e-12)
    # head k's forces are −∂E_k/∂r: finite differences of its own energy
    h, k = 1e-5, 3
    e_k = []
    for sign in (1, -1):
        s2 = ethanol.subset([2])
        s2.positions[4, 1] += sign * h
        e_k.append(float(jitted(pot)(params, graph(pot, s2, [0]))["energy_members"][k, 0]))
    np.testing.assert_allclose(out["forces_members"][k, 4, 1], -(e_k[0] - e_k[1]) / (2 * h), atol=1e-7)


@pytest.mark.slow
def test_stress_and_the_mean_only_path(tial):
    """The stress of the mean is (1/V) ∂E/∂ε (finite differences of a strain); MD and export use the mean only
    (`residual_energy`, and ``force_spread=False``: one backward pass), the same energy and forces."""
    pot, params = shallow(tial.subset([0, 1]), heads=3)
    g = graph(pot, tial, [0, 1])
    out = jitted(pot)(params, g, compute_stress=True)
    np.testing.assert_allclose(out["stress"][0], fd_stress(pot, params, tial[0]), atol=1e-7)
    np.testing.assert_allclose(jax.jit(pot.residual_energy)(params, g)[:2], out["energy_residual"][:2], rtol=1e-12)
    cheap = jax.jit(pot.with_force_spread(False).__call__, static_argnames="compute_stress")(params, g, True)
    assert "forces_std" not in cheap and "forces_std" in out
    np.testing.assert_allclose(cheap["forces"], out["forces"], atol=1e-12)
    np.testing.assert_allclose(cheap["stress"], out["stress"], atol=1e-12)


def test_heads_differ_and_the_spread_is_their_std(ethanol):
    pot, params = shallow(ethanol, heads=5)
    out = jitted(pot)(params, graph(pot, ethanol, [0, 1, 2]))
    e_k = np.asarray(out["energy_members"])[:, :3]
    assert e_k.shape == (5, 3) and np.ptp(e_k, axis=0).min() > 1e-3  # eV: distinct heads on every structure
    np.testing.assert_allclose(out["energy_std"][:3], e_k.std(axis=0), rtol=1e-10)
    np.testing.assert_allclose(out["energy"][:3], e_k.mean(axis=0), rtol=1e-12)
    assert np.asarray(out["forces_std"])[:27].min() > 0


@pytest.mark.slow
def test_nll_training_lowers_the_held_out_nll_and_the_force_error():
    """100 steps on 48 real rMD17 ethanol frames, the same seed and batches with and without the energy NLL: the
    NLL of the heads' energy spread on 48 held-out frames falls, below mean-only training (the loss on the
    mean never reaches the heads' deviations), and the mean's force error falls in both."""
    from so3lib.graph import NeighbourTable, build_batch
    from so3lib.training.loss import gaussian_nll
    from so3lib.training.optim import make_optimizer
    from so3lib.training.state import init_state
    from so3lib.training.step import make_train_step

    tr, te = d.read(data("rmd17", "rmd17_ethanol_train_01.npz")), d.read(ETHANOL)
    pot, params0 = shallow(tr, heads=4)
    pot = pot.with_force_spread(False)  # the default: the energy NLL, no per-head forces in the step

    def batches(ds):
        table = NeighbourTable.build(ds, pot.cutoff)
        return [
            build_batch(ds, table, list(range(i, i + 16)), None, np.float64, pot.reference.energy(ds))
            for i in (0, 16, 32)
        ]

    train_b, held = batches(tr), batches(te)
    fn = jax.jit(pot.__call__)

    def score(params):
        nll, f_sq = [], []
        for g in held:
            out = fn(params, g)
            de = np.asarray(out["energy_residual"] - g.globals["energy_residual"])[:-1]
            nll.append(np.mean(gaussian_nll(de, np.var(np.asarray(out["energy_residual_members"]), axis=0)[:-1])))
            f_sq.append(np.mean(np.asarray(out["forces"] - g.nodes["forces"])[:-1] ** 2))
        return float(np.mean(nll)), float(np.sqrt(np.mean(f_sq)))

    n_steps = 100
    tc = TrainingConfig(max_steps=n_steps, learning_rate=1e-2, warmup_steps=0)
    start = score(params0)
    ends = {}
    for w in (0.0, 0.1):
        opt = make_optimizer(tc, 10)
        step = make_train_step(pot, opt, 0.99, 0.0, None, False, w)
        params = jax.tree_util.tree_map(jax.numpy.copy, params0)  # the step donates its state
        state = init_state(params, opt.init(params))
        for i in range(n_steps):
            state, loss, aux = step(state, train_b[i % 3])
        assert np.isfinite(float(loss)) and ("nll_energy" in aux) == (w > 0)
        ends[w] = score(state.params)
    assert ends[0.1][0] < ends[0.0][0] - 0.5 and ends[0.1][0] < start[0] - 0.5, (start, ends)
    assert ends[0.1][1] < 0.8 * start[1] and ends[0.0][1] < 0.8 * start[1], (start, ends)


def test_predict_writes_the_spread_where_ase_reads_it(ethanol, tmp_path):
    import ase.io

    pot, params = shallow(ethanol, heads=3)
    pot = pot.with_calibration(1.5, 2.5)
    run = tmp_path / "run"
    save_potential(run / "model", pot, params)
    back, _ = load_potential(run)
    assert isinstance(back, ShallowEnsemblePotential) and (back.energy_scale, back.forces_scale) == (1.5, 2.5)
    out = tmp_path / "p.extxyz"
    assert main(["predict", str(run), str(ETHANOL), "--out", str(out), "--no-progress", "--no-plots"]) == 0
    frames = ase.io.read(out, index=":")
    atoms = ethanol[6].to_ase()
    atoms.calc = So3libCalculator(back, params)
    f = atoms.get_forces()
    np.testing.assert_allclose(frames[6].get_forces(), f, atol=1e-8)
    np.testing.assert_allclose(frames[6].arrays["forces_std"], atoms.calc.results["forces_std"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(frames[6].info["energy_std"], atoms.calc.results["energy_std"], rtol=1e-6)
    assert frames[6].info["energy_std"] > 0 and frames[6].arrays["forces_std"].min() > 0
    u = json.loads(out.with_suffix(".json").read_text())["metrics"]["uncertainty"]
    assert u["rms_forces_std_ev_per_a"] > 0 and -1 <= u["spearman_force_rmse_vs_std"] <= 1


def test_config_round_trips_and_a_plain_model_is_unchanged(tmp_path):
    cfg = RunConfig(
        model=make_config("so3krates", readout_heads=8),
        training=TrainingConfig(max_steps=10, nll_weight=0.05, nll_forces=True),
    )
    back = RunConfig.from_yaml(cfg.to_yaml())
    assert back == cfg and back.model.readout_heads == 8 and back.training.nll_forces
    assert "readout_heads" not in make_config("schnet").to_dict()  # configs and fingerprints of one-output runs
    ethanol = d.read(ETHANOL)
    pot = make_potential(make_config("schnet", **TINY["schnet"]), fit_energy_reference(ethanol, method="average"))
    assert type(pot) is Potential and type(Potential.from_dict(pot.to_dict())) is Potential
    shapes = jax.eval_shape(pot.init, jax.random.PRNGKey(0), graph(pot, ethanol, [0]))["params"]
    assert shapes["Dense_5"]["kernel"].shape == (4, 1)  # saved one-output runs keep their parameter names


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--readout-heads", "1"], r"readout_heads: readout_heads 1: a shallow ensemble needs at least 2 heads"),
        (["--readout-heads", "4", "--ensemble", "3"], r"readout_heads 4 and ensemble 3: choose one uncertainty"),
        (["--nll-forces"], r"nll_forces applies to a shallow ensemble: give the model readout_heads"),
        (["--nll-weight", "0.1"], r"nll_weight applies to a shallow ensemble"),
        (["--readout-heads", "4", "--nll-weight", "-1"], r"--nll-weight: Input should be greater than or equal to 0"),
    ],
)
def test_contradicting_options_are_one_line_errors(flags, message, tmp_path, capsys):
    argv = ["train", "--train", str(ETHANOL), "--out", str(tmp_path / "r"), "--max-steps", "1", *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("so3lib: error: ")
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------------ slow tier
@pytest.fixture(scope="module")
def ethanol_shallow(tmp_path_factory):
    """8 heads, float64 SchNet F=16, T=1, 150 steps on 200 rMD17 ethanol frames; 50 validation frames."""
    ds = d.read(d.bundled_path(d.samples.RMD17_ETHANOL_TRAIN))
    cfg = RunConfig(
        model=make_config("schnet", n_atom_basis=16, n_interactions=1, dtype="float64", readout_heads=8),
        training={
            "batch_size": 16,
            "max_epochs": None,
            "max_steps": 150,
            "eval_every_steps": 50,
            "learning_rate": 3e-3,
        },
        data=DataConfig(energy_reference="average"),
    )
    out = tmp_path_factory.mktemp("shallow") / "run"
    val = ds.subset(np.arange(900, 950))
    test = d.read(ETHANOL)
    res = train(cfg, ds.subset(np.arange(200)), val, test, out_dir=out, progress=False)
    return out, res, val


@pytest.mark.slow
def test_training_calibrates_the_spread_on_the_validation_set(ethanol_shallow):
    import ase.io

    out, res, val = ethanol_shallow
    pot, params = load_potential(out)
    assert isinstance(pot, ShallowEnsemblePotential) and pot.forces_scale == res["calibration"]["forces_scale"]
    check_spread_calibrated(pot, params, val)
    saved = json.loads((out / "results.json").read_text())
    assert saved["readout_heads"] == 8 and saved["nll_weight"] == 0.01
    assert set(saved["uncertainty"]) == {"validation", "test"} and (out / "plots" / "calibration.png").exists()
    frames = ase.io.read(out / "test_predictions.extxyz", index=":")  # the calibrated spread of the test frames
    calc = load_calculator(out)
    atoms = frames[4].copy()
    atoms.calc = calc
    atoms.get_forces()
    np.testing.assert_allclose(frames[4].arrays["forces_std"], calc.results["forces_std"], rtol=1e-6)


@pytest.mark.slow
def test_spread_ranks_the_force_errors_on_original_md17(ethanol_shallow):
    """Off the training distribution (original MD17 ethanol, another level of theory): the per-structure
    force RMSE rises with the shallow ensemble's spread, if weakly (Spearman 0.18 measured here; a 3-member
    ensemble of the same model exceeds 0.2, see test_ensemble.py)."""
    out, _, _ = ethanol_shallow
    md17 = d.read(data("md17", "md17_ethanol_first1050.npz"))
    md17 = md17.subset(np.arange(0, len(md17), 5))
    pot, params = load_potential(out)
    rep = E.uncertainty_report(E.predict_arrays(pot, params, md17), md17)
    assert rep["forces"]["spearman_rmse_vs_std_rms"] > 0.1, rep["forces"]
    curve = rep["forces"]["calibration_curve"]
    assert curve["rmse"][-1] > curve["rmse"][0]


@pytest.mark.slow
def test_md_command_stops_above_the_uncertainty(ethanol_shallow, tmp_path):
    from so3lib.workflows.md_report import MDOptions, run

    out, _, _ = ethanol_shallow
    opts = MDOptions(
        run=str(out),
        structure=str(d.bundled_path(d.samples.RMD17_ETHANOL_TEST)),
        steps=40,
        save_every=10,
        max_uncertainty=1e-6,
        uncertainty_action="stop",
        out=str(tmp_path / "md"),
        progress=False,
    )
    rep = run(opts)
    u = rep["uncertainty"]
    assert u["stopped"] and u["first_above"]["step"] == 0 and u["frames_above"] == 1
    atoms = d.read(d.bundled_path(d.samples.RMD17_ETHANOL_TEST))[0].to_ase()
    atoms.calc = load_calculator(out, skin=0.0)
    atoms.get_forces()
    worst = np.linalg.norm(atoms.calc.results["forces_std"], axis=1).max()
    np.testing.assert_allclose(u["forces_std_max_ev_per_a"][0], worst, rtol=1e-8)


@pytest.mark.slow
def test_export_holds_the_heads_mean(ethanol_shallow, tmp_path):
    """`so3lib export` of a shallow ensemble: the exported energy and forces are the heads' mean."""
    from test_export import _inputs

    from so3lib.potential_export import load_export

    out, _, _ = ethanol_shallow
    assert main(["export", str(out), "--out", str(tmp_path / "exp")]) == 0
    meta, prog = load_export(tmp_path / "exp")
    atoms = d.read(ETHANOL)[3].to_ase()
    e, f, _ = prog["potential"].call(*_inputs(atoms, meta))
    atoms.calc = load_calculator(out, skin=0.0)
    np.testing.assert_allclose(float(e), atoms.get_potential_energy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(f)[: len(atoms)], atoms.get_forces(), atol=1e-6)
