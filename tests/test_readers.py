"""Every shared dataset loads, in Å and eV, with the conversions checked by hand against the raw arrays."""

import json

import h5py
import numpy as np
import pytest
from conftest import ETHANOL_TEST, SPICE_SAMPLE, data, shared

import so3lib.data as d
from so3lib.workflows.md17 import MOLECULES

KCAL = 0.0433641  # eV per kcal/mol (data README)
HARTREE = 27.211386  # eV
BOHR = 0.529177  # Å


def test_rmd17_units_by_hand():
    p = data("rmd17", "rmd17_aspirin_train_01.npz")
    raw = np.load(p)
    ds = d.read(p)
    assert d.detect_format(p) == "rmd17" and len(ds) == len(raw["energies"]) == 50 and ds.n_atoms[0] == 21
    np.testing.assert_allclose(ds.energy[7], raw["energies"][7] * KCAL, rtol=1e-6)
    np.testing.assert_allclose(ds[7].forces[3], raw["forces"][7, 3] * KCAL, rtol=1e-6)
    np.testing.assert_array_equal(ds[7].positions, raw["coords"][7])
    np.testing.assert_array_equal(ds[7].numbers, raw["nuclear_charges"])
    assert ds[7].info["name"] == "aspirin" and ds[7].info["frame"] == 7
    assert not ds.pbc.any()


@pytest.mark.parametrize("mol", MOLECULES)
def test_all_rmd17_molecules_load(mol):
    for part in ("train", "test"):
        ds = d.read(data("rmd17", f"rmd17_{mol}_{part}_01.npz"))
        assert len(ds) == 50 and np.isfinite(ds.energy).all() and np.isfinite(ds.forces).all()


@pytest.mark.data
def test_full_reference_files_load():
    """The full files the slices come from (../shared/data): every rMD17 split 01 file, MD17 ethanol, Li, TiAl;
    and each committed slice equals the first frames of its source."""
    for mol in MOLECULES:
        for part in ("train", "test"):
            full = d.read(shared("rmd17", f"rmd17_{mol}_{part}_01.npz"))
            assert len(full) == 1000 and np.isfinite(full.energy).all() and np.isfinite(full.forces).all()
            cut = d.read(data("rmd17", f"rmd17_{mol}_{part}_01.npz"))
            np.testing.assert_array_equal(cut.energy, full.energy[:50])
            np.testing.assert_array_equal(cut.positions, full.positions[: len(cut.positions)])
    assert len(d.read(shared("md17", "md17_ethanol_first2000.npz"))) == 2000
    li = d.read(shared("materials", "li_mlearn_training.json"))
    assert len(li) == 241 and li.pbc.all()
    np.testing.assert_array_equal(d.read(data("materials", "li_mlearn_training_every6.json")).energy, li.energy[::6])
    tial = d.read(shared("materials", "tial_tutorial.xyz"))
    assert len(tial) == 329 and set(tial.species) == {13, 22}
    np.testing.assert_array_equal(d.read(data("materials", "tial_first40.xyz")).energy, tial.energy[:40])


def test_sgdml_md17_units():
    p = data("md17", "md17_ethanol_first1050.npz")
    raw = np.load(p)
    ds = d.read(p)
    assert d.detect_format(p) == "sgdml" and len(ds) == len(raw["E"]) == 1050
    np.testing.assert_allclose(ds.energy[5], raw["E"][5, 0] * KCAL, rtol=1e-6)
    np.testing.assert_allclose(ds[5].forces, raw["F"][5] * KCAL, rtol=1e-6)


def test_spice_units_and_forces_are_minus_gradient():
    p = SPICE_SAMPLE
    ds = d.read(p)
    with h5py.File(p) as f:
        g = f["103147721"]
        e0, grad0, r0 = g["dft_total_energy"][0], g["dft_total_gradient"][0], g["conformations"][0]
    assert len(ds) == 55 and sorted(set(ds.meta["name"])) == ["103147721", "C#C.[Na+]"]
    i = int(np.nonzero(ds.meta["name"] == "103147721")[0][0])
    np.testing.assert_allclose(ds.energy[i], e0 * HARTREE, rtol=1e-7)
    np.testing.assert_allclose(ds[i].positions, r0 * BOHR, rtol=1e-5)
    np.testing.assert_allclose(ds[i].forces, -grad0 * HARTREE / BOHR, rtol=1e-5)  # forces = −gradient
    assert "PubChem" in ds[i].info["subset"] and ds[i].info["smiles"].startswith("[H:10]")


