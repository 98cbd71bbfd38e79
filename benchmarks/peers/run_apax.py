"""apax's runner for the peer comparison (run in the apax venv from `make_venvs.sh`): apax's model as its trainer
builds it (`ModelBuilder.build_energy_derivative_model`, vmapped over the structures of a batch, as in
apax.train.run), with an optax Adam step written like apax's, jitted. ``--model gmnn`` (apax's default model;
``--options`` JSON: fields of apax's GMNNConfig) or ``so3krates`` (apax's So3kratesConfig)."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import apax  # noqa: E402, F401  (sets jax_enable_x64 as apax does)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import protocol  # noqa: E402
from apax.config import model_config  # noqa: E402


def inputs(numbers, positions, cutoff):
    b, n = positions.shape[:2]
    idx = np.stack([protocol.pairs_within(r, cutoff) for r in positions]).astype(np.int32)  # same count per frame
    return (
        jnp.asarray(positions, jnp.float64),
        jnp.asarray(np.tile(numbers, (b, 1)), jnp.int32),
        jnp.asarray(idx),
        jnp.zeros((b, 3), jnp.float64),
        jnp.zeros((b, idx.shape[2], 3), jnp.float64),
    )


def build(b: dict, model: str, options: dict):
    kinds = {"gmnn": model_config.GMNNConfig, "so3krates": getattr(model_config, "So3kratesConfig", None)}
    if kinds.get(model) is None:
        raise ValueError(f"apax runner: unknown model {model!r} (known: {', '.join(k for k, v in kinds.items() if v)})")
    cfg = kinds[model](**options)
    cutoff = float(b["cutoff_angstrom"])
    net = cfg.get_builder()(cfg.model_dump()).build_energy_derivative_model(
        scale=1.0, shift=float(b["energy_per_atom_mean_ev"]), apply_mask=True, init_box=np.zeros(3)
    )
    batched = jax.vmap(net.apply, in_axes=(None, 0, 0, 0, 0, 0))
    z = b["numbers"]
    train, test, one = (
        inputs(z, b["train_positions"], cutoff),
        inputs(z, b["test_positions"], cutoff),
        inputs(z, b["test_positions"][:1], cutoff),
    )
    params = net.init(jax.random.PRNGKey(0), *[x[0] for x in train])
    tx = optax.adam(protocol.LEARNING_RATE)
    e_ref, f_ref = jnp.asarray(b["train_energy"]), jnp.asarray(b["train_forces"])

    @jax.jit
    def step(params, opt_state, batch):
        def loss_fn(p):
            out = batched(p, *batch)
            return protocol.ENERGY_WEIGHT * jnp.mean((out["energy"] - e_ref) ** 2) + protocol.FORCES_WEIGHT * jnp.mean(
                (out["forces"] - f_ref) ** 2
            )

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    box = {"params": params, "opt": tx.init(params)}
    ef = jax.jit(batched)

    def train_step():
        box["params"], box["opt"], loss = step(box["params"], box["opt"], train)
        jax.block_until_ready(loss)

    def energy_forces(batch):
        return lambda: jax.block_until_ready(ef(box["params"], *batch))

    info = {
        "code": "apax",
        "version": importlib.metadata.version("apax"),
        "jax": jax.__version__,
        "model": model,
        "config": cfg.model_dump(mode="json"),
        "n_parameters": int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params))),
        "edges_per_molecule": int(train[2].shape[2]),
    }
    ops = {"train_step": train_step, "energy_forces_1": energy_forces(one), "energy_forces_1000": energy_forces(test)}
    return info, ops


if __name__ == "__main__":
    protocol.serve(build)
