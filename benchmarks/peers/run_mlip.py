"""mlip's runner for the peer comparison (InstaDeep's mlip, run in its venv from `make_venvs.sh`): its models
(`mlip.models.Nequip`, `Mace`, `Visnet`) as a `ForceField` on its own graphs (`Graph.from_chemical_system`,
`batch_graphs`; its neighbour list at the same cutoff), with an optax Adam step on the predictor, jitted.
``--model nequip|mace|visnet``; ``--options`` JSON: fields of that model's mlip config."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import protocol  # noqa: E402
from mlip.data.chemical_system import ChemicalSystem  # noqa: E402
from mlip.data.dataset_info import DatasetInfo  # noqa: E402
from mlip.graph import Graph  # noqa: E402
from mlip.graph.batching_helpers import batch_graphs  # noqa: E402
from mlip.models import ForceField, Mace, Nequip, Visnet  # noqa: E402

MODELS = {"nequip": Nequip, "mace": Mace, "visnet": Visnet}


def graphs(numbers, positions, energy, forces, cutoff):
    systems = [
        ChemicalSystem(atomic_numbers=numbers, positions=r, energy=float(e), forces=f)
        for r, e, f in zip(positions, energy, forces, strict=True)
    ]
    return batch_graphs([Graph.from_chemical_system(s, graph_cutoff_angstrom=cutoff) for s in systems])


def build(b: dict, model: str, options: dict):
    if model not in MODELS:
        raise ValueError(f"mlip runner: unknown model {model!r} (known: {', '.join(MODELS)})")
    cutoff = float(b["cutoff_angstrom"])
    z = b["numbers"]
    train = graphs(z, b["train_positions"], b["train_energy"], b["train_forces"], cutoff)
    test = graphs(z, b["test_positions"], b["test_energy"], b["test_forces"], cutoff)
    one = graphs(z, b["test_positions"][:1], b["test_energy"][:1], b["test_forces"][:1], cutoff)
    n_edge = int(np.sum(np.asarray(train.n_edge)))
    info_ds = DatasetInfo(
        atomic_energies_map={int(k): float(b["energy_per_atom_mean_ev"]) for k in set(z.tolist())},
        graph_cutoff_angstrom=cutoff,
        avg_num_neighbors=n_edge / int(np.sum(np.asarray(train.n_node))),
    )
    cls = MODELS[model]
    net = cls(cls.Config(**options), info_ds)
    ff = ForceField.from_mlip_network(net, seed=0)
    predictor = ff.predictor
    tx = optax.adam(protocol.LEARNING_RATE)
    e_ref, f_ref = jnp.asarray(b["train_energy"]), jnp.asarray(b["train_forces"].reshape(-1, 3))

    @jax.jit
    def step(params, opt_state, g):
        def loss_fn(p):
            out = predictor.apply(p, g)
            return protocol.ENERGY_WEIGHT * jnp.mean((out.globals.energy - e_ref) ** 2) + protocol.FORCES_WEIGHT * (
                jnp.mean((out.nodes.forces - f_ref) ** 2)
            )

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    box = {"params": ff.params, "opt": tx.init(ff.params)}
    ef = jax.jit(lambda p, g: (lambda o: (o.globals.energy, o.nodes.forces))(predictor.apply(p, g)))
    train, test, one = jax.device_put(train), jax.device_put(test), jax.device_put(one)

    def train_step():
        box["params"], box["opt"], loss = step(box["params"], box["opt"], train)
        jax.block_until_ready(loss)

    def energy_forces(g):
        return lambda: jax.block_until_ready(ef(box["params"], g))

    info = {
        "code": "mlip",
        "version": importlib.metadata.version("mlip"),
        "jax": jax.__version__,
        "model": model,
        "config": cls.Config(**options).model_dump(mode="json"),
        "n_parameters": int(sum(np.size(x) for x in jax.tree_util.tree_leaves(ff.params))),
        "edges_per_molecule": n_edge // len(b["train_positions"]),
    }
    ops = {"train_step": train_step, "energy_forces_1": energy_forces(one), "energy_forces_1000": energy_forces(test)}
    return info, ops


if __name__ == "__main__":
    protocol.serve(build)
