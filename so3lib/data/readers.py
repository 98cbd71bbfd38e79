"""Readers: every supported file format → one validated `Dataset` in Å and eV.

Formats: ``rmd17`` (npz: nuclear_charges, coords, energies, forces; kcal/mol), ``sgdml`` (npz: R, z, E, F;
units from ``r_unit``/``e_unit`` when present, else Å and kcal/mol as in MD17), ``spice`` (HDF5, one group per
molecule; bohr, hartree, forces = −dft_total_gradient), ``mlearn`` (JSON list of pymatgen structure dicts with
``outputs.energy/forces/virial_stress``) and ``ase`` (anything ``ase.io.read`` reads: extxyz, ase db, ...).

Label keys: ``read(path, energy_key=..., forces_key=..., stress_key=...)`` names the labels where a file does not
use the format's defaults (MACE-style extxyz: ``energy_key="REF_energy", forces_key="REF_forces"``). A key that
is given must be there (in every frame); a file whose labels are only under other, label-like names fails
loudly instead of loading unlabelled frames.

Non-finite labels: a NaN or infinite energy, force or stress component that the file has is a `DataError`
("NaN or infinite value", naming the file, the file's key and the frame index in the file). A frame is unlabelled
(NaN in the `Dataset`) only where the file has no such label (an extxyz frame without an energy, an sGDML file
without F, an mlearn entry without virial_stress). ``read(path, nonfinite="drop")`` drops the frames with a
non-finite label instead: they are counted in ``Dataset.dropped_nonfinite`` and one warning (logger
``so3lib.data``) names the file, the count and the first frames.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from so3lib import units
from so3lib.data.dataset import NONFINITE, Dataset, finite_labels, merge_drops
from so3lib.data.errors import DataError, MissingFileError

FORMATS = ("rmd17", "sgdml", "spice", "mlearn", "ase")
log = logging.getLogger("so3lib.data")
_SHOW_FRAMES = 10  # dropped frames named in the warning
_READERS: dict[str, Callable[..., Dataset]] = {}


def _reader(name: str):
    def deco(fn):
        _READERS[name] = fn
        return fn

    return deco


def read(
    path: str | os.PathLike,
    format: str | None = None,
    *,
    energy_key: str | None = None,
    forces_key: str | None = None,
    stress_key: str | None = None,
    nonfinite: Literal["error", "drop"] = "error",
    **kwargs,
) -> Dataset:
    """Read a data file into a validated `Dataset` (Å, eV, eV/Å, eV/Å³).

    ``format`` is one of `FORMATS`; by default it is detected from the content and extension. ``energy_key``,
    ``forces_key`` and ``stress_key`` name the labels (None: the format's defaults): for ASE files an
    ``atoms.info`` key (energy, stress) or ``atoms.arrays`` key (forces), the calculator's results for
    'energy'/'forces'/'stress'; for npz files the array names; for SPICE the group's dataset names (a forces key
    ending in 'gradient' is a gradient, forces = −gradient). An explicit key missing in a frame is a
    `DataError` that lists the keys the frame has. Extra keyword arguments go to the format's reader (e.g.
    ``groups=[...]`` for SPICE, ``index=':'`` for ASE).

    ``nonfinite``: what a NaN or infinite label value of the file (energy, force or stress component) does.
    ``"error"`` (default): a `DataError` "<file>, key '<key>', frame <i>: NaN or infinite value" (the key as the
    file names it, the frame's index in the file; for SPICE '<group>/<key>' and the conformer's index in the
    group). ``"drop"``: such frames are removed, recorded in the dataset's ``dropped_nonfinite`` ({"count",
    "frames", "keys"}, see `Dataset`) and one warning is logged (logger ``so3lib.data``) naming the file, the
    count and the first frames; a file whose every frame is dropped is a `DataError`. Labels absent from the file
    are never an error: those frames load unlabelled."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(path, "no such data file")
    if path.is_dir():
        raise DataError(path, "is a directory, expected a data file")
    fmt = format or detect_format(path)
    if fmt not in _READERS:
        raise DataError(path, f"unknown format '{fmt}', choose one of {FORMATS}")
    for name, key in (("energy_key", energy_key), ("forces_key", forces_key), ("stress_key", stress_key)):
        if key is not None and (not isinstance(key, str) or not key):
            raise DataError(path, f"{name} must be a non-empty string, got {key!r}")
    if nonfinite not in NONFINITE:
        raise DataError(path, f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
    ds = _READERS[fmt](
        path, energy_key=energy_key, forces_key=forces_key, stress_key=stress_key, nonfinite=nonfinite, **kwargs
    )
    warn_dropped(path, ds.dropped_nonfinite)
    return ds


def warn_dropped(path: str | os.PathLike, record: dict) -> None:
    """Log the one warning for frames dropped with ``nonfinite="drop"`` (nothing when none were)."""
    if not record["count"]:
        return
    shown = [f"{f} ('{k}')" for f, k in zip(record["frames"][:_SHOW_FRAMES], record["keys"][:_SHOW_FRAMES])]
    more = f", ... ({record['count'] - _SHOW_FRAMES} more)" if record["count"] > _SHOW_FRAMES else ""
    log.warning(
        "%s: dropped %d frame(s) with NaN or infinite labels (nonfinite='drop'): frames %s%s",
        path,
        record["count"],
        ", ".join(shown),
        more,
    )


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


def _get(npz, path: Path, key: str, required: bool = True, given_as: str | None = None):
    """Array ``key``; None when absent and not ``required``. ``given_as`` names the argument that gave the key
    (an explicit label key must be there)."""
    if key not in npz.files:
        if given_as is not None:
            raise DataError(path, f"missing key given as {given_as} (file has {sorted(npz.files)})", key)
        if not required:
            return None
        raise DataError(path, f"missing key (file has {sorted(npz.files)}){_npz_hint(npz, key)}", key)
    try:
        return npz[key]
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise DataError(path, f"corrupted or truncated array ({type(exc).__name__}: {exc})", key) from exc


def _no_stress(path: Path, fmt: str, stress_key: str | None) -> None:
    if stress_key is not None:
        raise DataError(path, f"{fmt} files carry no stress labels: stress_key cannot be given", stress_key)


def _npz_hint(npz, key: str) -> str:
    """A hint naming the energy/forces-like arrays of an npz when a default label array is missing."""
    files = sorted(npz.files)
    if key in ("energies", "E") and any("energ" in k.lower() for k in files):
        return "; name the energy array with energy_key=NAME (--energy-key NAME)"
    if key in ("forces", "F") and any("force" in k.lower() for k in files):
        return "; name the forces array with forces_key=NAME (--forces-key NAME)"
    return ""


def _check_npz_unlabelled(npz, path: Path, e, f, energy_key, forces_key) -> None:
    """No energy (or forces) array under the default name, none named, but label-like arrays: fail loudly."""
    for label, arr, given, default, word, flag in (
        ("energy", e, energy_key, "E", "energ", "energy"),
        ("forces", f, forces_key, "F", "force", "forces"),
    ):
        if arr is None and given is None and any(word in k.lower() for k in npz.files):
            raise DataError(
                path,
                f"no {label} label under the default key '{default}', but the file has keys {sorted(npz.files)}; "
                f"name the label with {flag}_key=NAME (--{flag}-key NAME)",
                default,
            )


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
def read_rmd17(
    path: Path,
    indices: Sequence[int] | None = None,
    energy_key: str | None = None,
    forces_key: str | None = None,
    stress_key: str | None = None,
    nonfinite: Literal["error", "drop"] = "error",
) -> Dataset:
    """rMD17 npz (Christensen & von Lilienfeld 2020): coords Å, energies kcal/mol, forces kcal/mol/Å.
    ``indices`` selects frames (as the figshare split files do). ``energy_key``/``forces_key`` replace the
    array names 'energies'/'forces' (same units)."""
    npz = _open_npz(path)
    _no_stress(path, "rmd17", stress_key)
    ek, fk = energy_key or "energies", forces_key or "forces"
    z = _get(npz, path, "nuclear_charges")
    r = _get(npz, path, "coords")
    e = _get(npz, path, ek, given_as=energy_key and "energy_key")
    f = _get(npz, path, fk, given_as=forces_key and "forces_key")
    _check_frames(path, {"coords": r, ek: e, fk: f})
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
        keys={"numbers": "nuclear_charges", "positions": "coords", "energy": ek, "forces": fk},
        nonfinite=nonfinite,
    )


