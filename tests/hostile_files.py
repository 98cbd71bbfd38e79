"""Bad but realistic input files for the hostile-input suite, built from the committed real data."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import SPICE_SAMPLE, data

RMD17_KEYS = ("nuclear_charges", "coords", "energies", "forces")


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def build(d: Path) -> dict[str, Path]:
    """Every file the suite uses, by name."""
    import ase.io
    import h5py

    raw = np.load(data("rmd17", "rmd17_ethanol_train_01.npz"))
    eth = {k: raw[k][:30] if k != "nuclear_charges" else raw[k] for k in RMD17_KEYS}
    f: dict[str, Path] = {"dir": d, "missing": d / "nothing_here.xyz"}
    f["ok"] = _npz(d / "rmd17_ethanol_ok.npz", **eth)
    f["ok40"] = _npz(
        d / "rmd17_ethanol_ok40.npz", **{k: raw[k][:40] if k != "nuclear_charges" else raw[k] for k in RMD17_KEYS}
    )
    f["ten"] = _npz(d / "rmd17_ethanol_ten.npz", **{k: v if k == "nuclear_charges" else v[:10] for k, v in eth.items()})
    f["truncated"] = d / "truncated.npz"
    f["truncated"].write_bytes(f["ok"].read_bytes()[:300])
    f["wrongkeys"] = _npz(d / "wrongkeys.npz", a=np.zeros(3), b=np.ones(2))
    f["mismatch"] = _npz(d / "mismatch.npz", **{**eth, "energies": eth["energies"][:29]})
    f["z0"] = _npz(
        d / "z0.npz", **{**eth, "nuclear_charges": np.where(eth["nuclear_charges"] == 8, 0, eth["nuclear_charges"])}
    )
    f["z200"] = _npz(
        d / "z200.npz", **{**eth, "nuclear_charges": np.where(eth["nuclear_charges"] == 8, 200, eth["nuclear_charges"])}
    )
    close = eth["coords"].copy()
    close[3, 1] = close[3, 0] + 0.01
    f["close"] = _npz(d / "close.npz", **{**eth, "coords": close})
    f["sgdml_fshape"] = _npz(
        d / "sgdml_fshape.npz", z=eth["nuclear_charges"], R=eth["coords"], E=eth["energies"], F=eth["forces"][:, :8]
    )
    frames = []
    from ase import Atoms

    for i in range(12):
        a = Atoms(numbers=eth["nuclear_charges"], positions=eth["coords"][i])
        a.info["REF_energy"] = float(eth["energies"][i]) * 0.0433641
        a.arrays["REF_forces"] = eth["forces"][i] * 0.0433641
        frames.append(a)
    f["forces_only"], f["energy_only"] = d / "forces_only.extxyz", d / "energy_only.extxyz"
    fo_frames, en_frames = [], []
    for a in frames[:6]:
        b = Atoms(numbers=a.numbers, positions=a.positions)
        b.arrays["forces"] = a.arrays["REF_forces"]
        fo_frames.append(b)
        c = Atoms(numbers=a.numbers, positions=a.positions)
        c.info["energy"] = a.info["REF_energy"]
        en_frames.append(c)
    ase.io.write(f["forces_only"], fo_frames)
    ase.io.write(f["energy_only"], en_frames)
    f["mace"] = d / "mace.extxyz"
    ase.io.write(f["mace"], frames)
    gap = [a.copy() for a in frames]
    for a, b in zip(gap, frames):
        a.info, a.arrays["REF_forces"] = dict(b.info), b.arrays["REF_forces"]
    del gap[2].info["REF_energy"]
    f["mace_gap"] = d / "mace_gap.extxyz"
    ase.io.write(f["mace_gap"], gap)
    zc = Atoms(numbers=eth["nuclear_charges"], positions=eth["coords"][0], pbc=True)  # periodic, no cell
    f["zero_cell"] = d / "zero_cell.extxyz"
    ase.io.write(f["zero_cell"], zc)
    vir = Atoms(numbers=eth["nuclear_charges"], positions=eth["coords"][0])
    vir.info["energy"] = -4209.0
    vir.info["virial"] = np.eye(3).ravel()
    f["virial_nocell"] = d / "virial_nocell.extxyz"
    ase.io.write(f["virial_nocell"], vir)
    one = Atoms("H", positions=[[0.0, 0.0, 0.0]])
    f["one_atom"] = d / "one_atom.extxyz"
    ase.io.write(f["one_atom"], one)
    big = Atoms(numbers=eth["nuclear_charges"], positions=eth["coords"][0], cell=[12.0, 12.0, 12.0])
    # a lattice to repeat along, but no periodic boundaries
    f["free_with_cell"] = d / "free_with_cell.extxyz"
    ase.io.write(f["free_with_cell"], big)
    small = Atoms(numbers=eth["nuclear_charges"], positions=eth["coords"][0], cell=[6.0, 6.0, 6.0], pbc=True)
    f["small_box"] = d / "small_box.extxyz"  # periodic, but the cell is below twice the cutoff
    ase.io.write(f["small_box"], small)
    f["empty"] = d / "empty.xyz"
    f["empty"].write_text("")
    f["garbage_h5"] = d / "garbage.h5"
    f["garbage_h5"].write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 4)
    f["spice_empty_group"] = d / "spice_empty_group.hdf5"
    with h5py.File(f["spice_empty_group"], "w") as h:
        with h5py.File(SPICE_SAMPLE) as src:
            first = sorted(src)[0]
            src.copy(src[first], h, name=first)  # a real molecule, and beside it one without conformations
        g = h.create_group("c1ccccc1")
        g["atomic_numbers"] = np.array([6] * 6 + [1] * 6, np.int16)
        g["conformations"] = np.zeros((0, 12, 3))
        g["dft_total_energy"] = np.zeros(0)
        g["dft_total_gradient"] = np.zeros((0, 12, 3))
        g["smiles"] = np.array([b"c1ccccc1"])
        g["subset"] = np.array([b"test"])
    f["spice_only_empty"] = d / "spice_only_empty.hdf5"
    with h5py.File(f["spice_only_empty"], "w") as h:
        with h5py.File(f["spice_empty_group"]) as src:
            src.copy(src["c1ccccc1"], h, name="c1ccccc1")
    e = eth["energies"].copy()
    e[4] = np.nan
    f["nan_energy"] = _npz(d / "nan_energy.npz", **{**eth, "energies": e})
    fo = eth["forces"].copy()
    fo[7, 2, 1] = np.inf
    f["inf_force"] = _npz(d / "inf_force.npz", **{**eth, "forces": fo})
    f["li"] = data("materials", "li_mlearn_test.json")
    f["e0s_symbol"] = d / "e0s_symbol.yaml"
    f["e0s_symbol"].write_text("H: -13.6\nC: -1029.0\nXx: -2041.0\n")
    f["e0s_text"] = d / "e0s_text.yaml"
    f["e0s_text"].write_text("H: -13.6\nC: low\nO: -2041.0\n")
    f["e0s_missing"] = d / "e0s_missing.json"
    f["e0s_missing"].write_text(json.dumps({"H": -13.6}))
    f["foreign"] = d / "project"
    f["foreign"].mkdir()
    (f["foreign"] / "thesis.tex").write_text("my thesis")
    f["bad_yaml"] = d / "bad.yaml"
    f["bad_yaml"].write_text("model: schnet\ntrain: [unclosed\n")
    f["list_yaml"] = d / "list.yaml"
    f["list_yaml"].write_text("- train\n- ok.npz\n")
    f["afile"] = d / "afile.txt"
    f["afile"].write_text("not a folder")
    return f


@contextlib.contextmanager
def holding_lock(folder: Path):
    """Another process holding ``folder``'s run-folder lock; yields its pid."""
    code = (
        "import time\nfrom so3lib.training.run_folder import RunFolder\n"
        f"with RunFolder({str(folder)!r}).lock():\n    print('locked', flush=True)\n    time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()
