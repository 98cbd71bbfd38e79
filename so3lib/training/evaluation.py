"""Evaluation: errors of a potential over a loader, the validation loss used for model selection, and the rows of
``metrics.csv``.

A metric whose labels are absent (no structure with an energy, no atom with forces) is ``None``: it is logged as
"n/a", written as an empty CSV cell and left out of the validation loss

    L_val = (1 − β)·RMSE_E² + β·RMSE_F²   (eV², eV²/Å²; a term whose labels are absent is dropped).
"""

from __future__ import annotations

import csv
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from so3lib.graph.batching import GraphLoader
from so3lib.potential import Potential
from so3lib.training.loss import error_sums, masks, metrics_from_sums

METRIC_FIELDS = [
    "step",
    "epoch",
    "time_s",
    "learning_rate",
    "train_loss",
    "val_loss",
    "val_energy_mae_mev",
    "val_energy_rmse_mev",
    "val_energy_mae_per_atom_mev",
    "val_forces_mae_mev_per_a",
    "val_forces_rmse_mev_per_a",
]


def make_eval_fn(pot: Potential, stress: bool = False):
    """Jitted ``(params, graph) -> (error_sums, predictions)``."""

    @jax.jit
    def eval_batch(params, graph):
        pred = pot(params, graph, compute_stress=stress)
        return error_sums(pred, graph), pred

    return eval_batch


def _square(x: float | None) -> float | None:
    return None if x is None else x**2


def evaluate(
    pot: Potential, params, loader: GraphLoader, eval_fn=None, collect: bool = False, collect_max: int | None = None
) -> dict:
    """MAE/RMSE over a loader (eV, eV/Å; None where the labels are absent), with mse_energy = RMSE_E² and
    mse_forces = RMSE_F². With ``collect`` also the labelled predictions for parity plots (``predictions``):
    of every structure, or with ``collect_max`` of every k-th batch, k = ⌈structures / collect_max⌉ (about
    ``collect_max`` structures spread over the loader: what is held does not grow with the set)."""
    eval_fn = eval_fn or make_eval_fn(pot)
    sums, coll = None, {"e_ref": [], "e_pred": [], "f_ref": [], "f_pred": [], "n_atoms": []}
    every = 1 if collect_max is None else max(1, -(-len(loader.dataset) // collect_max))
    for k, g in enumerate(loader.epoch(0)):
        s, pred = eval_fn(params, g)
        sums = s if sums is None else jax.tree_util.tree_map(jnp.add, sums, s)
        if collect and k % every == 0:
            gm, nm = (np.asarray(m) > 0 for m in masks(g))  # labelled real graphs, labelled real atoms
            coll["e_ref"].append(np.asarray(g.globals["energy_residual"])[gm])
            coll["e_pred"].append(np.asarray(pred["energy_residual"])[gm])
            coll["n_atoms"].append(np.asarray(g.n_node)[gm])
            coll["f_ref"].append(np.asarray(g.nodes["forces"])[nm])
            coll["f_pred"].append(np.asarray(pred["forces"])[nm])
    out = metrics_from_sums(jax.tree_util.tree_map(float, sums))
    out["mse_energy"] = _square(out["energy_rmse_ev"])
    out["mse_forces"] = _square(out["forces_rmse_ev_per_a"])
    if collect:
        out["predictions"] = {k: np.concatenate(v) for k, v in coll.items()}
    return out


def validation_loss(m: dict, beta: float) -> float | None:
    """(1 − β)·mse_energy + β·mse_forces from `evaluate`'s metrics, over the terms that exist (None: neither)."""
    e, f = m["mse_energy"], m["mse_forces"]
    if e is None and f is None:
        return None
    if f is None:
        return (1 - beta) * e
    if e is None:
        return beta * f
    return (1 - beta) * e + beta * f


def to_mev(x_ev: float | None) -> float | None:
    """eV → meV (eV/Å → meV/Å); None stays None."""
    return None if x_ev is None else 1e3 * x_ev


def metric_row(m: dict, prefix: str = "val_") -> dict:
    """`evaluate`'s metrics in meV and meV/Å under the metrics.csv names (None stays None)."""
    return {
        f"{prefix}energy_mae_mev": to_mev(m["energy_mae_ev"]),
        f"{prefix}energy_rmse_mev": to_mev(m["energy_rmse_ev"]),
        f"{prefix}energy_mae_per_atom_mev": to_mev(m["energy_mae_per_atom_ev"]),
        f"{prefix}forces_mae_mev_per_a": to_mev(m["forces_mae_ev_per_a"]),
        f"{prefix}forces_rmse_mev_per_a": to_mev(m["forces_rmse_ev_per_a"]),
    }


def fmt(x: float | None, spec: str = ".3f") -> str:
    """``format(x, spec)``, or "n/a" for an absent metric."""
    return "n/a" if x is None else format(x, spec)


class MetricsCSV:
    """metrics.csv: one row per evaluation (`METRIC_FIELDS`); an absent value is an empty cell. Opened for
    appending, so a resumed run continues the file after `truncate`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        new = not self.path.exists()
        self._fh = open(self.path, "a", newline="")
        self._writer = csv.DictWriter(self._fh, fieldnames=METRIC_FIELDS)
        if new:
            self._writer.writeheader()
            self._fh.flush()

    def write(self, row: dict) -> None:
        self._writer.writerow({k: "" if row.get(k) is None else row[k] for k in METRIC_FIELDS})
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()

    @staticmethod
    def truncate(path: str | Path, step: int) -> None:
        """Drop the rows logged after ``step`` (the checkpoint a run resumes from: they will be logged again)."""
        path = Path(path)
        if not path.exists():
            return
        with open(path) as fh:
            rows = list(csv.DictReader(fh))
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=METRIC_FIELDS)
            w.writeheader()
            for r in rows:
                if int(float(r["step"])) <= step:
                    w.writerow({k: r.get(k, "") for k in METRIC_FIELDS})
