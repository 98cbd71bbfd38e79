"""so3lib's runner for the peer comparison (run in so3lib's own environment by `compare.py`): the shared batches
as so3lib graphs on the device, the training step of `so3lib train` (Adam, gradient clipping, EMA) and the
potential's energy and forces, jitted. ``--model`` is any so3lib model, ``--options`` its options as JSON."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

import jax  # noqa: E402
import numpy as np  # noqa: E402
import protocol  # noqa: E402

from so3lib.data import Dataset, fit_energy_reference  # noqa: E402
from so3lib.graph import GraphLoader  # noqa: E402
from so3lib.models import make_config  # noqa: E402
from so3lib.potential import Potential, fit_scale_shift  # noqa: E402
from so3lib.training.config import TrainingConfig  # noqa: E402
from so3lib.training.optim import make_optimizer  # noqa: E402
from so3lib.training.state import init_state  # noqa: E402
from so3lib.training.step import make_train_step  # noqa: E402


def dataset(b: dict, prefix: str, frames=None) -> Dataset:
    sel = slice(None) if frames is None else frames
    return Dataset.from_arrays(
        source=f"peer batches ({prefix})",
        numbers=b["numbers"],
        positions=b[f"{prefix}_positions"][sel],
        energy=b[f"{prefix}_energy"][sel],
        forces=b[f"{prefix}_forces"][sel],
    )


def build(b: dict, model: str, options: dict):
    cutoff = float(b["cutoff_angstrom"])
    train, test, one = dataset(b, "train"), dataset(b, "test"), dataset(b, "test", slice(0, 1))
    cfg = make_config(model, cutoff=cutoff, **options).fit(train)
    ref = fit_energy_reference(train, method="average")
    pot = Potential(cfg, ref, *fit_scale_shift(train, ref))

    def graph(ds):
        loader = GraphLoader(
            ds, cutoff, len(ds), shuffle=False, energy_offset=ref.energy(ds), triplet_cutoff=cfg.triplet_cutoff
        )
        return jax.device_put(next(loader.epoch(0)))

    g_train, g_test, g_one = graph(train), graph(test), graph(one)
    params = pot.init(jax.random.PRNGKey(0), g_train)
    tc = TrainingConfig(max_steps=10, batch_size=len(train), learning_rate=protocol.LEARNING_RATE, warmup_steps=0)
    assert abs(tc.beta - protocol.FORCES_WEIGHT) < 1e-12
    opt = make_optimizer(tc, 100)
    step = make_train_step(pot, opt, tc.beta, 0.0, tc.ema_decay)
    box = {"state": init_state(params, opt.init(params))}
    ef = jax.jit(pot.__call__)

    def train_step():
        box["state"], loss, _ = step(box["state"], g_train)
        jax.block_until_ready(loss)

    def energy_forces(g):
        return lambda: jax.block_until_ready(ef(box["state"].params, g))

    info = {
        "code": "so3lib",
        "model": model,
        "config": cfg.config_view(),
        "n_parameters": int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params))),
        "edges_per_molecule": int(len(protocol.pairs_within(b["test_positions"][0], cutoff)[0])),
        "jax": jax.__version__,
        "devices": [str(d) for d in jax.devices()],
    }
    ops = {
        "train_step": train_step,
        "energy_forces_1": energy_forces(g_one),
        "energy_forces_1000": energy_forces(g_test),
    }
    return info, ops


if __name__ == "__main__":
    protocol.serve(build)
