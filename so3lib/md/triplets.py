"""Exact angular triplets from a jax-md Dense neighbour list, with a fixed capacity and overflow detection.

The Dense list holds K slots per centre (cutoff + skin, padding value N). A triplet is an unordered pair of slots
{a, b}, a < b, of one centre whose two neighbours both lie inside the angular cutoff (``|r| < cutoff_angular``,
as `so3lib.graph.batching.triplets_from_edges`): the same triplets as the training batches. They are compacted
(`jnp.nonzero` with a static size) into a list of ``capacity`` entries instead of all N·K(K−1)/2 slot pairs, so the
descriptors run over the real triplets only. The capacity is ``fraction`` of the slot pairs (static for a given
K; a reallocated, larger neighbour list gets a larger one); more triplets than that is an overflow, reported,
never truncated silently.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from so3lib.graph.batching import round_up


def capacity(n_atoms: int, slots: int, fraction: float) -> int:
    """Static triplet capacity: ``fraction`` of the N·K(K−1)/2 slot pairs, a multiple of 64, at least 64."""
    pairs = n_atoms * slots * (slots - 1) // 2
    return int(min(max(round_up(int(np.ceil(fraction * pairs)), 64), 64), max(pairs, 1)))


def slot_vectors(R: jax.Array, idx: jax.Array, cell: jax.Array, periodic: bool) -> jax.Array:
    """(N, K, 3) minimum-image vectors r_j − r_i of the slots (0 for padding slots), no gradient."""
    N = idx.shape[0]
    R = jax.lax.stop_gradient(R)
    Rp = jnp.concatenate([R, jnp.zeros((1, 3), R.dtype)])
    d = Rp[idx] - R[:, None, :]
    if periodic:
        cell = jnp.asarray(cell, R.dtype)
        d = d - jnp.round(d @ jnp.linalg.inv(cell)) @ cell
    return jnp.where((idx < N)[..., None], d, 0.0)


def exact_triplets(
    R: jax.Array, idx: jax.Array, cell: jax.Array, periodic: bool, cutoff_angular: float, cap: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(slot_a (C,), slot_b (C,)) flat slot indices i·K + k of the triplets, their mask (C,) and the number of
    triplets (an overflow when > C = ``cap``; then the list holds the first C)."""
    N, K = idx.shape
    d = slot_vectors(R, idx, cell, periodic)
    inside = (idx < N) & (jnp.sum(d**2, -1) < cutoff_angular**2)  # (N, K)
    a, b = np.triu_indices(K, k=1)
    ok = (inside[:, a] & inside[:, b]).reshape(-1)  # (N·K(K−1)/2,) slot pairs of every centre
    count = jnp.sum(ok)
    (sel,) = jnp.nonzero(ok, size=cap, fill_value=0)
    centre, pair = sel // len(a), sel % len(a)
    mask = jnp.arange(cap) < count
    return centre * K + jnp.asarray(a)[pair], centre * K + jnp.asarray(b)[pair], mask, count


def count_triplets(R, idx, cell, periodic: bool, cutoff_angular: float) -> jax.Array:
    """Number of exact triplets of a structure (for sizing the capacity and detecting overflow)."""
    N, K = idx.shape
    d = slot_vectors(R, idx, cell, periodic)
    n = jnp.sum((idx < N) & (jnp.sum(d**2, -1) < cutoff_angular**2), axis=1)
    return jnp.sum(n * (n - 1) // 2)


def fraction_for(count: int, n_atoms: int, slots: int, multiplier: float) -> float:
    """The capacity fraction that holds ``multiplier`` × ``count`` triplets with K = ``slots``."""
    pairs = max(n_atoms * slots * (slots - 1) // 2, 1)
    return float(min(1.0, multiplier * max(int(count), 1) / pairs))
