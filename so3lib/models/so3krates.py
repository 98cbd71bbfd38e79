"""SO3krates-style Euclidean transformer (Frank, Unke, Müller, Chmiela 2022/2024), as in MODELS.md.

Per atom: invariant features f_i ∈ R^F and ONE set of Euclidean variables x_i = ⊕_{l=1..L} x_i^l ∈ R^(2l+1)
(no feature channels on x, so the cost per edge is O(L² + F)).

  f_i = Embed(Z_i);  x_i^l = (1/⟨N⟩) Σ_j φ(r_ij) Y^l(r̂_ij)
  each of T layers (pre-layer-norm on f, residual updates):
    c_ij^l = ⟨x_j^l − x_i^l, x_j^l − x_i^l⟩                                      (E, L) pair invariants
    w_ij = MLP_r(rbf(r_ij)) + MLP_s(c_ij)                                         (E, F) filter
    α_ijh = Σ_d q_ihd w_ijhd k_jhd / √d · φ(r_ij),   f_i += (1/⟨N⟩) Σ_j α_ijh v_jh  (H heads of size d = F/H)
    α_ij^l = Σ_d q^x_ild w^x_ijld k^x_jld / √d · φ(r_ij),  x_i^l += (1/⟨N⟩) Σ_j α_ij^l Y^l(r̂_ij)
    (a_i, b_i) = MLP([f_i, ⟨x_i^l, x_i^l⟩_l]);  f_i += a_i;  x_i^l += b_i^l x_i^l
  E_i = MLP(LayerNorm(f_i))   (its last layer `ReadoutHeads`: K heads of a shallow ensemble, ``readout_heads``)

Only the invariants c^l and ⟨x^l, x^l⟩ reach f, so E is invariant under rotations, translations, permutations
and also reflections (Y^l(−r̂) = (−1)^l Y^l(r̂) and every contraction is a squared norm): the model does not
distinguish mirror images; forces are O(3)-equivariant. Spherical harmonics from e3nn-jax.
"""

from __future__ import annotations

from typing import Literal

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph
import numpy as np
from pydantic import Field, model_validator

from so3lib.models.common import ACTIVATIONS, CUTOFFS, RBFS, ReadoutHeads, edge_geometry
from so3lib.models.registry import ModelConfig, register


@register("so3krates")
class SO3kratesConfig(ModelConfig):
    name: Literal["so3krates"] = "so3krates"
    features: int = Field(132, ge=2, le=4096, description="invariant feature width F")
    l_max: int = Field(3, ge=1, le=6, description="largest degree L of the Euclidean variables")
    layers: int = Field(3, ge=1, le=12, description="transformer layers T")
    heads: int = Field(4, ge=1, le=64, description="attention heads H (F must be divisible by H)")
    n_rbf: int = Field(32, ge=2, le=256)
    rbf: Literal["bessel", "gaussian"] = "bessel"
    cutoff_fn: Literal["cosine", "polynomial"] = "cosine"
    activation: Literal["silu", "ssp", "tanh", "gelu"] = "silu"
    avg_num_neighbors: float | None = Field(None, gt=0, description="⟨N⟩; None: fitted on the training set")

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.features % self.heads:
            raise ValueError(f"features ({self.features}) must be divisible by heads ({self.heads})")
        return self

    def build(self) -> nn.Module:
        return SO3krates(self)

    def readout_params(self) -> tuple[str, ...]:
        """The final layer norm and the output MLP (with readout heads: its hidden layer and the heads)."""
        return ("LayerNorm_0", "MLP_0", "ReadoutHeads_0") if self.readout_heads else ("LayerNorm_0", "MLP_0")

    def fit(self, dataset) -> SO3kratesConfig:
        """⟨N⟩ = mean neighbour count within the cutoff on (up to 500 frames of) the training set."""
        if self.avg_num_neighbors is not None:
            return self
        from so3lib.graph.batching import NeighbourTable

        sample = dataset.subset(np.linspace(0, len(dataset) - 1, min(len(dataset), 500)).astype(int))
        table = NeighbourTable.build(sample, self.cutoff)
        return self.replace(avg_num_neighbors=max(float(table.offsets[-1] / sample.offsets[-1]), 1.0))


def degree_index(l_max: int) -> np.ndarray:
    """(D,) degree − 1 of every component of ⊕_{l=1..L} R^(2l+1), D = (L+1)² − 1."""
    return np.concatenate([np.full(2 * l + 1, l - 1) for l in range(1, l_max + 1)])


def per_degree_sum(v: jnp.ndarray, l_max: int) -> jnp.ndarray:
    """(..., D) → (..., L): sum of components within each degree (a contraction with a 0/1 matrix)."""
    onehot = jnp.asarray(np.eye(l_max)[degree_index(l_max)], v.dtype)  # (D, L)
    return v @ onehot


