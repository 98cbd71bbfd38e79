"""Sweeps: a two-point sweep writes the CSV, the Markdown table and the plots; a sweep killed mid-way and run
again completes only the missing points, with the same results; invalid sweep files get clear errors."""

import csv
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ETHANOL_TRAIN, ROOT

SWEEP = """model: schnet
train: {train}
test: {test}
max_steps: 12
seeds: [0]
batch_size: 16
eval_every_steps: 12
warmup_steps: 2
model_options: {{n_interactions: 1, n_rbf: 8}}
beta: 0.9
e0s: average
grid:
  n_atom_basis: [4, 8]
"""


@pytest.fixture(scope="session")  # session: built once per worker, whatever the order
def sweep_file(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("sweepdata")
    raw = np.load(ETHANOL_TRAIN)
    keys = ("nuclear_charges", "coords", "energies", "forces")
    np.savez(tmp_path / "tr.npz", **{k: raw[k][:120] if k != "nuclear_charges" else raw[k] for k in keys})
    np.savez(tmp_path / "te.npz", **{k: raw[k][900:950] if k != "nuclear_charges" else raw[k] for k in keys})
    p = tmp_path / "sweep.yaml"
    p.write_text(SWEEP.format(train=tmp_path / "tr.npz", test=tmp_path / "te.npz"))
    return p


def _rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="session")  # session: built once per worker, whatever the order
def full_sweep(tmp_path_factory, sweep_file):
    """One uninterrupted sequential sweep, the reference for the tests below."""
    out = tmp_path_factory.mktemp("full")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    full = subprocess.run(
        [sys.executable, "-m", "experiments.ablation", str(sweep_file), "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert full.returncode == 0, full.stderr[-3000:]
    return out


@pytest.mark.slow  # minutes on 2 cores: the default tier stays under 8 minutes
def test_sweep_kill_and_rerun_completes_missing_points_with_same_results(tmp_path, sweep_file, full_sweep):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "experiments.ablation", str(sweep_file)]
    out = full_sweep
    rows = _rows(out / "sweep.csv")
    assert len(rows) == 2 and {
        "n_atom_basis",
        "energy_mae_mev",
        "forces_mae_mev_per_a",
        "n_parameters",
        "compile_time_s",
        "train_time_s",
        "time_per_step_ms",
        "inference_ms_per_structure",
    } <= set(rows[0])
    md = (out / "sweep.md").read_text()
    assert md.count("\n|") >= 3 and "best force MAE first" in md
    for f in ("metrics_vs_parameters.png", "pareto.png"):
        assert (out / "plots" / f).stat().st_size > 5000

    # interrupted sweep: kill once the first point has finished, then run again
    killed = subprocess.Popen(
        cmd + ["--out", str(tmp_path / "part")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    pts = tmp_path / "part" / "points"
    t0 = time.time()
    while time.time() - t0 < 600:
        done = list(pts.glob("*/results.json")) if pts.exists() else []
        if done:
            break
        time.sleep(0.1)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    n_done = len(list(pts.glob("*/results.json")))
    assert n_done == 1 and not (tmp_path / "part" / "sweep.csv").exists()
    again = subprocess.run(
        cmd + ["--out", str(tmp_path / "part")], env=env, capture_output=True, text=True, timeout=900
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier, skipped") == n_done
    a = sorted(_rows(out / "sweep.csv"), key=lambda r: int(r["n_atom_basis"]))
    b = sorted(_rows(tmp_path / "part" / "sweep.csv"), key=lambda r: int(r["n_atom_basis"]))
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        assert ra["forces_mae_mev_per_a"] == rb["forces_mae_mev_per_a"] and ra["energy_mae_mev"] == rb["energy_mae_mev"]


@pytest.mark.slow  # minutes on 2 cores: the default tier stays under 8 minutes
def test_workers_split_the_points_and_match(tmp_path, sweep_file, full_sweep):
    """--workers 2: two processes train disjoint halves of the points; the tables equal a sequential sweep's."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "experiments.ablation", str(sweep_file)]
    par = subprocess.run(
        cmd + ["--out", str(tmp_path / "par"), "--workers", "2"], env=env, capture_output=True, text=True, timeout=900
    )
    assert par.returncode == 0, par.stderr[-3000:]
    assert par.stdout.count("finished earlier, skipped") == 2  # the workers trained both points
    a = sorted(_rows(full_sweep / "sweep.csv"), key=lambda r: int(r["n_atom_basis"]))
    b = sorted(_rows(tmp_path / "par" / "sweep.csv"), key=lambda r: int(r["n_atom_basis"]))
    assert len(a) == len(b) == 2
    assert [r["forces_mae_mev_per_a"] for r in a] == [r["forces_mae_mev_per_a"] for r in b]


@pytest.mark.parametrize(
    "body,message",
    [
        ("model: schnet\ndata: rmd17:ethanol\ngrid: {l_max: [1, 2]}\n", "'l_max' is not an option of model 'schnet'"),
        ("model: schnet\ndata: rmd17:ethanol\ngrid: {cutof: [4.0]}\n", "unknown parameter 'cutof'"),
        ("model: schnet\ndata: rmd17:ethanol\ngrid: {cutoff: []}\n", "non-empty list"),
        ("model: schnet\ndata: rmd17:ethanol\n", "exactly one of 'grid' or 'random'"),
        ("model: painn\ndata: rmd17:ethanol\ngrid: {cutoff: [4.0]}\n", "unknown model 'painn'"),
        ("model: schnet\ndata: rmd17:ethanol\ngrid: {cutoff: [4.0]}\nlearning_rat: 0.1\n", "unknown top-level option"),
        ("- just a list\n", "a sweep file is a mapping"),
    ],
)
def test_invalid_sweep_files(tmp_path, body, message):
    from so3lib.workflows.sweeps import load_sweep

    p = tmp_path / "bad.yaml"
    p.write_text(body)
    with pytest.raises(ValueError, match=message):
        load_sweep(p)


def test_random_sampling_is_seeded_and_pareto_front():
    from so3lib.workflows.sweeps import SweepConfig, pareto_front

    cfg = dict(model="so3krates", data="rmd17:ethanol", random={"cutoff": [3.0, 6.0], "l_max": [1, 2, 3]}, samples=5)
    a = SweepConfig(**cfg, sample_seed=1).points()
    assert a == SweepConfig(**cfg, sample_seed=1).points() and a != SweepConfig(**cfg, sample_seed=2).points()
    assert all(3.0 <= p["cutoff"] <= 6.0 and p["l_max"] in (1, 2, 3) for p in a)
    front = pareto_front(np.array([1.0, 2.0, 3.0, 1.5]), np.array([5.0, 3.0, 4.0, 6.0]))
    assert front.tolist() == [0, 1]


@pytest.mark.slow  # minutes on 2 cores: the default tier stays under 8 minutes
def test_a_rerun_with_another_budget_or_data_retrains_the_points_and_keeps_the_old_ones(
    tmp_path, sweep_file, full_sweep
):
    """Point names hold only the swept values: a re-run into the same folder with another budget must not pass
    the old points off as finished. They are set aside (renamed, never deleted) and trained again."""
    import shutil

    out = tmp_path / "again"
    shutil.copytree(full_sweep, out)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "so3lib", "sweep", str(sweep_file), "--out", str(out)]
    same = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert same.returncode == 0 and same.stdout.count("finished earlier, skipped") == 2, same.stderr[-2000:]
    longer = subprocess.run([*cmd, "--max-steps", "13"], env=env, capture_output=True, text=True, timeout=900)
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert longer.stdout.count("trained with other data or options; moved to") == 2
    assert "finished earlier" not in longer.stdout
    stale = sorted(p.name for p in (out / "points").glob("*.stale-1"))
    assert len(stale) == 2 and all((out / "points" / s / "results.json").exists() for s in stale)
    assert {int(r["steps"]) for r in _rows(out / "sweep.csv")} == {13}
