"""The line protocol between `compare.py` and a peer runner (one process per model, in that peer's own venv).
Standard library and numpy only: every venv imports it from this folder.

A runner is ``python run_<peer>.py --batches BATCHES.npz --model NAME [--options JSON]``. It builds the model
and its inputs from the shared batches (`load_batches`), warms up every operation (the first call, compilation
included, is reported as ``first_call_s``), then prints one JSON line ``{"ready": {...}}`` and answers requests,
one JSON line each, on stdin/stdout:

    {"op": "train_step", "repeats": 5}   ->  {"op": "train_step", "times_s": [t1, ..., t5]}
    {"op": "quit"}                         ->  (exits)

Each time is one call, finished (results on the host or blocked until ready). Anything the libraries print goes
to stderr: stdout carries the protocol only. The operations (``OPS``), equal for every peer:

* ``train_step``: one optimiser step on the 32 training frames: energies and forces (−∂E/∂r), the loss
  0.01·MSE(E) + 0.99·MSE(F) in eV and eV/Å, its gradient, an Adam update (learning rate 1e-3).
* ``energy_forces_1``: energy and forces of one ethanol (the first test frame).
* ``energy_forces_1000``: energy and forces of the 1000 test frames as one batch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable

import numpy as np

OPS = ("train_step", "energy_forces_1", "energy_forces_1000")
ENERGY_WEIGHT, FORCES_WEIGHT, LEARNING_RATE = 0.01, 0.99, 1e-3


def load_batches(path: str) -> dict[str, np.ndarray]:
    """The shared batches (written by `compare.export_batches`): ``numbers`` (9,), ``train_positions`` (32, 9, 3)
    Å, ``train_energy`` (32,) eV, ``train_forces`` (32, 9, 3) eV/Å, ``test_positions`` (1000, 9, 3) Å,
    ``test_energy``, ``test_forces``, ``cutoff_angstrom`` (), ``energy_per_atom_mean_ev`` () of the training split."""
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def pairs_within(positions: np.ndarray, cutoff: float) -> np.ndarray:
    """(2, E) directed pairs (i ≠ j) of one frame with |r_i − r_j| < cutoff (senders, receivers)."""
    d = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
    i, j = np.nonzero((d < cutoff) & ~np.eye(len(positions), dtype=bool))
    return np.stack([i, j])


def serve(build: Callable[[dict, str, dict], tuple[dict, dict[str, Callable[[], object]]]]) -> None:
    """Parse the runner's arguments, ``build(batches, model, options) -> (info, {op: call})``, warm up, answer."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--options", default="{}", help="JSON: model options")
    a = ap.parse_args()
    proto = os.fdopen(os.dup(1), "w", buffering=1)  # the protocol's own copy of stdout ...
    os.dup2(2, 1)  # ... and everything else printed to stdout goes to stderr
    sys.stdout = sys.stderr

    def send(obj) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    try:
        t0 = time.perf_counter()
        info, ops = build(load_batches(a.batches), a.model, json.loads(a.options))
        info["setup_s"] = time.perf_counter() - t0
        first = {}
        for name, call in ops.items():
            t = time.perf_counter()
            call()
            first[name] = time.perf_counter() - t
            call()  # a second warm-up call: caches, allocator, autotuning
        info["first_call_s"] = first
        info["pid"] = os.getpid()
        send({"ready": info})
    except Exception as exc:
        send({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]})
        sys.exit(1)
    for line in sys.stdin:
        req = json.loads(line)
        if req.get("op") == "quit":
            break
        call = ops.get(req["op"])
        if call is None:
            send({"op": req["op"], "error": f"unknown op {req['op']!r} (known: {', '.join(ops)})"})
            continue
        times = []
        for _ in range(int(req.get("repeats", 1))):
            t = time.perf_counter()
            call()
            times.append(time.perf_counter() - t)
        send({"op": req["op"], "times_s": times})