class MLP(nn.Module):
    features: tuple[int, ...]
    act: str = "silu"
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i, f in enumerate(self.features):
            x = nn.Dense(f, dtype=self.dtype, param_dtype=self.dtype)(x)
            if i < len(self.features) - 1:
                x = ACTIVATIONS[self.act](x)
        return x


class SO3kratesLayer(nn.Module):
    config: SO3kratesConfig

    @nn.compact
    def __call__(self, f, x, rbf, sh, phi, senders, receivers, n_node):
        c = self.config
        dt = c.jnp_dtype
        F, H, L = c.features, c.heads, c.l_max
        d = F // H
        inv_n = 1.0 / float(c.avg_num_neighbors or 1.0)
        dense = lambda n, **kw: nn.Dense(n, dtype=dt, param_dtype=dt, **kw)  # noqa: E731
        # 1. pair invariants and 2. filter
        dx = x[senders] - x[receivers]  # (E, D)
        c_ij = per_degree_sum(dx * dx, L)  # (E, L)
        w = MLP((F, F), c.activation, dt)(rbf) + MLP((F, F), c.activation, dt)(c_ij)  # (E, F)
        # 3. invariant multi-head attention on pre-normalised features
        h = nn.LayerNorm(dtype=dt, param_dtype=dt)(f)
        q = dense(F, use_bias=False)(h).reshape(-1, H, d)
        k = dense(F, use_bias=False)(h).reshape(-1, H, d)
        v = dense(F, use_bias=False)(h).reshape(-1, H, d)
        alpha = jnp.sum(q[receivers] * w.reshape(-1, H, d) * k[senders], axis=-1) / np.sqrt(d) * phi[:, None]
        msg = (alpha[:, :, None] * v[senders]).reshape(-1, F)
        f = f + inv_n * jax.ops.segment_sum(msg, receivers, num_segments=n_node)
        # 4. equivariant attention: one coefficient per degree
        h = nn.LayerNorm(dtype=dt, param_dtype=dt)(f)
        qx = dense(L * d, use_bias=False)(h).reshape(-1, L, d)
        kx = dense(L * d, use_bias=False)(h).reshape(-1, L, d)
        wx = dense(L * d)(w).reshape(-1, L, d)
        alpha_l = jnp.sum(qx[receivers] * wx * kx[senders], axis=-1) / np.sqrt(d) * phi[:, None]  # (E, L)
        deg = degree_index(L)
        x = x + inv_n * jax.ops.segment_sum(alpha_l[:, deg] * sh, receivers, num_segments=n_node)
        # 5. exchange between f and x
        h = nn.LayerNorm(dtype=dt, param_dtype=dt)(f)
        ab = MLP((F, F + L), c.activation, dt)(jnp.concatenate([h, per_degree_sum(x * x, L)], axis=-1))
        a, b = ab[:, :F], ab[:, F:]
        return f + a, x + b[:, deg] * x


class SO3krates(nn.Module):
    """GraphsTuple → per-atom energies (N,); (N, K) with K ``readout_heads``."""

    config: SO3kratesConfig

    @nn.compact
    def __call__(self, graph: jraph.GraphsTuple) -> jax.Array:
        c = self.config
        dt = c.jnp_dtype
        n_node = graph.nodes["species"].shape[0]
        vec, r, emask = edge_geometry(graph, dt)
        unit = vec / jnp.where(emask, r, 1.0)[:, None]
        unit = jnp.where(emask[:, None], unit, jnp.array([0.0, 0.0, 1.0], dt))  # padding: any unit vector
        irreps = e3nn.Irreps.spherical_harmonics(c.l_max)[1:]  # 1o + 2e + ... + Lp
        sh = e3nn.spherical_harmonics(irreps, unit, normalize=False, normalization="component").array  # (E, D)
        phi = CUTOFFS[c.cutoff_fn](r, c.cutoff) * emask  # 0 on padding edges
        rbf = RBFS[c.rbf](r, c.n_rbf, c.cutoff) * phi[:, None]
        inv_n = 1.0 / float(c.avg_num_neighbors or 1.0)
        x = inv_n * jax.ops.segment_sum(phi[:, None] * sh, graph.receivers, num_segments=n_node)
        f = nn.Embed(119, c.features, dtype=dt, param_dtype=dt)(graph.nodes["species"])
        for _ in range(c.layers):
            f, x = SO3kratesLayer(c)(f, x, rbf, sh, phi, graph.senders, graph.receivers, n_node)
        h = nn.LayerNorm(dtype=dt, param_dtype=dt)(f)
        if c.readout_heads:
            hidden = ACTIVATIONS[c.activation](MLP((c.features,), c.activation, dt)(h))
            return ReadoutHeads(c.readout_heads, dt)(hidden)
        return MLP((c.features, 1), c.activation, dt)(h)[:, 0]
