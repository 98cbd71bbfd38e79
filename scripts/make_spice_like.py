"""Write a SPICE-layout HDF5 file from the ten rMD17 molecules (real multi-molecule data for tests and
notebooks): one group per molecule with atomic_numbers, conformations (bohr), dft_total_energy (hartree),
dft_total_gradient (hartree/bohr, = −forces), smiles and subset, exactly as SPICE stores them.

usage: python scripts/make_spice_like.py [--rmd17-dir ../shared/data/rmd17] [--frames 200]
                                         [--out data/rmd17_spice_layout.hdf5]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import h5py
import numpy as np

import so3lib.data as data
from so3lib import units

SMILES = {
    "aspirin": "CC(=O)OC1=CC=CC=C1C(=O)O",
    "azobenzene": "C1=CC=C(C=C1)N=NC2=CC=CC=C2",
    "benzene": "C1=CC=CC=C1",
    "ethanol": "CCO",
    "malonaldehyde": "O=CCC=O",
    "naphthalene": "C1=CC=C2C=CC=CC2=C1",
    "paracetamol": "CC(=O)NC1=CC=C(C=C1)O",
    "salicylic": "C1=CC=C(C(=C1)C(=O)O)O",
    "toluene": "CC1=CC=CC=C1",
    "uracil": "C1=CNC(=O)NC1=O",
}


def write_spice_like(rmd17_dir: Path, out: Path, frames: int = 200, split: str = "train_01") -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(out, "w") as f:
        for mol, smiles in SMILES.items():
            src = rmd17_dir / f"rmd17_{mol}_{split}.npz"
            if not src.exists():
                raise FileNotFoundError(f"{src} missing (rMD17 split files expected in {rmd17_dir})")
            ds = data.read(src)
            idx = np.linspace(0, len(ds) - 1, min(frames, len(ds))).astype(int)
            n = int(ds.n_atoms[0])
            g = f.create_group(mol)
            g["atomic_numbers"] = ds.numbers[:n].astype(np.int16)
            g["conformations"] = (ds.positions.reshape(len(ds), n, 3)[idx] / units.BOHR_ANGSTROM).astype(np.float32)
            g["dft_total_energy"] = ds.energy[idx] / units.HARTREE_EV
            g["dft_total_gradient"] = (
                -ds.forces.reshape(len(ds), n, 3)[idx] / units.HARTREE_PER_BOHR_EV_PER_ANGSTROM
            ).astype(np.float32)
            g["smiles"] = np.array([smiles.encode()], dtype=object)
            g["subset"] = np.array([b"rMD17 in SPICE layout (converted by so3lib)"], dtype=object)
    return out


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rmd17-dir", type=Path, default=Path("../shared/data/rmd17"))
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path("data/rmd17_spice_layout.hdf5"))
    a = ap.parse_args(argv)
    path = write_spice_like(a.rmd17_dir, a.out, a.frames)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
