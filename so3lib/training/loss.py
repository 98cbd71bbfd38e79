"""Loss and error sums over real (non-padding) graphs and atoms only."""

from __future__ import annotations

import jax.numpy as jnp
import jraph


def masks(graph: jraph.GraphsTuple):
    """(graph mask (G,), atom mask (N,)) as floats: real graphs with an energy label, real atoms of graphs
    with force labels."""
    gmask = jraph.get_graph_padding_mask(graph).astype(graph.globals["energy"].dtype)
    nmask = jraph.get_node_padding_mask(graph).astype(gmask.dtype)
    gidx = jnp.repeat(jnp.arange(graph.n_node.shape[0]), graph.n_node, total_repeat_length=nmask.shape[0])
    return gmask * graph.globals["has_energy"], nmask * graph.globals["has_forces"][gidx]


def loss_sums(pred: dict, graph: jraph.GraphsTuple, stress: bool = False) -> dict:
    """Sums behind the loss over real graphs/atoms: squared errors and counts. Sums of several (sub-)batches
    add up to the sums of their union, which is what makes data-parallel steps equal single-device ones."""
    gm, nm = masks(graph)
    de = pred["energy_residual"] - graph.globals["energy_residual"]
    df = pred["forces"] - graph.nodes["forces"]
    out = {
        "e_sq": jnp.sum(gm * de**2),
        "n_e": jnp.sum(gm),
        "f_sq": jnp.sum(nm[:, None] * df**2),
        "n_f": 3.0 * jnp.sum(nm),
    }
    if stress and "stress" in pred:
        sm = jraph.get_graph_padding_mask(graph) * graph.globals["has_stress"]
        ds = pred["stress"] - graph.globals["stress"]
        out.update(s_sq=jnp.sum(sm[:, None, None] * ds**2), n_s=9.0 * jnp.sum(sm))
    return out


def loss_from_sums(s: dict, beta: float, stress_weight: float = 0.0):
    """L = (1 − β)·mean_graphs (E − Ẽ)² + β·Σ_atoms |F − F̃|² / (3 N_real) [+ w·mean (σ − σ̃)²].
    Returns (loss, aux) with the energy and force MSE terms."""
    mse_e = s["e_sq"] / jnp.maximum(s["n_e"], 1.0)
    mse_f = s["f_sq"] / jnp.maximum(s["n_f"], 1.0)
    loss = (1.0 - beta) * mse_e + beta * mse_f
    aux = {"mse_energy": mse_e, "mse_forces": mse_f}
    if stress_weight > 0 and "s_sq" in s:
        mse_s = s["s_sq"] / jnp.maximum(s["n_s"], 1.0)
        loss = loss + stress_weight * mse_s
        aux["mse_stress"] = mse_s
    return loss, aux


def loss_fn(pred: dict, graph: jraph.GraphsTuple, beta: float, stress_weight: float = 0.0):
    """The loss of one padded batch (see `loss_from_sums`)."""
    return loss_from_sums(loss_sums(pred, graph, stress_weight > 0), beta, stress_weight)


def error_sums(pred: dict, graph: jraph.GraphsTuple) -> dict:
    """Sums of absolute and squared errors for MAE/RMSE (energies per structure and per atom, force components)."""
    gm, nm = masks(graph)
    n = jnp.maximum(graph.n_node.astype(gm.dtype), 1.0)
    de = pred["energy_residual"] - graph.globals["energy_residual"]
    df = pred["forces"] - graph.nodes["forces"]
    return {
        "e_abs": jnp.sum(gm * jnp.abs(de)),
        "e_sq": jnp.sum(gm * de**2),
        "ea_abs": jnp.sum(gm * jnp.abs(de) / n),
        "ea_sq": jnp.sum(gm * (de / n) ** 2),
        "n_e": jnp.sum(gm),
        "f_abs": jnp.sum(nm[:, None] * jnp.abs(df)),
        "f_sq": jnp.sum(nm[:, None] * df**2),
        "n_f": 3.0 * jnp.sum(nm),
    }


def metrics_from_sums(s: dict) -> dict:
    """MAE/RMSE in eV and eV/Å from accumulated `error_sums`."""
    import math

    ne, nf = max(float(s["n_e"]), 1.0), max(float(s["n_f"]), 1.0)
    return {
        "energy_mae_ev": float(s["e_abs"]) / ne,
        "energy_rmse_ev": math.sqrt(float(s["e_sq"]) / ne),
        "energy_mae_per_atom_ev": float(s["ea_abs"]) / ne,
        "energy_rmse_per_atom_ev": math.sqrt(float(s["ea_sq"]) / ne),
        "forces_mae_ev_per_a": float(s["f_abs"]) / nf,
        "forces_rmse_ev_per_a": math.sqrt(float(s["f_sq"]) / nf),
        "n_structures": int(round(float(s["n_e"]))),
    }
