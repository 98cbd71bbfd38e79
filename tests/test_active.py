"""Active learning (issue #17, item 5): the loop's mechanics with ASE's EMT as a cheap oracle on ethanol. Each
round adds the requested number of oracle-labelled frames; the uncertainty strategy takes the frames of largest
spread of its own MD, the random one frames of the same trajectory; the labels are the oracle's."""

import json

import numpy as np
import pytest
from ase.calculators.emt import EMT

import so3lib.data as d
from so3lib import active
from so3lib.cli import main


def test_select_takes_the_largest_spread_or_a_random_draw():
    u = np.array([0.1, np.nan, 0.5, 0.3, 0.9, 0.2])
    np.testing.assert_array_equal(active.select(u, 2, "uncertainty", np.random.default_rng(0)), [4, 2])
    r = active.select(u, 3, "random", np.random.default_rng(0))
    assert len(set(r)) == 3 and 1 not in r  # no NaN frame, no repeats
    assert len(active.select(u, 10, "uncertainty", np.random.default_rng(0))) == 5
    # above the bound a frame is no candidate for either strategy (the MD has left the physical region there)
    np.testing.assert_array_equal(active.select(u, 2, "uncertainty", np.random.default_rng(0), 0.6), [2, 3])
    assert 4 not in active.select(u, 4, "random", np.random.default_rng(1), 0.6)


def test_label_uses_the_oracle_and_skips_what_it_cannot_do():
    atoms = d.read(d.bundled_path(d.samples.RMD17_ETHANOL_TEST))[0].to_ase()
    bad = atoms.copy()
    bad.positions[0] = np.nan
    ds, failed = active.label([atoms, bad], EMT())
    ref = atoms.copy()
    ref.calc = EMT()
    assert failed == 1 and len(ds) == 1
    np.testing.assert_allclose(ds.energy[0], ref.get_potential_energy())
    np.testing.assert_allclose(ds.forces, ref.get_forces())


def test_loop_adds_the_most_uncertain_frames_each_round(tmp_path):
    out = tmp_path / "al"
    argv = [
        "active",
        "--structure",
        str(d.bundled_path(d.samples.RMD17_ETHANOL_TEST)),
        "--oracle",
        "emt",
        "--rounds",
        "1",
        "--n-select",
        "3",
        "--n-initial",
        "6",
        "--n-val",
        "4",
        "--n-test",
        "5",
        "--md-steps",
        "60",
        "--save-every",
        "10",
        "--ensemble",
        "2",
        "--n-atom-basis",
        "8",
        "--n-interactions",
        "1",
        "--max-steps",
        "10",
        "--eval-every-steps",
        "10",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    res = json.loads((out / "active_learning.json").read_text())
    for s in ("uncertainty", "random"):
        h = res["history"][s]
        assert [r["n_train"] for r in h] == [6, 9]  # 3 oracle-labelled frames in the round
        assert h[0]["labelled"] == 3 and h[0]["md_frames"] == 6 and h[0]["oracle_failed"] == 0
        assert all(np.isfinite(r["test"]["forces_mae_ev_per_a"]) for r in h)
    u, r = res["history"]["uncertainty"], res["history"]["random"]
    assert u[0]["test"] == r[0]["test"]  # round 0 is the same ensemble
    # the uncertainty strategy picks the top of its pool: at least the pool's mean
    assert u[0]["selected_mean_forces_std_ev_per_a"] >= u[0]["pool_mean_forces_std_ev_per_a"]
    from so3lib.training import load_potential

    pot, _ = load_potential(out / "uncertainty" / "round1")
    assert len(pot) == 2
    assert (out / "active_learning.png").stat().st_size > 0


def test_active_learning_needs_an_ensemble(tmp_path, capsys):
    argv = ["active", "--structure", str(d.bundled_path(d.samples.RMD17_ETHANOL_TEST)), "--oracle", "emt"]
    assert main([*argv, "--ensemble", "none", "--out", str(tmp_path / "x")]) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err == "so3lib: error: active learning needs an ensemble: --ensemble K with K >= 2"


def test_the_xtb_oracle_labels_ethanol_with_conservative_forces():
    pytest.importorskip("tblite")
    from so3lib.workflows.active import make_oracle

    atoms = d.read(d.bundled_path(d.samples.RMD17_ETHANOL_TEST))[0].to_ase()
    ds, failed = active.label([atoms], make_oracle("gfn2-xtb"))
    assert failed == 0 and ds.energy[0] < -300  # GFN2-xTB total energy of ethanol, eV
    calc, h = make_oracle("gfn2-xtb"), 1e-4
    e = []
    for sign in (1, -1):
        a = atoms.copy()
        a.positions[2, 1] += sign * h
        a.calc = calc
        e.append(a.get_potential_energy())
    np.testing.assert_allclose(ds.forces[2, 1], -(e[0] - e[1]) / (2 * h), atol=1e-4)