def _check_frames(path: Path, arrays: dict) -> None:
    n = {k: (len(v) if np.ndim(v) else 0) for k, v in arrays.items()}
    first = next(iter(n))
    for k, v in n.items():
        if v != n[first]:
            raise DataError(path, f"{v} frames, but '{first}' has {n[first]}", k)


@_reader("sgdml")
def read_sgdml(
    path: Path,
    energy_key: str | None = None,
    forces_key: str | None = None,
    stress_key: str | None = None,
    nonfinite: Literal["error", "drop"] = "error",
) -> Dataset:
    """sGDML / original MD17 npz: R (F, N, 3), z (N,), E (F,) or (F, 1), F (F, N, 3); optional lattice
    (periodic), r_unit and e_unit (default Å and kcal/mol, as in the MD17 files). ``energy_key``/``forces_key``
    replace the array names 'E'/'F' (same units)."""
    npz = _open_npz(path)
    _no_stress(path, "sgdml", stress_key)
    ek, fk = energy_key or "E", forces_key or "F"
    z = _get(npz, path, "z")
    r = _get(npz, path, "R")
    e = _get(npz, path, ek, required=False, given_as=energy_key and "energy_key")
    f = _get(npz, path, fk, required=False, given_as=forces_key and "forces_key")
    _check_npz_unlabelled(npz, path, e, f, energy_key, forces_key)
    arrays = {"R": r, **({ek: e} if e is not None else {}), **({fk: f} if f is not None else {})}
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
        keys={"numbers": "z", "positions": "R", "energy": ek, "forces": fk, "cell": "lattice"},
        nonfinite=nonfinite,
    )


