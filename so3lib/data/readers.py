"""Readers: every supported file format → one validated `Dataset` in Å and eV.

Formats: ``rmd17`` (npz: nuclear_charges, coords, energies, forces; kcal/mol), ``sgdml`` (npz: R, z, E, F;
units from ``r_unit``/``e_unit`` when present, else Å and kcal/mol as in MD17), ``spice`` (HDF5, one group per
molecule; bohr, hartree, forces = −dft_total_gradient), ``mlearn`` (JSON list of pymatgen structure dicts with
``outputs.energy/forces/virial_stress``) and ``ase`` (anything ``ase.io.read`` reads: extxyz, ase db, ...).
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from so3lib import units
from so3lib.data.dataset import Dataset
from so3lib.data.errors import DataError

FORMATS = ("rmd17", "sgdml", "spice", "mlearn", "ase")
_READERS: dict[str, Callable[..., Dataset]] = {}


def _reader(name: str):
    def deco(fn):
        _READERS[name] = fn
        return fn

    return deco


def read(path: str | os.PathLike, format: str | None = None, **kwargs) -> Dataset:
    """Read a data file into a validated `Dataset` (Å, eV, eV/Å, eV/Å³).

    ``format`` is one of `FORMATS`; by default it is detected from the content and extension. Extra keyword
    arguments go to the format's reader (e.g. ``groups=[...]`` for SPICE, ``index=':'`` for ASE)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such data file")
    if path.is_dir():
        raise DataError(path, "is a directory, expected a data file")
    fmt = format or detect_format(path)
    if fmt not in _READERS:
        raise DataError(path, f"unknown format '{fmt}', choose one of {FORMATS}")
    return _READERS[fmt](path, **kwargs)


def detect_format(path: str | os.PathLike) -> str:
    """Guess the format from magic bytes, keys and the extension."""
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head[:2] == b"PK" or path.suffix == ".npz":
        keys = set(_open_npz(path).files)
        if "nuclear_charges" in keys or "coords" in keys:
            return "rmd17"
        if "R" in keys or "z" in keys:
            return "sgdml"
        raise DataError(
            path,
            f"npz file with keys {sorted(keys)} is neither rMD17 (nuclear_charges, coords, "
            "energies, forces) nor sGDML (R, z, E, F)",
        )
    if head == b"\x89HDF\r\n\x1a\n" or path.suffix in (".h5", ".hdf5"):
        return "spice"
    if path.suffix == ".json":
        with open(path, "rb") as fh:
            start = fh.read(4096).lstrip()
        if start.startswith(b"[") and b'"structure"' in start:
            return "mlearn"
    return "ase"


# ---------------------------------------------------------------------------------------------- npz
def _open_npz(path: Path):
    try:
        return np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise DataError(path, f"corrupted or truncated npz file ({type(exc).__name__}: {exc})") from exc


def _get(npz, path: Path, key: str, required: bool = True):
    if key not in npz.files:
        if not required:
            return None
        raise DataError(path, f"missing key (file has {sorted(npz.files)})", key)
    try:
        return npz[key]
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise DataError(path, f"corrupted or truncated array ({type(exc).__name__}: {exc})", key) from exc


def _molecule_name(path: Path) -> str:
    stem = path.stem
    for prefix in ("rmd17_", "md17_"):
        if stem.startswith(prefix):
            stem = stem[len(prefix) :]
    for suffix in ("_train", "_test"):
        if suffix in stem:
            stem = stem[: stem.index(suffix)]
    return stem


