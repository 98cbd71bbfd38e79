"""BPNN descriptor cache (descriptors and their edge Jacobians computed once per structure, reused in training):
on real periodic cells (mlearn Li, TiAl: two elements, all six function kinds) the cached path gives the same
energies, forces, stress and parameter gradients as the direct path in float64, its forces are −finite
differences of the direct energy, the trainer's loaders carry the cache and no triplets, and a cache over the
memory limit falls back to the direct path with a warning."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from physics import fd_forces, fd_stress

import so3lib.data as d
from so3lib.data import fit_energy_reference
from so3lib.graph import NeighbourTable, build_batch
from so3lib.models import make_config
from so3lib.models.bpnn import CACHED_G
from so3lib.models.bpnn_cache import DescriptorCache, cache_for
from so3lib.potential import Potential, fit_scale_shift

ALL_KINDS = [
    dict(kind="G1"),
    dict(kind="G2", eta=0.8, rs=1.4),
    dict(kind="G3", kappa=1.3),
    dict(kind="G4", eta=0.05, zeta=2.0, lam=-1),
    dict(kind="G5", eta=0.1, zeta=1.0, lam=1),
    dict(kind="G5", eta=0.02, zeta=4.0, lam=-1),
    dict(kind="ANI", eta=2.0, zeta=8.0, rs=1.5, theta_s=0.7),
]


@pytest.fixture(scope="module")
def tial():
    from conftest import data

    return d.read(data("materials", "tial_first40.xyz")).subset(np.arange(6))


def _setup(ds, rc=4.5, rca=3.2, triplets_per_batch=1):
    cfg = make_config(
        "bpnn",
        preset="custom",
        symmetry_functions=ALL_KINDS,
        cutoff=rc,
        cutoff_angular=rca,
        hidden=(8,),
        dtype="float64",
    ).fit(ds)
    ref = fit_energy_reference(ds, method="average")
    pot = Potential(cfg, ref, *fit_scale_shift(ds, ref))
    table = NeighbourTable.build(ds, rc, triplet_cutoff=rca)
    cache = DescriptorCache.build(cfg, ds, table, np.float64, triplets_per_batch=triplets_per_batch)
    g = build_batch(ds, table, [0], None, np.float64)
    params = pot.init(jax.random.PRNGKey(0), g)
    params = jax.tree_util.tree_map(lambda x: x + 0.3 * jax.random.normal(jax.random.PRNGKey(1), x.shape), params)
    return pot, params, table, cache


# one element (Li) in the slow tier: the two-element TiAl cell covers the per-element tables by default
@pytest.mark.parametrize("which", [pytest.param("li", marks=pytest.mark.slow), "tial"])
def test_cached_equals_direct_energy_forces_stress_and_gradients(which, li_test, tial):
    ds = li_test.subset(np.flatnonzero(li_test.n_atoms <= 20)[:5]) if which == "li" else tial
    assert ds.pbc.all()
    # TiAl: one frame per cache batch (2-atom cells, one shape); Li: the cells of several sizes in one batch
    pot, params, table, cache = _setup(ds, triplets_per_batch=1 if which == "tial" else 10**9)
    frames = [3, 0, 4]  # another order than the cache was built in
    direct = build_batch(ds, table, frames, None, np.float64)
    cached = build_batch(ds, cache.table, frames, None, np.float64, descriptor_cache=cache)
    assert "triplets" in direct.globals and "triplets" not in cached.globals and CACHED_G in cached.nodes
    fn = jax.jit(pot.__call__, static_argnames="compute_stress")
    a, b = fn(params, direct, compute_stress=True), fn(params, cached, compute_stress=True)
    n = int(sum(ds.n_atoms[frames]))
    assert np.abs(np.asarray(a["forces"])[:n]).max() > 0.01
    for k in ("energy", "forces", "stress"):
        np.testing.assert_allclose(np.asarray(b[k]), np.asarray(a[k]), rtol=1e-10, atol=1e-10, err_msg=k)

    def loss(p, g):  # energy + force loss: its parameter gradient is the second-order term of training
        out = pot(p, g)
        return jnp.sum(out["energy"][:3] ** 2) + jnp.sum(out["forces"] ** 2)

    ga, gb = jax.jit(jax.grad(loss))(params, direct), jax.jit(jax.grad(loss))(params, cached)
    for x, y in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-9, atol=1e-10)


def test_cached_forces_and_stress_are_finite_differences_of_the_direct_energy(tial):
    pot, params, table, cache = _setup(tial)
    g = build_batch(tial, cache.table, [2], None, np.float64, descriptor_cache=cache)
    out = jax.jit(pot.__call__, static_argnames="compute_stress")(params, g, compute_stress=True)
    s = tial[2]
    atoms = [0, len(s.numbers) - 1]
    np.testing.assert_allclose(np.asarray(out["forces"])[atoms], fd_forces(pot, params, s, atoms), atol=1e-7)
    np.testing.assert_allclose(np.asarray(out["stress"])[0], fd_stress(pot, params, s), atol=1e-7)


def test_trainer_loaders_carry_the_cache_and_fall_back_over_the_limit(li_test, caplog):
    from so3lib.training.trainer import make_loader

    ds = li_test.subset(np.flatnonzero(li_test.n_atoms <= 20)[:4])
    pot, params, table, cache = _setup(ds)
    loader = make_loader(ds, pot, 2, False, 0, "training")
    g = next(loader.epoch(0))
    assert loader.descriptor_cache is not None and "triplets" not in g.globals and CACHED_G in g.nodes
    np.testing.assert_array_equal(np.asarray(g.nodes[CACHED_G])[: ds.n_atoms[0]], cache.G[: ds.n_atoms[0]])
    with caplog.at_level(logging.WARNING):
        assert cache_for(pot.model, ds, table, np.float64, max_bytes=1000) is None
    assert "descriptors are recomputed in every step" in caplog.text
    off = make_loader(ds, Potential(pot.model.replace(precompute_descriptors=False), pot.reference), 2, False, 0, "t")
    assert off.descriptor_cache is None and "triplets" in next(off.epoch(0)).globals
