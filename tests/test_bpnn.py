"""BPNN: descriptors equal a brute-force numpy implementation (explicit loops over i, j, k and periodic
images) on real ethanol and a periodic Li cell; standardisation; presets and the automatic set; triplet
overflow is an error; short training on ethanol and Li learns."""

import itertools

import jax
import numpy as np
import pytest

from so3lib.graph import GraphBudget, NeighbourTable, build_batch
from so3lib.models import make_config
from so3lib.models.bpnn import descriptors, species_lookup

ALL_KINDS = [
    dict(kind="G1"),
    dict(kind="G2", eta=0.8, rs=1.4),
    dict(kind="G3", kappa=1.3),
    dict(kind="G4", eta=0.05, zeta=2.0, lam=-1),
    dict(kind="G5", eta=0.1, zeta=1.0, lam=1),
    dict(kind="G5", eta=0.02, zeta=4.0, lam=-1),
    dict(kind="ANI", eta=2.0, zeta=8.0, rs=1.5, theta_s=0.7),
]


def fc(r, rc):
    return 0.5 * (np.cos(np.pi * r / rc) + 1.0) if r <= rc else 0.0


def brute_force(numbers, positions, cell, pbc, species, sfs, rc, rca):
    """Plain loops: radial by neighbour element, angular by unordered element pair, each pair {j, k} once."""
    S = len(species)
    pairs = [(a, b) for a in range(S) for b in range(a, S)]
    rad = [s for s in sfs if s["kind"] in ("G1", "G2", "G3")]
    ang = [s for s in sfs if s["kind"] in ("G4", "G5", "ANI")]
    out = np.zeros((len(numbers), S * len(rad) + len(pairs) * len(ang)))
    reps = [range(-3, 4) if p else [0] for p in pbc]
    for i in range(len(numbers)):
        neigh = []  # (element index, vector)
        for shift in itertools.product(*reps):
            t = np.array(shift) @ cell
            for j in range(len(numbers)):
                if j == i and not any(shift):
                    continue
                v = positions[j] - positions[i] + t
                if 0 < np.linalg.norm(v) < rc:
                    neigh.append((species.index(numbers[j]), v))
        for sj, v in neigh:
            r = np.linalg.norm(v)
            for f, s in enumerate(rad):
                g = {
                    "G1": 1.0,
                    "G2": np.exp(-s.get("eta", 0) * (r - s.get("rs", 0)) ** 2),
                    "G3": np.cos(s.get("kappa", 0) * r),
                }[s["kind"]]
                out[i, sj * len(rad) + f] += g * fc(r, rc)
        base = S * len(rad)
        for a in range(len(neigh)):
            for b in range(a + 1, len(neigh)):
                (sj, v1), (sk, v2) = neigh[a], neigh[b]
                r1, r2, r3 = np.linalg.norm(v1), np.linalg.norm(v2), np.linalg.norm(v2 - v1)
                if r1 >= rca or r2 >= rca:
                    continue
                cos = v1 @ v2 / (r1 * r2)
                p = pairs.index((min(sj, sk), max(sj, sk)))
                for f, s in enumerate(ang):
                    z, lam, eta = s.get("zeta", 1.0), s.get("lam", 1), s.get("eta", 0.0)
                    if s["kind"] == "G4":
                        g = (
                            2 ** (1 - z)
                            * (1 + lam * cos) ** z
                            * np.exp(-eta * (r1**2 + r2**2 + r3**2))
                            * fc(r1, rca)
                            * fc(r2, rca)
                            * fc(r3, rca)
                        )
                    elif s["kind"] == "G5":
                        g = (
                            2 ** (1 - z)
                            * (1 + lam * cos) ** z
                            * np.exp(-eta * (r1**2 + r2**2))
                            * fc(r1, rca)
                            * fc(r2, rca)
                        )
                    else:
                        th = np.arccos(0.95 * cos)
                        g = (
                            2 ** (1 - z)
                            * (1 + np.cos(th - s["theta_s"])) ** z
                            * np.exp(-eta * ((r1 + r2) / 2 - s["rs"]) ** 2)
                            * fc(r1, rca)
                            * fc(r2, rca)
                        )
                    out[i, base + p * len(ang) + f] += g
    return out