@_reader("rmd17")
def read_rmd17(path: Path, indices: Sequence[int] | None = None) -> Dataset:
    """rMD17 npz (Christensen & von Lilienfeld 2020): coords Å, energies kcal/mol, forces kcal/mol/Å.
    ``indices`` selects frames (as the figshare split files do)."""
    npz = _open_npz(path)
    z = _get(npz, path, "nuclear_charges")
    r = _get(npz, path, "coords")
    e = _get(npz, path, "energies")
    f = _get(npz, path, "forces")
    _check_frames(path, {"coords": r, "energies": e, "forces": f})
    frame = np.arange(len(r))
    if indices is not None:
        idx = np.asarray(indices, np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(r)):
            raise DataError(path, f"split index {int(idx.max())} out of range for {len(r)} frames", "coords")
        r, e, f, frame = r[idx], e[idx], f[idx], frame[idx]
    meta = {"name": np.full(len(r), _molecule_name(path), dtype=object)}
    if "old_indices" in npz.files:
        meta["md17_index"] = npz["old_indices"][frame]
    return Dataset.from_arrays(
        source=str(path),
        numbers=z,
        positions=r,
        energy=e * units.KCAL_PER_MOL_EV,
        forces=f * units.KCAL_PER_MOL_EV,
        meta=meta,
        frame_index=frame,
        keys={"numbers": "nuclear_charges", "positions": "coords", "energy": "energies", "forces": "forces"},
    )


def _check_frames(path: Path, arrays: dict) -> None:
    n = {k: (len(v) if np.ndim(v) else 0) for k, v in arrays.items()}
    first = next(iter(n))
    for k, v in n.items():
        if v != n[first]:
            raise DataError(path, f"{v} frames, but '{first}' has {n[first]}", k)


@_reader("sgdml")
def read_sgdml(path: Path) -> Dataset:
    """sGDML / original MD17 npz: R (F, N, 3), z (N,), E (F,) or (F, 1), F (F, N, 3); optional lattice
    (periodic), r_unit and e_unit (default Å and kcal/mol, as in the MD17 files)."""
    npz = _open_npz(path)
    z = _get(npz, path, "z")
    r = _get(npz, path, "R")
    e = _get(npz, path, "E", required=False)
    f = _get(npz, path, "F", required=False)
    arrays = {"R": r, **({"E": e} if e is not None else {}), **({"F": f} if f is not None else {})}
    _check_frames(path, arrays)
    e_unit = str(npz["e_unit"]) if "e_unit" in npz.files else "kcal/mol"
    r_unit = str(npz["r_unit"]) if "r_unit" in npz.files else "Ang"
    try:
        ke, kr = units.ENERGY_UNITS_EV[e_unit.lower()], units.LENGTH_UNITS_ANGSTROM[r_unit.lower()]
    except KeyError as exc:
        raise DataError(path, f"unsupported unit {exc}", "e_unit/r_unit") from exc
    cell, pbc = None, None
    if "lattice" in npz.files:
        cell = np.asarray(npz["lattice"], float) * kr
        pbc = np.ones(3, bool)
    name = str(npz["name"]) if "name" in npz.files else _molecule_name(path)
    return Dataset.from_arrays(
        source=str(path),
        numbers=z,
        positions=r * kr,
        cell=cell,
        pbc=pbc,
        energy=None if e is None else np.reshape(e, (len(r), -1))[:, 0] * ke,
        forces=None if f is None else f * ke / kr,
        meta={"name": np.full(len(r), name, dtype=object)},
        keys={"numbers": "z", "positions": "R", "energy": "E", "forces": "F", "cell": "lattice"},
    )


# ---------------------------------------------------------------------------------------------- SPICE
SPICE_KEYS = ("atomic_numbers", "conformations", "dft_total_energy", "dft_total_gradient")


