"""SO3krates specifics: runs for l_max = 1..4 and T = 1..4 with one compilation per padded shape; the
Euclidean variables carry no channels; invalid settings are named; short training on real ethanol learns."""

import jax
import numpy as np
import pytest
from physics import graph, jitted, make_potential, structure_graph

from so3lib.data import Structure
from so3lib.graph import GraphBudget
from so3lib.models import make_config
from so3lib.models.so3krates import degree_index


@pytest.mark.parametrize("l_max,layers", [(1, 3), (4, 1)])  # the sweep's extremes: l_max 1 and 4, T 1 and 3
def test_sweep_settings_compile_once_per_shape(l_max, layers, ethanol_test):
    pot, params = make_potential(
        "so3krates", {"features": 8, "heads": 2, "n_rbf": 6, "l_max": l_max, "layers": layers}, ethanol_test
    )
    fn = jax.jit(pot.__call__)
    budget = GraphBudget(64, 512, 5)
    outs = [fn(params, graph(pot, ethanol_test, frames, budget)) for frames in ([0, 1], [2, 3, 4], [5])]
    assert fn._cache_size() == 1  # three different batches, one padded shape, one compilation
    assert all(np.isfinite(np.asarray(o["forces"])).all() for o in outs)
    d = (l_max + 1) ** 2 - 1
    assert len(degree_index(l_max)) == d


def test_pair_shared_filters_equal_per_edge_evaluation(li_test):
    """Filters, radial basis and spherical harmonics evaluated once per reverse pair of edges and the messages
    sent both ways give the energies and forces of evaluating every edge on its own (same parameters, float64),
    on periodic Li and on a one-atom bcc cell whose every edge joins the atom to one of its images (that atom's
    force is 0 by symmetry: only the energy is compared there). One padded shape, so one compilation per mode;
    the stress of the paired path is checked against finite differences in test_model_physics."""
    pot, params = make_potential(
        "so3krates", {"features": 8, "heads": 2, "n_rbf": 6, "l_max": 3, "layers": 2, "cutoff": 4.0}, li_test
    )
    fn = jitted(pot)
    budget = GraphBudget(128, 4096, 3)
    bcc_cell = 1.72 * (np.ones((3, 3)) - 2 * np.eye(3))  # primitive bcc, a = 3.44 Å
    bcc = Structure(numbers=np.array([3]), positions=np.zeros((1, 3)), cell=bcc_cell, pbc=np.ones(3, bool))
    cases = (
        (graph(pot, li_test, [0, 5], budget), ("energy_residual", "forces")),
        (structure_graph(pot, bcc, budget), ("energy_residual",)),
    )
    for g, keys in cases:
        assert "pair_sign" in g.edges and g.n_edge[0] > 0
        unpaired = g._replace(edges={"shift": g.edges["shift"]})
        a, b = fn(params, g, compute_stress=False), fn(params, unpaired, compute_stress=False)
        for key in keys:
            x, y = np.asarray(a[key]), np.asarray(b[key])
            assert np.abs(y).max() > 1e-8, key
            np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-12 * np.abs(y).max(), err_msg=key)
    assert fn._cache_size() == 2


def test_euclidean_variables_have_no_channels(ethanol_test):
    """Parameter count does not grow with F·L² terms: going from l_max 1 to 4 adds only per-degree weights."""

    def n_params(l):
        _, p = make_potential(
            "so3krates", {"features": 16, "heads": 2, "n_rbf": 6, "l_max": l, "layers": 1}, ethanol_test
        )
        return sum(x.size for x in jax.tree_util.tree_leaves(p))

    F, d, dL = 16, 8, 3
    # per added degree: q^x, k^x (2·F·d), w^x (F·d + d), MLP_s and exchange inputs (2·F), exchange output (F + 1)
    per_degree = 2 * F * d + F * d + d + 2 * F + F + 1
    assert n_params(4) - n_params(1) == dL * per_degree  # linear in L: x carries no feature channels


def test_invalid_settings_are_named():
    with pytest.raises(ValueError, match=r"features \(130\) must be divisible by heads \(4\)"):
        make_config("so3krates", features=130, heads=4)
    with pytest.raises(ValueError, match="l_max"):
        make_config("so3krates", l_max=0)
    cfg = make_config("so3krates")
    assert (cfg.cutoff, cfg.features, cfg.l_max, cfg.layers, cfg.heads) == (5.0, 132, 3, 3, 4)


def test_short_training_on_real_ethanol_learns(tmp_path, ethanol_train, ethanol_test):
    from so3lib.training import DataConfig, RunConfig, train

    s = np.arange(400)
    cfg = RunConfig(
        name="s",
        model=make_config("so3krates", features=16, l_max=2, layers=1, heads=2, n_rbf=16),
        training=dict(max_steps=100, batch_size=16, eval_every_steps=50, warmup_steps=10, learning_rate=3e-3),
        data=DataConfig(energy_reference="average"),  # one molecule
    )
    res = train(
        cfg,
        ethanol_train.subset(s[:350]),
        ethanol_train.subset(s[350:]),
        ethanol_test.subset(np.arange(200)),
        out_dir=tmp_path / "run",
        progress=False,
    )
    zero_predictor = float(np.mean(np.abs(ethanol_test.forces[: 200 * 9])))
    assert res["test"]["forces_mae_ev_per_a"] < 0.6 * zero_predictor, res["test"]
    import yaml

    saved = yaml.safe_load((tmp_path / "run" / "model" / "potential.yaml").read_text())
    assert saved["model"]["avg_num_neighbors"] == pytest.approx(8.0)  # ethanol: all 8 other atoms within 5 Å
