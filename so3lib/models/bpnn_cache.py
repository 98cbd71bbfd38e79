"""Precomputed BPNN descriptors for training (as n2p2 and ænet do): computed once per structure, reused.

The descriptors of centre i depend only on the vectors r_e of the edges e whose receiver is i, so the Jacobian
is block-sparse: J_e = ∂G_{recv(e)}/∂r_e (E, D, 3), from forward-mode derivatives of each edge's radial terms and
each triplet's angular terms. A training batch then carries G⁰ (N, D), J (E, D, 3)
and the reference edge vectors r⁰ (E, 3), and the model evaluates the first-order expansion

    G_i(r) = G⁰_i + Σ_{e: recv(e)=i} J_e · (r_e − r⁰_e),

which at the data geometry (r = r⁰) has exactly the value G⁰ and the exact first derivatives in positions and
cell: energy, forces = −∂E/∂r and stress equal those of the direct path, while a step runs only the element
networks and the (E, D, 3) contraction, no triplets. (Second position derivatives of G are not kept: Hessians
need the direct path.)
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import jraph
import numpy as np

from so3lib.graph.geometry import edge_vectors, safe_norm
from so3lib.models.bpnn import (
    ANGULAR,
    CACHED_G,
    CACHED_JACOBIAN,
    CACHED_VECTORS,
    RADIAL,
    BPNNConfig,
    _angular_values,
    _pair_index,
    _params,
    _radial_values,
    descriptors,
    species_lookup,
)
from so3lib.models.common import cosine_cutoff

log = logging.getLogger(__name__)
MAX_CACHE_BYTES = 4 * 2**30  # above this the descriptors are recomputed in every step instead (logged)


def cached_descriptors(graph: jraph.GraphsTuple) -> jax.Array:
    """(N, D) G⁰ + Σ_e J_e·(r_e − r⁰_e) from a batch carrying the cache (padding edges have J = 0)."""
    dr = edge_vectors(graph) - graph.edges[CACHED_VECTORS]
    g0 = graph.nodes[CACHED_G]
    lin = jnp.einsum("edc,ec->ed", graph.edges[CACHED_JACOBIAN], dr.astype(g0.dtype))
    return g0 + jax.ops.segment_sum(lin, graph.receivers, num_segments=g0.shape[0])


def descriptors_and_jacobian(cfg: BPNNConfig, graph: jraph.GraphsTuple) -> tuple[jax.Array, jax.Array, jax.Array]:
    """G (N, D) (by `descriptors`), J (E, D, 3) = ∂G_{recv(e)}/∂r_e and r (E, 3) of a batch with triplets.

    J by forward mode per edge (radial terms, 3 tangents) and per triplet (angular terms, 6 tangents: its two
    edge vectors), scattered onto the edges: the radial block of edge e sits in the columns of its sender's
    element, the angular block of triplet (e1, e2) in those of its element pair, added to e1's and e2's rows."""
    dt = cfg.jnp_dtype
    S, E = len(cfg.species), graph.senders.shape[0]
    sidx = jnp.asarray(species_lookup(cfg.species))[graph.nodes["species"]]
    vec = edge_vectors(graph).astype(dt)
    G = descriptors(cfg, graph, vec)
    emask = jraph.get_edge_padding_mask(graph)
    blocks = []
    rad, p = _params(cfg.symmetry_functions, RADIAL, dt)
    if rad:

        def radial(v, m):  # one edge: (n_rad,)
            r = safe_norm(v[None], m[None])
            return _radial_values(p, r, cosine_cutoff(r, cfg.cutoff) * m)[0]

        d = jax.vmap(jax.jacfwd(radial))(vec, emask)  # (E, n_rad, 3)
        J = jnp.zeros((E, S, len(rad), 3), dt).at[jnp.arange(E), sidx[graph.senders]].set(d)
        blocks.append(J.reshape(E, S * len(rad), 3))
    ang, p = _params(cfg.symmetry_functions, ANGULAR, dt)
    if ang:
        rca = cfg.cutoff_angular or cfg.cutoff
        e1, e2 = graph.globals["triplets"][:, 0], graph.globals["triplets"][:, 1]
        tmask = graph.globals["triplet_mask"]

        def angular(v1, v2, m):  # one triplet: (n_ang,)
            r1, r2 = safe_norm(v1[None], m[None]), safe_norm(v2[None], m[None])
            return _angular_values(p, v1[None], v2[None], r1, r2, m[None], rca)[0]

        d1, d2 = jax.vmap(jax.jacfwd(angular, argnums=(0, 1)))(vec[e1], vec[e2], tmask)  # (T, n_ang, 3) each
        P = S * (S + 1) // 2
        pair = _pair_index(S, sidx[graph.senders[e1]], sidx[graph.senders[e2]])
        J = jax.ops.segment_sum(d1, e1 * P + pair, num_segments=E * P) + jax.ops.segment_sum(
            d2, e2 * P + pair, num_segments=E * P
        )
        blocks.append(J.reshape(E, P * len(ang), 3))
    return G, jnp.concatenate(blocks, axis=1), vec


@dataclasses.dataclass
class DescriptorCache:
    """Per-frame packed G (ΣN, D), J (ΣE, D, 3), r⁰ (ΣE, 3), aligned with ``table`` (a `NeighbourTable` without
    triplets: batches built from it carry the cache instead)."""

    table: object
    G: np.ndarray
    J: np.ndarray
    vectors: np.ndarray

    @staticmethod
    def nbytes_estimate(cfg: BPNNConfig, n_atoms: int, n_edges: int, itemsize: int) -> int:
        D = cfg.n_descriptors()
        return int(itemsize * (n_atoms * D + n_edges * (3 * D + 3)))

    @staticmethod
    def build(cfg: BPNNConfig, dataset, table, dtype=np.float32, triplets_per_batch: int = 1_000_000):
        """Compute the cache of every frame of ``dataset`` with ``table`` (which must hold the triplets)."""
        from tqdm.auto import tqdm

        from so3lib.graph.batching import GraphLoader

        if table.triplets is None and cfg.triplet_cutoff is not None:
            raise ValueError("the descriptor cache needs a neighbour table with triplets (triplet_cutoff)")
        per_frame = float(np.mean(table.n_triplets)) if table.triplets is not None else 0.0
        bs = int(max(1, min(64, triplets_per_batch // max(per_frame, 1.0))))
        loader = GraphLoader(dataset, table.cutoff, bs, shuffle=False, table=table, dtype=dtype, device_put=False)
        c = cfg.replace(dtype="float64" if dtype == np.float64 else "float32")
        fn = jax.jit(lambda g: descriptors_and_jacobian(c, g))
        n_at, n_ed = dataset.n_atoms, table.n_edges
        D = cfg.n_descriptors()
        G = np.zeros((int(n_at.sum()), D), dtype)
        J = np.zeros((int(n_ed.sum()), D, 3), dtype)
        V = np.zeros((int(n_ed.sum()), 3), dtype)
        a0 = e0 = 0
        batches = tqdm(loader.epoch(0), total=len(loader), desc="BPNN descriptors + derivatives", leave=False)
        for k, g in enumerate(batches):  # unshuffled: batch k holds frames k·bs … (k+1)·bs − 1, real rows first
            gi, ji, vi = (np.asarray(x) for x in fn(g))
            frames = slice(k * bs, (k + 1) * bs)
            n, e = int(n_at[frames].sum()), int(n_ed[frames].sum())
            G[a0 : a0 + n], J[e0 : e0 + e], V[e0 : e0 + e] = gi[:n], ji[:e], vi[:e]
            a0, e0 = a0 + n, e0 + e
        if a0 != len(G) or e0 != len(J):
            raise RuntimeError(f"descriptor cache: filled {a0}/{len(G)} atoms and {e0}/{len(J)} edges")
        light = dataclasses.replace(table, triplets=None, triplet_offsets=None, triplet_cutoff=None)
        return DescriptorCache(light, G, J, V)


def cache_for(cfg, dataset, table, dtype, max_bytes: int = MAX_CACHE_BYTES) -> DescriptorCache | None:
    """The cache for a BPNN model with ``precompute_descriptors`` on an in-memory dataset; None (logged) when
    the model is not a BPNN, the option is off, or the cache would exceed ``max_bytes``."""
    if not isinstance(cfg, BPNNConfig) or not cfg.precompute_descriptors:
        return None
    need = DescriptorCache.nbytes_estimate(
        cfg, int(dataset.n_atoms.sum()), int(table.n_edges.sum()), np.dtype(dtype).itemsize
    )
    if need > max_bytes:
        log.warning(
            "BPNN descriptor cache would need %.1f GiB (> %.1f GiB): descriptors are recomputed in every step",
            need / 2**30,
            max_bytes / 2**30,
        )
        return None
    log.info("BPNN: descriptors and their derivatives computed once (%.0f MiB) and reused", need / 2**20)
    return DescriptorCache.build(cfg, dataset, table, dtype)