def iter_spice_groups(
    path: str | os.PathLike, groups: Sequence[str] | None = None, energy_key: str = "dft_total_energy"
) -> Iterator[tuple[str, dict]]:
    """Yield (group name, arrays in Å/eV) one molecule at a time, reading only the needed keys, so a
    tens-of-GB SPICE file is never loaded whole. Arrays: numbers (n,), positions (C, n, 3) Å,
    energy (C,) eV, forces (C, n, 3) eV/Å = −gradient, smiles, subset."""
    import h5py

    path = Path(path)
    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(path, f"corrupted, truncated or not an HDF5 file ({exc})") from exc
    with fh:
        names = list(fh.keys()) if groups is None else list(groups)
        for name in names:
            if name not in fh:
                raise DataError(path, "no such molecule group", name)
            g = fh[name]
            missing = [k for k in ("atomic_numbers", "conformations", energy_key, "dft_total_gradient") if k not in g]
            if missing:
                raise DataError(path, f"group '{name}' lacks {missing}", f"{name}/{missing[0]}")
            try:
                z = np.asarray(g["atomic_numbers"][()])
                r = np.asarray(g["conformations"][()], np.float64)
                e = np.asarray(g[energy_key][()], np.float64)
                grad = np.asarray(g["dft_total_gradient"][()], np.float64)
            except (OSError, KeyError) as exc:
                raise DataError(path, f"cannot read group '{name}' ({exc})", name) from exc
            n = len(r)
            for key, arr, shape in (
                ("conformations", r, (n, len(z), 3)),
                (energy_key, e, (n,)),
                ("dft_total_gradient", grad, (n, len(z), 3)),
            ):
                if arr.shape != shape:
                    raise DataError(path, f"shape {arr.shape}, expected {shape}", f"{name}/{key}")
            yield (
                name,
                {
                    "numbers": z,
                    "positions": r * units.BOHR_ANGSTROM,
                    "energy": e * units.HARTREE_EV,
                    "forces": -grad * units.HARTREE_PER_BOHR_EV_PER_ANGSTROM,
                    "smiles": _h5_str(g, "smiles"),
                    "subset": _h5_str(g, "subset"),
                },
            )


def _h5_str(g, key: str) -> str:
    if key not in g:
        return ""
    v = g[key][()]
    v = v[0] if np.ndim(v) else v
    return v.decode() if isinstance(v, bytes) else str(v)


@_reader("spice")
def read_spice(path: Path, groups: Sequence[str] | None = None, energy_key: str = "dft_total_energy") -> Dataset:
    """SPICE HDF5 (1.x / 2.x layout) into memory, group by group. For the full file use the packed store."""
    parts = []
    for name, a in iter_spice_groups(path, groups, energy_key):
        c = len(a["positions"])
        if c == 0:
            continue
        parts.append(
            Dataset.from_arrays(
                source=str(path),
                numbers=a["numbers"],
                positions=a["positions"],
                energy=a["energy"],
                forces=a["forces"],
                meta={
                    "name": np.full(c, name, dtype=object),
                    "smiles": np.full(c, a["smiles"], dtype=object),
                    "subset": np.full(c, a["subset"], dtype=object),
                },
                keys={
                    "numbers": f"{name}/atomic_numbers",
                    "positions": f"{name}/conformations",
                    "energy": f"{name}/{energy_key}",
                    "forces": f"{name}/dft_total_gradient",
                },
            )
        )
    if not parts:
        raise DataError(path, "empty dataset: no molecule group with conformations")
    return Dataset.concatenate(parts)


