"""Several processes on this machine started the way a cluster starts them (a coordinator address, a process
count and each process's id; one CPU device per process, gloo collectives), training on a streamed SPICE store
(the bundled real SPICE 1.1.4 sample): the model equals single-process training with the same global batch;
process 0 alone writes the run folder; a killed process stops the others with one line, and a resume of all
processes after that is exact; bad starts (no coordinator, different process counts, a store missing on one
process) are one-line errors, exit status 2, within the timeout."""

from __future__ import annotations

import csv
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--n-atom-basis", "8", "--n-interactions", "1", "--batch-size", "4", "--eval-batch-size", "8"]
TRAIN = [*TINY, "--eval-every-steps", "2", "--checkpoint-every-steps", "2", "--no-progress"]
# a process that dies without a word: SIGKILL right after step STEP (argv: STEP, then so3lib's arguments)
KILLED_AFTER = r"""
import os, sys
import so3lib.training.loop as L
step, run = int(sys.argv[1]), L.TrainingLoop._step
def _step(self, graph):
    run(self, graph)
    if self.progress.step == step:
        os.kill(os.getpid(), 9)
L.TrainingLoop._step = _step
from so3lib.cli import main
sys.exit(main(sys.argv[2:]))
"""
# a process that dies without a word on entering a function (argv: MODULE.FUNCTION, then so3lib's arguments)
KILLED_IN = r"""
import importlib, os, sys
module, name = sys.argv[1].rsplit(".", 1)
setattr(importlib.import_module(module), name, lambda *a, **k: os.kill(os.getpid(), 9))
from so3lib.cli import main
sys.exit(main(sys.argv[2:]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The bundled SPICE sample as a packed store (50 conformations of one molecule)."""
    from so3lib.data import bundled_path
    from so3lib.data.samples import SPICE_SAMPLE
    from so3lib.data.store import convert_spice

    return convert_spice(
        bundled_path(SPICE_SAMPLE),
        tmp_path_factory.mktemp("mp") / "store",
        neutral_only=False,
        max_force_ev_per_a=10.0,  # the spice command's filters: the store is reused, never rebuilt
        progress=False,
    )


