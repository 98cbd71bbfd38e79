"""Graph layer: neighbour lists, padded `jraph.GraphsTuple` batches, edge geometry inside jit."""

from so3lib.graph.batching import (
    BudgetLadder,
    GraphBudget,
    GraphLoader,
    NeighbourTable,
    budget_key,
    build_batch,
    dynamic_budget,
    reverse_pair_order,
    round_up_ladder,
)
from so3lib.graph.geometry import edge_vectors, node_graph_index, safe_norm
from so3lib.graph.neighbours import neighbour_list

__all__ = [
    "BudgetLadder",
    "GraphBudget",
    "GraphLoader",
    "NeighbourTable",
    "budget_key",
    "build_batch",
    "dynamic_budget",
    "reverse_pair_order",
    "round_up_ladder",
    "edge_vectors",
    "node_graph_index",
    "safe_norm",
    "neighbour_list",
]
