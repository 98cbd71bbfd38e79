"""Bad input gets a clear error naming the file, the key and the frame; nothing is dropped silently."""

import json
import shutil

import h5py
import numpy as np
import pytest
from conftest import ETHANOL_TEST, SPICE_SAMPLE, data

import so3lib.data as d


@pytest.fixture()
def rmd17_arrays():
    raw = np.load(ETHANOL_TEST)
    return {k: raw[k][:20].copy() if raw[k].ndim and k != "nuclear_charges" else raw[k].copy() for k in raw.files}


def write(tmp_path, arrays, name="bad.npz"):
    p = tmp_path / name
    np.savez(p, **arrays)
    return p


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        d.read(tmp_path / "nope.npz")


def test_missing_key(tmp_path, rmd17_arrays):
    del rmd17_arrays["forces"]
    p = write(tmp_path, rmd17_arrays)
    with pytest.raises(d.DataError, match=r"bad.npz, key 'forces': missing key"):
        d.read(p)


def test_nan_names_key_and_frame(tmp_path, rmd17_arrays):
    rmd17_arrays["forces"][13, 2, 1] = np.nan
    with pytest.raises(d.DataError, match=r"bad.npz, key 'forces', frame 13: NaN or infinite"):
        d.read(write(tmp_path, rmd17_arrays))


def test_inf_positions(tmp_path, rmd17_arrays):
    rmd17_arrays["coords"][4, 0, 0] = np.inf
    with pytest.raises(d.DataError, match=r"key 'coords', frame 4: NaN or infinite"):
        d.read(write(tmp_path, rmd17_arrays))


def test_inf_energy(tmp_path, rmd17_arrays):
    rmd17_arrays["energies"][6] = -np.inf
    with pytest.raises(d.DataError, match=r"key 'energies', frame 6"):
        d.read(write(tmp_path, rmd17_arrays))


def test_frame_counts_disagree(tmp_path, rmd17_arrays):
    rmd17_arrays["energies"] = rmd17_arrays["energies"][:-1]
    with pytest.raises(d.DataError, match=r"key 'energies': 19 frames, but 'coords' has 20"):
        d.read(write(tmp_path, rmd17_arrays))


def test_wrong_shape(tmp_path, rmd17_arrays):
    rmd17_arrays["forces"] = rmd17_arrays["forces"][:, :8]
    with pytest.raises(d.DataError, match=r"key 'forces': shape \(20, 8, 3\)"):
        d.read(write(tmp_path, rmd17_arrays))
    rmd17_arrays["forces"] = np.zeros((20, 9, 3))
    rmd17_arrays["nuclear_charges"] = rmd17_arrays["nuclear_charges"][:7]
    with pytest.raises(d.DataError, match=r"key 'nuclear_charges': expected 9 atomic numbers"):
        d.read(write(tmp_path, rmd17_arrays))


def test_unknown_element(tmp_path, rmd17_arrays):
    rmd17_arrays["nuclear_charges"][3] = 0
    with pytest.raises(d.DataError, match=r"key 'nuclear_charges', frame 0: unknown element with atomic number 0"):
        d.read(write(tmp_path, rmd17_arrays))
    rmd17_arrays["nuclear_charges"][3] = 130
    with pytest.raises(d.DataError, match="atomic number 130"):
        d.read(write(tmp_path, rmd17_arrays))


def test_atoms_too_close(tmp_path, rmd17_arrays):
    rmd17_arrays["coords"][11, 4] = rmd17_arrays["coords"][11, 2] + 0.05
    with pytest.raises(d.DataError, match=r"key 'coords', frame 11: atoms 2 and 4 are 0.0866 Å apart"):
        d.read(write(tmp_path, rmd17_arrays))


def test_atoms_too_close_across_periodic_boundary(tmp_path):
    import ase
    import ase.io

    a = ase.Atoms("Li2", positions=[[0.02, 1, 1], [3.97, 1, 1]], cell=np.eye(3) * 4.0, pbc=True)
    a.info["energy"] = -3.0
    ase.io.write(tmp_path / "li.extxyz", a)
    with pytest.raises(d.DataError, match=r"li.extxyz, key 'positions', frame 0: two atoms are 0.05 Å apart"):
        d.read(tmp_path / "li.extxyz")


def test_empty_dataset(tmp_path, rmd17_arrays):
    for k in ("coords", "energies", "forces", "old_indices", "old_energies", "old_forces"):
        rmd17_arrays[k] = rmd17_arrays[k][:0]
    with pytest.raises(d.DataError, match="empty dataset"):
        d.read(write(tmp_path, rmd17_arrays))
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(d.DataError, match="empty dataset"):
        d.read(tmp_path / "empty.json", format="mlearn")


def test_zero_volume_cell_with_pbc(tmp_path):
    entries = json.load(open(data("materials", "li_mlearn_test.json")))[:3]
    entries[2]["structure"]["lattice"]["matrix"][2] = [0.0, 0.0, 0.0]
    (tmp_path / "li.json").write_text(json.dumps(entries))
    with pytest.raises(d.DataError, match=r"li.json, key 'structure.lattice', frame 2: .*zero-volume cell"):
        d.read(tmp_path / "li.json")


def test_truncated_npz(tmp_path):
    src = ETHANOL_TEST.read_bytes()
    p = tmp_path / "trunc.npz"
    p.write_bytes(src[: len(src) // 2])
    with pytest.raises(d.DataError, match="trunc.npz.*corrupted or truncated"):
        d.read(p)


def test_corrupted_hdf5(tmp_path):
    src = SPICE_SAMPLE.read_bytes()
    p = tmp_path / "bad.hdf5"
    p.write_bytes(src[:2000])
    with pytest.raises(d.DataError, match="bad.hdf5.*(corrupted|cannot read)"):
        d.read(p)


def test_spice_missing_key_and_nan(tmp_path):
    p = tmp_path / "s.hdf5"
    shutil.copy(SPICE_SAMPLE, p)
    with h5py.File(p, "r+") as f:
        g = f["103147721"]["dft_total_gradient"]
        arr = g[()]
        arr[17, 3, 0] = np.nan
        g[...] = arr
        del f["C#C.[Na+]"]["dft_total_energy"]
    with pytest.raises(d.DataError, match=r"key '103147721/dft_total_gradient', frame 17: NaN"):
        d.read(p, groups=["103147721"])
    with pytest.raises(d.DataError, match=r"key 'C#C.\[Na\+\]/dft_total_energy'"):
        d.read(p, groups=["C#C.[Na+]"])


def test_truncated_json_and_xyz(tmp_path):
    txt = data("materials", "li_mlearn_test.json").read_text()
    (tmp_path / "t.json").write_text(txt[: len(txt) // 3])
    with pytest.raises(d.DataError, match="t.json.*corrupted or truncated JSON"):
        d.read(tmp_path / "t.json", format="mlearn")
    lines = data("materials", "tial_first40.xyz").read_text().splitlines()
    (tmp_path / "t.xyz").write_text("\n".join(lines[:5]) + "\n")  # header promises 2 atoms; frame 2 is cut
    with pytest.raises(d.DataError, match="t.xyz.*cannot be read"):
        d.read(tmp_path / "t.xyz")


def test_mlearn_unknown_element(tmp_path):
    entries = json.load(open(data("materials", "li_mlearn_test.json")))[:2]
    entries[1]["structure"]["sites"][0]["species"][0]["element"] = "Xx"
    (tmp_path / "li.json").write_text(json.dumps(entries))
    with pytest.raises(d.DataError, match=r"li.json, key 'structure.sites.species', frame 1: unknown element"):
        d.read(tmp_path / "li.json")
