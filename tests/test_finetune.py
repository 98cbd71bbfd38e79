"""Fine-tuning (``--init-from RUN``, issue #17 item 2): the run starts from the trained potential exactly; the
energy reference is kept, refitted, or fitted for new elements only; a frozen representation stays fixed while
the readout trains; a fine-tuned run resumes bit for bit; contradicting options and elements the model cannot
take are one-line errors; and on a few frames of a related molecule it beats training from scratch."""

from __future__ import annotations

import json
import re

import flax.serialization
import jax
import numpy as np
import pytest
from conftest import ETHANOL_TRAIN, data

import so3lib.data as d
from so3lib.calculator import So3libCalculator, load_calculator
from so3lib.cli import main
from so3lib.data.errors import DataError
from so3lib.models import make_config
from so3lib.prediction import predict_dataset
from so3lib.training import DataConfig, RunConfig, finetune, train
from so3lib.training.run_folder import RunFolderError

TINY = {"n_atom_basis": 8, "n_interactions": 1, "n_rbf": 8, "dtype": "float64"}
MALON_TRAIN = data("rmd17", "rmd17_malonaldehyde_train_01.npz")
MALON_TEST = data("rmd17", "rmd17_malonaldehyde_test_01.npz")
URACIL = data("rmd17", "rmd17_uracil_train_01.npz")  # C, H, N, O: nitrogen is new to an ethanol model


def _cfg(model: dict, **training) -> RunConfig:
    return RunConfig(
        model=make_config("schnet", **model),
        training={"batch_size": 8, "max_epochs": None, "warmup_steps": 2, **training},
        data=DataConfig(energy_reference="average"),  # one molecule: least squares cannot fix e_Z
    )


@pytest.fixture(scope="module")
def ethanol():
    return d.read(ETHANOL_TRAIN)


@pytest.fixture(scope="module")
def pre(tmp_path_factory, ethanol):
    """A tiny float64 SchNet trained a few steps on rMD17 ethanol: the run to start from."""
    out = tmp_path_factory.mktemp("ft") / "pre"
    train(
        _cfg(TINY, max_steps=4, eval_every_steps=2),
        ethanol.subset(np.arange(40)),
        ethanol.subset(np.arange(40, 56)),
        out_dir=out,
        progress=False,
    )
    return out


def _params(run):
    return flax.serialization.msgpack_restore((run / "model" / "params.msgpack").read_bytes())


