"""A shallow (last-layer) ensemble: one model whose last readout layer has K heads (``readout_heads``), as
apax's shallow ensembles (Kellner & Ceriotti, Mach. Learn.: Sci. Technol. 5, 035006, 2024).

Every head k gives per-atom energies e_ik from the same representation (only the last Dense layer differs), so

    E_k = Σ_i [scale · e_ik + shift] + E_ref,     E = (1/K) Σ_k E_k,     F = −∂E/∂r = (1/K) Σ_k F_k
    σ_E = s_E · std_k(E_k),     σ_F,ic = s_F · std_k(F_k,ic),     F_k = −∂E_k/∂r     (population std)

The mean energy drives MD (`residual_energy`: one forward and one backward pass, the cost of one model). The
per-head forces F_k are K vector–Jacobian products of one forward pass (vmapped), computed when
``force_spread`` is set (prediction, the calculator, the force NLL in training). ``s_E``, ``s_F``: the
calibration fitted on the validation set after training (`so3lib.ensemble.fit_calibration`), saved in
``model/potential.yaml``. Training: `so3lib.training.loss.nll_sums` (the heads' spread by a Gaussian NLL).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import jraph

from so3lib.potential import Params, Potential, strained, stress_from_strain_gradient


@dataclasses.dataclass(frozen=True, eq=False)
class ShallowEnsemblePotential(Potential):
    """A `Potential` of a model with K ``readout_heads``: the outputs of the heads' mean plus their spread,
    with the same keys as `so3lib.ensemble.EnsemblePotential`."""

    energy_scale: float = 1.0  # calibration s_E
    forces_scale: float = 1.0  # calibration s_F
    force_spread: bool = True  # per-head forces (K backward passes); False: the mean's forces only

    def __post_init__(self):
        if not self.model.readout_heads:
            raise ValueError(f"a shallow ensemble needs a model with readout_heads, got {self.model.config_view()}")

    @property
    def n_heads(self) -> int:
        return int(self.model.readout_heads)

    def atomic_residual_energies_heads(self, params: Params, graph: jraph.GraphsTuple) -> jax.Array:
        """(N, K) scale · e_ik + shift per atom and head, eV (0 on padding atoms)."""
        e_atom = self.module.apply(params, graph)
        return jnp.where(graph.nodes["species"][:, None] > 0, self.scale * e_atom + self.shift, 0.0)

    def atomic_residual_energies(self, params: Params, graph: jraph.GraphsTuple) -> jax.Array:
        """(N,) the heads' mean per atom (what `residual_energy`, MD and export use)."""
        return jnp.mean(self.atomic_residual_energies_heads(params, graph), axis=1)

    def __call__(self, params: Params, graph: jraph.GraphsTuple, compute_stress: bool = False) -> dict[str, jax.Array]:
        """`Potential`'s outputs of the mean, plus energy_std (G,) (calibrated), energy_members (K, G),
        energy_residual_members (K, G) and, with ``force_spread``, forces_std (N, 3) (calibrated) and
        forces_members (K, N, 3)."""
        graph = self._cast(graph)
        k, n_graph = self.n_heads, graph.n_node.shape[0]

        def heads(pos, strain):
            g = (
                strained(graph, pos, strain)
                if compute_stress
                else graph._replace(nodes={**graph.nodes, "positions": pos})
            )
            e_atom = self.atomic_residual_energies_heads(params, g)
            return self._graph_sum(e_atom, g), e_atom  # (G, K), (N, K)

        strain0 = jnp.zeros((n_graph, 3, 3), self.dtype)
        e_heads, vjp, e_atom = jax.vjp(heads, graph.nodes["positions"], strain0, has_aux=True)
        if self.force_spread:  # cotangent k: ones on head k's column, so row k of the result is ∂E_k/∂r
            cot = jnp.broadcast_to(jnp.eye(k, dtype=e_heads.dtype)[:, None, :], (k, n_graph, k))
            grad_pos, grad_strain = jax.vmap(vjp)(cot)
            forces_members = -grad_pos  # (K, N, 3)
            forces, grad_strain = jnp.mean(forces_members, axis=0), jnp.mean(grad_strain, axis=0)
        else:
            grad_pos, grad_strain = vjp(jnp.full_like(e_heads, 1.0 / k))
            forces = -grad_pos
        e = jnp.mean(e_heads, axis=1)
        e_ref = self.reference_energy(graph)
        out = {
            "energy_residual": e,
            "energy": e + e_ref,
            "forces": forces,
            "atomic_energy_residual": jnp.mean(e_atom, axis=1),
            "energy_residual_members": e_heads.T,
            "energy_members": e_heads.T + e_ref,
            "energy_std": self.energy_scale * jnp.std(e_heads, axis=1),
        }
        if compute_stress:
            out["stress"] = stress_from_strain_gradient(graph, grad_strain)
        if self.force_spread:
            out["forces_members"] = forces_members
            out["forces_std"] = self.forces_scale * jnp.std(forces_members, axis=0)
        return out

    def with_calibration(self, energy_scale: float, forces_scale: float) -> ShallowEnsemblePotential:
        return dataclasses.replace(self, energy_scale=float(energy_scale), forces_scale=float(forces_scale))

    def with_force_spread(self, force_spread: bool) -> ShallowEnsemblePotential:
        return dataclasses.replace(self, force_spread=bool(force_spread))

    def to_dict(self) -> dict:
        return {
            **super().to_dict(),
            "calibration": {"energy_scale": float(self.energy_scale), "forces_scale": float(self.forces_scale)},
        }
