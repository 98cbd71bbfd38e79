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
    """(..., D) → (..., L): sum of the 2l + 1 components of each degree l (slices of a row: fused with the
    elementwise work around it, where a product with a 0/1 matrix is a separate kernel with transposed copies)."""
    return jnp.stack([v[..., l * l - 1 : (l + 1) ** 2 - 1].sum(-1) for l in range(1, l_max + 1)], axis=-1)


def per_degree_repeat(a: jnp.ndarray, l_max: int) -> jnp.ndarray:
    """(..., L) → (..., D): the coefficient of degree l on each of its 2l + 1 components (``a[..., degree_index]``
    as broadcasts, not a gather)."""
    return jnp.concatenate(
        [jnp.broadcast_to(a[..., l - 1 : l], (*a.shape[:-1], 2 * l + 1)) for l in range(1, l_max + 1)], axis=-1
    )


class LayerNorm(nn.Module):
    """``nn.LayerNorm`` (same parameters scale, bias; ε = 1e-6; var = E[x²] − E[x]², clipped at 0), with both
    row statistics from one matrix product: fewer kernels than two reductions (XLA's CPU backend splits every
    row reduction in two), which matters at a molecule's size."""

    dtype: object = jnp.float32
    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x):
        n, F = x.shape
        scale = self.param("scale", nn.initializers.ones_init(), (F,), self.dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (F,), self.dtype)
        stats = jnp.concatenate([x, x * x], axis=0) @ jnp.full((F, 1), 1.0 / F, x.dtype)  # (2N, 1)
        mean, mean_sq = stats[:n], stats[n:]
        var = jnp.maximum(0.0, mean_sq - mean * mean)
        return (x - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias


class DenseParams(nn.Module):
    """The kernel (in, out) and bias (out,) of an ``nn.Dense`` of the same name (same initialisers), unapplied:
    several layers are then applied as one product (the parameter tree is that of the plain layers)."""

    features: int
    use_bias: bool = True
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, in_features: int):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (in_features, self.features), self.dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.dtype) if self.use_bias else None
        return kernel, bias


class MLPParams(nn.Module):
    """The parameters [(kernel, bias), …] of an `MLP` of the same name, unapplied."""

    features: tuple[int, ...]
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, in_features: int):
        dims = (in_features, *self.features)
        return [DenseParams(f, dtype=self.dtype, name=f"Dense_{i}")(dims[i]) for i, f in enumerate(self.features)]


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


def half_graph(graph: jraph.GraphsTuple) -> jraph.GraphsTuple:
    """The first edge of every reverse pair (edges 2k, see `so3lib.graph.batching`): one edge per unordered
    pair of atoms (each graph's and the padding's edge counts are even)."""
    return graph._replace(
        senders=graph.senders[0::2],
        receivers=graph.receivers[0::2],
        edges={"shift": graph.edges["shift"][0::2]},
        n_edge=graph.n_edge // 2,
    )


def both_directions(v: jnp.ndarray) -> jnp.ndarray:
    """(P, ...) per pair → (E, ...) per edge: the value of pair k on edges 2k and 2k + 1."""
    return jnp.repeat(v, 2, axis=0, total_repeat_length=2 * v.shape[0])


