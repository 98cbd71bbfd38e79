"""The potential layer: per-atom model energies → energy, forces = −∂E/∂r and stress = (1/V) ∂E/∂ε.

E_graph = Σ_i [scale · e_i + shift] + Σ_i e_ref(Z_i)  where e_i is the model output, ``scale`` (eV) and ``shift``
(eV/atom) are fitted on the training set and e_ref is the per-element `EnergyReference`. The model learns the
residual E − E_ref; the loss and metrics use the residual, computed on the host in float64, so float32 training
does not lose meV to the large absolute energies. All outputs are exactly energy-conserving (autodiff).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import jraph
import numpy as np

from so3lib.data.dataset import Dataset
from so3lib.data.reference import EnergyReference
from so3lib.graph.geometry import node_graph_index
from so3lib.models.registry import ModelConfig, config_from_dict

Params = Any


@dataclasses.dataclass(frozen=True, eq=False)
class Potential:
    """A model plus its fitted output transform. Pure: parameters are passed to every call."""

    model: ModelConfig
    reference: EnergyReference
    scale: float = 1.0  # eV per unit of model output
    shift: float = 0.0  # eV per atom

    @functools.cached_property
    def module(self):
        return self.model.build()

    @property
    def dtype(self):
        return self.model.jnp_dtype

    @property
    def cutoff(self) -> float:
        return self.model.cutoff

    def init(self, key: jax.Array, graph: jraph.GraphsTuple) -> Params:
        """Parameters for this model, from the shapes of one padded batch (jitted: one compilation instead of
        one per operation)."""
        return jax.jit(lambda k, g: self.module.init(k, self._cast(g)))(key, graph)

    def _cast(self, graph: jraph.GraphsTuple) -> jraph.GraphsTuple:
        dt = self.dtype
        return graph._replace(
            nodes={**graph.nodes, "positions": jnp.asarray(graph.nodes["positions"], dt)},
            globals={**graph.globals, "cell": jnp.asarray(graph.globals["cell"], dt)},
        )

    # ------------------------------------------------------------------ energies
    def atomic_residual_energies(self, params: Params, graph: jraph.GraphsTuple) -> jax.Array:
        """(N,) scale · e_i + shift per atom, eV (0 on padding atoms); adding e_ref(Z_i) gives the per-atom
        energies, which sum to the energy."""
        e_atom = self.module.apply(params, graph)
        return jnp.where(graph.nodes["species"] > 0, self.scale * e_atom + self.shift, 0.0)

    def residual_energy(self, params: Params, graph: jraph.GraphsTuple) -> jax.Array:
        """(G,) E − E_ref per graph, eV (padding graph gives 0)."""
        return self._graph_sum(self.atomic_residual_energies(params, graph), graph)

    @staticmethod
    def _graph_sum(e_atom: jax.Array, graph: jraph.GraphsTuple) -> jax.Array:
        return jax.ops.segment_sum(e_atom, node_graph_index(graph), num_segments=graph.n_node.shape[0])

    def reference_energy(self, graph: jraph.GraphsTuple) -> jax.Array:
        """(G,) Σ_i e_ref(Z_i) in the model dtype (lossy in float32: use host float64 for absolute energies)."""
        table = jnp.asarray(self.reference.table(), self.dtype)
        return jax.ops.segment_sum(
            table[graph.nodes["species"]], node_graph_index(graph), num_segments=graph.n_node.shape[0]
        )

    def __call__(self, params: Params, graph: jraph.GraphsTuple, compute_stress: bool = False) -> dict[str, jax.Array]:
        """{energy_residual (G,), energy (G,), forces (N, 3), atomic_energy_residual (N,), [stress (G, 3, 3)]}
        in eV, eV/Å, eV/Å³ (atomic_energy_residual: `atomic_residual_energies`, summing to energy_residual)."""
        graph = self._cast(graph)
        pos = graph.nodes["positions"]
        if not compute_stress:

            def total(p):
                e_atom = self.atomic_residual_energies(params, graph._replace(nodes={**graph.nodes, "positions": p}))
                e = self._graph_sum(e_atom, graph)
                return jnp.sum(e), (e, e_atom)

            (_, (e, e_atom)), grad_pos = jax.value_and_grad(total, has_aux=True)(pos)
            out = {"energy_residual": e, "forces": -grad_pos, "atomic_energy_residual": e_atom}
        else:
            n_graph = graph.n_node.shape[0]
            strain0 = jnp.zeros((n_graph, 3, 3), self.dtype)

            def total(p, strain):
                g = strained(graph, p, strain)
                e_atom = self.atomic_residual_energies(params, g)
                e = self._graph_sum(e_atom, g)
                return jnp.sum(e), (e, e_atom)

            (_, (e, e_atom)), (grad_pos, grad_strain) = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(
                pos, strain0
            )
            stress = stress_from_strain_gradient(graph, grad_strain)
            out = {"energy_residual": e, "forces": -grad_pos, "stress": stress, "atomic_energy_residual": e_atom}
        out["energy"] = out["energy_residual"] + self.reference_energy(graph)
        return out

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        return {
            "model": self.model.to_dict(),
            "reference": self.reference.to_dict(),
            "scale": float(self.scale),
            "shift": float(self.shift),
        }

    @staticmethod
    def from_dict(d: Mapping) -> Potential:
        """A `Potential`, or for a model with ``readout_heads`` a `ShallowEnsemblePotential` (with the calibration
        it was saved with)."""
        pot = make_potential(
            config_from_dict(d["model"]),
            EnergyReference.from_dict(d["reference"]),
            float(d["scale"]),
            float(d["shift"]),
        )
        cal = d.get("calibration")
        return pot.with_calibration(cal["energy_scale"], cal["forces_scale"]) if cal else pot


def make_potential(model: ModelConfig, reference: EnergyReference, scale: float = 1.0, shift: float = 0.0) -> Potential:
    """The potential of ``model``: a `Potential`, or a `so3lib.shallow_ensemble.ShallowEnsemblePotential` when the
    model has ``readout_heads`` (uncalibrated: spread scales 1)."""
    if model.readout_heads:
        from so3lib.shallow_ensemble import ShallowEnsemblePotential

        return ShallowEnsemblePotential(model, reference, scale, shift)
    return Potential(model, reference, scale, shift)


def strained(graph: jraph.GraphsTuple, positions: jax.Array, strain: jax.Array) -> jraph.GraphsTuple:
    """The graph with ``positions`` deformed by the symmetric part ε of ``strain`` (G, 3, 3): r ← r (1 + ε),
    cell ← cell (1 + ε), per graph (∂E/∂ε at ε = 0 is the virial)."""
    sym = 0.5 * (strain + jnp.swapaxes(strain, 1, 2))
    gidx = node_graph_index(graph)
    p_s = positions + jnp.einsum("ni,nij->nj", positions, sym[gidx])
    cell = graph.globals["cell"]
    cell_s = cell + jnp.einsum("gij,gjk->gik", cell, sym)
    return graph._replace(nodes={**graph.nodes, "positions": p_s}, globals={**graph.globals, "cell": cell_s})


def stress_from_strain_gradient(graph: jraph.GraphsTuple, grad_strain: jax.Array) -> jax.Array:
    """(G, 3, 3) σ = (1/V) ∂E/∂ε for graphs with a periodic cell of non-zero volume, 0 for the others."""
    cell = graph.globals["cell"]
    vol = jnp.abs(jnp.linalg.det(cell))
    periodic = jnp.any(graph.globals["pbc"], axis=1) & (vol > 0)
    return jnp.where(periodic[:, None, None], grad_strain / jnp.where(periodic, vol, 1.0)[:, None, None], 0.0)


def fit_scale_shift(dataset: Dataset, reference: EnergyReference) -> tuple[float, float]:
    """shift = mean residual energy per atom (eV); scale = RMS force component (eV/Å), or the residual
    per-atom energy std when no forces are labelled. Both from the training split."""
    resid = reference.subtract(dataset) / dataset.n_atoms
    ok = np.isfinite(resid)
    shift = float(np.mean(resid[ok])) if ok.any() else 0.0
    scale = float("nan")
    if dataset.forces is not None:
        f = dataset.forces[np.isfinite(dataset.forces).all(axis=1)]
        if len(f):
            scale = float(np.sqrt(np.mean(f**2)))
    if not np.isfinite(scale) or scale <= 0:
        scale = float(np.std(resid[ok])) if ok.sum() > 1 else 1.0
    return (scale if scale > 0 else 1.0), shift
