"""Loss and error sums over real (non-padding) graphs and atoms only."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jraph

NLL_EPS = 1e-8  # eV² and (eV/Å)²: floor of the heads' variance in the NLL (σ ≥ 0.1 meV, 0.1 meV/Å)


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
    if "energy_residual_members" in pred:  # a shallow ensemble: the NLL of its heads' spread
        out.update(nll_sums(pred, graph, gm, nm))
    return out


def gaussian_nll(err: jax.Array, var: jax.Array) -> jax.Array:
    """½ [ln(σ² + ε) + sg(err)² / (σ² + ε)] (up to the constant ½ ln 2π). The error's gradient is stopped: the
    NLL shapes only the spread, the mean is trained by the squared errors alone."""
    v = var + NLL_EPS
    return 0.5 * (jnp.log(v) + jax.lax.stop_gradient(err) ** 2 / v)


def nll_sums(pred: dict, graph: jraph.GraphsTuple, gm: jax.Array, nm: jax.Array) -> dict:
    """Sums of the Gaussian NLL of a shallow ensemble (`so3lib.shallow_ensemble`) over the labelled graphs, with
    σ_E² = var_k(E_k) (raw, uncalibrated), and, where the prediction holds the per-head forces, over the labelled
    force components with σ_F,ic² = var_k(F_k,ic)."""
    de = pred["energy_residual"] - graph.globals["energy_residual"]
    out = {"nll_e": jnp.sum(gm * gaussian_nll(de, jnp.var(pred["energy_residual_members"], axis=0)))}
    if "forces_members" in pred:
        df = pred["forces"] - graph.nodes["forces"]
        out["nll_f"] = jnp.sum(nm[:, None] * gaussian_nll(df, jnp.var(pred["forces_members"], axis=0)))
    return out


def loss_from_sums(s: dict, beta: float, stress_weight: float = 0.0, nll_weight: float = 0.0):
    """L = (1 − β)·mean_graphs (E − Ẽ)² + β·Σ_atoms |F − F̃|² / (3 N_real) [+ w·mean (σ − σ̃)²], plus for a
    shallow ensemble w_nll·(NLL_E + NLL_F) (the mean NLL per labelled structure and per force component).
    Returns (loss, aux) with the energy and force MSE terms (and the NLL terms)."""
    mse_e = s["e_sq"] / jnp.maximum(s["n_e"], 1.0)
    mse_f = s["f_sq"] / jnp.maximum(s["n_f"], 1.0)
    loss = (1.0 - beta) * mse_e + beta * mse_f
    aux = {"mse_energy": mse_e, "mse_forces": mse_f}
    if stress_weight > 0 and "s_sq" in s:
        mse_s = s["s_sq"] / jnp.maximum(s["n_s"], 1.0)
        loss = loss + stress_weight * mse_s
        aux["mse_stress"] = mse_s
    if nll_weight > 0 and "nll_e" in s:
        aux["nll_energy"] = s["nll_e"] / jnp.maximum(s["n_e"], 1.0)
        nll = aux["nll_energy"]
        if "nll_f" in s:
            aux["nll_forces"] = s["nll_f"] / jnp.maximum(s["n_f"], 1.0)
            nll = nll + aux["nll_forces"]
        loss = loss + nll_weight * nll
    return loss, aux


def loss_fn(pred: dict, graph: jraph.GraphsTuple, beta: float, stress_weight: float = 0.0, nll_weight: float = 0.0):
    """The loss of one padded batch (see `loss_from_sums`)."""
    return loss_from_sums(loss_sums(pred, graph, stress_weight > 0), beta, stress_weight, nll_weight)


def error_sums(pred: dict, graph: jraph.GraphsTuple) -> dict:
    """Sums of absolute and squared errors for MAE/RMSE (energies per structure and per atom, force components;
    stress components when ``pred`` has a stress) and the counts of labelled values they are over."""
    gm, nm = masks(graph)
    n = jnp.maximum(graph.n_node.astype(gm.dtype), 1.0)
    de = pred["energy_residual"] - graph.globals["energy_residual"]
    df = pred["forces"] - graph.nodes["forces"]
    out = {
        "e_abs": jnp.sum(gm * jnp.abs(de)),
        "e_sq": jnp.sum(gm * de**2),
        "ea_abs": jnp.sum(gm * jnp.abs(de) / n),
        "ea_sq": jnp.sum(gm * (de / n) ** 2),
        "n_e": jnp.sum(gm),
        "f_abs": jnp.sum(nm[:, None] * jnp.abs(df)),
        "f_sq": jnp.sum(nm[:, None] * df**2),
        "n_f": 3.0 * jnp.sum(nm),
    }
    if "stress" in pred:
        sm = jraph.get_graph_padding_mask(graph).astype(gm.dtype) * graph.globals["has_stress"]
        ds = jnp.where(sm[:, None, None] > 0, pred["stress"] - graph.globals["stress"], 0.0)
        out.update(s_abs=jnp.sum(jnp.abs(ds)), s_sq=jnp.sum(ds**2), n_s=9.0 * jnp.sum(sm))
    return out


def metrics_from_sums(s: dict) -> dict:
    """MAE/RMSE in eV, eV/Å (and eV/Å³ for stress, when the sums have it) from accumulated `error_sums`.

    A metric over no labelled value is ``None`` (absent), never 0 or NaN: the energy metrics (per structure and per
    atom) when no structure has an energy label, the force metrics when no atom has forces, the stress metrics
    when no structure has a stress (stress metrics are there only when the sums include stress). ``n_structures``
    counts the structures with an energy label."""
    import math

    def mean(total: str, count: str, root: bool = False) -> float | None:
        n = float(s[count])
        if n <= 0:
            return None
        v = float(s[total]) / n
        return math.sqrt(v) if root else v

    out = {
        "energy_mae_ev": mean("e_abs", "n_e"),
        "energy_rmse_ev": mean("e_sq", "n_e", root=True),
        "energy_mae_per_atom_ev": mean("ea_abs", "n_e"),
        "energy_rmse_per_atom_ev": mean("ea_sq", "n_e", root=True),
        "forces_mae_ev_per_a": mean("f_abs", "n_f"),
        "forces_rmse_ev_per_a": mean("f_sq", "n_f", root=True),
        "n_structures": int(round(float(s["n_e"]))),
    }
    if "n_s" in s:
        out["stress_mae_ev_per_a3"] = mean("s_abs", "n_s")
        out["stress_rmse_ev_per_a3"] = mean("s_sq", "n_s", root=True)
    return out
