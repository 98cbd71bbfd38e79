"""Active learning (issue #17, item 5). Default tier: the selection between the uncertainty bounds and its
spacing, the oracle's labels and what is refused, fine-tuning each round from the previous round's ensemble
(member k from member k), bad input. Slow tier: the loop end to end with ASE's EMT as a cheap oracle (frames
selected within the bounds, round r fine-tuned from round r − 1, the test error falling with rounds) and the
GFN2-xTB oracle's forces against finite differences."""

import json

import numpy as np
import pytest
from ase.calculators.emt import EMT

import so3lib.data as d
from so3lib import active
from so3lib.cli import main

ETHANOL = str(d.bundled_path(d.samples.RMD17_ETHANOL_TEST))


def _ethanol():
    return d.read(ETHANOL)[0].to_ase()


def test_uncertainty_takes_the_largest_spread_between_the_bounds():
    s = np.array([0.1, np.nan, 0.5, 0.3, 0.9, 0.2, 7.0])
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(active.select(s, 2, "uncertainty", rng), [6, 4])
    # above the upper bound (the MD left the physical region) and below the lower one: never taken
    np.testing.assert_array_equal(active.select(s, 10, "uncertainty", rng, 0.25, 1.0), [4, 2, 3])
    assert len(active.select(s, 10, "uncertainty", rng, 2.0, 5.0)) == 0  # nothing uncertain enough: nothing


def test_random_draws_uniformly_below_the_upper_bound_only():
    s = np.array([0.1, np.nan, 0.5, 0.3, 0.9, 0.2, 7.0])
    counts = np.zeros(len(s))
    for seed in range(400):
        r = active.select(s, 2, "random", np.random.default_rng(seed), 0.4, 1.0)
        assert len(set(r)) == 2
        counts[r] += 1
    assert counts[1] == counts[6] == 0  # NaN and above the bound: never; the lower bound does not apply
    np.testing.assert_allclose(counts[[0, 2, 3, 4, 5]] / 400, 2 / 5, atol=0.1)


def test_selection_keeps_frames_of_one_trajectory_apart():
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.85])
    traj = np.array([0, 0, 0, 0, 1])
    frame = np.array([0, 1, 2, 3, 0])
    pick = active.select(s, 4, "uncertainty", np.random.default_rng(0), trajectory=traj, frame=frame, min_gap=2)
    np.testing.assert_array_equal(pick, [0, 4, 2])  # frame 1 sits next to frame 0, frame 3 next to frame 2
    for seed in range(20):
        r = active.select(s, 4, "random", np.random.default_rng(seed), trajectory=traj, frame=frame, min_gap=2)
        f0 = np.sort(frame[r][traj[r] == 0])
        assert np.all(np.diff(f0) >= 2)


def test_unknown_strategy_and_crossed_bounds_are_errors():
    with pytest.raises(ValueError, match="unknown selection strategy 'largest'"):
        active.select(np.ones(3), 1, "largest", np.random.default_rng(0))
    with pytest.raises(ValueError, match="min < max, got min 2.0 and max 1.0"):
        active.LoopConfig(min_uncertainty=2.0, max_uncertainty=1.0)


def test_label_uses_the_oracle_and_refuses_what_is_not_sane():
    atoms = _ethanol()
    bad = atoms.copy()
    bad.positions[0] = np.nan
    squeezed = atoms.copy()
    squeezed.positions[1] = squeezed.positions[0] + [0.3, 0, 0]  # a C–C pair at 0.3 Å: huge forces
    ds, refused = active.label([atoms, bad, squeezed], EMT(), max_force_ev_per_a=50.0)
    ref = atoms.copy()
    ref.calc = EMT()
    assert refused == {"failed": 0, "nonfinite": 1, "force_above_bound": 1} and len(ds) == 1
    np.testing.assert_allclose(ds.energy[0], ref.get_potential_energy())
    np.testing.assert_allclose(ds.forces, ref.get_forces())
    assert active.too_close(squeezed) and not active.too_close(atoms)