def _paths(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_the_start_is_the_trained_potential(pre, ethanol):
    """init_reference=keep: the fine-tuned potential at step 0 gives the run's energies and forces."""
    cfg = _cfg({}, max_steps=1, init_from=str(pre))
    cfg = cfg.model_copy(update={"model": make_config("schnet", n_atom_basis=8, n_interactions=1, n_rbf=8)})
    with pytest.raises(ValueError, match="--dtype float32 \\(the run has float64\\)"):
        finetune.start(cfg, ethanol)  # a default that contradicts the run is refused, not mixed in
    cfg = cfg.model_copy(update={"model": finetune.init_model(pre)})
    pot, params, summary = finetune.start(cfg, ethanol.subset(np.arange(100, 120)))
    assert summary == {"from": str(pre), "reference": "keep", "freeze": "none", "new_elements": []}
    old, new = load_calculator(pre), So3libCalculator(pot, params)
    for i in (100, 110):
        atoms = ethanol[i].to_ase()
        old.calculate(atoms, ["energy", "forces"])
        new.calculate(atoms, ["energy", "forces"])
        assert new.results["energy"] == old.results["energy"]
        np.testing.assert_array_equal(new.results["forces"], old.results["forces"])


def test_refit_new_fits_only_the_new_element(pre):
    """e_N = mean over frames of (E − Σ_known n_Z e_Z)/n_N for uracil (one composition, two N); H, C, O kept."""
    ref = load_calculator(pre).potential.reference
    uracil = d.read(URACIL)
    new = finetune.refit_new_elements(ref, uracil)
    old = dict(zip(ref.species, ref.energies_ev))
    got = dict(zip(new.species, new.energies_ev))
    assert new.species == (1, 6, 7, 8) and all(got[z] == old[z] for z in (1, 6, 8))
    counts = {z: int(np.sum(uracil.numbers[: uracil.offsets[1]] == z)) for z in (1, 6, 7, 8)}
    known = sum(counts[z] * old[z] for z in (1, 6, 8))
    assert got[7] == pytest.approx(np.mean(uracil.energy - known) / counts[7], rel=1e-12)
    assert finetune.refit_new_elements(ref, d.read(MALON_TRAIN)) is ref  # no new element: unchanged
    with pytest.raises(DataError, match=r"elements \[7\] are new to --init-from .*refit-new"):
        finetune.energy_reference(ref, uracil, "keep", DataConfig(), pre)


def test_refit_starts_without_an_energy_offset(pre):
    """refit fits the reference to E − E_θ of the starting model: its mean energy error on the new training set
    is zero at step 0 (the ethanol reference kept leaves an offset of tenths of an eV on malonaldehyde)."""
    malon = d.read(MALON_TRAIN)
    model = finetune.init_model(pre)
    offsets = {}
    for mode in ("refit", "keep"):
        cfg = _cfg({}, max_steps=1, init_from=str(pre), init_reference=mode).model_copy(update={"model": model})
        pot, params, _ = finetune.start(cfg, malon)
        offsets[mode] = np.mean(predict_dataset(pot, params, malon, 25)["energy_ev"] - malon.energy)
    assert abs(offsets["refit"]) < 1e-9 and abs(offsets["keep"]) > 0.1, offsets


def test_bpnn_cannot_take_new_elements():
    model = make_config("bpnn", species=[1, 6, 8])
    with pytest.raises(DataError, match=r"elements \[7\] are new to the bpnn model .* networks for \[1, 6, 8\]"):
        finetune.check_elements(model, d.read(URACIL), "runs/x")


@pytest.mark.parametrize(
    "name, opts, readout",
    [
        ("schnet", {"n_atom_basis": 8, "n_interactions": 2, "n_rbf": 8}, {"Dense_10", "Dense_11"}),
        ("so3krates", {"features": 8, "layers": 1, "heads": 2, "l_max": 1, "n_rbf": 8}, {"LayerNorm_0", "MLP_0"}),
        ("bpnn", {"hidden": (8, 8), "n_radial": 4, "n_angular": 2}, {"W2", "b2"}),
    ],
)
def test_each_model_names_its_readout(name, opts, readout, ethanol):
    """freeze=representation trains exactly the readout's parameters of every model, and freezes the rest."""
    from physics import make_potential

    pot, params = make_potential(name, opts, ethanol.subset(np.arange(3)))
    labels = finetune.freeze_labels(pot.model, params, "representation")
    trained = {
        jax.tree_util.keystr(p[1:2]) for p, lab in jax.tree_util.tree_leaves_with_path(labels) if lab == "trained"
    }
    assert trained == {f"['{k}']" for k in readout}
    assert any(lab == "frozen" for lab in jax.tree_util.tree_leaves(labels))
    assert finetune.freeze_labels(pot.model, params, "none") is None


def test_frozen_representation_stays_and_readout_trains(pre, tmp_path):
    ds = d.read(MALON_TRAIN)
    cfg = _cfg(
        TINY, max_steps=3, eval_every_steps=3, init_from=str(pre), init_reference="refit", freeze="representation"
    )
    res = train(cfg, ds.subset(np.arange(24)), ds.subset(np.arange(24, 32)), out_dir=tmp_path / "ft", progress=False)
    assert res["init"]["freeze"] == "representation" and res["energy_reference"]["species"] == [1, 6, 8]
    before, after = _paths(_params(pre)), _paths(_params(tmp_path / "ft"))
    readout = ("Dense_5", "Dense_6")  # SchNet T=1: 5 Dense layers in the interaction, then the output MLP
    assert set(before) == set(after)
    for k in before:
        if any(r in k for r in readout):
            assert np.max(np.abs(after[k] - before[k])) > 1e-6, k  # trained: far beyond rounding
        else:  # zero updates; the EMA (its weight is float32) of an unchanged value is that value up to rounding
            np.testing.assert_allclose(after[k], before[k], rtol=1e-7, atol=1e-12, err_msg=k)


def test_a_fine_tuned_run_resumes_exactly(pre, tmp_path):
    ds = d.read(MALON_TRAIN)
    tr, va = ds.subset(np.arange(24)), ds.subset(np.arange(24, 32))

    def cfg(steps, **kw):
        opts = dict(max_steps=steps, eval_every_steps=2, checkpoint_every_steps=2, init_from=str(pre))
        return _cfg(TINY, **{**opts, "init_reference": "refit", **kw})

    train(cfg(6), tr, va, out_dir=tmp_path / "full", progress=False)
    train(cfg(2), tr, va, out_dir=tmp_path / "cut", progress=False)
    with pytest.raises(RunFolderError, match=r"init_reference: refit → keep"):
        train(cfg(6, init_reference="keep"), tr, va, out_dir=tmp_path / "cut", resume=True, progress=False)
    train(cfg(6), tr, va, out_dir=tmp_path / "cut", resume=True, progress=False)
    a, b = _paths(_params(tmp_path / "full")), _paths(_params(tmp_path / "cut"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    saved = json.loads((tmp_path / "cut" / "fingerprint.json").read_text())
    assert saved["init_from"] == finetune.init_fingerprint(pre) and "init_from" not in saved["config"]["training"]


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--model", "bpnn"], r"--init-from \S+ holds a schnet model; the options ask for --model bpnn"),
        (["--cutoff", "4.0"], r"contradict its schnet model: --cutoff 4\.0 \(the run has 5\.0\)"),
        (["--n-atom-basis", "16"], r"--n-atom-basis 16 \(the run has 8\)"),
        (["--train", str(URACIL)], r"uracil_train_01\.npz.*elements \[7\] are new to --init-from .*refit-new"),
        (["--init-from", "{tmp}/nothing"], r"--init-from \S+nothing: \S+nothing: no such run folder"),
    ],
    ids=["other family", "other cutoff", "other width", "new element with keep", "missing run"],
)
def test_contradictions_are_one_line_errors(pre, tmp_path, capsys, extra, words):
    argv = ["train", "--train", str(MALON_TRAIN), "--init-from", str(pre), "--max-steps", "1", "--no-progress"]
    argv += ["--out", str(tmp_path / "out")] + [a.replace("{tmp}", str(tmp_path)) for a in extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("so3lib: error: ")
    assert re.search(words, err), err
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_freeze_without_init_from_is_refused(tmp_path, capsys):
    argv = ["train", "--train", str(MALON_TRAIN), "--freeze", "representation", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "freeze=representation apply to fine-tuning: give init_from" in capsys.readouterr().err


MD17_ETHANOL = data("md17", "md17_ethanol_first1050.npz")  # original MD17: another DFT setup, a 500 K trajectory


@pytest.mark.slow
def test_fine_tuning_beats_scratch(tmp_path, ethanol):
    """Pre-train on 400 frames of rMD17 ethanol (PBE/def2-SVP); then 20 frames of original MD17 ethanol (another
    level of theory, another energy zero): the same 150 steps from the rMD17 weights (reference refitted) and
    from scratch. The fine-tuned model has the lower energy and force errors on 113 other MD17 frames."""
    model = {"n_atom_basis": 32, "n_interactions": 2, "n_rbf": 16}
    train(
        _cfg(model, max_steps=600, eval_every_steps=200, learning_rate=3e-3),
        ethanol.subset(np.arange(400)),
        ethanol.subset(np.arange(900, 950)),
        out_dir=tmp_path / "pre",
        progress=False,
    )
    md17 = d.read(MD17_ETHANOL)
    tr, va, test = (md17.subset(np.arange(a, b, k)) for a, b, k in ((0, 500, 25), (500, 600, 10), (600, 1050, 4)))
    steps = {"max_steps": 150, "eval_every_steps": 25, "learning_rate": 1e-3}
    ft = train(
        _cfg(model, **steps, init_from=str(tmp_path / "pre"), init_reference="refit"),
        tr,
        va,
        test,
        out_dir=tmp_path / "ft",
        progress=False,
    )
    scratch = train(_cfg(model, **steps), tr, va, test, out_dir=tmp_path / "scratch", progress=False)
    f_ft, f_sc = ft["test"]["forces_mae_ev_per_a"], scratch["test"]["forces_mae_ev_per_a"]
    e_ft, e_sc = ft["test"]["energy_mae_ev"], scratch["test"]["energy_mae_ev"]
    print(f"{len(test)} MD17 test frames, forces MAE meV/Å: fine-tuned {1e3 * f_ft:.1f}, scratch {1e3 * f_sc:.1f}")
    print(f"energy MAE meV: fine-tuned {1e3 * e_ft:.1f}, scratch {1e3 * e_sc:.1f}")
    assert f_ft < 0.7 * f_sc
    assert e_ft < 0.7 * e_sc
