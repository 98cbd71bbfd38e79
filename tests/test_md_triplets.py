"""Exact angular triplets for on-device MD (so3lib.md.triplets): from a jax-md Dense neighbour list of a real
periodic Li cell, the triplets are exactly the training batches' ones (same count), energy and forces of the MD
energy function equal the batch path in float64 with a capacity far below all slot pairs, a capacity below the
count is flagged as an overflow, and a short NVE run of an angular BPNN conserves energy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from physics import make_potential

from so3lib.graph import NeighbourTable, build_batch
from so3lib.md import MDConfig, run_md, triplets
from so3lib.md.engine import _triplet_capacity, energy_function, standard_cell

jax_md = pytest.importorskip("jax_md")
from jax_md import space  # noqa: E402

RC, RCA, SKIN = 4.0, 3.2, 0.9  # 2 (RC + SKIN) below the 9.93 Å cell: minimum image holds


@pytest.fixture(scope="module")
def li_cell(li_test):
    ds = li_test.subset([int(np.argmax(li_test.n_atoms == 54))])
    pot, params = make_potential(
        "bpnn", {"n_radial": 6, "n_angular": 4, "cutoff": RC, "cutoff_angular": RCA, "hidden": (8,)}, ds
    )
    return ds, pot, params


def _neighbours(s):
    """The engine's set-up: fractional coordinates u in jax-md's (standard-form, column) box; the rotation from
    jax-md's frame to the structure's."""
    from jax_md import partition, space

    std = standard_cell(np.asarray(s.cell))
    box = jnp.asarray(std.T)
    disp, _ = space.periodic_general(box, fractional_coordinates=True)
    fn = partition.neighbor_list(
        disp, box, RC + SKIN, format=partition.Dense, disable_cell_list=True, fractional_coordinates=True
    )
    u = jnp.asarray(np.linalg.solve(np.asarray(s.cell).T, np.asarray(s.positions).T).T % 1.0)
    return fn, u, fn.allocate(u), box, np.linalg.solve(std, np.asarray(s.cell))


def test_md_triplets_are_exact_and_energy_forces_equal_the_batch_path(li_cell):
    ds, pot, params = li_cell
    s = ds[0]
    fn, u, nbrs, box, rotation = _neighbours(s)
    x = space.transform(box, u)  # Cartesian positions in jax-md's frame
    N, K = nbrs.idx.shape
    table = NeighbourTable.build(ds, RC, triplet_cutoff=RCA)
    n = int(triplets.count_triplets(x, nbrs.idx, box.T, True, RCA))
    assert n == len(table.triplets) > 1000
    fraction = triplets.fraction_for(n, N, K, 1.25)
    cap = triplets.capacity(N, K, fraction)
    assert n <= cap < 0.5 * N * K * (K - 1) // 2  # far fewer than the slot pairs the old path evaluated
    energy = energy_function(pot, params, s.numbers, box, True, fraction)
    e, g = jax.jit(jax.value_and_grad(energy))(u, nbrs)
    ref = pot(params, build_batch(ds, table, [0], None, np.float64, pot.reference.energy(ds)))
    np.testing.assert_allclose(float(e), float(ref["energy_residual"][0]), rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(-np.asarray(g) @ rotation, np.asarray(ref["forces"])[:N], atol=1e-10)
    assert np.abs(np.asarray(ref["forces"])[:N]).max() > 1e-3
    _, _, mask, count = triplets.exact_triplets(x, nbrs.idx, box.T, True, RCA, cap)
    assert int(count) == n == int(mask.sum())


def test_triplet_overflow_is_flagged_as_neighbour_overflow(li_cell):
    ds, pot, params = li_cell
    fn, u, nbrs, box, _ = _neighbours(ds[0])
    _, ok = _triplet_capacity(pot, fn, u, box, True, 1.0)
    assert not bool(ok(u, nbrs, box).did_buffer_overflow)
    _, tight = _triplet_capacity(pot, fn, u, box, True, 0.3)  # capacity for 30 % of the triplets
    assert bool(tight(u, nbrs, box).did_buffer_overflow)


@pytest.mark.slow  # 15 s; the triplets' exactness (energies and forces equal the batch path) is tested by default
def test_nve_with_an_angular_bpnn_conserves_energy(li_cell):
    ds, pot, params = li_cell
    atoms = ds[0].to_ase()
    r = run_md(
        pot,
        params,
        atoms,
        MDConfig(ensemble="nve", temperature_k=300, steps=40, dt_fs=1.0, save_every=20, skin_angstrom=SKIN),
        progress=False,
    )
    assert r.stopped is None and r.step[-1] == 40
    assert np.max(np.abs(r.total_ev - r.total_ev[0])) < 0.1 * np.ptp(r.potential_ev) + 1e-4
