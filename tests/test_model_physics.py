"""Physics of every registered model (float64): forces = −finite differences, stress = strain derivative,
energy invariant and forces equivariant under rotations, translations and permutations, padding-independent.
A model joins these tests by adding its small configuration to MODELS."""

import jax
import numpy as np
import pytest
from conftest import random_rotation
from physics import fd_forces, fd_stress, graph, jitted, make_potential, structure_graph

from so3lib.data import Structure
from so3lib.graph import GraphBudget

MODELS = {
    "schnet": {"n_atom_basis": 16, "n_interactions": 2, "n_rbf": 12, "cutoff": 4.0},
    "so3krates": {"features": 16, "l_max": 3, "layers": 2, "heads": 2, "n_rbf": 8, "cutoff": 4.0},
    "bpnn": {"n_radial": 6, "n_angular": 4, "cutoff": 4.0, "cutoff_angular": 3.5, "hidden": (16, 16)},
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model_name(request):
    return request.param


def _evaluate(pot, params, s, stress=False):
    out = jitted(pot)(params, structure_graph(pot, s), compute_stress=stress)
    n = len(s)
    return {
        "e": float(out["energy_residual"][0]),
        "f": np.asarray(out["forces"])[:n],
        "s": np.asarray(out["stress"])[0] if stress else None,
    }


def test_forces_equal_minus_finite_differences_ethanol(model_name, ethanol_test):
    pot, params = make_potential(model_name, MODELS[model_name], ethanol_test)
    s = ethanol_test[10]
    f = _evaluate(pot, params, s)["f"]
    idx = [0, 2, 5, 8]
    fd = fd_forces(pot, params, s, idx)
    assert np.abs(f).max() > 1e-3
    np.testing.assert_allclose(f[idx], fd, rtol=1e-6, atol=1e-6 * np.abs(f).max())


def test_forces_and_stress_on_periodic_li(model_name, li_test):
    pot, params = make_potential(model_name, MODELS[model_name], li_test)
    s = li_test[int(np.argmax(li_test.n_atoms == 54))]
    s = Structure(numbers=s.numbers, positions=s.positions, cell=s.cell, pbc=s.pbc)
    out = _evaluate(pot, params, s, stress=True)
    idx = [0, 17, 40]
    fd = fd_forces(pot, params, s, idx)
    np.testing.assert_allclose(out["f"][idx], fd, rtol=1e-6, atol=1e-6 * np.abs(out["f"]).max())
    sfd = fd_stress(pot, params, s)
    assert np.abs(out["s"]).max() > 1e-6
    np.testing.assert_allclose(out["s"], sfd, rtol=1e-5, atol=1e-6 * np.abs(sfd).max())
    np.testing.assert_allclose(out["s"], out["s"].T, atol=1e-12)


def _check_symmetry(pot, params, s, rng, n_rot=10):
    base = _evaluate(pot, params, s, stress=bool(s.pbc.any()))
    for _ in range(n_rot):
        R = random_rotation(rng)
        t = rng.normal(0, 3.0, 3)
        perm = rng.permutation(len(s))
        s2 = Structure(numbers=s.numbers[perm], positions=(s.positions @ R.T + t)[perm], cell=s.cell @ R.T, pbc=s.pbc)
        out = _evaluate(pot, params, s2, stress=bool(s.pbc.any()))
        assert abs(out["e"] - base["e"]) <= 1e-9 * max(abs(base["e"]), 1.0)
        np.testing.assert_allclose(out["f"], (base["f"] @ R.T)[perm], atol=1e-9 * np.abs(base["f"]).max())
        if s.pbc.any():
            np.testing.assert_allclose(out["s"], R @ base["s"] @ R.T, atol=1e-9 * np.abs(base["s"]).max())


def test_rotation_translation_permutation_molecule(model_name, aspirin):
    pot, params = make_potential(model_name, MODELS[model_name], aspirin)
    _check_symmetry(pot, params, aspirin[3], np.random.default_rng(0))


def test_rotation_translation_permutation_periodic(model_name, li_test):
    pot, params = make_potential(model_name, MODELS[model_name], li_test)
    s = li_test[7]
    _check_symmetry(
        pot,
        params,
        Structure(numbers=s.numbers, positions=s.positions, cell=s.cell, pbc=s.pbc),
        np.random.default_rng(1),
        n_rot=4,
    )


def test_reflection_behaviour(model_name, aspirin):
    """Every model here builds E from rotation- and reflection-invariant quantities (distances; for SO3krates
    squared norms of Y^l contractions), so E is invariant under a mirror image and forces are mirrored: the
    models do not distinguish enantiomers."""
    pot, params = make_potential(model_name, MODELS[model_name], aspirin)
    s = aspirin[5]
    base = _evaluate(pot, params, s)
    M = np.diag([-1.0, 1.0, 1.0])
    out = _evaluate(pot, params, Structure(numbers=s.numbers, positions=s.positions @ M, cell=s.cell, pbc=s.pbc))
    assert abs(out["e"] - base["e"]) <= 1e-9 * max(abs(base["e"]), 1.0)
    np.testing.assert_allclose(out["f"], base["f"] @ M, atol=1e-9 * np.abs(base["f"]).max())


def test_padding_never_changes_results(model_name, li_test):
    pot, params = make_potential(model_name, MODELS[model_name], li_test)
    fn = jitted(pot)
    frames = [24, 26, 3]  # 12-, 2- and 53-atom cells
    small = graph(pot, li_test, frames)
    big = graph(pot, li_test, frames, GraphBudget(400, 12000, 8, 30000))
    a, b = fn(params, small, compute_stress=True), fn(params, big, compute_stress=True)  # two shapes: two compiles
    n = int(li_test.n_atoms[frames].sum())
    np.testing.assert_allclose(np.asarray(a["energy"])[:3], np.asarray(b["energy"])[:3], rtol=1e-12)
    np.testing.assert_allclose(np.asarray(a["forces"])[:n], np.asarray(b["forces"])[:n], atol=1e-12)
    np.testing.assert_allclose(np.asarray(a["stress"])[:3], np.asarray(b["stress"])[:3], atol=1e-14)
    assert np.all(np.asarray(b["forces"])[n:] == 0) and np.all(np.asarray(b["energy_residual"])[3:] == 0)
    # changing what sits in padding slots changes nothing either
    junk = big._replace(nodes={**big.nodes, "positions": np.asarray(big.nodes["positions"]).copy()})
    junk.nodes["positions"][n:] = 7.3
    c = fn(params, junk, compute_stress=True)
    np.testing.assert_allclose(np.asarray(c["energy"])[:3], np.asarray(b["energy"])[:3], rtol=1e-12)


def test_batched_equals_single(model_name, ethanol_test):
    pot, params = make_potential(model_name, MODELS[model_name], ethanol_test)
    fn = jax.jit(pot.__call__)
    batch = fn(params, graph(pot, ethanol_test, [4, 9, 1]))
    for k, f in enumerate([4, 9, 1]):
        single = fn(params, graph(pot, ethanol_test, [f]))
        np.testing.assert_allclose(float(batch["energy"][k]), float(single["energy"][0]), rtol=1e-12)
        np.testing.assert_allclose(
            np.asarray(batch["forces"])[9 * k : 9 * k + 9], np.asarray(single["forces"])[:9], atol=1e-12
        )


def test_float32_default_and_float64_switch(model_name, ethanol_test):
    from so3lib.data import fit_energy_reference
    from so3lib.models import make_config
    from so3lib.potential import Potential

    ref = fit_energy_reference(ethanol_test, method="average")  # one molecule: least squares is undetermined
    for dt, want in (("float32", np.float32), ("float64", np.float64)):
        pot = Potential(
            make_config(model_name, dtype=dt, **MODELS[model_name]).fit(ethanol_test.subset(range(50))), ref
        )
        g = graph(pot, ethanol_test, [0])
        params = pot.init(jax.random.PRNGKey(0), g)
        assert all(x.dtype == want for x in jax.tree_util.tree_leaves(params))
        assert jax.jit(pot.__call__)(params, g)["forces"].dtype == want
