"""Edge geometry inside jitted, differentiated code."""

from __future__ import annotations

import jax.numpy as jnp
import jraph


def node_graph_index(graph: jraph.GraphsTuple) -> jnp.ndarray:
    """(N,) index of the graph each node belongs to."""
    n_graph = graph.n_node.shape[0]
    return jnp.repeat(jnp.arange(n_graph), graph.n_node, total_repeat_length=graph.nodes["species"].shape[0])


def edge_graph_index(graph: jraph.GraphsTuple) -> jnp.ndarray:
    """(E,) index of the graph each edge belongs to."""
    n_graph = graph.n_node.shape[0]
    return jnp.repeat(jnp.arange(n_graph), graph.n_edge, total_repeat_length=graph.senders.shape[0])


def edge_vectors(graph: jraph.GraphsTuple) -> jnp.ndarray:
    """(E, 3) r_ij = r_j − r_i + shift · cell in Å, from ``nodes['positions']`` and ``globals['cell']``
    (so gradients flow to positions and, for stress, to the strained cell). Padding edges give 0."""
    pos = graph.nodes["positions"]
    vec = pos[graph.senders] - pos[graph.receivers]
    cell = graph.globals["cell"][edge_graph_index(graph)]  # (E, 3, 3)
    return vec + jnp.einsum("ei,eij->ej", graph.edges["shift"].astype(pos.dtype), cell)


def safe_norm(vec: jnp.ndarray, mask: jnp.ndarray | None = None, eps: float = 1e-12) -> jnp.ndarray:
    """|vec| with a finite gradient at 0 (padding edges): sqrt is evaluated at a safe value where masked."""
    r2 = jnp.sum(vec**2, axis=-1)
    ok = r2 > eps if mask is None else (mask & (r2 > eps))
    return jnp.where(ok, jnp.sqrt(jnp.where(ok, r2, 1.0)), 0.0)