# ---------------------------------------------------------------------------------------------- mlearn
@_reader("mlearn")
def read_mlearn(path: Path) -> Dataset:
    """mlearn JSON (Zuo et al. 2020): a list of {structure: pymatgen dict, outputs: {energy eV, forces eV/Å,
    virial_stress (6,) kbar in VASP order xx yy zz xy yz zx}}. Parsed without pymatgen. Stress follows ASE's
    VASP reader: stress = −virial_stress · 0.1 GPa."""
    try:
        with open(path) as fh:
            entries = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(path, f"corrupted or truncated JSON ({exc})") from exc
    if not isinstance(entries, list) or not entries:
        raise DataError(path, "empty dataset: expected a non-empty JSON list of entries")
    from ase.data import atomic_numbers as z_of

    numbers, positions, cells, energy, forces, stress, tags = [], [], [], [], [], [], []
    for f, entry in enumerate(entries):
        try:
            st, out = entry["structure"], entry["outputs"]
            sites = st["sites"]
            lattice = np.asarray(st["lattice"]["matrix"], float)
            sym = [s["species"][0]["element"] for s in sites]
            xyz = np.asarray([s["xyz"] for s in sites], float)
            e, fr = float(out["energy"]), np.asarray(out["forces"], float)
        except (KeyError, TypeError, IndexError) as exc:
            raise DataError(path, f"malformed entry: missing {exc}", str(exc).strip("'"), f) from exc
        try:
            numbers.append(np.array([z_of[s] for s in sym]))
        except KeyError as exc:
            raise DataError(path, f"unknown element {exc}", "structure.sites.species", f) from exc
        if fr.shape != xyz.shape:
            raise DataError(path, f"forces shape {fr.shape} for {len(xyz)} sites", "outputs.forces", f)
        positions.append(xyz)
        cells.append(lattice)
        energy.append(e)
        forces.append(fr)
        vs = out.get("virial_stress")
        if vs is not None and len(vs) == 6:
            xx, yy, zz, xy, yz, zx = (-float(v) * units.KBAR_EV_PER_ANGSTROM3 for v in vs)
            stress.append(np.array([[xx, xy, zx], [xy, yy, yz], [zx, yz, zz]]))
        else:
            stress.append(np.full((3, 3), np.nan))
        tags.append(f"{entry.get('group', '')}".strip())
    n = np.array([len(p) for p in positions])
    return Dataset.from_arrays(
        source=str(path),
        numbers=np.concatenate(numbers),
        positions=np.concatenate(positions),
        offsets=np.concatenate([[0], np.cumsum(n)]),
        cell=np.stack(cells),
        pbc=np.ones((len(n), 3), bool),
        energy=np.array(energy),
        forces=np.concatenate(forces),
        stress=np.stack(stress),
        meta={"name": np.array(tags, dtype=object)},
        keys={
            "numbers": "structure.sites",
            "positions": "structure.sites.xyz",
            "energy": "outputs.energy",
            "forces": "outputs.forces",
            "stress": "outputs.virial_stress",
            "cell": "structure.lattice",
        },
    )


# ---------------------------------------------------------------------------------------------- ASE
@_reader("ase")
def read_ase(path: Path, index: str = ":", format: str | None = None) -> Dataset:
    """Anything ase.io reads. Energy from the calculator or info['energy']; forces from the calculator or
    arrays 'forces'/'force'; stress from the calculator, info['stress'] or info['virial'] (stress = −virial/V)."""
    import ase.io

    try:
        frames = ase.io.read(str(path), index=index, format=format)
    except FileNotFoundError:
        raise
    except Exception as exc:  # ase raises many types for broken files
        raise DataError(path, f"cannot be read by ase.io ({type(exc).__name__}: {exc})") from exc
    if not isinstance(frames, list):
        frames = [frames]
    if not frames:
        raise DataError(path, "empty dataset: no frames")
    from so3lib.data.dataset import Structure

    structures = []
    for f, atoms in enumerate(frames):
        res = dict(atoms.calc.results) if atoms.calc is not None else {}
        e = res.get("energy", atoms.info.get("energy"))
        forces = res.get("forces", atoms.arrays.get("forces", atoms.arrays.get("force")))
        stress = res.get("stress", atoms.info.get("stress"))
        if stress is None and "virial" in atoms.info:
            vol = abs(atoms.get_volume()) if atoms.pbc.any() else 0.0
            if vol <= 0:
                raise DataError(path, "virial given for a frame without a periodic cell", "virial", f)
            stress = -np.asarray(atoms.info["virial"], float).reshape(3, 3) / vol
        if stress is not None:
            stress = np.asarray(stress, float)
            if stress.shape == (6,):  # Voigt xx yy zz yz xz xy (ASE)
                from ase.stress import voigt_6_to_full_3x3_stress

                stress = voigt_6_to_full_3x3_stress(stress)
            stress = stress.reshape(3, 3)
        info = {"name": str(atoms.info.get("config_type", atoms.get_chemical_formula()))}
        structures.append(
            Structure(
                numbers=np.asarray(atoms.numbers),
                positions=np.asarray(atoms.positions, float),
                cell=np.asarray(atoms.cell.array, float),
                pbc=np.asarray(atoms.pbc, bool),
                energy=None if e is None else float(e),
                forces=None if forces is None else np.asarray(forces, float),
                stress=stress,
                info=info,
            )
        )
    for f, s in enumerate(structures):
        if s.forces is not None and s.forces.shape != s.positions.shape:
            raise DataError(path, f"forces shape {s.forces.shape} for {len(s)} atoms", "forces", f)
    return Dataset.from_structures(structures, source=str(path))
