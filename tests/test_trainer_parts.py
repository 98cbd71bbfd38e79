"""The trainer's parts: old checkpoint counters still read; the validation loss and the metric rows accept absent
metrics; a resume with a larger batch starts the next epoch instead of spinning; the NaN guard names the step, the
last finite step and the checkpoint (or its absence); a damaged newest checkpoint falls back to the previous one
with one warning line, and `CheckpointError` names the folder when none can be read."""

import csv
import json
import logging
import math
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from so3lib.models import make_config
from so3lib.training import CheckpointError, DataConfig, NonFiniteLossError, RunConfig, train
from so3lib.training.evaluation import METRIC_FIELDS, MetricsCSV, fmt, metric_row, validation_loss
from so3lib.training.state import Progress, TrainState, init_state

OLD_META = {  # a checkpoint's JSON as written before Progress existed
    "step": 40,
    "epoch": 1,
    "batch_in_epoch": 15,
    "best_val_loss": 0.25,
    "best_step": 30,
    "bad_evals": 1,
    "elapsed_s": 12.5,
    "stopped": None,
    "n_evals": 2,
}


def test_progress_reads_old_counters_and_round_trips_through_json():
    p = Progress.from_dict(OLD_META)
    assert (p.step, p.epoch, p.batch_in_epoch, p.best_step, p.n_evals) == (40, 1, 15, 30, 2)
    assert p.last_good_step == 40  # a checkpoint is written only after its losses were checked finite
    assert Progress.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    fresh = Progress()
    assert fresh.best_val_loss == math.inf and fresh.last_good_step is None
    assert Progress.from_dict(json.loads(json.dumps(fresh.to_dict()))) == fresh


def test_train_state_stores_the_old_checkpoint_tree():
    params = {"w": jnp.ones(3)}
    state = init_state(params, ())
    assert set(state.to_dict()) == {"params", "opt_state", "ema", "best", "step"}
    back = TrainState.from_dict(state.to_dict())
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(state)
    assert state["params"] is state.params and int(state.step) == 0
    assert state.ema["w"] is not state.params["w"]  # own buffers: the step donates the state


def _metrics(e_rmse, f_rmse):
    return {
        "energy_mae_ev": e_rmse,
        "energy_rmse_ev": e_rmse,
        "energy_mae_per_atom_ev": e_rmse,
        "forces_mae_ev_per_a": f_rmse,
        "forces_rmse_ev_per_a": f_rmse,
        "mse_energy": None if e_rmse is None else e_rmse**2,
        "mse_forces": None if f_rmse is None else f_rmse**2,
    }


def test_validation_loss_is_formed_from_the_metrics_that_exist():
    beta = 0.9
    assert validation_loss(_metrics(2.0, 1.0), beta) == pytest.approx(0.1 * 4.0 + 0.9 * 1.0)
    assert validation_loss(_metrics(2.0, None), beta) == pytest.approx(0.1 * 4.0)
    assert validation_loss(_metrics(None, 1.0), beta) == pytest.approx(0.9 * 1.0)
    assert validation_loss(_metrics(None, None), beta) is None


def test_absent_metrics_are_na_in_logs_and_empty_in_the_csv(tmp_path):
    row = metric_row(_metrics(0.002, None))
    assert row["val_energy_mae_mev"] == pytest.approx(2.0) and row["val_forces_mae_mev_per_a"] is None
    assert fmt(row["val_forces_mae_mev_per_a"]) == "n/a" and fmt(2.0) == "2.000"
    out = MetricsCSV(tmp_path / "metrics.csv")
    out.write({"step": 5, "epoch": 0, "time_s": 1.0, "learning_rate": 1e-3, "train_loss": "", "val_loss": 0.1, **row})
    out.close()
    with open(tmp_path / "metrics.csv") as fh:
        (read,) = list(csv.DictReader(fh))
    assert list(read) == METRIC_FIELDS
    assert read["val_forces_mae_mev_per_a"] == "" and read["val_forces_rmse_mev_per_a"] == ""
    assert float(read["val_energy_mae_mev"]) == pytest.approx(2.0)


# ---------------------------------------------------------------- tiny training runs
def _cfg(**training):
    base = dict(batch_size=4, warmup_steps=0, log_every_steps=1, eval_every_steps=2, checkpoint_every_steps=2)
    return RunConfig(
        name="parts",
        model=make_config("schnet", n_atom_basis=8, n_interactions=1, n_rbf=8),
        training={**base, **training},
        data=DataConfig(energy_reference="average"),  # one molecule: least squares cannot fix e_Z
    )


