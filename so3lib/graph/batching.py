"""Graphs and padded batches.

A batch is a `jraph.GraphsTuple` (numpy on the host, moved to the device by the loader):
  nodes   = {positions (N, 3) Å, species (N,) int32 atomic numbers (0 = padding), forces (N, 3) eV/Å}
  edges   = {shift (E, 3) float: integer cell shifts, so r_ij = r_j − r_i + shift · cell,
             [pair_sign (E,) +1/−1: present when the edges come in reverse pairs, edge 2k + 1 being edge 2k
             reversed (i → j with −S, so r_{2k+1} = −r_{2k}): +1 on the first and −1 on the second of each pair]}
  globals = {[triplets (T, 2) edge-index pairs, triplet_mask (T,) for angular descriptors,]
             energy (G,) eV, energy_residual (G,) eV (energy − per-element reference), stress (G, 3, 3) eV/Å³,
             cell (G, 3, 3) Å, pbc (G, 3),
             has_energy, has_forces, has_stress (G,) 0/1 label masks}
  senders / receivers (E,) int32, n_node (G,), n_edge (G,).
Batches are padded to a small ladder of static budgets (the `jraph.pad_with_graphs` convention: all padding
nodes and edges in the first padding graph, any further padding graphs empty, padding edges attached to the
first padding node, so jraph's padding masks apply), so `jit` compiles once per budget.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence

import jraph
import numpy as np

from so3lib.data.dataset import Dataset, _ranges
from so3lib.graph.neighbours import neighbour_list

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GraphBudget:
    """Static padded sizes: n_node and n_edge include padding; n_graph includes the padding graph."""

    n_node: int
    n_edge: int
    n_graph: int
    n_triplet: int = 0

    def fits(self, n_node: int, n_edge: int, n_graph: int, n_triplet: int = 0) -> bool:
        return n_node < self.n_node and n_edge <= self.n_edge and n_graph < self.n_graph and n_triplet <= self.n_triplet


def round_up(x: int, quantum: int) -> int:
    return int(quantum * math.ceil(max(x, 1) / quantum))


def round_up_ladder(x: int, quantum: int = 8, steps_per_octave: int = 2) -> int:
    """Round x up to the next value of a geometric ladder (2^(k/steps_per_octave)·quantum, multiples of
    quantum): at most ~41 % padding, and only a handful of distinct sizes over many orders of magnitude."""
    x = max(int(x), 1)
    k = math.ceil(steps_per_octave * math.log2(max(x / quantum, 1.0)) - 1e-9)
    return round_up(int(math.ceil(quantum * 2 ** (k / steps_per_octave))), quantum)


@dataclasses.dataclass(frozen=True)
class BudgetLadder:
    """A few (n_node, n_edge) rungs for batches of up to ``batch_size`` graphs. `select` picks the smallest."""

    rungs: tuple[GraphBudget, ...]

    @staticmethod
    def from_counts(
        n_atoms: np.ndarray,
        n_edges: np.ndarray,
        batch_size: int,
        max_rungs: int = 4,
        n_triplets: np.ndarray | None = None,
    ) -> BudgetLadder:
        """Rungs from dataset statistics: the top rung holds the ``batch_size`` largest structures (so every
        batch fits); lower rungs are geometric down to ~5 % above a typical batch."""
        b = min(batch_size, len(n_atoms))
        worst_n = int(np.sort(n_atoms)[-b:].sum()) + 1
        worst_e = int(np.sort(n_edges)[-b:].sum())
        typ_n = b * float(np.mean(n_atoms)) * 1.05 + 1
        typ_e = b * float(np.mean(n_edges)) * 1.05
        k = 1 if worst_n <= typ_n * 1.1 and worst_e <= typ_e * 1.1 else max_rungs
        fr = np.linspace(0.0, 1.0, k) if k > 1 else np.ones(1)
        rungs = []
        for f in fr:
            nn = round_up(int(typ_n * (worst_n / typ_n) ** f) if k > 1 else worst_n, 8)
            ne = round_up(int(max(typ_e, 1) * (max(worst_e, 1) / max(typ_e, 1)) ** f) if k > 1 else worst_e, 64)
            rungs.append(
                GraphBudget(max(nn, worst_n if f == 1 else 0), max(ne, worst_e if f == 1 else 0), batch_size + 1)
            )
        if n_triplets is not None:  # the triplet budget grows along the same rungs as the edges
            worst_t = int(np.sort(n_triplets)[-b:].sum())
            typ_t = b * float(np.mean(n_triplets)) * 1.05
            rungs = [
                dataclasses.replace(
                    r,
                    n_triplet=round_up(
                        int(max(typ_t, 1) * (max(worst_t, 1) / max(typ_t, 1)) ** f) if k > 1 else worst_t, 64
                    ),
                )
                for r, f in zip(rungs, fr)
            ]
            rungs[-1] = dataclasses.replace(rungs[-1], n_triplet=max(rungs[-1].n_triplet, round_up(worst_t, 64)))
        uniq = sorted(set(rungs), key=lambda r: (r.n_node, r.n_edge, r.n_triplet))
        return BudgetLadder(tuple(uniq))

    def select(self, n_node: int, n_edge: int, n_graph: int, n_triplet: int = 0) -> GraphBudget:
        for r in self.rungs:
            if r.fits(n_node, n_edge, n_graph, n_triplet):
                return r
        raise ValueError(
            f"batch of {n_graph} graphs, {n_node} nodes, {n_edge} edges, {n_triplet} triplets exceeds "
            f"the largest padding budget {self.rungs[-1]}: rebuild the ladder for this data (never "
            "truncated)"
        )


def dynamic_budget(n_node: int, n_edge: int, n_graph: int, n_triplet: int = 0) -> GraphBudget:
    """Budget for ad-hoc inputs (calculator, MD): geometric ladder, so repeated calls reuse compilations."""
    return GraphBudget(
        round_up_ladder(n_node + 1, 8),
        round_up_ladder(max(n_edge, 1), 64),
        round_up_ladder(n_graph + 1, 2, 1),
        round_up_ladder(n_triplet, 64) if n_triplet else 0,
    )


def triplets_from_edges(receivers: np.ndarray, distances: np.ndarray, cutoff: float) -> np.ndarray:
    """(T, 2) pairs of edge indices (e1, e2), e1 < e2, sharing a centre atom, both shorter than ``cutoff``.
    Convention: each unordered neighbour pair {j, k} of centre i is counted once (as n2p2 does)."""
    keep = np.nonzero(distances < cutoff)[0]
    if len(keep) < 2:
        return np.zeros((0, 2), np.int32)
    order = keep[np.argsort(receivers[keep], kind="stable")]
    centres, starts, counts = np.unique(receivers[order], return_index=True, return_counts=True)
    out = []
    for st, c in zip(starts, counts):
        if c < 2:
            continue
        a, b = np.triu_indices(c, k=1)
        e = order[st : st + c]
        out.append(np.stack([e[a], e[b]], axis=1))
    return np.concatenate(out).astype(np.int32) if out else np.zeros((0, 2), np.int32)


def reverse_pair_order(senders: np.ndarray, receivers: np.ndarray, shifts: np.ndarray) -> np.ndarray | None:
    """Permutation of one frame's full neighbour list putting every edge j → i (cell shift S) right before its
    reverse i → j (−S): in the reordered list edges 2k and 2k + 1 are one unordered pair, with the same distance
    and opposite vectors. None when some edge has no single reverse partner (a half or truncated list)."""
    n = len(senders)
    if n % 2:
        return None
    s, r, sh = senders.astype(np.int64), receivers.astype(np.int64), shifts.astype(np.int64)
    lex = np.sign(sh[:, 0]) * 4 + np.sign(sh[:, 1]) * 2 + np.sign(sh[:, 2])  # > 0 iff S is lexicographically > 0
    forward = (s < r) | ((s == r) & (lex > 0))
    key_sh = np.where(forward[:, None], sh, -sh)
    keys = np.stack([np.minimum(s, r), np.maximum(s, r), key_sh[:, 0], key_sh[:, 1], key_sh[:, 2]], axis=1)
    order = np.lexsort((~forward, *keys.T[::-1]))  # by pair key, the forward edge first
    k, f = keys[order], forward[order]
    if not (np.all(k[0::2] == k[1::2]) and f[0::2].all() and not f[1::2].any()):
        return None
    return order


@dataclasses.dataclass
class NeighbourTable:
    """Neighbour lists of all frames of a dataset, packed: local senders/receivers (E,), shifts (E, 3),
    offsets (F+1,) into the edge arrays; with ``triplet_cutoff``, also triplets (T, 2) of frame-local edge
    indices and their offsets (F+1,). ``paired``: every frame's edges are in reverse pairs (`reverse_pair_order`;
    True for the symmetric lists `neighbour_list` returns)."""

    cutoff: float
    senders: np.ndarray
    receivers: np.ndarray
    shifts: np.ndarray
    offsets: np.ndarray
    triplets: np.ndarray | None = None
    triplet_offsets: np.ndarray | None = None
    triplet_cutoff: float | None = None
    paired: bool = False

    @property
    def n_edges(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def n_triplets(self) -> np.ndarray | None:
        return None if self.triplet_offsets is None else np.diff(self.triplet_offsets)

    @staticmethod
    def build(
        dataset: Dataset, cutoff: float, progress: bool = False, triplet_cutoff: float | None = None
    ) -> NeighbourTable:
        from tqdm.auto import tqdm

        s_all, r_all, sh_all, counts = [], [], [], np.zeros(len(dataset), np.int64)
        paired = True
        t_all, t_counts = [], np.zeros(len(dataset), np.int64)
        it = range(len(dataset))
        for f in tqdm(it, desc=f"neighbour lists (cutoff {cutoff} Å)", disable=not progress, leave=False):
            a, b = dataset.offsets[f], dataset.offsets[f + 1]
            s, r, sh, d = neighbour_list(
                dataset.positions[a:b], dataset.cell[f], dataset.pbc[f], cutoff, return_distances=True
            )
            order = reverse_pair_order(s, r, sh)
            if order is None:
                paired = False
            else:
                s, r, sh, d = s[order], r[order], sh[order], d[order]
            s_all.append(s)
            r_all.append(r)
            sh_all.append(sh)
            counts[f] = len(s)
            if triplet_cutoff is not None:
                t = triplets_from_edges(r, d, triplet_cutoff)
                t_all.append(t)
                t_counts[f] = len(t)
        tri = (
            (np.concatenate(t_all).reshape(-1, 2), np.concatenate([[0], np.cumsum(t_counts)]))
            if triplet_cutoff is not None
            else (None, None)
        )
        return NeighbourTable(
            cutoff,
            np.concatenate(s_all),
            np.concatenate(r_all),
            np.concatenate(sh_all).reshape(-1, 3),
            np.concatenate([[0], np.cumsum(counts)]),
            tri[0],
            tri[1],
            triplet_cutoff,
            paired,
        )


def build_batch(
    dataset: Dataset,
    table: NeighbourTable,
    frames: Sequence[int],
    budget: GraphBudget | None = None,
    dtype=np.float32,
    energy_offset: np.ndarray | None = None,
    descriptor_cache=None,
) -> jraph.GraphsTuple:
    """Padded GraphsTuple of the given frames (numpy). With ``budget=None`` a `dynamic_budget` is used.
    ``energy_offset`` (F,) eV per dataset frame (the per-element reference): ``globals['energy_residual']`` =
    energy − offset is computed here in float64, so float32 batches keep meV precision. ``descriptor_cache``
    (a `so3lib.models.bpnn_cache.DescriptorCache` aligned with ``table``): its rows of the frames are added
    (nodes 'bpnn_descriptors', edges 'bpnn_jacobian' and 'bpnn_vectors'; zero on padding)."""
    frames = np.asarray(frames, np.int64)
    n_node = dataset.n_atoms[frames]
    n_edge = table.n_edges[frames]
    N, E, G = int(n_node.sum()), int(n_edge.sum()), len(frames)
    with_triplets = table.triplets is not None
    n_trip = table.n_triplets[frames] if with_triplets else None
    T = int(n_trip.sum()) if with_triplets else 0
    budget = budget or dynamic_budget(N, E, G, T)
    if not budget.fits(N, E, G, T):
        raise ValueError(
            f"{G} graphs / {N} nodes / {E} edges / {T} triplets do not fit the budget {budget} "
            "(overflow: nothing is dropped, use a larger budget)"
        )
    atom_idx = _ranges(dataset.offsets[frames], n_node)
    edge_idx = _ranges(table.offsets[frames], n_edge)
    node_base = np.repeat(np.concatenate([[0], np.cumsum(n_node)[:-1]]), n_edge)
    pn, pe, pg = budget.n_node, budget.n_edge, budget.n_graph
    positions = np.zeros((pn, 3), dtype)
    positions[:N] = dataset.positions[atom_idx]
    species = np.zeros(pn, np.int32)
    species[:N] = dataset.numbers[atom_idx]
    forces = np.zeros((pn, 3), dtype)
    has_forces = np.zeros(pg, dtype)
    if dataset.forces is not None:
        f = dataset.forces[atom_idx]
        ok = np.isfinite(f).all(axis=1)
        forces[:N] = np.where(ok[:, None], f, 0.0)
        has_forces[:G] = np.minimum.reduceat(ok, np.concatenate([[0], np.cumsum(n_node)[:-1]])) if G else 0
    senders = np.full(pe, N, np.int32)
    receivers = np.full(pe, N, np.int32)
    senders[:E] = table.senders[edge_idx] + node_base
    receivers[:E] = table.receivers[edge_idx] + node_base
    shift = np.zeros((pe, 3), dtype)
    shift[:E] = table.shifts[edge_idx]
    edges = {"shift": shift}
    if table.paired and pe % 2 == 0:  # frames' pairs stay aligned (even counts); padding edges pair up too
        edges["pair_sign"] = np.tile(np.array([1, -1], dtype), pe // 2)
    energy = np.zeros(pg, dtype)
    e = dataset.energy[frames]
    energy[:G] = np.nan_to_num(e)
    residual = np.zeros(pg, dtype)
    residual[:G] = np.nan_to_num(e - (energy_offset[frames] if energy_offset is not None else 0.0))
    has_energy = np.zeros(pg, dtype)
    has_energy[:G] = np.isfinite(e)
    stress = np.zeros((pg, 3, 3), dtype)
    has_stress = np.zeros(pg, dtype)
    if dataset.stress is not None:
        s = dataset.stress[frames]
        ok = np.isfinite(s).all(axis=(1, 2)) & dataset.pbc[frames].all(axis=1)  # stress only where a cell exists
        stress[:G] = np.where(ok[:, None, None], s, 0.0)
        has_stress[:G] = ok
    cell = np.zeros((pg, 3, 3), dtype)
    cell[:G] = dataset.cell[frames]
    pbc = np.zeros((pg, 3), bool)
    pbc[:G] = dataset.pbc[frames]
    n_node_p = np.zeros(pg, np.int32)
    n_node_p[:G] = n_node
    n_node_p[G] = pn - N  # jraph convention: all padding in the first padding graph, later ones empty
    n_edge_p = np.zeros(pg, np.int32)
    n_edge_p[:G] = n_edge
    n_edge_p[G] = pe - E
    glob = {
        "energy": energy,
        "energy_residual": residual,
        "stress": stress,
        "cell": cell,
        "pbc": pbc,
        "has_energy": has_energy,
        "has_forces": has_forces,
        "has_stress": has_stress,
    }
    if with_triplets:  # (T, 2) batch edge indices; padding triplets point at edge 0 and are masked
        trip = np.zeros((budget.n_triplet, 2), np.int32)
        edge_base = np.repeat(np.concatenate([[0], np.cumsum(n_edge)[:-1]]), n_trip)
        trip[:T] = table.triplets[_ranges(table.triplet_offsets[frames], n_trip)] + edge_base[:, None]
        tmask = np.zeros(budget.n_triplet, bool)
        tmask[:T] = True
        glob["triplets"], glob["triplet_mask"] = trip, tmask
    nodes = {"positions": positions, "species": species, "forces": forces}
    if descriptor_cache is not None:
        from so3lib.models.bpnn import CACHED_G, CACHED_JACOBIAN, CACHED_VECTORS

        c = descriptor_cache
        nodes[CACHED_G] = np.zeros((pn, c.G.shape[1]), c.G.dtype)
        nodes[CACHED_G][:N] = c.G[atom_idx]
        edges[CACHED_JACOBIAN] = np.zeros((pe, *c.J.shape[1:]), c.J.dtype)
        edges[CACHED_JACOBIAN][:E] = c.J[edge_idx]
        edges[CACHED_VECTORS] = np.zeros((pe, 3), c.vectors.dtype)
        edges[CACHED_VECTORS][:E] = c.vectors[edge_idx]
    return jraph.GraphsTuple(
        nodes=nodes,
        edges=edges,
        senders=senders,
        receivers=receivers,
        n_node=n_node_p,
        n_edge=n_edge_p,
        globals=glob,
    )


def budget_key(graph: jraph.GraphsTuple) -> tuple[int, ...]:
    """(graphs, nodes, edges[, triplets]) of a padded batch (per shard; stacked batches lead with the number
    of shards): one compilation per distinct key."""
    lead = tuple(graph.senders.shape[:-1])
    key = lead + (int(graph.n_node.shape[-1]), int(graph.nodes["positions"].shape[-2]), int(graph.senders.shape[-1]))
    if "triplets" in graph.globals:
        key += (int(graph.globals["triplets"].shape[-2]),)
    return key


@dataclasses.dataclass(frozen=True)
class FrameEstimate:
    """Edges and triplets of a frame estimated from its atom count N alone: ⌈r_E·N⌉ and ⌈r_T·N⌉, bounded by
    the atom pairs N(N−1) and triples N(N−1)(N−2)/2 for free molecules. The ratios r are per-atom counts of a
    sample; a frame's estimate needs nothing but N, so no per-frame array of a whole store is kept."""

    edges_per_atom: float
    triplets_per_atom: float | None
    periodic: bool

    def __call__(self, n_atoms: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(edges, triplets or None) of frames with ``n_atoms`` atoms."""
        n = np.asarray(n_atoms, np.int64)

        def estimate(ratio, cap):
            est = np.ceil(ratio * n).astype(np.int64)
            return est if self.periodic else np.minimum(est, cap)  # free molecules: bounded by the atom pairs

        n_trip = None
        if self.triplets_per_atom is not None:
            n_trip = estimate(self.triplets_per_atom, n * (n - 1) * (n - 2) // 2)
        return estimate(self.edges_per_atom, n * (n - 1)), n_trip


def frame_estimator(
    view, cutoff: float, triplet_cutoff: float | None = None, sample_size: int = 1000, seed: int = 0, quantile=0.99
) -> FrameEstimate:
    """The `FrameEstimate` of a streamed dataset: neighbour and triplet counts per atom measured on a sample of
    frames, their ``quantile`` + 5 %. Deterministic for a (view, seed)."""
    sample = view.sample(sample_size, seed)
    t = NeighbourTable.build(sample, cutoff, triplet_cutoff=triplet_cutoff)

    def ratio(counts):
        return float(np.quantile(counts / sample.n_atoms, quantile)) * 1.05

    return FrameEstimate(
        ratio(t.n_edges),
        ratio(t.n_triplets) if triplet_cutoff is not None else None,
        bool(np.asarray(sample.pbc).any()),
    )


def frame_estimates(
    view, cutoff: float, triplet_cutoff: float | None = None, sample_size: int = 1000, seed: int = 0, quantile=0.99
) -> tuple[np.ndarray, np.ndarray | None]:
    """(edges, triplets or None) per frame of a streamed dataset, estimated without reading the frames
    (`frame_estimator` applied to every frame's atom count)."""
    return frame_estimator(view, cutoff, triplet_cutoff, sample_size, seed, quantile)(view.n_atoms)


def ladder_from_sample(
    view, cutoff: float, batch_size: int, triplet_cutoff: float | None = None, sample_size: int = 1000, seed: int = 0
) -> BudgetLadder:
    """Padding ladder for a streamed dataset (a store's `DatasetView`): neighbour and triplet counts per atom
    are measured on a sample of frames and extrapolated (99th percentile + 5 %) to every frame from its atom
    count, which is known without reading the frame. A batch that still overflows gets a new rung, logged."""
    n_edge, n_trip = frame_estimates(view, cutoff, triplet_cutoff, sample_size, seed)
    return BudgetLadder.from_counts(np.asarray(view.n_atoms, np.int64), n_edge, batch_size, n_triplets=n_trip)


class GraphLoader:
    """Batches of a dataset as padded GraphsTuples, shuffled with (seed, epoch), built ahead of the consumer
    by host threads and placed on the device. The order depends only on (seed, epoch), so a run can resume
    mid-epoch exactly (``start_batch``).

    Two sources: an in-memory `Dataset` (neighbour lists computed once, up front) or a memory-mapped store's
    `DatasetView` (streaming: each batch's frames are read from disk and their neighbour lists built in the
    worker threads, so memory does not grow with the dataset). With ``n_shards`` > 1 (data parallelism) every
    batch is split into ``n_shards`` equal sub-batches padded to one budget and stacked on a leading axis
    (n_shards, ...), then placed with ``sharding`` (a `jax.sharding.NamedSharding` over the mesh's data axis).
    ``energy_offset``: the reference energy of every frame (eV), an (F,) array or, for a streamed dataset, a
    function of frame indices computing it per batch (so nothing per frame of the store is kept)."""

    def __init__(
        self,
        dataset,
        cutoff: float,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        ladder: BudgetLadder | None = None,
        prefetch: int = 4,
        dtype=np.float32,
        progress: bool = False,
        table: NeighbourTable | None = None,
        device_put: bool = True,
        sharding=None,
        energy_offset: np.ndarray | Callable[[np.ndarray], np.ndarray] | None = None,
        triplet_cutoff: float | None = None,
        n_shards: int = 1,
        workers: int | None = None,
        descriptor_cache=None,
    ):
        if len(dataset) == 0:
            raise ValueError("empty dataset")
        if n_shards < 1 or batch_size % n_shards:
            raise ValueError(f"batch size {batch_size} must be a multiple of the {n_shards} data-parallel shards")
        self.dataset, self.batch_size, self.shuffle, self.seed = dataset, int(batch_size), shuffle, seed
        self.cutoff, self.triplet_cutoff, self.n_shards = cutoff, triplet_cutoff, n_shards
        self.streaming = not isinstance(dataset, Dataset)
        self.descriptor_cache = descriptor_cache
        if descriptor_cache is not None:  # the cache replaces the triplets: batches from its triplet-free table
            if self.streaming:
                raise ValueError("a descriptor cache needs an in-memory dataset, not a streamed store")
            table, self.triplet_cutoff = descriptor_cache.table, None
        shard_size = self.batch_size // n_shards
        if self.streaming:
            self.table = None
            self.ladder = ladder or ladder_from_sample(dataset, cutoff, shard_size, triplet_cutoff)
        else:
            self.table = (
                table
                if table is not None
                else NeighbourTable.build(dataset, cutoff, progress=progress, triplet_cutoff=triplet_cutoff)
            )
            self.ladder = ladder or BudgetLadder.from_counts(
                dataset.n_atoms, self.table.n_edges, shard_size, n_triplets=self.table.n_triplets
            )
        self.prefetch, self.dtype, self.device_put, self.sharding = prefetch, dtype, device_put, sharding
        self.workers = workers or (min(4, os.cpu_count() or 1) if self.streaming else 2)
        self.shapes_seen: set[tuple[int, int, int]] = set()
        self.wait_s = 0.0  # time the consumer waited for a batch, the first batch of each epoch() call excluded
        self.energy_offset = energy_offset
        self.local_shards = list(range(n_shards))
        self.agreed_sizes = False  # several processes: every process derives the padding from every shard
        self.global_estimate: FrameEstimate | None = None  # ... of a streamed dataset: from the atom counts
        if n_shards > 1 and sharding is not None:  # several processes: this one builds only its devices' shards
            import jax

            if jax.process_count() > 1:
                me = jax.process_index()
                self.local_shards = [i for i, d in enumerate(sharding.mesh.devices.flat) if d.process_index == me]
                self.agreed_sizes = True
                if self.streaming:
                    self._add_global_rung(shard_size)

    def _add_global_rung(self, shard_size: int) -> None:
        """A streamed dataset in several processes: the atoms of every frame are known to every process, its
        edges and triplets are estimated from them with the largest per-atom counts of a sample (+ 5 %), so
        all processes pick the same padding; the ladder gets a rung that holds the largest such batch."""
        self.global_estimate = frame_estimator(self.dataset, self.cutoff, self.triplet_cutoff, quantile=1.0)
        n_atoms = self.dataset.n_atoms
        n_edge, n_trip = self.global_estimate(n_atoms)
        top = BudgetLadder.from_counts(n_atoms, n_edge, shard_size, n_triplets=n_trip).rungs[-1]
        if not any(r.n_edge >= top.n_edge and r.n_node >= top.n_node for r in self.ladder.rungs):
            self.ladder = BudgetLadder(self.ladder.rungs + (top,))

    def _global_sizes(self, frames: np.ndarray) -> tuple[int, int, int]:
        """(atoms, edges, triplets) of a sub-batch that every process knows without reading other processes'
        frames: exact for an in-memory dataset; for a streamed one the atoms are exact, the edges and triplets
        `global_estimate`'s (read per batch: nothing per frame of the whole dataset is kept)."""
        if not self.streaming:
            n_trip = self.table.n_triplets
            return (
                int(np.sum(self.dataset.offsets[frames + 1] - self.dataset.offsets[frames])),
                int(self.table.n_edges[frames].sum()),
                int(n_trip[frames].sum()) if n_trip is not None else 0,
            )
        n_atoms = self.dataset.subset(frames).n_atoms
        n_edge, n_trip = self.global_estimate(n_atoms)
        return int(n_atoms.sum()), int(n_edge.sum()), int(n_trip.sum()) if n_trip is not None else 0

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.dataset))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))

    def _prepare(self, frames: np.ndarray):
        """(dataset, table, frames in it, energy offsets indexed by those frames) for one (sub-)batch."""
        if not self.streaming:
            return self.dataset, self.table, frames, self.energy_offset
        if len(frames) == 0:
            return None
        ds = self.dataset.materialize(frames)
        table = NeighbourTable.build(ds, self.cutoff, triplet_cutoff=self.triplet_cutoff)
        off = self.energy_offset
        if off is not None:
            off = off(frames) if callable(off) else off[frames]
        return ds, table, np.arange(len(frames)), off

    def _select(self, n_node: int, n_edge: int, n_graph: int, n_trip: int) -> GraphBudget:
        try:
            return self.ladder.select(n_node, n_edge, n_graph, n_trip)
        except ValueError:
            if not self.streaming:
                raise
            top = self.ladder.rungs[-1]
            rung = GraphBudget(
                max(top.n_node, round_up(int(1.25 * n_node) + 1, 8)),
                max(top.n_edge, round_up(int(1.25 * n_edge), 64)),
                top.n_graph,
                max(top.n_triplet, round_up(int(1.25 * n_trip), 64)) if n_trip else top.n_triplet,
            )
            self.ladder = BudgetLadder(self.ladder.rungs + (rung,))
            log.warning(
                "a batch (%d nodes, %d edges, %d triplets) exceeds the padding ladder estimated from a sample: "
                "added the rung %s (one more compilation; nothing dropped)",
                n_node,
                n_edge,
                n_trip,
                rung,
            )
            return rung

    def _make(self, frames: np.ndarray):
        parts = np.array_split(frames, self.n_shards) if self.n_shards > 1 else [frames]
        agreed = None
        if self.agreed_sizes:  # the budget every process computes alike, from every shard
            sizes = [self._global_sizes(p) for p in parts]
            agreed = np.array([[n_at, n_ed, len(p), n_tr] for (n_at, n_ed, n_tr), p in zip(sizes, parts)]).max(axis=0)
        parts = [parts[i] for i in self.local_shards]
        prepared = [self._prepare(p) for p in parts]
        filler = next(x for x in prepared if x is not None)
        prepared = [x if x is not None else (filler[0], filler[1], np.zeros(0, np.int64), filler[3]) for x in prepared]
        sizes = np.array(
            [
                [
                    int(ds.n_atoms[f].sum()),
                    int(tab.n_edges[f].sum()),
                    len(f),
                    int(tab.n_triplets[f].sum()) if tab.triplets is not None else 0,
                ]
                for ds, tab, f, _ in prepared
            ]
        )
        if agreed is None:
            budget = self._select(*[int(x) for x in sizes.max(axis=0)])
        else:
            budget = self.ladder.select(*[int(x) for x in agreed])
            local = sizes.max(axis=0)
            if not budget.fits(*[int(x) for x in local]):
                raise ValueError(
                    f"a sub-batch of this process ({local[2]} graphs, {local[0]} atoms, {local[1]} edges, {local[3]} "
                    f"triplets) exceeds the padding budget {budget} that all processes derived from a sample of "
                    "the data: a multi-process run cannot add a padding rung on one process alone; train with a "
                    "larger batch per device (the estimate is a sum over its frames) or report the data"
                )
        graphs = [
            build_batch(ds, tab, f, budget, self.dtype, off, self.descriptor_cache) for ds, tab, f, off in prepared
        ]
        g = graphs[0] if self.n_shards == 1 else jax_tree_stack(graphs)
        if self.device_put:
            import jax

            if self.n_shards > 1 and self.sharding is not None:
                g = jax.tree_util.tree_map(
                    lambda x: jax.make_array_from_process_local_data(self.sharding, x, (self.n_shards, *x.shape[1:])), g
                )
            else:
                g = jax.device_put(g, self.sharding) if self.sharding is not None else jax.device_put(g)
        return g

    def epoch(self, epoch: int = 0, start_batch: int = 0) -> Iterator[jraph.GraphsTuple]:
        order = self.order(epoch)
        starts = range(start_batch * self.batch_size, len(order), self.batch_size)
        chunk = lambda k: order[starts[k] : starts[k] + self.batch_size]  # noqa: E731  (batch k, made when due)
        with cf.ThreadPoolExecutor(max_workers=self.workers) as pool:
            futures = collections.deque(
                pool.submit(self._make, chunk(k)) for k in range(min(self.prefetch, len(starts)))
            )
            for k in range(len(starts)):
                t_wait = time.perf_counter()
                g = futures.popleft().result()  # released once consumed
                if k:
                    self.wait_s += time.perf_counter() - t_wait
                if k + self.prefetch < len(starts):
                    futures.append(pool.submit(self._make, chunk(k + self.prefetch)))
                key = budget_key(g)
                if key not in self.shapes_seen:
                    self.shapes_seen.add(key)
                    log.info(
                        "new padded batch shape (graphs, nodes, edges) = %s; %d distinct so far",
                        key,
                        len(self.shapes_seen),
                    )
                yield g

    def __iter__(self):
        return self.epoch(0)


def jax_tree_stack(graphs: Sequence[jraph.GraphsTuple]) -> jraph.GraphsTuple:
    """Stack equally padded graphs on a new leading (shard) axis, in numpy."""
    import jax

    return jax.tree_util.tree_map(lambda *xs: np.stack(xs), *graphs)