# ---------------------------------------------------------------------------------------------- SPICE
SPICE_KEYS = ("atomic_numbers", "conformations", "dft_total_energy", "dft_total_gradient")


def iter_spice_groups(
    path: str | os.PathLike,
    groups: Sequence[str] | None = None,
    energy_key: str | None = "dft_total_energy",
    forces_key: str | None = "dft_total_gradient",
) -> Iterator[tuple[str, dict]]:
    """Yield (group name, arrays in Å/eV) one molecule at a time, reading only the needed keys, so a
    tens-of-GB SPICE file is never loaded whole. Arrays: numbers (n,), positions (C, n, 3) Å,
    energy (C,) eV, forces (C, n, 3) eV/Å = −gradient, smiles, subset. ``energy_key`` / ``forces_key`` name the
    group's datasets (None: dft_total_energy / dft_total_gradient; hartree, hartree/bohr); a forces key ending
    in 'gradient' is a gradient (forces = −gradient), any other is forces."""
    import h5py

    path = Path(path)
    energy_key = energy_key or "dft_total_energy"
    forces_key = forces_key or "dft_total_gradient"
    sign = -1.0 if forces_key.endswith("gradient") else 1.0
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
            missing = [k for k in ("atomic_numbers", "conformations", energy_key, forces_key) if k not in g]
            if missing:
                raise DataError(
                    path, f"group '{name}' lacks {missing} (it has {sorted(g.keys())})", f"{name}/{missing[0]}"
                )
            try:
                z = np.asarray(g["atomic_numbers"][()])
                r = np.asarray(g["conformations"][()], np.float64)
                e = np.asarray(g[energy_key][()], np.float64)
                grad = np.asarray(g[forces_key][()], np.float64)
            except (OSError, KeyError) as exc:
                raise DataError(path, f"cannot read group '{name}' ({exc})", name) from exc
            n = len(r)
            for key, arr, shape in (
                ("conformations", r, (n, len(z), 3)),
                (energy_key, e, (n,)),
                (forces_key, grad, (n, len(z), 3)),
            ):
                if arr.shape != shape:
                    raise DataError(path, f"shape {arr.shape}, expected {shape}", f"{name}/{key}")
            yield (
                name,
                {
                    "numbers": z,
                    "positions": r * units.BOHR_ANGSTROM,
                    "energy": e * units.HARTREE_EV,
                    "forces": sign * grad * units.HARTREE_PER_BOHR_EV_PER_ANGSTROM,
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
def read_spice(
    path: Path,
    groups: Sequence[str] | None = None,
    energy_key: str | None = None,
    forces_key: str | None = None,
    stress_key: str | None = None,
    nonfinite: Literal["error", "drop"] = "error",
) -> Dataset:
    """SPICE HDF5 (1.x / 2.x layout) into memory, group by group. For the full file use the packed store.
    ``energy_key`` / ``forces_key``: the group's datasets (default dft_total_energy / dft_total_gradient).
    Frame indices (``meta['frame']``, errors, dropped frames) are conformer indices within their group."""
    _no_stress(path, "spice", stress_key)
    energy_key = energy_key or "dft_total_energy"
    forces_key = forces_key or "dft_total_gradient"
    parts, drops, empty = [], [], []
    for name, a in iter_spice_groups(path, groups, energy_key, forces_key):
        c = len(a["positions"])
        if c == 0:
            empty.append(name)
            continue
        keys = {
            "numbers": f"{name}/atomic_numbers",
            "positions": f"{name}/conformations",
            "energy": f"{name}/{energy_key}",
            "forces": f"{name}/{forces_key}",
        }
        if nonfinite == "drop":  # a group whose every conformer is dropped is no dataset: recorded here
            fin = finite_labels(np.arange(c + 1) * len(a["numbers"]), a["energy"], a["forces"].reshape(-1, 3))
            if not (fin["energy"] & fin["forces"]).any():
                bad = [keys["energy"] if not e else keys["forces"] for e in fin["energy"]]
                drops.append({"count": c, "frames": list(range(c)), "keys": bad})
                continue
        ds = Dataset.from_arrays(
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
            keys=keys,
            nonfinite=nonfinite,
        )
        parts.append(ds)
        drops.append(ds.dropped_nonfinite)
    if not parts:
        if drops:
            n = sum(r["count"] for r in drops)
            raise DataError(
                path,
                f"empty dataset: every one of the {n} conformers has a NaN or infinite label, and nonfinite='drop' "
                f"dropped them all (the first: key '{drops[0]['keys'][0]}', frame {drops[0]['frames'][0]})",
            )
        raise DataError(
            path,
            "empty dataset: no molecule group with conformations"
            + (f" (groups without any: {', '.join(empty[:10])})" if empty else ""),
        )
    if empty:
        log.warning(
            "%s: %d molecule group(s) without any conformation skipped: %s",
            path,
            len(empty),
            ", ".join(empty[:10]) + (f", ... ({len(empty) - 10} more)" if len(empty) > 10 else ""),
        )
    ds = Dataset.concatenate(parts)
    ds.dropped_nonfinite = merge_drops(drops)  # in file order, with the groups dropped whole
    return ds


# ---------------------------------------------------------------------------------------------- mlearn
@_reader("mlearn")
def read_mlearn(
    path: Path,
    energy_key: str | None = None,
    forces_key: str | None = None,
    stress_key: str | None = None,
    nonfinite: Literal["error", "drop"] = "error",
) -> Dataset:
    """mlearn JSON (Zuo et al. 2020): a list of {structure: pymatgen dict, outputs: {energy eV, forces eV/Å,
    virial_stress (6,) kbar in VASP order xx yy zz xy yz zx}}. Parsed without pymatgen. Stress follows ASE's
    VASP reader: stress = −virial_stress · 0.1 GPa; an entry without virial_stress (or with null) has no stress
    label. JSON's NaN and Infinity are read as such, so they are non-finite labels. The label keys are fixed:
    label key arguments other than None (or the fixed names themselves) are an error."""
    for given, fixed in (
        (energy_key, "outputs.energy"),
        (forces_key, "outputs.forces"),
        (stress_key, "outputs.virial_stress"),
    ):
        if given is not None and given != fixed:
            raise DataError(
                path,
                "mlearn files have fixed label keys outputs.energy, outputs.forces and outputs.virial_stress: "
                "energy_key, forces_key and stress_key cannot be given",
                given,
            )
    try:
        with open(path) as fh:
            entries = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(path, f"corrupted or truncated JSON ({exc})") from exc
    if not isinstance(entries, list) or not entries:
        raise DataError(path, "empty dataset: expected a non-empty JSON list of entries")
    from ase.data import atomic_numbers as z_of

    numbers, positions, cells, energy, forces, stress, has_stress, tags = [], [], [], [], [], [], [], []
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
        has_stress.append(vs is not None)
        if vs is not None:
            vs = _to_array(path, vs, "outputs.virial_stress", f, "virial_stress")
            if vs.shape != (6,):
                msg = f"virial_stress has shape {vs.shape}, expected (6,) (xx yy zz xy yz zx)"
                raise DataError(path, msg, "outputs.virial_stress", f)
            xx, yy, zz, xy, yz, zx = -vs * units.KBAR_EV_PER_ANGSTROM3
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
        labelled={"stress": np.array(has_stress)},
        nonfinite=nonfinite,
    )


# ---------------------------------------------------------------------------------------------- ASE
def _ase_keys_seen(atoms, res: dict) -> str:
    seen = f"info keys {sorted(atoms.info)}, arrays keys {sorted(atoms.arrays)}"
    return seen + (f", calculator results {sorted(res)}" if res else "")


def _ase_label(path: Path, atoms, res: dict, frame: int, key: str, label: str, where: dict):
    """The value of an explicitly named label: the calculator's result ``key`` (energy, forces, stress, ...)
    or ``where[key]`` (atoms.info or atoms.arrays); a frame without it is an error naming what it has."""
    if key in res:
        return res[key]
    if key in where:
        return where[key]
    raise DataError(path, f"no {label} label '{key}' in this frame ({_ase_keys_seen(atoms, res)})", key, frame)


def _to_array(path: Path, value, key: str, frame: int, label: str) -> np.ndarray:
    try:
        return np.asarray(value, float)
    except (TypeError, ValueError) as exc:
        raise DataError(path, f"{label} label is not numeric ({type(exc).__name__}: {exc})", key, frame) from exc


def _virial_to_stress(path: Path, atoms, virial, key: str, frame: int) -> np.ndarray:
    vol = abs(atoms.get_volume()) if atoms.pbc.any() else 0.0
    if vol <= 0:
        raise DataError(path, "virial given for a frame without a periodic cell", key, frame)
    return -_to_array(path, virial, key, frame, "virial").reshape(3, 3) / vol


@_reader("ase")
def read_ase(
    path: Path,
    index: str = ":",
    format: str | None = None,
    energy_key: str | None = None,
    forces_key: str | None = None,
    stress_key: str | None = None,
    nonfinite: Literal["error", "drop"] = "error",
    unnamed_labels: Literal["error", "ignore"] = "error",
) -> Dataset:
    """Anything ase.io reads. By default: energy from the calculator or info['energy']; forces from the
    calculator or arrays 'forces'/'force'; stress from the calculator, info['stress'] or info['virial']
    (stress = −virial/V). ``energy_key`` names an info key (MACE: 'REF_energy'), ``forces_key`` an arrays key
    ('REF_forces'), ``stress_key`` an info key (Voigt 6 or 3×3; a key containing 'virial' is a virial,
    stress = −virial/V); the calculator's results are used where the key names one of them ('energy',
    'forces', 'stress'). A named key must be in every frame. Without keys, a file whose frames have no energy
    (or forces) under the defaults but energy-like info keys (or force-like arrays) is an error. A frame without
    a label (none of the default keys, no key given) has none: it loads unlabelled."""
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

    ek, fk, sk = energy_key or "energy", forces_key or "forces", stress_key or "stress"
    structures, frame_fk, frame_sk = [], [], []  # the key each frame's forces and stress came from
    for f, atoms in enumerate(frames):
        res = dict(atoms.calc.results) if atoms.calc is not None else {}
        if energy_key is None:
            e = res.get("energy", atoms.info.get("energy"))
        else:
            e = _ase_label(path, atoms, res, f, energy_key, "energy", atoms.info)
        if e is not None:
            e = _to_array(path, e, ek, f, "energy")
            if e.size != 1:
                raise DataError(path, f"energy label has shape {e.shape}, expected a number", ek, f)
            e = float(e.reshape(()))
        frame_fk.append(fk)
        if forces_key is None:
            forces = res.get("forces", atoms.arrays.get("forces", atoms.arrays.get("force")))
            if "forces" not in res and "forces" not in atoms.arrays and "force" in atoms.arrays:
                frame_fk[-1] = "force"
        else:
            forces = _ase_label(path, atoms, res, f, forces_key, "forces", atoms.arrays)
        if forces is not None:
            forces = _to_array(path, forces, frame_fk[-1], f, "forces")
        frame_sk.append(sk)
        if stress_key is None:
            stress = res.get("stress", atoms.info.get("stress"))
            if stress is None and "virial" in atoms.info:
                stress = _virial_to_stress(path, atoms, atoms.info["virial"], "virial", f)
                frame_sk[-1] = "virial"
        else:
            stress = _ase_label(path, atoms, res, f, stress_key, "stress", atoms.info)
            if "virial" in stress_key.lower():
                stress = _virial_to_stress(path, atoms, stress, stress_key, f)
        if stress is not None:
            stress = _to_array(path, stress, frame_sk[-1], f, "stress")
            if stress.shape == (6,):  # Voigt xx yy zz yz xz xy (ASE)
                from ase.stress import voigt_6_to_full_3x3_stress

                stress = voigt_6_to_full_3x3_stress(stress)
            if stress.size != 9:
                raise DataError(path, f"stress label has shape {stress.shape}, expected (6,) or (3, 3)", sk, f)
            stress = stress.reshape(3, 3)
        info = {"name": str(atoms.info.get("config_type", atoms.get_chemical_formula()))}
        structures.append(
            Structure(
                numbers=np.asarray(atoms.numbers),
                positions=np.asarray(atoms.positions, float),
                cell=np.asarray(atoms.cell.array, float),
                pbc=np.asarray(atoms.pbc, bool),
                energy=e,
                forces=forces,
                stress=stress,
                info=info,
            )
        )
    if unnamed_labels == "error":  # "ignore": a structure file (MD), whose labels do not matter
        _check_ase_unlabelled(path, frames, structures, energy_key, forces_key)
    for f, s in enumerate(structures):
        if s.forces is not None and s.forces.shape != s.positions.shape:
            raise DataError(path, f"forces shape {s.forces.shape} for {len(s)} atoms", fk, f)
    keys = {
        "energy": ek,
        "forces": fk if set(frame_fk) == {fk} else np.array(frame_fk, dtype=object),
        "stress": sk if set(frame_sk) == {sk} else np.array(frame_sk, dtype=object),
    }
    return Dataset.from_structures(structures, source=str(path), keys=keys, nonfinite=nonfinite)


def _check_ase_unlabelled(path: Path, frames, structures, energy_key, forces_key) -> None:
    """No key given, no frame labelled under the default lookup, but label-like keys in the file: the labels are
    under other names (MACE's REF_energy / REF_forces), and loading the frames unlabelled would be silent."""
    info_keys = sorted({k for a in frames for k in a.info})
    array_keys = sorted({k for a in frames for k in a.arrays})
    missing = []
    if (
        energy_key is None
        and all(s.energy is None for s in structures)
        and any("energy" in k.lower() for k in info_keys)
    ):
        missing.append("energy")
    if (
        forces_key is None
        and all(s.forces is None for s in structures)
        and any("force" in k.lower() for k in array_keys)
    ):
        missing.append("forces")
    if not missing:
        return
    defaults = {
        "energy": "calculator 'energy', info 'energy'",
        "forces": "calculator 'forces', arrays 'forces'/'force'",
    }
    raise DataError(
        path,
        f"no {' and no '.join(m + ' label' for m in missing)} found under the default keys "
        f"({'; '.join(defaults[m] for m in missing)}) in any frame, but the frames have info keys {info_keys} "
        f"and arrays keys {array_keys}: name the labels with --energy-key NAME / --forces-key NAME "
        "(energy_key=NAME / forces_key=NAME in so3lib.data.read)",
        missing[0],
    )
