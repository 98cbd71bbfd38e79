"""Neighbour lists against brute force on real periodic cells, padding invariance, batching, loader order."""

import itertools

import jax
import jax.numpy as jnp
import jraph
import numpy as np
import pytest

from so3lib.graph import (
    BudgetLadder,
    GraphBudget,
    GraphLoader,
    NeighbourTable,
    build_batch,
    edge_vectors,
    neighbour_list,
    reverse_pair_order,
    round_up_ladder,
    safe_norm,
)


def brute_force_pairs(pos, cell, pbc, cutoff):
    """All (i, j, shift) with |r_j − r_i + shift·cell| < cutoff, by explicit loops over images."""
    inv = np.linalg.inv(cell) if pbc.any() else None
    reps = []
    for k in range(3):
        if pbc[k]:
            # number of images needed along k: cutoff / (plane spacing)
            spacing = 1.0 / np.linalg.norm(inv[:, k])
            reps.append(range(-int(np.ceil(cutoff / spacing)) - 1, int(np.ceil(cutoff / spacing)) + 2))
        else:
            reps.append([0])
    out = set()
    for s in itertools.product(*reps):
        t = np.array(s) @ cell if pbc.any() else np.zeros(3)
        for i in range(len(pos)):
            for j in range(len(pos)):
                if i == j and not any(s):
                    continue
                if np.linalg.norm(pos[j] - pos[i] + t) < cutoff:
                    out.add((i, j, *s))
    return out


