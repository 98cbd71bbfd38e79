"""Shared building blocks: cutoff functions, radial bases, activations, edge geometry of a graph.

All distances in Å. Padding edges have r = 0 and a mask of False; every function here returns exactly 0
for them, with finite gradients.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph

from so3lib.graph.geometry import edge_vectors, safe_norm


def cosine_cutoff(r: jnp.ndarray, cutoff: float) -> jnp.ndarray:
    """φ(r) = 0.5 [cos(π r / r_c) + 1] for r < r_c, else 0."""
    return jnp.where(r < cutoff, 0.5 * (jnp.cos(jnp.pi * r / cutoff) + 1.0), 0.0)


def polynomial_cutoff(r: jnp.ndarray, cutoff: float, p: int = 6) -> jnp.ndarray:
    """Smooth polynomial envelope (DimeNet): 1 − (p+1)(p+2)/2 x^p + p(p+2) x^(p+1) − p(p+1)/2 x^(p+2), x = r/r_c."""
    x = r / cutoff
    f = 1.0 - (p + 1) * (p + 2) / 2 * x**p + p * (p + 2) * x ** (p + 1) - p * (p + 1) / 2 * x ** (p + 2)
    return jnp.where(x < 1.0, f, 0.0)


CUTOFFS = {"cosine": cosine_cutoff, "polynomial": polynomial_cutoff}


def gaussian_rbf(r: jnp.ndarray, n: int, cutoff: float) -> jnp.ndarray:
    """(E, n) exp(−γ (r − μ_k)²), μ_k evenly spaced on [0, r_c], γ = 1 / (2 Δμ²) (SchNetPack's width)."""
    mu = jnp.linspace(0.0, cutoff, n, dtype=r.dtype)
    gamma = 0.5 / (mu[1] - mu[0]) ** 2 if n > 1 else 1.0
    return jnp.exp(-gamma * (r[:, None] - mu) ** 2)


def bessel_rbf(r: jnp.ndarray, n: int, cutoff: float) -> jnp.ndarray:
    """(E, n) √(2/r_c) sin(k π r / r_c) / r, k = 1..n (0 at r = 0, i.e. padding edges)."""
    k = jnp.arange(1, n + 1, dtype=r.dtype)
    safe_r = jnp.where(r > 0, r, 1.0)
    out = jnp.sqrt(2.0 / cutoff) * jnp.sin(k * jnp.pi * safe_r[:, None] / cutoff) / safe_r[:, None]
    return jnp.where(r[:, None] > 0, out, 0.0)


RBFS = {"gaussian": gaussian_rbf, "bessel": bessel_rbf}


def shifted_softplus(x: jnp.ndarray) -> jnp.ndarray:
    """ssp(x) = ln(0.5 eˣ + 0.5)."""
    return jax.nn.softplus(x) - jnp.log(2.0).astype(x.dtype)


ACTIVATIONS = {"ssp": shifted_softplus, "silu": jax.nn.silu, "tanh": jnp.tanh, "gelu": jax.nn.gelu}


def edge_geometry(graph: jraph.GraphsTuple, dtype=None):
    """(vectors (E, 3), distances (E,), mask (E,) bool) of the graph's edges; padding edges have r = 0."""
    vec = edge_vectors(graph)
    if dtype is not None:
        vec = vec.astype(dtype)
    mask = jraph.get_edge_padding_mask(graph)
    return vec, safe_norm(vec, mask), mask


class ReadoutHeads(nn.Module):
    """The last readout layer of a shallow ensemble, (N, H) → (N, K): e_k = w̄·h + b̄ + (δ_k − δ̄)·h + (c_k − c̄).

    The heads' mean is one Dense layer (w̄, b̄: a one-output model's last layer); the deviations δ_k, c_k are
    centred over the heads, so the mean has no gradient to them and they have none to the mean: a loss on the
    mean trains w̄ alone, the NLL of the spread trains the deviations at the optimiser's full step."""

    n_heads: int
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        dense = lambda f, name: nn.Dense(f, dtype=self.dtype, param_dtype=self.dtype, name=name)  # noqa: E731
        dev = dense(self.n_heads, "deviations")(h)
        return dense(1, "mean")(h) + dev - jnp.mean(dev, axis=-1, keepdims=True)