def test_labelled_frames_are_written_and_read_back(tmp_path):
    ds, _ = active.label([_ethanol()], EMT())
    for r in (0, 1):
        active.write_frames(tmp_path / "labelled.extxyz", ds, {"active_learning_round": r}, append=True)
    back = d.read(tmp_path / "labelled.extxyz")
    assert len(back) == 2
    np.testing.assert_allclose(back.energy, [ds.energy[0]] * 2)
    np.testing.assert_allclose(back.forces, np.concatenate([ds.forces] * 2), atol=1e-6)


def test_label_counts_an_oracle_that_raises():
    class Failing(EMT):
        def calculate(self, *args, **kwargs):
            raise RuntimeError("SCF not converged")

    ds, refused = active.label([_ethanol()], Failing())
    assert ds is None and refused["failed"] == 1


def test_each_round_fine_tunes_the_previous_rounds_ensemble(tmp_path):
    from so3lib.models import make_config
    from so3lib.training import RunConfig

    cfg = RunConfig(model=make_config("schnet"), training={"ensemble": 2, "max_steps": 500, "max_epochs": None})
    loop = active.LoopConfig(finetune_steps=100, finetune_learning_rate=1e-4)
    assert active.round_config(cfg, loop, None) is cfg  # round 0: from scratch
    tc = active.round_config(cfg, loop, tmp_path / "round0").training
    assert (tc.init_from, tc.init_reference, tc.max_steps, tc.learning_rate) == (
        str(tmp_path / "round0"),
        "keep",
        100,
        1e-4,
    )
    assert active.round_config(cfg, loop.model_copy(update={"retrain": "scratch"}), tmp_path) is cfg


def _fake_ensemble(run, n):
    (run / "model").mkdir(parents=True)
    members = "\n".join(f"  - ../members/m{k}/model" for k in range(n))
    (run / "model" / "ensemble.yaml").write_text(f"members:\n{members}\ncalibration: {{}}\n")


def test_an_ensemble_fine_tunes_member_k_from_member_k(tmp_path):
    from so3lib.models import make_config
    from so3lib.training import RunConfig
    from so3lib.training.ensemble import member_config

    _fake_ensemble(tmp_path / "r0", 3)
    cfg = RunConfig(model=make_config("schnet"), training={"ensemble": 3, "init_from": str(tmp_path / "r0")})
    for k in range(3):
        m = member_config(cfg, k).training
        assert m.ensemble is None and m.seed == k
        assert (tmp_path / "r0" / "model" / m.init_from).resolve() == (tmp_path / "r0" / "members" / f"m{k}" / "model")
    two = cfg.model_copy(update={"training": cfg.training.model_copy(update={"ensemble": 2})})
    with pytest.raises(ValueError, match="is an ensemble of 3 members, the options ask for --ensemble 2"):
        member_config(two, 0)


def test_a_single_model_cannot_start_from_an_ensemble(tmp_path):
    from so3lib.training.finetune import load_init

    _fake_ensemble(tmp_path / "r0", 2)
    with pytest.raises(ValueError, match="is an ensemble run: fine-tune it as an ensemble"):
        load_init(tmp_path / "r0")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--ensemble", "none"], "active learning needs an ensemble: --ensemble K with K >= 2"),
        (["--min-uncertainty", "3", "--max-uncertainty", "2"], "the uncertainty bounds must satisfy min < max"),
    ],
)
def test_bad_active_learning_input_is_a_one_line_error(tmp_path, capsys, flags, message):
    argv = ["active", "--structure", ETHANOL, "--oracle", "emt", "--out", str(tmp_path / "x"), *flags]
    assert main(argv) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err.startswith("so3lib: error: ") and message in err


# ------------------------------------------------------------------------------------------ slow: the loop
def _loop(out, *extra):
    argv = [
        "active", "--structure", ETHANOL, "--oracle", "emt", "--rounds", "2", "--n-select", "4",
        "--n-initial", "6", "--n-val", "6", "--n-test", "20", "--reference-every", "20", "--steps", "100",
        "--save-every", "5", "--walkers", "2", "--ensemble", "2", "--n-atom-basis", "8", "--n-interactions", "1",
        "--max-steps", "300", "--eval-every-steps", "100", "--out", str(out), "--no-progress", *extra,
    ]  # fmt: skip
    assert main(argv) == 0
    return json.loads((out / "active_learning.json").read_text())