def test_spice_lazy_group_selection():
    ds = d.read(SPICE_SAMPLE, groups=["C#C.[Na+]"])
    assert len(ds) == 5 and set(ds.numbers.tolist()) == {1, 6, 11}
    names = [n for n, _ in d.iter_spice_groups(SPICE_SAMPLE)]
    assert names == ["103147721", "C#C.[Na+]"]


def test_mlearn_li_with_stress():
    p = data("materials", "li_mlearn_training_every6.json")
    raw = json.load(open(p))
    ds = d.read(p)
    assert d.detect_format(p) == "mlearn" and len(ds) == len(raw) == 41 and ds.pbc.all()
    assert ds.energy[0] == raw[0]["outputs"]["energy"]
    np.testing.assert_array_equal(ds[0].forces, np.array(raw[0]["outputs"]["forces"]))
    vs = raw[0]["outputs"]["virial_stress"]  # kbar, VASP order xx yy zz xy yz zx, sign as ASE's VASP reader
    kbar = 0.1 / 160.21766208  # eV/Å³
    np.testing.assert_allclose(ds.stress[0][0, 0], -vs[0] * kbar, rtol=1e-6)
    np.testing.assert_allclose(ds.stress[0][0, 1], -vs[3] * kbar, rtol=1e-6)
    np.testing.assert_allclose(ds.stress[0][1, 2], -vs[4] * kbar, rtol=1e-6)
    np.testing.assert_allclose(ds.stress[0], ds.stress[0].T)
    assert d.read(data("materials", "li_mlearn_test.json")).n_atoms.max() == 54


def test_extxyz_tial_virial_to_stress():
    import ase.io

    p = data("materials", "tial_first40.xyz")
    ds = d.read(p)
    atoms = ase.io.read(p, 0)
    assert d.detect_format(p) == "ase" and len(ds) == 40 and set(ds.species) == {13, 22}
    vir = np.array(atoms.info["virial"]).reshape(3, 3)
    np.testing.assert_allclose(ds.stress[0], -vir / atoms.get_volume(), rtol=1e-10)
    np.testing.assert_allclose(ds[0].forces, atoms.arrays["force"])
    assert ds.energy[0] == pytest.approx(-1703.64063822)


def test_ase_db_and_roundtrip(tmp_path, ethanol_test):
    import ase.db

    db = ase.db.connect(tmp_path / "x.db")
    for i in range(3):
        db.write(ethanol_test[i].to_ase())
    ds = d.read(tmp_path / "x.db")
    assert len(ds) == 3
    np.testing.assert_allclose(ds.energy, ethanol_test.energy[:3])
    np.testing.assert_allclose(ds.forces, ethanol_test.forces[:27])


def test_bundled_samples_load():
    tr = d.read(d.bundled_path("rmd17_ethanol_train_01.npz"))
    sp = d.read(d.bundled_path("SPICE-1.1.4_n2.hdf5"))
    assert len(tr) == 1000 and len(sp) == 55
    assert (d.BUNDLED_DIR / "LICENSE-rmd17-CC0").exists() and (d.BUNDLED_DIR / "LICENSE-SPICE-sample-MIT").exists()
    with pytest.raises(FileNotFoundError, match="not a bundled sample"):
        d.bundled_path("rmd17_aspirin_train_01.npz")


def test_explicit_format_overrides_detection(tmp_path):
    src = ETHANOL_TEST
    dst = tmp_path / "ethanol.data"
    dst.write_bytes(src.read_bytes())
    assert len(d.read(dst, format="rmd17")) == 1000
    with pytest.raises(d.DataError, match="missing key"):
        d.read(dst, format="sgdml")