class SO3kratesLayer(nn.Module):
    """One transformer layer (MODELS.md steps 1-5). The filter w_ij is symmetric in i ↔ j (a function of r_ij
    and |x_j − x_i|), so with ``paired`` edges (edge 2k + 1 the reverse of edge 2k) it is evaluated once per
    pair and shared by both directions; the same parameters give the same energies either way."""

    config: SO3kratesConfig

    @nn.compact
    def __call__(self, f, x, rbf_p, sh, phi, senders, receivers, paired, n_node):
        c = self.config
        dt = c.jnp_dtype
        F, H, L = c.features, c.heads, c.l_max
        d = F // H
        inv_n = 1.0 / float(c.avg_num_neighbors or 1.0)
        act = ACTIVATIONS[c.activation]
        ln = lambda i: LayerNorm(dt, name=f"LayerNorm_{i}")  # noqa: E731
        dense = lambda i, n, bias=False: DenseParams(n, bias, dt, name=f"Dense_{i}")  # noqa: E731
        # 1. pair invariants c_ij^l and 2. filter w_ij = MLP_r(rbf) + MLP_s(c) and its map w^x to the degrees,
        # once per unordered pair when the edges are paired
        s_p, r_p = (senders[0::2], receivers[0::2]) if paired else (senders, receivers)
        dx = x[s_p] - x[r_p]  # (P, D)
        c_p = per_degree_sum(dx * dx, L)  # (P, L)
        K = rbf_p.shape[-1]
        (r1, rb1), (r2, rb2) = MLPParams((F, F), dt, name="MLP_0")(K)
        (s1, sb1), (s2, sb2) = MLPParams((F, F), dt, name="MLP_1")(L)
        # both hidden layers as one product with the block-diagonal [[W_r1, 0], [0, W_s1]], both output layers
        # as one product with the stacked [W_r2; W_s2]
        w1 = jnp.zeros((K + L, 2 * F), dt).at[:K, :F].set(r1).at[K:, F:].set(s1)
        hid = act(jnp.concatenate([rbf_p, c_p], axis=-1) @ w1 + jnp.concatenate([rb1, sb1]))  # (P, 2F)
        w = hid @ jnp.concatenate([r2, s2], axis=0) + (rb2 + sb2)  # (P, F)
        kx_w, kx_b = dense(5, L * d, bias=True)(F)
        wx = w @ kx_w + kx_b  # (P, L·d)
        if paired:
            w, wx = both_directions(w), both_directions(wx)  # (E, F), (E, L·d)
        # 3. invariant multi-head attention on pre-normalised features (q, k, v in one product)
        h = ln(0)(f)
        kq, kk, kv = (dense(i, F)(F)[0] for i in range(3))
        qkv = h @ jnp.concatenate([kq, kk, kv], axis=1)  # (N, 3F)
        q, k, v = qkv[:, :F][receivers], qkv[:, F : 2 * F][senders], qkv[:, 2 * F :][senders]  # (E, F) each
        scale = (phi / np.sqrt(d))[:, None]
        alpha = jnp.sum((q * w * k).reshape(-1, H, d), axis=-1) * scale  # (E, H)
        msg = (alpha[:, :, None] * v.reshape(-1, H, d)).reshape(-1, F)
        f = f + inv_n * jax.ops.segment_sum(msg, receivers, num_segments=n_node)
        # 4. equivariant attention: one coefficient per degree (q^x, k^x in one product)
        h = ln(1)(f)
        kqx, kkx = (dense(i, L * d)(F)[0] for i in (3, 4))
        qk = h @ jnp.concatenate([kqx, kkx], axis=1)  # (N, 2·L·d)
        alpha_l = jnp.sum((qk[:, : L * d][receivers] * wx * qk[:, L * d :][senders]).reshape(-1, L, d), axis=-1)
        x = x + inv_n * jax.ops.segment_sum(per_degree_repeat(alpha_l * scale, L) * sh, receivers, num_segments=n_node)
        # 5. exchange between f and x
        # (the first layer's kernel split into its rows for h and for ⟨x, x⟩, the second's into the columns of
        # a and b: products of aligned shapes, no concatenation of the input)
        h = ln(2)(f)
        (e1, eb1), (e2, eb2) = MLPParams((F, F + L), dt, name="MLP_2")(F + L)
        hid = act(h @ e1[:F] + per_degree_sum(x * x, L) @ e1[F:] + eb1)  # (N, F)
        a, b = hid @ e2[:, :F] + eb2[:F], hid @ e2[:, F:] + eb2[F:]  # (N, F), (N, L)
        return f + a, x + per_degree_repeat(b, L) * x


class SO3krates(nn.Module):
    """GraphsTuple → per-atom energies (N,); (N, K) with K ``readout_heads``. With ``edges['pair_sign']`` (batches
    from `so3lib.graph.build_batch`: edge 2k + 1 is edge 2k reversed) the geometry, radial basis, spherical
    harmonics (Y^l(−r̂) = (−1)^l Y^l(r̂)) and filters are evaluated once per unordered pair of atoms."""

    config: SO3kratesConfig

    @nn.compact
    def __call__(self, graph: jraph.GraphsTuple) -> jax.Array:
        c = self.config
        dt = c.jnp_dtype
        n_node = graph.nodes["species"].shape[0]
        paired = "pair_sign" in graph.edges
        vec, r, emask = edge_geometry(half_graph(graph) if paired else graph, dt)  # (P, 3), (P,), (P,)
        unit = vec / jnp.where(emask, r, 1.0)[:, None]
        unit = jnp.where(emask[:, None], unit, jnp.array([0.0, 0.0, 1.0], dt))  # padding: any unit vector
        irreps = e3nn.Irreps.spherical_harmonics(c.l_max)[1:]  # 1o + 2e + ... + Lp
        sh = e3nn.spherical_harmonics(irreps, unit, normalize=False, normalization="component").array  # (P, D)
        phi = CUTOFFS[c.cutoff_fn](r, c.cutoff) * emask  # 0 on padding edges
        rbf_p = RBFS[c.rbf](r, c.n_rbf, c.cutoff) * phi[:, None]  # (P, K)
        if paired:  # to both directions: φ and rbf are even, Y^l has the parity (−1)^l
            odd = jnp.asarray(degree_index(c.l_max) % 2 == 0)  # degree l = index + 1 odd
            sh = both_directions(sh) * jnp.where(odd, graph.edges["pair_sign"].astype(dt)[:, None], 1.0)
            phi = both_directions(phi)
        inv_n = 1.0 / float(c.avg_num_neighbors or 1.0)
        x = inv_n * jax.ops.segment_sum(phi[:, None] * sh, graph.receivers, num_segments=n_node)
        f = nn.Embed(119, c.features, dtype=dt, param_dtype=dt, name="Embed_0")(graph.nodes["species"])
        for t in range(c.layers):
            f, x = SO3kratesLayer(c, name=f"SO3kratesLayer_{t}")(
                f, x, rbf_p, sh, phi, graph.senders, graph.receivers, paired, n_node
            )
        h = LayerNorm(dt, name="LayerNorm_0")(f)
        if c.readout_heads:
            hidden = ACTIVATIONS[c.activation](MLP((c.features,), c.activation, dt, name="MLP_0")(h))
            return ReadoutHeads(c.readout_heads, dt, name="ReadoutHeads_0")(hidden)
        return MLP((c.features, 1), c.activation, dt, name="MLP_0")(h)[:, 0]