@pytest.mark.slow
def test_the_loop_selects_within_the_bounds_fine_tunes_and_its_error_falls(tmp_path):
    res = _loop(tmp_path / "al")
    for s, h in res["history"].items():
        assert [r["round"] for r in h] == [0, 1, 2]
        assert [r["n_train"] for r in h] == list(np.cumsum([6] + [r["labelled"] for r in h[:-1]]))
        for r in h[:-1]:
            lo, hi = r["bounds_ev_per_a"]
            np.testing.assert_allclose([lo, hi], np.array([1.0, 4.0]) * r["val_median_forces_std_max_ev_per_a"])
            assert 0 < r["selected"] <= 4 and r["labelled"] + sum(r["refused"].values()) == r["selected"]
            sigma = r["exploration"]["forces_std_max_ev_per_a"]
            picked = np.array([sigma[w][k] for w, k in r["selected_frames"]])
            assert np.all(picked <= hi) and (s == "random" or np.all(picked >= lo))
            for w, t in enumerate(sigma):  # a trajectory ends at its first frame above the bound
                assert np.all(np.array(t[:-1]) <= hi)
                frames = sorted(k for v, k in r["selected_frames"] if v == w)
                assert np.all(np.diff(frames) >= 3)  # --min-gap 3
            if s == "uncertainty":
                assert picked.mean() >= r["candidates_mean_forces_std_ev_per_a"]
        assert h[1]["trained"] == "finetune from round 0" and h[2]["trained"] == "finetune from round 1"
        # more oracle data and more steps: the error against the oracle falls
        assert h[-1]["test"]["forces_mae_ev_per_a"] < h[0]["test"]["forces_mae_ev_per_a"]
    u, r = res["history"]["uncertainty"], res["history"]["random"]
    assert [x["selected"] for x in u[:-1]] == [x["selected"] for x in r[:-1]]  # the same number of frames
    assert u[0]["test"] == r[0]["test"]  # round 0 is the same ensemble
    assert u[0]["exploration"]["start_frames"] == r[0]["exploration"]["start_frames"]
    cfg = json.loads((tmp_path / "al" / "uncertainty" / "round2" / "members" / "m1" / "results.json").read_text())
    assert cfg["init"]["from"].endswith("uncertainty/round1/members/m1/model")
    assert (tmp_path / "al" / "active_learning.png").stat().st_size > 0
    assert len(d.read(tmp_path / "al" / "reference_test.extxyz")) == 20
    # the labelled frames, with the oracle's labels, read back by so3lib
    for s, h in res["history"].items():
        ds = d.read(tmp_path / "al" / s / "labelled.extxyz")
        assert len(ds) == h[-1]["n_train"] - 6 and np.isfinite(ds.forces).all()
        ref = ds[0].to_ase()
        ref.calc = EMT()
        np.testing.assert_allclose(ds.forces[: len(ref)], ref.get_forces(), atol=1e-6)


@pytest.mark.slow
def test_a_fine_tuning_round_starts_from_the_previous_weights(tmp_path):
    """With a learning rate of 1e-12 fine-tuning cannot move the weights: every round predicts as round 0."""
    res = _loop(tmp_path / "al", "--rounds", "1", "--finetune-learning-rate", "1e-12", "--finetune-steps", "20")
    for h in res["history"].values():
        for key in ("forces_mae_ev_per_a", "energy_mae_ev"):
            np.testing.assert_allclose(h[1]["test"][key], h[0]["test"][key], rtol=1e-6)


@pytest.mark.slow
def test_the_xtb_oracle_labels_ethanol_with_conservative_forces():
    pytest.importorskip("tblite")
    from so3lib.workflows.active import make_oracle

    atoms = _ethanol()
    ds, refused = active.label([atoms], make_oracle("gfn2-xtb"))
    assert sum(refused.values()) == 0 and ds.energy[0] < -300  # GFN2-xTB total energy of ethanol, eV
    calc, h = make_oracle("gfn2-xtb"), 1e-4
    e = []
    for sign in (1, -1):
        a = atoms.copy()
        a.positions[2, 1] += sign * h
        a.calc = calc
        e.append(a.get_potential_energy())
    np.testing.assert_allclose(ds.forces[2, 1], -(e[0] - e[1]) / (2 * h), atol=1e-4)