@pytest.mark.parametrize("which", ["ethanol", "li"])
def test_descriptors_equal_brute_force(which, ethanol_test, li_test):
    ds = ethanol_test if which == "ethanol" else li_test
    frame = 0 if which == "ethanol" else int(np.argmax(li_test.n_atoms == 12))
    s = ds[frame]
    rc, rca = (4.0, 3.0) if which == "ethanol" else (4.5, 3.2)
    cfg = make_config(
        "bpnn",
        preset="custom",
        symmetry_functions=ALL_KINDS,
        cutoff=rc,
        cutoff_angular=rca,
        species=ds.species,
        standardize=False,
        dtype="float64",
    )
    sub = ds.subset([frame])
    g = build_batch(sub, NeighbourTable.build(sub, rc, triplet_cutoff=rca), [0], None, np.float64)
    got = np.asarray(jax.jit(lambda g: descriptors(cfg, g))(g))[: len(s)]
    want = brute_force(s.numbers, s.positions, s.cell, s.pbc, ds.species, ALL_KINDS, rc, rca)
    assert np.abs(want).max() > 0.1 and want.shape == got.shape
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_standardised_training_descriptors_have_zero_mean_unit_variance(ethanol_train):
    ds = ethanol_train.subset(np.arange(200))
    cfg = make_config("bpnn", n_radial=6, n_angular=4, cutoff=4.0, dtype="float64").fit(ds)
    g = build_batch(
        ds, NeighbourTable.build(ds, cfg.cutoff, triplet_cutoff=cfg.triplet_cutoff), np.arange(200), None, np.float64
    )
    G = np.asarray(jax.jit(lambda g: descriptors(cfg, g))(g))[: ds.offsets[-1]]
    lookup = species_lookup(cfg.species)
    z = lookup[ds.numbers]
    mean, std = np.asarray(cfg.descriptor_mean), np.asarray(cfg.descriptor_std)
    Gs = (G - mean[z]) / std[z]
    for e in range(len(cfg.species)):
        sel = Gs[z == e]
        varying = np.asarray(cfg.descriptor_std)[e] != 1.0
        np.testing.assert_allclose(sel.mean(axis=0), 0.0, atol=1e-8)
        np.testing.assert_allclose(sel.std(axis=0)[varying], 1.0, rtol=1e-8)


def test_presets_and_explicit_lists():
    ani = make_config("bpnn", preset="ani")
    kinds = [s.kind for s in ani.symmetry_functions]
    assert kinds.count("G2") == 16 and kinds.count("ANI") == 32 and (ani.cutoff, ani.cutoff_angular) == (5.2, 3.5)
    rs = sorted({s.rs for s in ani.symmetry_functions if s.kind == "G2"})
    assert rs[0] == 0.9 and rs[-1] == pytest.approx(4.93125)
    assert {s.zeta for s in ani.symmetry_functions if s.kind == "ANI"} == {32.0}
    g = make_config("bpnn", preset="g2g4g5")
    kinds = [s.kind for s in g.symmetry_functions]
    assert (kinds.count("G2"), kinds.count("G4"), kinds.count("G5"), g.cutoff) == (12, 6, 6, 8.0)
    f = make_config("bpnn", preset="fortnet")
    assert {s.kind for s in f.symmetry_functions} == {"G2", "G5"}
    custom = make_config("bpnn", preset="custom", symmetry_functions=ALL_KINDS, cutoff=5.0)
    from so3lib.models import config_from_dict

    assert config_from_dict(custom.to_dict()) == custom
    with pytest.raises(ValueError, match="needs symmetry_functions"):
        make_config("bpnn", preset="custom")
    with pytest.raises(ValueError, match="must not exceed"):
        make_config("bpnn", cutoff=4.0, cutoff_angular=5.0)
    with pytest.raises(ValueError, match="zeta"):
        make_config("bpnn", preset="custom", symmetry_functions=[dict(kind="G5", zeta=0.5)])


def test_auto_set_follows_the_data(ethanol_train, caplog):
    ds = ethanol_train.subset(np.arange(100))
    cfg = make_config("bpnn", n_radial=8, n_angular=6, cutoff=5.0).fit(ds)
    g2 = [s for s in cfg.symmetry_functions if s.kind == "G2"]
    assert len(g2) == 8 and len(cfg.symmetry_functions) == 14
    shifts = np.array([s.rs for s in g2])
    assert np.all(np.diff(shifts) > 0) and shifts[0] > 0.9 and shifts[-1] < 4.0  # ethanol distances 0.96–3.7 Å
    assert {s.zeta for s in cfg.symmetry_functions if s.kind == "G5"} <= {1.0, 2.0, 4.0, 16.0}
    text = cfg.describe()
    assert "G2" in text and "elements [1, 6, 8]" in text


def test_triplet_overflow_is_an_error(ethanol_test):
    cfg = make_config("bpnn", n_radial=4, n_angular=2, cutoff=4.0).fit(ethanol_test.subset(np.arange(20)))
    table = NeighbourTable.build(ethanol_test, 4.0, triplet_cutoff=cfg.triplet_cutoff)
    with pytest.raises(ValueError, match="triplets do not fit"):
        build_batch(ethanol_test, table, [0, 1], GraphBudget(64, 512, 3, 10), np.float32)


