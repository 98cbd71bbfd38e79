"""SPICE groundwork (issue #6): formal charges from SMILES, MACE-OFF filtering with a drop report on the real
sample, and the rMD17-in-SPICE-layout file that reads back to the rMD17 values."""

import importlib.util
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import ETHANOL_TRAIN, SPICE_SAMPLE, data

import so3lib.data as d
from so3lib.data.spice import filter_spice, formal_charge


@pytest.mark.parametrize(
    "smiles,charge",
    [
        ("C#C.[Na+]", 1),
        ("[H:3][C:1]#[C:2][H:4].[Na+:5]", 1),
        ("C[N+](=O)[O-]", 0),
        ("[NH4+].[Cl-]", 0),
        ("[Fe+3]", 3),
        ("[O--]", -2),
        ("[C@@H](N)(C)C(=O)O", 0),
        ("CCO", 0),
        ("[O-]C(=O)C", -1),
        ("[Ca++]", 2),
    ],
)
def test_formal_charge(smiles, charge):
    assert formal_charge(smiles) == charge


def test_mace_off_filter_on_the_real_sample():
    p = SPICE_SAMPLE
    kept, rep = filter_spice(p)  # both sample molecules are charged ([N+], [Na+]); Na is also not a MACE-OFF element
    assert kept is None and rep["conformers_in"] == 55
    assert rep["dropped"]["charged"]["names"] == ["103147721"] and rep["dropped"]["element"]["names"] == ["C#C.[Na+]"]
    kept, rep = filter_spice(p, neutral_only=False)
    assert rep["dropped"]["element"]["names"] == ["C#C.[Na+]"] and len(kept) == 50
    fmax = np.abs(kept.forces).reshape(50, -1).max(axis=1)
    thr = float(np.median(fmax))
    kept2, rep2 = filter_spice(p, neutral_only=False, max_force_ev_per_a=thr)
    assert rep2["dropped"]["max_force"]["conformers"] == int((fmax > thr).sum()) > 0
    assert len(kept2) == int((fmax <= thr).sum()) and np.abs(kept2.forces).max() <= thr


def test_rmd17_in_spice_layout(tmp_path):
    spec = importlib.util.spec_from_file_location("msl", Path(__file__).parents[1] / "scripts" / "make_spice_like.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.write_spice_like(data("rmd17"), tmp_path / "s.hdf5", frames=20)
    ds = d.read(out)
    assert len(ds) == 200 and len(set(ds.meta["name"])) == 10
    eth = d.read(ETHANOL_TRAIN)
    sel = ds.meta["name"] == "ethanol"
    np.testing.assert_allclose(ds.energy[sel][0], eth.energy[0], rtol=1e-12)
    np.testing.assert_allclose(ds.subset(np.nonzero(sel)[0][:1]).forces, eth[0].forces, rtol=1e-5, atol=1e-5)
    with h5py.File(out) as f:
        assert f["ethanol"]["smiles"][0] == b"CCO"
    kept, rep = filter_spice(out)
    assert rep["molecules_kept"] == 10 and rep["dropped"]["charged"]["molecules"] == 0
    s = d.split_by_group(ds.meta["name"], (0.8, 0.1, 0.1), seed=0)
    assert not set(ds.meta["name"][s["train"]]) & set(ds.meta["name"][s["test"]])
