"""`Structure` and `Dataset`: the one in-memory data type every reader produces.

A `Dataset` keeps frames packed as flat arrays plus offsets (atoms of frame ``f`` are rows
``offsets[f]:offsets[f+1]``), in so3lib units: positions Å, energy eV, forces eV/Å, stress eV/Å³
(ASE sign convention, stress = (1/V) ∂E/∂ε). It is validated once, at construction.

Absent labels: inside a `Dataset`, NaN (the whole frame's energy, forces or stress) means "this frame has no such
label". That only ever comes from the reader knowing the label is absent from the file (``labelled`` masks of
`Dataset.from_arrays`, ``None`` labels of a `Structure`), never from a value read: a NaN or infinite value of a
label the file has is a `DataError` naming the file, key and frame, or, with ``nonfinite="drop"``, drops the frame,
counted in `Dataset.dropped_nonfinite`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from so3lib.data.errors import DataError

MIN_DISTANCE_ANGSTROM = 0.1
MAX_ATOMIC_NUMBER = 118
_DEFAULT_KEYS = {
    "numbers": "numbers",
    "positions": "positions",
    "energy": "energy",
    "forces": "forces",
    "stress": "stress",
    "cell": "cell",
}
LABELS = ("energy", "forces", "stress")
NONFINITE = ("error", "drop")


def no_drops() -> dict:
    """An empty `Dataset.dropped_nonfinite` record."""
    return {"count": 0, "frames": [], "keys": []}


def merge_drops(records: Sequence[Mapping[str, Any]]) -> dict:
    """One `Dataset.dropped_nonfinite` record from several, in order."""
    return {
        "count": sum(int(r["count"]) for r in records),
        "frames": [f for r in records for f in r["frames"]],
        "keys": [k for r in records for k in r["keys"]],
    }


@dataclasses.dataclass(frozen=True)
class Structure:
    """One frame. numbers (n,) int; positions (n, 3) Å; cell (3, 3) Å (rows are lattice vectors);
    pbc (3,) bool; energy eV or None; forces (n, 3) eV/Å or None; stress (3, 3) eV/Å³ or None."""

    numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    energy: float | None = None
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.numbers)

    def to_ase(self):
        """The frame as an `ase.Atoms` with a SinglePointCalculator holding the labels."""
        import ase
        from ase.calculators.singlepoint import SinglePointCalculator

        atoms = ase.Atoms(numbers=self.numbers, positions=self.positions, cell=self.cell, pbc=self.pbc)
        results = {}
        if self.energy is not None and np.isfinite(self.energy):
            results["energy"] = float(self.energy)
        if self.forces is not None:
            results["forces"] = np.array(self.forces)
        if self.stress is not None and np.all(np.isfinite(self.stress)):
            results["stress"] = np.array(self.stress)
        if results:
            atoms.calc = SinglePointCalculator(atoms, **results)
        atoms.info.update({k: v for k, v in self.info.items() if isinstance(v, (str, int, float))})
        return atoms

    @staticmethod
    def from_ase(atoms) -> Structure:
        return Structure(
            numbers=np.asarray(atoms.numbers, np.int32),
            positions=np.asarray(atoms.positions, float),
            cell=np.asarray(atoms.cell.array, float),
            pbc=np.asarray(atoms.pbc, bool),
        )


class Dataset:
    """Frames packed as flat arrays. Build with `Dataset.from_arrays` (validates) or `Dataset.from_structures`.

    Attributes (F frames, A atoms in total):
      numbers (A,) int32; positions (A, 3) float64 Å; forces (A, 3) eV/Å or None;
      offsets (F+1,) int64; cell (F, 3, 3) Å; pbc (F, 3) bool; energy (F,) eV (NaN where unlabelled);
      stress (F, 3, 3) eV/Å³ or None (NaN where unlabelled);
      meta: dict of per-frame arrays, always with ``source`` (file), ``name`` (molecule id) and ``frame``
      (index of the frame in its source file);
      dropped_nonfinite: the frames the reader dropped for a NaN or infinite label (``nonfinite="drop"``):
      ``{"count": int, "frames": [frame index in the file, ...], "keys": [the file's key of the frame's first
      non-finite label, ...]}`` (for SPICE the key names the group, ``'<group>/dft_total_gradient'``, and the
      frame is the conformer's index in it). Empty (count 0) when nothing was dropped, and for subsets (the
      record describes the read, not a split); `concatenate` joins the records.
    """

    def __init__(
        self,
        numbers,
        positions,
        offsets,
        cell,
        pbc,
        energy,
        forces=None,
        stress=None,
        meta: Mapping[str, np.ndarray] | None = None,
        dropped_nonfinite: Mapping[str, Any] | None = None,
    ):
        self.numbers = numbers
        self.positions = positions
        self.offsets = offsets
        self.cell = cell
        self.pbc = pbc
        self.energy = energy
        self.forces = forces
        self.stress = stress
        self.meta = dict(meta or {})
        self.dropped_nonfinite = dict(dropped_nonfinite) if dropped_nonfinite else no_drops()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_arrays(
        cls,
        *,
        source: str,
        numbers,
        positions,
        offsets=None,
        cell=None,
        pbc=None,
        energy=None,
        forces=None,
        stress=None,
        meta: Mapping[str, Any] | None = None,
        keys: Mapping[str, str] | None = None,
        frame_index=None,
        check_distances: bool = True,
        labelled: Mapping[str, Any] | None = None,
        nonfinite: Literal["error", "drop"] = "error",
    ) -> Dataset:
        """Validate and pack. ``numbers``/``positions``/``forces`` are flat (A, ...) with ``offsets`` (F+1,),
        or per-frame stacked (F, n, ...) with ``numbers`` (n,) shared, in which case ``offsets`` is None.
        ``keys`` maps field names to the file's key names for error messages (for a label, also an (F,) array
        of key names, where the file's key differs by frame); ``frame_index`` (F,) maps rows to the frame
        numbers of the source file.

        ``labelled`` maps 'energy', 'forces', 'stress' to (F,) bool masks of the frames whose file has that label
        (default: every frame of a label array given; none of a label given as None). The values of frames
        without the label are ignored (stored as NaN: absent). A NaN or infinite value in a frame that has the
        label is a `DataError` (``nonfinite="error"``: "NaN or infinite value", naming the file, the label's
        key and the frame), or drops the frame (``nonfinite="drop"``), recorded in ``dropped_nonfinite``."""
        if nonfinite not in NONFINITE:
            raise DataError(source, f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
        keys = {**_DEFAULT_KEYS, **(keys or {})}
        frame_keys = {label: keys[label] for label in LABELS}  # a key name, or one per frame
        keys = {k: v if isinstance(v, str) else "/".join(dict.fromkeys(map(str, v))) for k, v in keys.items()}
        positions = np.asarray(positions)
        if offsets is None:  # stacked molecular frames (F, n, 3), shared numbers (n,)
            if positions.ndim != 3 or positions.shape[-1] != 3:
                raise DataError(
                    source, f"expected positions of shape (frames, atoms, 3), got {positions.shape}", keys["positions"]
                )
            n_frames, n_atoms = positions.shape[:2]
            numbers = np.asarray(numbers)
            if numbers.ndim != 1 or numbers.shape[0] != n_atoms:
                raise DataError(
                    source,
                    f"expected {n_atoms} atomic numbers (one per atom of the positions array), "
                    f"got shape {numbers.shape}",
                    keys["numbers"],
                )
            numbers = np.tile(numbers, n_frames)
            positions = positions.reshape(-1, 3)
            if forces is not None:
                forces = np.asarray(forces)
                if forces.shape != (n_frames, n_atoms, 3):
                    raise DataError(
                        source,
                        f"shape {forces.shape} does not match positions {(n_frames, n_atoms, 3)}",
                        keys["forces"],
                    )
                forces = forces.reshape(-1, 3)
            offsets = np.arange(n_frames + 1, dtype=np.int64) * n_atoms
        offsets = np.asarray(offsets, np.int64)
        n_frames = len(offsets) - 1
        if n_frames <= 0:
            raise DataError(source, "empty dataset: no frames")
        numbers = np.asarray(numbers)
        if numbers.shape != (offsets[-1],):
            raise DataError(source, f"{numbers.shape[0]} atomic numbers for {offsets[-1]} atoms", keys["numbers"])
        if positions.shape != (offsets[-1], 3):
            raise DataError(
                source, f"positions shape {positions.shape}, expected {(int(offsets[-1]), 3)}", keys["positions"]
            )
        if np.any(np.diff(offsets) <= 0):
            f = int(np.argmax(np.diff(offsets) <= 0))
            raise DataError(source, "frame has no atoms", keys["numbers"], _frame(frame_index, f))
        cell = np.zeros((n_frames, 3, 3)) if cell is None else np.asarray(cell, np.float64)
        if cell.shape == (3, 3):
            cell = np.broadcast_to(cell, (n_frames, 3, 3)).copy()
        if cell.shape != (n_frames, 3, 3):
            raise DataError(source, f"cell shape {cell.shape}, expected {(n_frames, 3, 3)}", keys["cell"])
        pbc = np.zeros((n_frames, 3), bool) if pbc is None else np.asarray(pbc, bool)
        if pbc.shape == (3,):
            pbc = np.broadcast_to(pbc, (n_frames, 3)).copy()
        if pbc.shape != (n_frames, 3):
            raise DataError(source, f"pbc shape {pbc.shape}, expected {(n_frames, 3)}", "pbc")
        energy_given = energy is not None
        energy = np.full(n_frames, np.nan) if energy is None else np.asarray(energy, np.float64)
        if energy.shape != (n_frames,):
            if energy.shape == (n_frames, 1):
                energy = energy[:, 0]
            else:
                raise DataError(source, f"{energy.shape} energies for {n_frames} frames", keys["energy"])
        if forces is not None:
            forces = np.asarray(forces, np.float64)
            if forces.shape != (offsets[-1], 3):
                raise DataError(
                    source, f"forces shape {forces.shape}, expected {(int(offsets[-1]), 3)}", keys["forces"]
                )
        if stress is not None:
            stress = np.asarray(stress, np.float64)
            if stress.shape != (n_frames, 3, 3):
                raise DataError(source, f"stress shape {stress.shape}, expected {(n_frames, 3, 3)}", keys["stress"])
        frame_index = np.arange(n_frames) if frame_index is None else np.asarray(frame_index)
        if frame_index.shape != (n_frames,):
            raise DataError(source, f"frame_index shape {frame_index.shape}, expected {(n_frames,)}")
        given = {"energy": energy_given, "forces": forces is not None, "stress": stress is not None}
        has = _labelled_masks(source, n_frames, labelled, given)
        finite = finite_labels(offsets, energy, forces, stress)
        bad = {label: has[label] & ~finite[label] for label in LABELS}  # there in the file, but NaN or infinite
        atom_frame = np.repeat(np.arange(n_frames), np.diff(offsets))
        energy = np.where(has["energy"], energy, np.nan)  # absent labels: NaN, whatever the reader passed
        if forces is not None:
            forces = np.where(has["forces"][atom_frame, None], forces, np.nan)
        if stress is not None:
            stress = np.where(has["stress"][:, None, None], stress, np.nan)
        meta = dict(meta or {})
        meta.setdefault("source", np.full(n_frames, str(source), dtype=object))
        meta.setdefault("name", np.full(n_frames, "", dtype=object))
        meta["frame"] = frame_index
        for k, v in meta.items():
            meta[k] = np.asarray(v, dtype=object if np.asarray(v).dtype.kind in "OUS" else None)
            if meta[k].shape[:1] != (n_frames,):
                raise DataError(source, f"metadata '{k}' has {meta[k].shape[:1]} entries for {n_frames} frames")
        ds = cls(
            numbers.astype(np.int32), positions.astype(np.float64), offsets, cell, pbc, energy, forces, stress, meta
        )
        first_bad = np.full(n_frames, "", dtype=object)  # the file key of each frame's first non-finite label
        for label in reversed(LABELS):
            label_keys = np.broadcast_to(np.asarray(frame_keys[label], dtype=object), (n_frames,))
            first_bad[bad[label]] = label_keys[bad[label]]
        dropped = first_bad != ""
        if dropped.any() and nonfinite == "error":
            f = int(np.argmax(dropped))
            raise DataError(source, "NaN or infinite value", first_bad[f], _frame(frame_index, f))
        if dropped.any():
            if dropped.all():
                raise DataError(
                    source,
                    f"empty dataset: every one of the {n_frames} frames has a NaN or infinite label, and "
                    f"nonfinite='drop' dropped them all (the first: key '{first_bad[0]}', frame "
                    f"{_frame(frame_index, 0)})",
                )
            record = {
                "count": int(dropped.sum()),
                "frames": [int(f) for f in frame_index[dropped]],
                "keys": [str(k) for k in first_bad[dropped]],
            }
            ds = ds.subset(np.nonzero(~dropped)[0])
            ds.dropped_nonfinite = record
        ds.validate(source, keys, check_distances=check_distances)
        return ds

    @classmethod
    def from_structures(cls, structures: Sequence[Structure], source: str = "<structures>", **kw) -> Dataset:
        """Pack `Structure` frames; a label that is None is absent (keyword arguments go to `from_arrays`, e.g.
        ``keys``, ``nonfinite``)."""
        if len(structures) == 0:
            raise DataError(source, "empty dataset: no frames")
        n = np.array([len(s) for s in structures])
        offsets = np.concatenate([[0], np.cumsum(n)])
        has_f = any(s.forces is not None for s in structures)
        has_s = any(s.stress is not None for s in structures)
        labelled = {  # a label is absent where the Structure has None, never where its value is NaN
            "energy": np.array([s.energy is not None for s in structures]),
            "forces": np.array([s.forces is not None for s in structures]),
            "stress": np.array([s.stress is not None for s in structures]),
        }
        nan3 = np.full((3, 3), np.nan)
        meta_keys = sorted({k for s in structures for k in s.info})
        meta = {k: np.array([s.info.get(k, "") for s in structures], dtype=object) for k in meta_keys}
        return cls.from_arrays(
            source=source,
            numbers=np.concatenate([s.numbers for s in structures]),
            positions=np.concatenate([s.positions for s in structures]),
            offsets=offsets,
            cell=np.stack([s.cell for s in structures]),
            pbc=np.stack([s.pbc for s in structures]),
            energy=np.array([np.nan if s.energy is None else s.energy for s in structures]),
            forces=np.concatenate(
                [s.forces if s.forces is not None else np.full((len(s), 3), np.nan) for s in structures]
            )
            if has_f
            else None,
            stress=np.stack([s.stress if s.stress is not None else nan3 for s in structures]) if has_s else None,
            meta=meta,
            labelled=labelled,
            **kw,
        )

    # ------------------------------------------------------------------ validation
    def validate(self, source: str, keys: Mapping[str, str] | None = None, check_distances: bool = True) -> None:
        """Raise `DataError` naming file, key and frame for NaN/inf positions or cells, labels that are neither
        finite nor absent (NaN over the whole frame), unknown elements, zero-volume periodic cells and atoms
        closer than 0.1 Å."""
        keys = {**_DEFAULT_KEYS, **(keys or {})}
        fidx = self.meta["frame"]
        atom_frame = self.atom_frame_index()
        bad = (self.numbers < 1) | (self.numbers > MAX_ATOMIC_NUMBER)
        if bad.any():
            a = int(np.argmax(bad))
            raise DataError(
                source,
                f"unknown element with atomic number {int(self.numbers[a])} (atom {a - self.offsets[atom_frame[a]]})",
                keys["numbers"],
                _frame(fidx, atom_frame[a]),
            )
        for name, arr, per_atom in (("positions", self.positions, True), ("cell", self.cell, False)):
            finite = np.isfinite(arr).reshape(len(arr), -1).all(axis=1)
            if not finite.all():
                r = int(np.argmin(finite))
                f = atom_frame[r] if per_atom else r
                raise DataError(source, "NaN or infinite value", keys[name], _frame(fidx, f))
        finite = finite_labels(self.offsets, self.energy, self.forces, self.stress)
        for label, arr in (("energy", self.energy), ("forces", self.forces), ("stress", self.stress)):
            absent = _per_frame(self.offsets, arr, np.isnan, label == "forces")  # NaN over the whole frame
            bad = ~(finite[label] | absent)
            if bad.any():
                raise DataError(source, "NaN or infinite value", keys[label], _frame(fidx, int(np.argmax(bad))))
        periodic = self.pbc.any(axis=1)
        vol = np.abs(np.linalg.det(self.cell))
        zero = periodic & (vol < 1e-6)
        if zero.any():
            f = int(np.argmax(zero))
            raise DataError(
                source,
                f"periodic frame (pbc={self.pbc[f].tolist()}) has a zero-volume cell",
                keys["cell"],
                _frame(fidx, f),
            )
        if check_distances:
            self._check_min_distance(source, keys)

    def _check_min_distance(self, source: str, keys: Mapping[str, str]) -> None:
        n_atoms = self.n_atoms
        uniform = np.all(n_atoms == n_atoms[0]) and not self.pbc.any()
        if uniform and n_atoms[0] <= 256:  # molecular frames: vectorised over chunks of frames
            n = int(n_atoms[0])
            pos = self.positions.reshape(-1, n, 3)
            chunk = max(1, 2_000_000 // max(n * n, 1))
            eye = np.eye(n, dtype=bool)
            for s in range(0, len(pos), chunk):
                p = pos[s : s + chunk]
                d2 = np.sum((p[:, :, None] - p[:, None]) ** 2, axis=-1)
                d2[:, eye] = np.inf
                close = (d2 < MIN_DISTANCE_ANGSTROM**2).any(axis=(1, 2))
                if close.any():
                    f = s + int(np.argmax(close))
                    i, j = np.unravel_index(np.argmin(d2[f - s]), d2.shape[1:])
                    raise DataError(
                        source,
                        f"atoms {i} and {j} are {np.sqrt(d2[f - s, i, j]):.3g} Å apart (< {MIN_DISTANCE_ANGSTROM} Å)",
                        keys["positions"],
                        _frame(self.meta["frame"], f),
                    )
            return
        from so3lib.graph.neighbours import neighbour_list

        for f in range(len(self)):
            s = self[f]
            # query at 1 Å: a 0.1 Å cutoff makes cell-list libraries build a huge, slow grid
            _, _, _, d = neighbour_list(s.positions, s.cell, s.pbc, 1.0, return_distances=True)
            d = d[d < MIN_DISTANCE_ANGSTROM]
            if len(d):
                raise DataError(
                    source,
                    f"two atoms are {d.min():.3g} Å apart (< {MIN_DISTANCE_ANGSTROM} Å)",
                    keys["positions"],
                    _frame(self.meta["frame"], f),
                )

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_atoms(self) -> np.ndarray:
        """(F,) atoms per frame."""
        return np.diff(self.offsets)

    def atom_frame_index(self) -> np.ndarray:
        """(A,) frame index of every atom."""
        return np.repeat(np.arange(len(self)), self.n_atoms)

    @property
    def species(self) -> list[int]:
        """Sorted atomic numbers present."""
        return sorted(int(z) for z in np.unique(self.numbers))

    def __getitem__(self, i: int) -> Structure:
        if isinstance(i, (slice, np.ndarray, list)):
            raise TypeError("use Dataset.subset(indices) to select several frames")
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"frame {i} out of range for a dataset of {len(self)} frames")
        a, b = self.offsets[i], self.offsets[i + 1]
        e = self.energy[i]
        stress = None if self.stress is None or np.isnan(self.stress[i]).all() else self.stress[i]
        return Structure(
            numbers=self.numbers[a:b],
            positions=self.positions[a:b],
            cell=self.cell[i],
            pbc=self.pbc[i],
            energy=None if np.isnan(e) else float(e),
            forces=None if self.forces is None else self.forces[a:b],
            stress=stress,
            info={k: v[i] for k, v in self.meta.items()},
        )

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def subset(self, indices) -> Dataset:
        """A new dataset with the given frames, in that order (no re-validation: already valid)."""
        idx = np.asarray(indices, np.int64)
        if len(idx) == 0:
            raise DataError(self.meta["source"][0] if len(self) else "<dataset>", "empty selection of frames")
        n = self.n_atoms[idx]
        offsets = np.concatenate([[0], np.cumsum(n)]).astype(np.int64)
        atom_idx = (
            np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in idx])
            if len(idx) < 4096
            else _ranges(self.offsets[idx], n)
        )
        return Dataset(
            self.numbers[atom_idx],
            self.positions[atom_idx],
            offsets,
            self.cell[idx],
            self.pbc[idx],
            self.energy[idx],
            None if self.forces is None else self.forces[atom_idx],
            None if self.stress is None else self.stress[idx],
            {k: v[idx] for k, v in self.meta.items()},
        )

    @staticmethod
    def concatenate(datasets: Sequence[Dataset]) -> Dataset:
        if not datasets:
            raise DataError("<concatenate>", "empty dataset: nothing to concatenate")
        offs, shift = [np.zeros(1, np.int64)], 0
        for d in datasets:
            offs.append(d.offsets[1:] + shift)
            shift += d.offsets[-1]
        any_f = any(d.forces is not None for d in datasets)
        any_s = any(d.stress is not None for d in datasets)
        keys = set.intersection(*[set(d.meta) for d in datasets])
        return Dataset(
            np.concatenate([d.numbers for d in datasets]),
            np.concatenate([d.positions for d in datasets]),
            np.concatenate(offs),
            np.concatenate([d.cell for d in datasets]),
            np.concatenate([d.pbc for d in datasets]),
            np.concatenate([d.energy for d in datasets]),
            np.concatenate(
                [d.forces if d.forces is not None else np.full((d.offsets[-1], 3), np.nan) for d in datasets]
            )
            if any_f
            else None,
            np.concatenate([d.stress if d.stress is not None else np.full((len(d), 3, 3), np.nan) for d in datasets])
            if any_s
            else None,
            {k: np.concatenate([d.meta[k] for d in datasets]) for k in keys},
            merge_drops([d.dropped_nonfinite for d in datasets]),
        )

    def summary(self) -> dict:
        """Counts and label statistics, for logs and `experiments.inspect`."""
        n = self.n_atoms
        out = {
            "frames": len(self),
            "atoms_total": int(self.offsets[-1]),
            "atoms_min": int(n.min()),
            "atoms_max": int(n.max()),
            "atoms_mean": float(n.mean()),
            "elements": {int(z): int(c) for z, c in zip(*np.unique(self.numbers, return_counts=True))},
            "periodic_frames": int(self.pbc.any(axis=1).sum()),
            "molecules": int(len(np.unique(self.meta["name"].astype(str)))),
            "sources": sorted({str(s) for s in self.meta["source"]}),
        }
        e = self.energy[np.isfinite(self.energy)]
        if len(e):
            out.update(
                energy_ev_min=float(e.min()),
                energy_ev_max=float(e.max()),
                energy_ev_mean=float(e.mean()),
                energy_per_atom_ev_mean=float(np.nanmean(self.energy / n)),
            )
        if self.forces is not None:
            f = self.forces[np.isfinite(self.forces).all(axis=1)]
            out.update(forces_ev_per_a_rms=float(np.sqrt(np.mean(f**2))), forces_ev_per_a_max=float(np.abs(f).max()))
        if self.stress is not None:
            out["frames_with_stress"] = int(np.isfinite(self.stress).all(axis=(1, 2)).sum())
        return out


def finite_labels(offsets, energy=None, forces=None, stress=None) -> dict[str, np.ndarray]:
    """Per label ('energy', 'forces', 'stress'), the (F,) mask of frames whose label values are all finite (all
    True for a label that is None). ``offsets`` (F+1,) gives the atoms of each frame (forces are per atom)."""
    return {
        label: _per_frame(offsets, arr, np.isfinite, label == "forces")
        for label, arr in (("energy", energy), ("forces", forces), ("stress", stress))
    }


def _per_frame(offsets, arr, test, per_atom: bool) -> np.ndarray:
    """(F,) whether ``test`` holds for every value of each frame of ``arr`` (True where ``arr`` is None)."""
    offsets = np.asarray(offsets)
    n = len(offsets) - 1
    if arr is None:
        return np.ones(n, bool)
    rows = test(np.asarray(arr).reshape(len(arr), -1)).all(axis=1)
    if not per_atom:
        return rows
    out = np.ones(n, bool)
    nonempty = np.diff(offsets) > 0
    if nonempty.any():
        out[nonempty] = np.logical_and.reduceat(rows, offsets[:-1][nonempty])
    return out


def _labelled_masks(source, n_frames: int, labelled, given: Mapping[str, bool]) -> dict[str, np.ndarray]:
    """(F,) bool masks of the frames that have each label: ``labelled[label]`` where given, else every frame of a
    label whose array is given (``given[label]``); none of a label not given."""
    labelled = dict(labelled or {})
    unknown = sorted(set(labelled) - set(LABELS))
    if unknown:
        raise DataError(source, f"labelled masks for unknown labels {unknown}; the labels are {LABELS}")
    out = {}
    for label in LABELS:
        mask = labelled.get(label)
        if mask is None:
            out[label] = np.full(n_frames, bool(given[label]))
            continue
        mask = np.asarray(mask, bool)
        if mask.shape == ():
            mask = np.full(n_frames, bool(mask))
        if mask.shape != (n_frames,):
            raise DataError(source, f"labelled['{label}'] has shape {mask.shape}, expected {(n_frames,)}")
        out[label] = mask & bool(given[label])
    return out


def _frame(frame_index, f) -> int:
    return int(frame_index[f]) if frame_index is not None else int(f)


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenated aranges [s, s+c) for each pair, vectorised."""
    total = int(counts.sum())
    rep = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    return np.arange(total) + rep
