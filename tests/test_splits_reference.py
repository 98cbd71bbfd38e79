"""Splits are disjoint and reproducible; the per-element reference recovers known energies exactly."""

import numpy as np
import pytest
from conftest import data

import so3lib.data as d


def test_random_split_disjoint_reproducible():
    a = d.random_split(1000, (0.8, 0.1, 0.1), seed=3)
    b = d.random_split(1000, (0.8, 0.1, 0.1), seed=3)
    c = d.random_split(1000, (0.8, 0.1, 0.1), seed=4)
    assert [len(v) for v in a.values()] == [800, 100, 100]
    assert not set(a["train"]) & set(a["val"]) and not set(a["val"]) & set(a["test"])
    assert all(np.array_equal(a[k], b[k]) for k in a) and not np.array_equal(a["train"], c["train"])


def test_rmd17_protocol_and_saved_indices(tmp_path):
    s = d.count_split(1000, {"train": 950, "val": 50}, seed=1)
    assert len(s["train"]) == 950 and len(s["val"]) == 50 and not set(s["train"]) & set(s["val"])
    d.save_splits(tmp_path / "splits.npz", s, protocol="rmd17")
    back = d.load_splits(tmp_path / "splits.npz")
    assert set(back) == {"train", "val"} and np.array_equal(back["val"], s["val"])
    with pytest.raises(ValueError, match="only 10 exist"):
        d.count_split(10, {"train": 950})


def multi_molecule():
    parts = [
        d.read(data("rmd17", f"rmd17_{m}_test_01.npz")).subset(np.arange(40))
        for m in ("ethanol", "aspirin", "uracil", "benzene", "malonaldehyde", "naphthalene")
    ]
    return d.Dataset.concatenate(parts)


def test_split_by_molecule_never_shares_a_molecule():
    ds = multi_molecule()
    s = d.split_by_group(ds.meta["name"], (0.5, 0.25, 0.25), seed=0)
    names = {k: set(ds.meta["name"][v]) for k, v in s.items()}
    assert names["train"] and names["val"] and names["test"]
    assert not names["train"] & names["val"] and not names["train"] & names["test"] and not names["val"] & names["test"]
    assert sum(len(v) for v in s.values()) == len(ds)


def test_reference_recovers_known_per_element_energies():
    ds = multi_molecule()
    true = {1: -13.6, 6: -1029.5, 7: -1484.2, 8: -2041.9}
    e_true = np.array([sum(true[z] for z in s.numbers) for s in ds]) + np.random.default_rng(0).normal(0, 1e-3, len(ds))
    ds.energy = e_true
    ref = d.fit_energy_reference(ds)
    assert set(ref.species) == set(ds.species)
    for z, e in zip(ref.species, ref.energies_ev):
        assert e == pytest.approx(true[z], abs=2e-3)
    assert ref.residual_std_per_atom_ev < 1e-3 < ref.raw_std_per_atom_ev
    resid = ref.subtract(ds)
    np.testing.assert_allclose(ref.add(ds, resid), ds.energy, rtol=0, atol=1e-9)  # exact undo
    assert d.EnergyReference.from_dict(ref.to_dict()) == ref


def test_reference_residual_diagnostic_on_real_multi_molecule_data():
    ds = multi_molecule()
    ref = d.fit_energy_reference(ds)
    # without a reference, per-atom energies of different molecules differ by hundreds of eV
    assert ref.raw_std_per_atom_ev > 10.0 and ref.residual_std_per_atom_ev < 0.1


def test_isolated_atom_reference_and_errors():
    ds = multi_molecule()
    ref = d.fit_energy_reference(ds, isolated_atom_energies_ev={1: -13.6, 6: -1029.0, 7: -1484.0, 8: -2041.0})
    assert ref.method == "isolated_atoms" and ref.energies_ev[0] == -13.6
    with pytest.raises(d.DataError, match="lack elements"):
        d.fit_energy_reference(ds, isolated_atom_energies_ev={1: -13.6})
    with pytest.raises(d.DataError, match="no energy reference"):
        ref.check_species(np.array([1, 6, 17]), "x")