@pytest.fixture
def no_hang():
    """Fail instead of spinning forever (the loop is python, so SIGALRM interrupts it)."""

    def expire(*_):
        raise TimeoutError("training did not finish within 300 s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(300)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.slow  # minutes on 2 cores: the default tier stays under 8 minutes
def test_resume_with_a_larger_batch_starts_the_next_epoch(tmp_path, ethanol_train, no_hang, caplog):
    data = ethanol_train.subset(np.arange(40))  # 10 batches of 4, 3 batches of 16
    val = ethanol_train.subset(np.arange(40, 48))
    out = tmp_path / "run"
    first = train(_cfg(max_steps=7), data, val, out_dir=out, progress=False)
    assert first["steps"] == 7 and first["epochs_completed"] == 0  # stopped at batch 7 of epoch 0
    with caplog.at_level(logging.INFO, logger="so3lib"):
        res = train(_cfg(max_steps=10, batch_size=16), data, val, out_dir=out, resume=True, progress=False)
    assert res["steps"] == 10 and res["epochs_completed"] == 2 and res["stopped_because"] == "max_steps"
    assert "resuming at batch 7 of epoch 0, but an epoch now has 3 batches" in caplog.text
    assert "starting epoch 1" in caplog.text


@pytest.mark.parametrize("checkpoint_every_steps", [1000, 1])
def test_nan_guard_names_the_step_the_last_finite_step_and_the_checkpoint(
    tmp_path, ethanol_train, checkpoint_every_steps
):
    cfg = _cfg(
        max_steps=20,
        learning_rate=1e30,
        grad_clip=None,
        schedule="constant",
        eval_every_steps=20,
        checkpoint_every_steps=checkpoint_every_steps,
    )
    data = ethanol_train.subset(np.arange(16))
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg, data, data.subset(np.arange(4)), out_dir=tmp_path / "nan", progress=False)
    msg = str(err.value)
    assert "step None" not in msg and "\n" not in msg
    assert msg.startswith("non-finite training loss (") and " at step 2 (epoch 0)" in msg, msg
    assert "The last finite loss was at step 1;" in msg, msg
    if checkpoint_every_steps == 1:
        assert f"the last checkpoint is at step 1 in {tmp_path / 'nan' / 'checkpoints'}" in msg, msg
    else:
        assert "there is no checkpoint" in msg, msg


def _damage(step_dir: Path, how: str) -> None:
    files = sorted((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"), key=str)
    assert files, step_dir
    for f in files:
        if how == "truncate":
            f.write_bytes(f.read_bytes()[:10])
        else:
            f.unlink()


def test_damaged_checkpoint_falls_back_with_one_warning_then_fails_naming_the_folder(
    tmp_path, ethanol_train, caplog, capfd
):
    data, val = ethanol_train.subset(np.arange(16)), ethanol_train.subset(np.arange(16, 20))
    out = tmp_path / "run"
    ckpt = out / "checkpoints"
    train(_cfg(max_steps=4), data, val, out_dir=out, progress=False)
    assert sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) == [2, 4]
    _damage(ckpt / "4", "truncate")
    capfd.readouterr()
    with caplog.at_level(logging.INFO, logger="so3lib"):
        res = train(_cfg(max_steps=6), data, val, out_dir=out, resume=True, progress=False)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("so3lib")]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    line = warnings[0].getMessage()
    assert line.startswith(f"checkpoint at step 4 in {ckpt} cannot be restored (") and "\n" not in line, line
    assert line.endswith("; trying step 2") and len(line) < 600, line
    assert "resumed from checkpoint at step 2" in caplog.text and res["steps"] == 6
    assert "Traceback" not in capfd.readouterr().err  # no pages of tensorstore errors
    # the damaged step 4 was written again by the resumed run; now damage every checkpoint
    steps = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    assert steps == [4, 6]
    _damage(ckpt / "4", "delete")
    _damage(ckpt / "6", "truncate")
    with pytest.raises(CheckpointError) as err:
        train(_cfg(max_steps=8), data, val, out_dir=out, resume=True, progress=False)
    assert isinstance(err.value, ValueError) and str(ckpt) in str(err.value) and "\n" not in str(err.value)
    assert "Traceback" not in capfd.readouterr().err


def test_training_with_a_validation_set_without_forces(tmp_path, ethanol_train, caplog):
    """Forces absent from the validation and test sets: their metrics are None (`metrics_from_sums`), model
    selection uses the energy term alone."""
    data = ethanol_train.subset(np.arange(16))
    val = ethanol_train.subset(np.arange(16, 24))
    val.forces = np.full_like(val.forces, np.nan)  # NaN: the frame has no force label
    test = ethanol_train.subset(np.arange(24, 32))
    test.forces = np.full_like(test.forces, np.nan)
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="so3lib"):
        res = train(_cfg(max_steps=4, beta=0.9), data, val, test, out_dir=out, progress=False)
    assert res["val"]["forces_mae_ev_per_a"] is None and res["val"]["energy_mae_ev"] > 0
    assert res["test"]["forces_mae_ev_per_a"] is None and res["train"]["forces_mae_ev_per_a"] > 0
    assert json.loads((out / "results.json").read_text())["val"]["forces_rmse_ev_per_a"] is None
    with open(out / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["step"] for r in rows] == ["2", "4"]
    for r in rows:
        assert r["val_forces_mae_mev_per_a"] == "" and r["val_energy_mae_mev"] != ""
        e_rmse_ev = float(r["val_energy_rmse_mev"]) / 1e3
        assert float(r["val_loss"]) == pytest.approx(0.1 * e_rmse_ev**2, rel=1e-6)  # energy term only
    assert "forces MAE n/a meV/Å" in caplog.text
    assert (out / "plots" / "parity_energy.png").exists() and not (out / "plots" / "parity_forces.png").exists()


def test_a_validation_set_without_labels_is_refused(tmp_path, ethanol_train):
    data = ethanol_train.subset(np.arange(16))
    val = ethanol_train.subset(np.arange(16, 20))
    val.energy = np.full_like(val.energy, np.nan)
    val.forces = np.full_like(val.forces, np.nan)
    with pytest.raises(ValueError, match="neither energy nor force labels"):
        train(_cfg(max_steps=2), data, val, out_dir=tmp_path / "run", progress=False)