# periodic Li trains through the descriptor cache (tests/test_bpnn_cache.py checks it equals the direct path)
@pytest.mark.parametrize("which", ["ethanol", pytest.param("li", marks=pytest.mark.slow)])
def test_short_training_learns(which, tmp_path, ethanol_train, li_test):
    from conftest import data

    import so3lib.data as d
    from so3lib.training import DataConfig, RunConfig, train

    if which == "ethanol":
        tr, va, te = (
            ethanol_train.subset(np.arange(300)),
            ethanol_train.subset(np.arange(300, 350)),
            ethanol_train.subset(np.arange(350, 550)),
        )
        opts = dict(n_radial=8, n_angular=8, cutoff=4.0, hidden=(32, 32))
    else:
        full = d.read(data("materials", "li_mlearn_training_every6.json"))  # 41 of the 241 training cells
        val = np.arange(3, len(full), 8)
        te = li_test.subset(np.flatnonzero(li_test.n_atoms >= 53))  # the 24 bulk cells (53-54 atoms)
        tr, va = full.subset(np.setdiff1d(np.arange(len(full)), val)), full.subset(val)
        opts = dict(n_radial=8, n_angular=4, cutoff=5.0, cutoff_angular=3.2, hidden=(32, 32))
    cfg = RunConfig(
        name="b",
        model=make_config("bpnn", **opts),
        training=dict(max_steps=100, batch_size=8, eval_every_steps=50, warmup_steps=10, learning_rate=3e-3),
        # ethanol is one molecule (least squares cannot fix e_Z); the Li cells are one element (it can)
        data=DataConfig(energy_reference="average" if which == "ethanol" else "lstsq"),
    )
    res = train(cfg, tr, va, te, out_dir=tmp_path / which, progress=False)
    zero_predictor = float(np.mean(np.abs(te.forces)))
    assert res["test"]["forces_mae_ev_per_a"] < 0.7 * zero_predictor, res["test"]
    assert "G2" in (tmp_path / which / "config.yaml").read_text()  # the chosen set is saved in config.yaml


def test_descriptor_analysis_hierarchy_and_plots(tmp_path, ethanol_test):
    from so3lib.analysis import descriptor_analysis

    ds = ethanol_test.subset(np.arange(60))
    sfs = [
        dict(kind="G1"),
        dict(kind="G2", eta=4.0, rs=0.0),
        dict(kind="G3", kappa=0.3),
        dict(kind="G4", eta=0.5, zeta=4.0, lam=1),
        dict(kind="G5", eta=0.5, zeta=4.0, lam=1),
    ]
    cfg = make_config(
        "bpnn", preset="custom", symmetry_functions=sfs, cutoff=6.0, standardize=False, dtype="float64"
    ).fit(ds)
    res = descriptor_analysis(cfg, ds, tmp_path)
    assert set(res["per_kind"]) == {"G1", "G2", "G3", "G4", "G5"}
    m = {k: v["mean_abs"] for k, v in res["per_kind"].items()}
    # G1 dominates, magnitudes spread over orders, and G4 ≤ G5 term by term (extra factors ≤ 1)
    assert res["hierarchy"][0] == "G1" and m["G1"] / min(m.values()) > 100 and m["G5"] > m["G4"]
    for f in ("descriptor_magnitudes.png", "energy_vs_descriptors.png", "descriptor_correlation.png"):
        assert (tmp_path / f).stat().st_size > 5000


def test_calculator_with_triplets_equals_direct(ethanol_test):
    from physics import graph, make_potential

    import so3lib

    pot, params = make_potential(
        "bpnn", {"n_radial": 4, "n_angular": 3, "cutoff": 4.0, "hidden": (8,)}, ethanol_test.subset(np.arange(30))
    )
    calc = so3lib.So3libCalculator(pot, params, skin=0.3)
    atoms = ethanol_test[7].to_ase()
    atoms.calc = calc
    direct = jax.jit(pot.__call__)(params, graph(pot, ethanol_test, [7]))
    np.testing.assert_allclose(atoms.get_forces(), np.asarray(direct["forces"])[:9], atol=1e-10)
    atoms.positions[2] += 0.05  # within the skin: triplets reused, still exact
    f_moved = atoms.get_forces()
    assert calc.n_neighbour_builds == 1
    ref = so3lib.So3libCalculator(pot, params, skin=0.0)
    atoms.calc = ref
    np.testing.assert_allclose(f_moved, atoms.get_forces(), atol=1e-10)
