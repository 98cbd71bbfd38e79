"""Packed on-disk store of a filtered SPICE file, memory-mapped, so training streams batches from disk with
peak memory independent of the number of conformations.

The HDF5 file is converted once, group by group (tqdm), through the MACE-OFF filters of `so3lib.data.spice`;
every kept group is validated (`Dataset.from_arrays`) before it is appended. Layout of ``<store>/``:

  manifest.json     fingerprint (source path, size, mtime; filter options; format version), counts, drop
                    report, species, molecules [{name, smiles, subset, conformers}], dtypes and shapes
  numbers.bin       (A,) int8 atomic numbers          positions.bin (A, 3) float64 Å
  forces.bin        (A, 3) float64 eV/Å                offsets.bin   (F+1,) int64 atom offsets
  energy.bin        (F,) float64 eV                    molecule.bin  (F,) int32 index into manifest molecules
  frame.bin         (F,) int32 conformer index in its group
  composition.bin   (F, S) int16 atoms of each species per frame (for the energy reference, no atom scan)

`open_store` maps the arrays (``numpy.memmap``) into a `Dataset` without reading them; `DatasetView` selects
frames of it (a split) without copying. A changed source file or filter invalidates the store: it is rebuilt.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from so3lib.data.dataset import NONFINITE, Dataset
from so3lib.data.errors import DataError
from so3lib.data.readers import iter_spice_groups
from so3lib.data.spice import MACE_OFF_ELEMENTS, filter_group, group_dataset, new_report, warn_nonfinite

log = logging.getLogger(__name__)
STORE_VERSION = 2  # 2: the drop report has its own "nonfinite" reason; the fingerprint records the nonfinite option
STORE_MARKER = ".so3lib-store"
_ATOM = {"numbers": (np.int8, ()), "positions": (np.float64, (3,)), "forces": (np.float64, (3,))}
_FRAME = {"energy": (np.float64, ()), "molecule": (np.int32, ()), "frame": (np.int32, ())}
CHUNK_FRAMES = 1 << 16  # frames per chunk of a reduction over a view (a few MB of per-frame arrays)


def fingerprint(
    source: str | Path,
    elements: Sequence[int],
    neutral_only: bool,
    max_force_ev_per_a: float | None,
    nonfinite: Literal["error", "drop"] = "error",
) -> dict:
    """What the store depends on: the source file (absolute path, size, mtime) and the filter options."""
    st = Path(source).stat()
    return {
        "version": STORE_VERSION,
        "source": str(Path(source).resolve()),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "elements": sorted(int(z) for z in elements),
        "neutral_only": bool(neutral_only),
        "max_force_ev_per_a": max_force_ev_per_a,
        "nonfinite": nonfinite,
    }


def convert_spice(
    source: str | Path,
    store: str | Path,
    elements: Sequence[int] = MACE_OFF_ELEMENTS,
    neutral_only: bool = True,
    max_force_ev_per_a: float | None = None,
    progress: bool = True,
    rebuild: bool = False,
    nonfinite: Literal["error", "drop"] = "error",
) -> Path:
    """Convert a SPICE HDF5 file into a packed store at ``store`` (reused when its fingerprint matches).
    Returns the store path. Raises `DataError` when nothing survives the filters. ``nonfinite``: a NaN or
    infinite dft_total_energy/dft_total_gradient is a `DataError` naming the file, '<group>/<key>' and the
    conformer ("error"), or drops the conformer, counted in the manifest's ``report["dropped"]["nonfinite"]``
    and logged ("drop"); never a force-threshold drop."""
    import h5py
    from tqdm.auto import tqdm

    source, store = Path(source), Path(store)
    if not source.exists():
        raise DataError(source, "no such file")
    if nonfinite not in NONFINITE:
        raise DataError(source, f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
    fp = fingerprint(source, elements, neutral_only, max_force_ev_per_a, nonfinite)
    man = store / "manifest.json"
    if man.exists() and not rebuild:
        old = json.loads(man.read_text())
        if old.get("fingerprint") == fp:
            log.info("reusing the packed store %s (%d conformations)", store, old["frames"])
            return store
        changed = sorted(k for k in fp if old.get("fingerprint", {}).get(k) != fp[k])
        log.warning("store %s is stale (changed: %s): rebuilding it", store, ", ".join(changed))
    tmp = store.with_name(store.name + ".tmp")
    for folder in (store, tmp):  # so3lib replaces only what it made: its own stores and their partial builds
        if folder.exists() and not is_store(folder) and (not folder.is_dir() or any(folder.iterdir())):
            raise DataError(
                folder,
                "exists and is not a so3lib store (no manifest.json or build marker written by so3lib): so3lib "
                "replaces only its own stores; choose another --store",
            )
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / STORE_MARKER).write_text("a packed store being built by so3lib\n")
    with h5py.File(source, "r") as fh:
        names = list(fh.keys())
    allowed = set(int(z) for z in elements)
    species = sorted(allowed)
    col = np.full(256, -1)
    col[species] = np.arange(len(species))
    report = new_report(max_force_ev_per_a)
    files = {k: open(tmp / f"{k}.bin", "wb") for k in (*_ATOM, *_FRAME, "offsets", "composition")}
    molecules, n_atoms_total, n_frames = [], 0, 0
    files["offsets"].write(np.zeros(1, np.int64).tobytes())
    try:
        it = iter_spice_groups(source, names)
        for name, a in tqdm(it, total=len(names), desc=f"packing {source.name}", disable=not progress, unit="mol"):
            keep = filter_group(name, a, report, allowed, neutral_only, max_force_ev_per_a, nonfinite)
            if keep is None:
                continue
            ds = group_dataset(source, name, a, keep)  # validates: NaN/inf, close atoms, shapes
            f, n = len(ds), int(ds.n_atoms[0])
            files["numbers"].write(ds.numbers.astype(np.int8).tobytes())
            files["positions"].write(ds.positions.astype(np.float64).tobytes())
            files["forces"].write(ds.forces.astype(np.float64).tobytes())
            files["energy"].write(ds.energy.astype(np.float64).tobytes())
            files["molecule"].write(np.full(f, len(molecules), np.int32).tobytes())
            files["frame"].write(np.asarray(ds.meta["frame"], np.int32).tobytes())
            files["offsets"].write((n_atoms_total + n * np.arange(1, f + 1, dtype=np.int64)).tobytes())
            comp = np.bincount(col[a["numbers"]], minlength=len(species)).astype(np.int16)
            files["composition"].write(np.tile(comp, (f, 1)).tobytes())
            molecules.append({"name": name, "smiles": a["smiles"], "subset": a["subset"], "conformers": f})
            n_atoms_total += n * f
            n_frames += f
    finally:
        for fh in files.values():
            fh.close()
    warn_nonfinite(source, report)
    if n_frames == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(
            source,
            f"empty dataset: no conformation survives the filters (elements {species}, "
            f"neutral_only={neutral_only}, max force {max_force_ev_per_a} eV/Å, nonfinite={nonfinite!r}); drop "
            "report: " + json.dumps({k: _counts(v) for k, v in report["dropped"].items()}),
        )
    present = np.fromfile(tmp / "composition.bin", np.int16).reshape(n_frames, len(species)).any(axis=0)
    manifest = {
        "fingerprint": fp,
        "frames": n_frames,
        "atoms": n_atoms_total,
        "species": species,
        "species_present": [z for z, p in zip(species, present) if p],
        "report": report,
        "molecules": molecules,
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(store, ignore_errors=True)
    os.replace(tmp, store)
    log.info("packed %d conformations of %d molecules into %s", n_frames, len(molecules), store)
    return store


def is_store(folder: str | Path) -> bool:
    """A folder so3lib wrote: a finished store (its manifest has a so3lib fingerprint) or a partial build."""
    folder = Path(folder)
    if (folder / STORE_MARKER).exists():
        return True
    try:
        return "version" in json.loads((folder / "manifest.json").read_text()).get("fingerprint", {})
    except (OSError, ValueError, AttributeError):
        return False


def _counts(reason: dict) -> dict:
    return {k: v for k, v in reason.items() if k not in ("names", "frames")}


def read_manifest(store: str | Path) -> dict:
    man = Path(store) / "manifest.json"
    if not man.exists():
        raise DataError(store, "not a packed store (no manifest.json): build it with convert_spice")
    return json.loads(man.read_text())


def open_store(store: str | Path) -> DatasetView:
    """Memory-map a packed store as a `DatasetView` over all its frames (nothing is read yet)."""
    store = Path(store)
    m = read_manifest(store)
    F, A, S = m["frames"], m["atoms"], len(m["species"])

    def mm(name, dtype, shape):
        path = store / f"{name}.bin"
        expect = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if not path.exists() or path.stat().st_size != expect:
            raise DataError(path, f"truncated or missing store array (expected {expect} bytes): rebuild the store")
        return np.memmap(path, dtype=dtype, mode="r", shape=shape)

    arr = {k: mm(k, dt, (A, *sh)) for k, (dt, sh) in _ATOM.items()}
    arr.update({k: mm(k, dt, (F, *sh)) for k, (dt, sh) in _FRAME.items()})
    offsets = mm("offsets", np.int64, (F + 1,))
    composition = mm("composition", np.int16, (F, S))
    mols = m["molecules"]
    lookup = {k: np.array([mol[k] for mol in mols], dtype=object) for k in ("name", "smiles", "subset")}
    lookup["source"] = np.array([m["fingerprint"]["source"]] * len(mols), dtype=object)
    base = Dataset(
        arr["numbers"],
        arr["positions"],
        offsets,
        None,
        None,
        arr["energy"],
        arr["forces"],
        None,
        {"molecule": arr["molecule"], "frame": arr["frame"]},
    )  # free molecules: no cells
    return DatasetView(base, np.arange(F), composition, tuple(m["species"]), lookup, str(store))


@dataclasses.dataclass
class DatasetView:
    """Frames ``frames`` of a (memory-mapped) `Dataset`, without copying: what a split of a store is.
    ``composition`` (F_base, S) counts per species of every base frame, for the energy reference."""

    base: Dataset
    frames: np.ndarray
    composition_counts: np.ndarray
    store_species: tuple[int, ...]
    molecules: dict  # name, smiles, subset, source: (M,) object arrays indexed by the per-frame molecule index
    source: str = "<store>"

    def __len__(self) -> int:
        return len(self.frames)

    def __post_init__(self):
        self.frames = np.asarray(self.frames, np.int64)

    # n_atoms and energy are read from the memory map on each use, not kept: a view holds only its frame index
    # (8 bytes per frame), so a process's heap does not grow with the store. Reductions go through `chunks`.
    @property
    def n_atoms(self) -> np.ndarray:
        """(F,) atoms of each selected frame (from the stored offsets)."""
        off = self.base.offsets
        return (np.asarray(off[self.frames + 1]) - np.asarray(off[self.frames])).astype(np.int64)

    @property
    def energy(self) -> np.ndarray:
        """(F,) energy label of each selected frame (eV; NaN: unlabelled)."""
        return np.asarray(self.base.energy[self.frames], np.float64)

    def chunks(self, size: int | None = None) -> Iterator[DatasetView]:
        """Consecutive sub-views of at most ``size`` (default `CHUNK_FRAMES`) frames, in order: for reductions
        over a view that never hold per-frame arrays of all its frames at once."""
        size = size or CHUNK_FRAMES
        for start in range(0, len(self.frames), size):
            yield dataclasses.replace(self, frames=self.frames[start : start + size])

    @property
    def species(self) -> list[int]:
        """Atomic numbers present in these frames."""
        present = np.zeros(len(self.store_species), bool)
        for s in range(0, len(self.frames), CHUNK_FRAMES):
            present |= np.asarray(self.composition_counts[self.frames[s : s + CHUNK_FRAMES]]).any(axis=0)
        return [z for z, p in zip(self.store_species, present) if p]

    def composition(self, species: Sequence[int]) -> np.ndarray:
        """(F, S') counts of the given species per frame (raises for species of the frames not listed)."""
        col = {z: i for i, z in enumerate(self.store_species)}
        missing = [z for z in self.species if z not in species]
        if missing:
            raise DataError(self.source, f"elements {missing} are not in {list(species)}", "numbers")
        counts = np.asarray(self.composition_counts[self.frames])  # int16: 2 bytes per species and frame
        out = np.zeros((len(self.frames), len(species)))
        for j, z in enumerate(species):
            if z in col:
                out[:, j] = counts[:, col[z]]
        return out

    def molecule_index(self) -> np.ndarray:
        """(F,) index of each selected frame's molecule into ``molecules`` (4 bytes per frame, no strings)."""
        return np.asarray(self.base.meta["molecule"][self.frames])

    @property
    def meta(self) -> dict:
        """Per-frame name, smiles, subset, source (shared string objects) and frame index in its group."""
        return meta_rows(self.base, self.molecules, self.frames)

    def subset(self, indices) -> DatasetView:
        return dataclasses.replace(self, frames=self.frames[np.asarray(indices, np.int64)])

    def materialize(self, indices=None) -> Dataset:
        """The selected frames (all, or ``indices`` into this view) read into an in-memory `Dataset`."""
        idx = self.frames if indices is None else self.frames[np.asarray(indices, np.int64)]
        order = np.argsort(idx, kind="stable")  # read the memory map in file order
        sub = _subset_sorted(self.base, self.molecules, idx[order])
        return sub.subset(np.argsort(order, kind="stable"))

    def sample(self, k: int, seed: int = 0) -> Dataset:
        """Up to ``k`` frames, evenly spaced over a random permutation, in memory (for fitting constants)."""
        if len(self) <= k:
            return self.materialize()
        pick = np.sort(np.random.default_rng(seed).choice(len(self), size=k, replace=False))
        return self.materialize(pick)


def meta_rows(base: Dataset, molecules: dict, idx: np.ndarray) -> dict:
    mol = np.asarray(base.meta["molecule"][idx])
    out = {k: v[mol] for k, v in molecules.items()}
    out["frame"] = np.asarray(base.meta["frame"][idx])
    return out


def _subset_sorted(base: Dataset, molecules: dict, idx: np.ndarray) -> Dataset:
    """In-memory copy of frames ``idx`` (sorted) of a memory-mapped dataset."""
    from so3lib.data.dataset import _ranges

    n = np.asarray(base.offsets[idx + 1]) - np.asarray(base.offsets[idx])
    atom_idx = _ranges(np.asarray(base.offsets[idx]), n)
    offsets = np.concatenate([[0], np.cumsum(n)]).astype(np.int64)
    meta = meta_rows(base, molecules, idx)
    return Dataset(
        np.asarray(base.numbers[atom_idx], np.int32),
        np.asarray(base.positions[atom_idx]),
        offsets,
        np.zeros((len(idx), 3, 3)),
        np.zeros((len(idx), 3), bool),
        np.asarray(base.energy[idx]),
        np.asarray(base.forces[atom_idx]),
        None,
        meta,
    )
