"""SchNet: continuous-filter convolutions (Schütt et al. 2017/2018), as in MODELS.md.

x_i⁰ = A[Z_i] ∈ R^F;  W(r_ij) = Dense_F(ssp(Dense_F(rbf(r_ij)))) · φ(r_ij);
v_i = Σ_j Dense_F(x)_j ⊙ W(r_ij);  x_i ← x_i + Dense_F(ssp(Dense_F(v_i)))  (T times);
E_i = Dense_1(ssp(Dense_{F/2}(x_i)))  (`ReadoutHeads` instead of Dense_1: K heads of a shallow ensemble).
"""

from __future__ import annotations

from typing import Literal

import flax.linen as nn
import jax
import jraph
from pydantic import Field

from so3lib.models.common import CUTOFFS, RBFS, ReadoutHeads, edge_geometry, shifted_softplus
from so3lib.models.registry import ModelConfig, register


@register("schnet")
class SchNetConfig(ModelConfig):
    name: Literal["schnet"] = "schnet"
    n_atom_basis: int = Field(128, ge=1, le=4096, description="feature width F")
    n_interactions: int = Field(3, ge=1, le=12, description="interaction blocks T")
    n_rbf: int = Field(20, ge=2, le=256, description="radial basis functions")
    rbf: Literal["gaussian", "bessel"] = "gaussian"
    cutoff_fn: Literal["cosine", "polynomial"] = "cosine"
    embedding_init_std: float | None = Field(
        None,
        gt=0,
        description="standard deviation of the initial atom embedding A (SchNetPack: 1); default: 1/√F (flax)",
    )

    def build(self) -> nn.Module:
        return SchNet(self)

    def readout_params(self) -> tuple[str, ...]:
        """The atom-wise output MLP: the two Dense layers after the T interactions (5 Dense layers each); with
        readout heads the hidden Dense layer and the heads."""
        t = 5 * self.n_interactions
        return (f"Dense_{t}", "ReadoutHeads_0") if self.readout_heads else (f"Dense_{t}", f"Dense_{t + 1}")


class SchNet(nn.Module):
    """GraphsTuple (positions Å, species Z) → per-atom energies (N,) in units of the potential's scale; (N, K)
    with K ``readout_heads``."""

    config: SchNetConfig

    @nn.compact
    def __call__(self, graph: jraph.GraphsTuple) -> jax.Array:
        c = self.config
        dt = c.jnp_dtype
        dense = lambda f, **kw: nn.Dense(f, dtype=dt, param_dtype=dt, **kw)  # noqa: E731
        n_node = graph.nodes["species"].shape[0]
        _, r, emask = edge_geometry(graph, dt)
        rbf = RBFS[c.rbf](r, c.n_rbf, c.cutoff)
        fc = (CUTOFFS[c.cutoff_fn](r, c.cutoff) * emask)[:, None]
        init = {} if c.embedding_init_std is None else {"embedding_init": nn.initializers.normal(c.embedding_init_std)}
        x = nn.Embed(119, c.n_atom_basis, dtype=dt, param_dtype=dt, **init)(graph.nodes["species"])
        for _ in range(c.n_interactions):
            w = dense(c.n_atom_basis)(shifted_softplus(dense(c.n_atom_basis)(rbf))) * fc
            y = dense(c.n_atom_basis, use_bias=False)(x)
            v = jax.ops.segment_sum(y[graph.senders] * w, graph.receivers, num_segments=n_node)
            x = x + dense(c.n_atom_basis)(shifted_softplus(dense(c.n_atom_basis)(v)))
        if c.readout_heads:  # the hidden layer is Dense_{5T}, the heads ReadoutHeads_0
            return ReadoutHeads(c.readout_heads, dt)(shifted_softplus(dense(max(c.n_atom_basis // 2, 1))(x)))
        # the output layer is built first (Dense_{5T}), the hidden one second: the names saved runs hold
        return dense(1)(shifted_softplus(dense(max(c.n_atom_basis // 2, 1))(x)))[:, 0]