def start(
    pid: int, n: int, port: int, argv: list[str], killed_after: int | None = None, killed_in: str | None = None
) -> subprocess.Popen:
    """One process of a run of ``n``: ``so3lib spice --distributed`` with the coordinator on ``port``; SIGKILLed
    after step ``killed_after`` or on entering the function ``killed_in`` (MODULE.FUNCTION)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    cmd = ["spice", "--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n)]
    cmd += ["--process-id", str(pid), "--distributed-timeout-s", "20", *argv]
    head = [sys.executable, "-m", "so3lib"]
    if killed_after:
        head = [sys.executable, "-c", KILLED_AFTER, str(killed_after)]
    elif killed_in:
        head = [sys.executable, "-c", KILLED_IN, killed_in]
    return subprocess.Popen([*head, *cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(procs: list[subprocess.Popen], timeout: float = 400) -> list[tuple[int, str, str]]:
    """(exit status, stdout, stderr) of every process; a process still running after ``timeout`` s (all of them
    together) hangs: all are killed and the test fails saying so."""
    deadline, out = time.monotonic() + timeout, []
    for i, p in enumerate(procs):
        try:
            o, e = p.communicate(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"process {i} still running after {timeout:g} s: it hangs instead of stopping")
        out.append((p.returncode, o, e))
    return out


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("so3lib: ")]


def params(run: Path) -> list[np.ndarray]:
    from so3lib.training import load_potential

    return [np.asarray(x) for x in jax.tree_util.tree_leaves(load_potential(run)[1])]


def val_losses(run: Path) -> list[float]:
    with open(run / "metrics.csv") as fh:
        return [float(r["val_loss"]) for r in csv.DictReader(fh)]


def single_process(store: Path, out: Path, steps: int) -> None:
    from so3lib.cli import main

    argv = ["spice", "--store", str(store), "--out", str(out), "--max-steps", str(steps), *TRAIN]
    assert main(argv) == 0


def assert_same_training(multi: Path, single: Path) -> None:
    """The same model (float32: the gradient sum over processes is added in another order) and the same
    validation losses at every evaluation."""
    np.testing.assert_allclose(val_losses(multi), val_losses(single), rtol=2e-6)
    for a, b in zip(params(multi), params(single), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_two_processes_train_as_one(store, tmp_path):
    """2 processes × 1 CPU device, global batch 4 (2 per process), 4 steps = 1 process, batch 4, 4 steps.
    Process 1 is given another --out: it stays unwritten (process 0 alone writes)."""
    port, out, elsewhere = free_port(), tmp_path / "multi", tmp_path / "never_written"
    common = ["--store", str(store), "--max-steps", "4", *TRAIN]
    procs = [start(0, 2, port, [*common, "--out", str(out)]), start(1, 2, port, [*common, "--out", str(elsewhere)])]
    single_process(store, tmp_path / "single", 4)
    (rc0, out0, err0), (rc1, out1, err1) = finish(procs)
    assert rc0 == 0 and rc1 == 0, err0[-3000:] + err1[-3000:]
    assert "process 1: 4 steps done" in out1 and "results:" in out0
    assert not elsewhere.exists()
    assert_same_training(out, tmp_path / "single")
    import json

    res = json.loads((out / "results.json").read_text())
    assert res["n_processes"] == 2 and res["n_devices"] == 2 and res["steps"] == 4
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2", "4"]


@pytest.mark.slow
def test_killed_process_stops_the_others_and_resume_is_exact(store, tmp_path):
    """Process 1 is SIGKILLed after step 3: process 0 stops at once (at step 3 or 4) with one line naming the
    last checkpoint (step 2); both processes started again with --resume finish the 6 steps exactly as one
    uninterrupted single-process run."""
    out = tmp_path / "multi"
    common = ["--store", str(store), "--max-steps", "6", *TRAIN, "--out", str(out)]
    port = free_port()
    (rc0, _, err0), (rc1, _, _) = finish([start(0, 2, port, common), start(1, 2, port, common, killed_after=3)])
    assert rc1 == -9
    lines = error_lines(err0)
    assert rc0 == 2 and len(lines) == 1, err0[-3000:]
    # process 0 may have dispatched one more step before its collective saw process 1 gone
    assert re.match(r"so3lib: error: process 0: another process stopped during training \(at step [34]\): ", lines[0])
    assert lines[0].endswith(
        ". Every process stops; start all of them again with --resume (the last checkpoint is at step 2)"
    )
    assert "Traceback" not in err0
    port = free_port()
    procs = [start(i, 2, port, [*common, "--resume"]) for i in range(2)]
    single_process(store, tmp_path / "single", 6)
    results = finish(procs)
    assert all(rc == 0 for rc, _, _ in results), "".join(e[-3000:] for _, _, e in results)
    assert_same_training(out, tmp_path / "single")


def test_coordinator_unreachable(store, tmp_path):
    """Process 1 started with no process 0: one line naming the address, within the timeout."""
    port = free_port()
    p = start(1, 2, port, ["--store", str(store), "--out", str(tmp_path / "r"), "--distributed-timeout-s", "3"])
    ((rc, _, err),) = finish([p], timeout=60)
    lines = error_lines(err)
    assert rc == 2 and len(lines) == 1, err[-3000:]
    assert lines[0] == (
        f"so3lib: error: process 1 of 2: the coordinator 127.0.0.1:{port} (process 0) cannot be reached within 3 s "
        "(Connection refused): start process 0 there, or check the address and port"
    )


def test_process_counts_differ(store, tmp_path):
    """Process 0 started for 2 processes, process 1 for 3: both stop with the same one line."""
    port = free_port()
    argv = ["--store", str(store), "--out", str(tmp_path / "r")]
    results = finish([start(0, 2, port, argv), start(1, 3, port, argv)], timeout=120)
    why = f"process 1 on {socket.gethostname()} was started for 3 processes, process 0 for 2"
    for (rc, _, err), line in zip(results, (why, f"process 1: the coordinator refused the start: {why}")):
        lines = error_lines(err)
        assert rc == 2 and lines == [f"so3lib: error: {line}"], err[-3000:]
    assert not (tmp_path / "r").exists()


def test_store_missing_on_one_process(store, tmp_path):
    """Process 1 does not see the store: it names the store and itself; process 0 stops with its message; the
    run folder is not written."""
    port = free_port()
    argv = [*TINY, "--max-steps", "2", "--no-progress", "--out", str(tmp_path / "r")]
    missing = tmp_path / "not_copied_here"
    results = finish(
        [start(0, 2, port, ["--store", str(store), *argv]), start(1, 2, port, ["--store", str(missing), *argv])],
        timeout=200,
    )
    (rc0, _, err0), (rc1, _, err1) = results
    why = (
        f"{missing}: no packed store on process 1 on {socket.gethostname()}: every process reads the store process 0 "
        "converted; put --store on a file system all processes see, or copy the store folder to this path on every "
        "node"
    )
    for rc, err, line in ((rc0, err0, f"process 1 of 2 stopped while opening the store: {why}"), (rc1, err1, why)):
        lines = error_lines(err)
        assert rc == 2 and lines == [f"so3lib: error: {line}"], err[-3000:]
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_process_killed_before_training_stops_the_others(store, tmp_path):
    """Process 1 dies without a word while the processes prepare the training (fitting the reference): process
    0, waiting for it at the end of that phase, stops with one line naming the phase, not a hang or gloo's
    message alone; no checkpoint is written."""
    port, out = free_port(), tmp_path / "r"
    argv = ["--store", str(store), *TINY, "--max-steps", "2", "--no-progress", "--out", str(out)]
    procs = [start(0, 2, port, argv), start(1, 2, port, argv, killed_in="so3lib.training.trainer.build_potential")]
    (rc0, _, err0), (rc1, _, _) = finish(procs, timeout=200)
    assert rc1 == -9
    lines = error_lines(err0)
    assert rc0 == 2 and len(lines) == 1, err0[-3000:]
    assert lines[0].startswith("so3lib: error: process 0: another process stopped while preparing the training: ")
    assert lines[0].endswith(". Every process stops; start all of them again") and "Traceback" not in err0
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


@pytest.mark.slow
def test_process_that_never_comes(store, tmp_path):
    """Process 0 started for 2 processes, process 1 never started: process 0 stops within its timeout (3 s) with
    one line naming the missing process; the run folder is not written."""
    port = free_port()
    argv = ["--store", str(store), "--out", str(tmp_path / "r"), "--distributed-timeout-s", "3"]
    ((rc, _, err),) = finish([start(0, 2, port, argv)], timeout=90)
    assert rc == 2 and error_lines(err) == [
        f"so3lib: error: process(es) 1 of 2 did not reach the coordinator 127.0.0.1:{port} within 3 s"
    ], err[-3000:]
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--coordinator", "127.0.0.1:1"], "--coordinator, --num-processes and --process-id need --distributed"),
        (
            ["--distributed"],
            "--distributed: no --coordinator (or JAX_COORDINATOR_ADDRESS), --num-processes (or JAX_NUM_PROCESSES), "
            "--process-id (or JAX_PROCESS_ID) given and no cluster scheduler (SLURM) detected",
        ),
        (
            ["--distributed", "--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"],
            "--distributed: process id 2 is not in 0..1",
        ),
        (
            ["--distributed", "--coordinator", "localhost", "--num-processes", "2", "--process-id", "1"],
            "--coordinator 'localhost': expected HOST:PORT",
        ),
    ],
)
def test_incomplete_distributed_options(argv, words, store, tmp_path, capsys, monkeypatch):
    """Options that cannot start a multi-process run: one line before anything starts (no scheduler here)."""
    from so3lib.cli import main

    for var in (
        "JAX_COORDINATOR_ADDRESS",
        "JAX_NUM_PROCESSES",
        "JAX_PROCESS_ID",
        "SLURM_JOB_ID",
        "OMPI_MCA_orte_hnp_uri",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert main(["spice", "--store", str(store), "--out", str(tmp_path / "r"), *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"so3lib: error: {words}"), lines
    assert not (tmp_path / "r").exists()