@pytest.mark.parametrize("which", ["li", "tial"])
def test_periodic_neighbour_list_equals_brute_force(which, li_test, tial):
    ds = li_test if which == "li" else tial
    frames = [int(np.argmin(ds.n_atoms)), int(np.argsort(ds.n_atoms)[len(ds) // 2])]  # tiny cell and a mid one
    for f in frames:
        s = ds[f]
        for cutoff in (3.0, 5.0):
            snd, rcv, sh = neighbour_list(s.positions, s.cell, s.pbc, cutoff)
            got = {(int(r), int(j), *map(int, k)) for j, r, k in zip(snd, rcv, sh)}
            assert got == brute_force_pairs(s.positions, s.cell, s.pbc, cutoff), (which, f, cutoff)
            vec = s.positions[snd] - s.positions[rcv] + sh @ s.cell
            assert np.all(np.linalg.norm(vec, axis=1) < cutoff)
            assert snd.dtype == np.int32 and sh.dtype == np.int32


def test_molecule_neighbour_list(ethanol_test):
    s = ethanol_test[0]
    snd, rcv, sh = neighbour_list(s.positions, s.cell, s.pbc, 5.0)
    assert len(snd) == 9 * 8 and not sh.any()  # ethanol: all pairs within 5 Å


def test_build_batch_equals_jraph_batch_and_pad(li_test):
    table = NeighbourTable.build(li_test, 4.0)
    frames = [0, 3, 7]
    budget = GraphBudget(200, 6400, 5)
    ours = build_batch(li_test, table, frames, budget, np.float64)
    singles = []
    for f in frames:
        g = build_batch(li_test, table, [f], GraphBudget(li_test.n_atoms[f] + 1, int(table.n_edges[f]), 2), np.float64)
        singles.append(
            jraph.GraphsTuple(
                nodes={"positions": g.nodes["positions"][:-1]},
                edges={"shift": g.edges["shift"]},
                senders=g.senders,
                receivers=g.receivers,
                n_node=g.n_node[:1],
                n_edge=g.n_edge[:1],
                globals=None,
            )
        )
    ref = jraph.pad_with_graphs(jraph.batch_np(singles), n_node=200, n_edge=6400, n_graph=5)
    np.testing.assert_array_equal(ours.senders, ref.senders)
    np.testing.assert_array_equal(ours.receivers, ref.receivers)
    np.testing.assert_array_equal(ours.n_node, ref.n_node)
    np.testing.assert_array_equal(ours.n_edge, ref.n_edge)
    np.testing.assert_array_equal(ours.nodes["positions"], ref.nodes["positions"])
    np.testing.assert_array_equal(ours.edges["shift"], ref.edges["shift"])
    np.testing.assert_array_equal(jraph.get_node_padding_mask(ours), ours.nodes["species"] > 0)


def test_edges_come_in_reverse_pairs(li_test, ethanol_test):
    """Edge 2k + 1 is edge 2k reversed (senders and receivers swapped, shift negated, r_{2k+1} = −r_{2k}) in
    every batch, across frames and padding; a list without a reverse for every edge is left as it is."""
    for ds, frames in ((li_test, [0, 3, 7]), (ethanol_test, [0, 1, 2])):
        table = NeighbourTable.build(ds, 4.0)
        assert table.paired
        g = build_batch(ds, table, frames, None, np.float64)
        np.testing.assert_array_equal(g.edges["pair_sign"], np.tile([1.0, -1.0], len(g.senders) // 2))
        n = int(np.sum(g.n_edge[: len(frames)]))
        assert n % 2 == 0 and len(g.senders) > n  # real edges, then padding
        np.testing.assert_array_equal(g.senders[1:n:2], g.receivers[0:n:2])
        np.testing.assert_array_equal(g.receivers[1:n:2], g.senders[0:n:2])
        np.testing.assert_array_equal(g.edges["shift"][1::2], -g.edges["shift"][0::2])
        vec = np.asarray(edge_vectors(g))
        np.testing.assert_array_equal(vec[1::2], -vec[0::2])
        assert np.all(np.linalg.norm(vec[:n], axis=1) > 0)
    s, r, sh = neighbour_list(li_test[0].positions, li_test[0].cell, li_test[0].pbc, 4.0)
    assert reverse_pair_order(s[1:], r[1:], sh[1:]) is None  # odd: one edge lost its partner
    drop = np.ones(len(s), bool)
    drop[:2] = False
    half = ~((s == s[0]) & (r == r[0]) & np.all(sh == sh[0], axis=1))  # one direction of one pair removed
    assert reverse_pair_order(s[half & drop], r[half & drop], sh[half & drop]) is None


def test_padded_edges_zero_and_gradients_finite(li_test):
    table = NeighbourTable.build(li_test, 4.0)
    g = build_batch(li_test, table, [1, 2], GraphBudget(256, 8192, 4), np.float64)

    def f(pos):
        vec = edge_vectors(g._replace(nodes={**g.nodes, "positions": pos}))
        mask = jraph.get_edge_padding_mask(g)
        return jnp.sum(safe_norm(vec, mask) ** 2 * mask), vec

    (val, vec), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(g.nodes["positions"]))
    mask = np.asarray(jraph.get_edge_padding_mask(g))
    assert np.all(np.asarray(vec)[~mask] == 0) and (~mask).sum() > 0
    assert np.isfinite(np.asarray(grad)).all()
    n_real = int(np.sum(jraph.get_node_padding_mask(g)))
    assert np.all(np.asarray(grad)[n_real:] == 0)


def test_sums_over_real_atoms_do_not_change_with_padding(li_test):
    table = NeighbourTable.build(li_test, 4.0)
    small = build_batch(li_test, table, [0, 5], None, np.float64)
    big = build_batch(li_test, table, [0, 5], GraphBudget(1000, 20000, 9), np.float64)
    sums = []
    for g in (small, big):
        vec = np.asarray(edge_vectors(g))
        mask = np.asarray(jraph.get_edge_padding_mask(g))
        r = np.linalg.norm(vec, axis=1) * mask
        per_graph = np.asarray(
            jraph.segment_sum(
                jnp.asarray(r),
                jnp.repeat(jnp.arange(len(g.n_edge)), g.n_edge, total_repeat_length=len(r)),
                len(g.n_edge),
            )
        )
        sums.append(per_graph[:2])
    assert small.n_node.shape != big.n_node.shape
    np.testing.assert_allclose(sums[0], sums[1], rtol=1e-12)


def test_ladder_few_shapes_and_never_truncates(li_test):
    table = NeighbourTable.build(li_test, 5.0)
    ladder = BudgetLadder.from_counts(li_test.n_atoms, table.n_edges, 8)
    assert 1 <= len(ladder.rungs) <= 4
    loader = GraphLoader(li_test, 5.0, 8, seed=0, table=table, ladder=ladder, device_put=False)
    n_atoms = 0
    for ep in range(3):
        for g in loader.epoch(ep):
            n_atoms += int(np.sum(jraph.get_node_padding_mask(g)))
    assert n_atoms == 3 * li_test.offsets[-1]  # nothing dropped
    assert len(loader.shapes_seen) <= len(ladder.rungs)
    with pytest.raises(ValueError, match="exceeds the largest padding budget"):
        ladder.select(10**6, 1, 2)


def test_ladder_single_shape_for_fixed_size_molecules(ethanol_test):
    table = NeighbourTable.build(ethanol_test, 5.0)
    ladder = BudgetLadder.from_counts(ethanol_test.n_atoms, table.n_edges, 32)
    assert len(ladder.rungs) == 1 and ladder.rungs[0].n_graph == 33


def test_loader_order_is_reproducible_and_resumable(ethanol_test):
    sub = ethanol_test.subset(np.arange(100))
    a = GraphLoader(sub, 5.0, 16, seed=7, device_put=False)
    b = GraphLoader(sub, 5.0, 16, seed=7, device_put=False)
    full = [g.nodes["positions"] for g in a.epoch(2)]
    again = [g.nodes["positions"] for g in b.epoch(2)]
    tail = [g.nodes["positions"] for g in b.epoch(2, start_batch=3)]
    assert len(full) == 7 and all(np.array_equal(x, y) for x, y in zip(full, again))
    assert all(np.array_equal(x, y) for x, y in zip(full[3:], tail))
    other_epoch = [g.nodes["positions"] for g in a.epoch(3)]
    assert not np.array_equal(full[0], other_epoch[0])


def test_round_up_ladder_is_geometric():
    vals = sorted({round_up_ladder(x) for x in range(1, 5000)})
    assert len(vals) < 25 and all(v % 8 == 0 for v in vals)
    assert all(round_up_ladder(x) >= x for x in range(1, 5000))
