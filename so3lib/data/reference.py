"""Per-element linear energy reference: E ≈ Σ_Z n_Z · e_Z (+ c).

Fitted by least squares on the training split, given as isolated-atom energies, or the same mean energy per
atom for every element ("average"). The model learns the remainder. The residual standard deviation per atom is
the diagnostic that shows whether absolute energies of different molecules are comparable: without a reference,
the per-molecule offsets dominate the energy error.

Least squares needs the training compositions to determine the per-element energies: with fewer independent
compositions than elements (a single molecule, or elements always in the same ratio) it raises
`UndeterminedReferenceError` unless ``allow_undetermined`` takes the minimum-norm solution.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from so3lib.data.dataset import Dataset
from so3lib.data.errors import DataError, UndeterminedReferenceError

log = logging.getLogger("so3lib.data")

Method = Literal["lstsq", "lstsq+intercept", "isolated_atoms", "average"]
METHODS: tuple[str, ...] = ("lstsq", "lstsq+intercept", "isolated_atoms", "average")


@dataclasses.dataclass(frozen=True)
class EnergyReference:
    """species: atomic numbers; energies_ev: e_Z per species (eV); intercept_ev: c (eV, per structure);
    method: one of `METHODS`; residual_std_per_atom_ev / residual_mae_per_atom_ev: fit diagnostics on the
    training data; determined: False when the training compositions did not determine the least-squares
    reference and the minimum-norm solution was taken (``allow_undetermined``)."""

    species: tuple[int, ...]
    energies_ev: tuple[float, ...]
    intercept_ev: float = 0.0
    method: str = "lstsq"
    residual_std_per_atom_ev: float = float("nan")
    residual_mae_per_atom_ev: float = float("nan")
    raw_std_per_atom_ev: float = float("nan")
    determined: bool = True

    def table(self, size: int = 119) -> np.ndarray:
        """(size,) array of e_Z indexed by atomic number (0 elsewhere)."""
        t = np.zeros(size)
        t[list(self.species)] = self.energies_ev
        return t

    def check_species(self, numbers: np.ndarray, where: str = "<input>") -> None:
        unknown = sorted(set(np.unique(numbers).tolist()) - set(self.species))
        if unknown:
            raise DataError(
                where, f"elements {unknown} have no energy reference (the model knows {list(self.species)})", "numbers"
            )

    def energy(self, dataset) -> np.ndarray:
        """(F,) reference energy of every frame (eV), of a `Dataset` or a store's `DatasetView`."""
        if not isinstance(dataset, Dataset):  # a store view: from the stored composition, chunk by chunk
            self.check_species(np.asarray(dataset.species, np.int64), dataset.source)
            e, out, start = np.asarray(self.energies_ev), np.empty(len(dataset)), 0
            for part in dataset.chunks():
                out[start : start + len(part)] = part.composition(self.species) @ e + self.intercept_ev
                start += len(part)
            return out
        self.check_species(dataset.numbers, str(dataset.meta["source"][0]))
        per_atom = self.table()[dataset.numbers]
        return np.add.reduceat(per_atom, dataset.offsets[:-1]) + self.intercept_ev

    def subtract(self, dataset: Dataset) -> np.ndarray:
        """(F,) energy minus reference (eV)."""
        return dataset.energy - self.energy(dataset)

    def add(self, dataset: Dataset, residual: np.ndarray) -> np.ndarray:
        """Exact inverse of `subtract`."""
        return np.asarray(residual) + self.energy(dataset)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @staticmethod
    def from_dict(d: Mapping) -> EnergyReference:
        d = dict(d)
        d["species"] = tuple(int(z) for z in d["species"])
        d["energies_ev"] = tuple(float(e) for e in d["energies_ev"])
        d["determined"] = bool(d.get("determined", True))  # dicts written before the field existed
        return EnergyReference(**d)


def composition_matrix(dataset, species: Sequence[int]) -> np.ndarray:
    """(F, S) counts of each species per frame (of a `Dataset` or a store's `DatasetView`)."""
    if not isinstance(dataset, Dataset):
        return dataset.composition(species)
    col = {z: i for i, z in enumerate(species)}
    lookup = np.full(119, -1)
    lookup[list(col)] = list(col.values())
    s = lookup[dataset.numbers]
    counts = np.zeros((len(dataset), len(species)))
    np.add.at(counts, (dataset.atom_frame_index(), s), 1.0)
    return counts


def _symbols(species: Sequence[int]) -> str:
    from ase.data import chemical_symbols

    return ", ".join(chemical_symbols[int(z)] for z in species)


def _source(dataset) -> str:
    """The file(s) a dataset came from, for messages."""
    if not isinstance(dataset, Dataset):
        return str(getattr(dataset, "source", "<store>"))
    files = list(dict.fromkeys(str(s) for s in dataset.meta["source"]))
    return files[0] if len(files) == 1 else f"{files[0]} (and {len(files) - 1} more files)"


def _element(key) -> int | None:
    """Atomic number of a mapping key: an int or digit string (1-118) or an element symbol ('H'); else None."""
    from ase.data import atomic_numbers

    if isinstance(key, bool):
        return None
    if isinstance(key, int | np.integer):
        z = int(key)
    elif isinstance(key, str) and key.strip().isdigit():
        z = int(key.strip())
    elif isinstance(key, str) and key.strip() in atomic_numbers:
        z = atomic_numbers[key.strip()]
    else:
        return None
    return z if 1 <= z <= 118 else None


def normalize_isolated_atom_energies(
    energies: Mapping, source: str | os.PathLike = "<isolated_atom_energies_ev>"
) -> dict[int, float]:
    """{atomic number: eV} from a mapping keyed by atomic numbers (1 or "1") or element symbols ("H").
    `DataError` naming ``source`` and the key for an unknown element, an element given twice or a value that is
    not a finite number."""
    if not isinstance(energies, Mapping):
        raise DataError(
            source,
            "expected a mapping of element (symbol or atomic number) to isolated-atom energy in eV, e.g. "
            f"{{H: -13.6, O: -2041.8}}, got {type(energies).__name__}",
        )
    out: dict[int, float] = {}
    for key, value in energies.items():
        z = _element(key)
        if z is None:
            raise DataError(
                source, "unknown element: expected an element symbol such as 'H' or an atomic number 1-118", str(key)
            )
        if z in out:
            raise DataError(source, f"element {_symbols([z])} (atomic number {z}) is given twice", str(key))
        if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
            raise DataError(source, f"isolated-atom energy {value!r} is not a number (eV)", str(key))
        if not math.isfinite(float(value)):
            raise DataError(source, f"isolated-atom energy {value!r} is not a finite number (eV)", str(key))
        out[z] = float(value)
    return out


def load_isolated_atom_energies(path: str | os.PathLike) -> dict[int, float]:
    """Isolated-atom energies (E0s) from a YAML or JSON file mapping element (symbol or atomic number) to eV,
    e.g. ``{H: -13.587, C: -1029.8, O: -2041.8}``: {atomic number: eV}. `DataError` naming the file (and the
    key) for content that is not such a mapping, unknown elements and values that are not numbers."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such isolated-atom energies file")
    try:
        content = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        msg = " ".join(str(exc).split())
        raise DataError(path, f"not a YAML/JSON mapping of element to energy ({type(exc).__name__}: {msg})") from exc
    if isinstance(content, Mapping) and not content:
        raise DataError(path, "no isolated-atom energies: the mapping is empty")
    return normalize_isolated_atom_energies(content, path)


def _resolve_method(method, intercept: bool, isolated) -> str:
    if method is None:
        return "isolated_atoms" if isolated is not None else ("lstsq+intercept" if intercept else "lstsq")
    if method not in METHODS:
        raise ValueError(f"unknown energy reference method {method!r}, choose one of {METHODS}")
    if intercept and method != "lstsq+intercept":
        raise ValueError(f"intercept=True contradicts method {method!r} (intercept=True means 'lstsq+intercept')")
    if isolated is not None and method != "isolated_atoms":
        raise ValueError(f"isolated_atom_energies_ev given with method {method!r}: use method 'isolated_atoms'")
    if method == "isolated_atoms" and isolated is None:
        raise DataError(
            "<config>",
            "energy reference 'isolated_atoms' needs the isolated-atom energies (--e0s FILE)",
            "isolated_atom_energies_ev",
        )
    return method


def undetermined_reason(rank: int, species: Sequence[int], intercept: bool, n_compositions: int) -> str:
    """Why the least-squares reference is not determined, in words (the start of the error and warning)."""
    what = f"{len(species)} element{'s' if len(species) != 1 else ''} ({_symbols(species)})"
    if intercept:
        what += " and an intercept"
    detail = (
        "a single composition: every frame has the same atoms"
        if n_compositions == 1
        else f"{n_compositions} distinct compositions"
    )
    return (
        f"per-element energy reference is not determined: the training set's compositions have rank {rank} "
        f"for {what} ({detail})"
    )


def fit_energy_reference(
    dataset,
    intercept: bool = False,
    isolated_atom_energies_ev: Mapping[int | str, float] | None = None,
    *,
    method: Method | None = None,
    allow_undetermined: bool = False,
) -> EnergyReference:
    """The per-element energy reference of ``dataset`` (the training split: a `Dataset` or a store's
    `DatasetView`). Frames without an energy label are ignored.

    ``method`` (default: from the older keywords, ``isolated_atom_energies_ev`` given → 'isolated_atoms',
    ``intercept=True`` → 'lstsq+intercept', else 'lstsq'):

    - 'lstsq': least squares E ≈ Σ_Z n_Z e_Z; 'lstsq+intercept': with a constant c per structure;
    - 'isolated_atoms': e_Z = the given isolated-atom energies (keys: atomic numbers or element symbols);
    - 'average': every element gets e_Z = mean over the frames of E/N (always determined; for a single
      molecule the reference energy N·mean(E/N) is its mean energy, as the minimum-norm least squares gives).

    Least squares needs the composition matrix ([A | 1] with the intercept) to have full column rank; when it
    does not (one molecule, elements always in the same ratio), the per-element energies are not determined by
    the data: `UndeterminedReferenceError`, or with ``allow_undetermined=True`` a warning and the minimum-norm
    solution, recorded as ``determined=False``."""
    method = _resolve_method(method, intercept, isolated_atom_energies_ev)
    species = list(dataset.species)
    chunks = _labelled_chunks(dataset, species)
    n_labelled, sum_e_per_atom = 0, 0.0
    for _, y, n_atoms in chunks():
        n_labelled += len(y)
        sum_e_per_atom += np.sum(y / n_atoms)
    if n_labelled == 0:
        raise DataError(_source(dataset), "no frame has an energy label: cannot fit an energy reference", "energy")
    c, determined = 0.0, True
    if method == "isolated_atoms":
        iso = normalize_isolated_atom_energies(isolated_atom_energies_ev)
        missing = [z for z in species if z not in iso]
        if missing:
            raise DataError(
                "<config>",
                f"isolated-atom energies lack elements {_symbols(missing)} (atomic numbers {missing})",
                "isolated_atom_energies_ev",
            )
        coef = np.array([iso[z] for z in species])
    elif method == "average":
        coef = np.full(len(species), float(sum_e_per_atom / n_labelled))
    else:
        with_c = method == "lstsq+intercept"
        if isinstance(dataset, Dataset):  # in memory: least squares on every labelled frame
            ((A, y, _),) = chunks()
            X = np.concatenate([A, np.ones((len(A), 1))], axis=1) if with_c else A
            distinct = np.unique(X, axis=0)  # same rank, far fewer rows
        else:  # a store view: the same normal equations from its distinct compositions (weights: frames each)
            distinct, frames_each, energy_sums = _distinct_rows(chunks(), with_c)
            X, y = distinct * np.sqrt(frames_each)[:, None], energy_sums / np.sqrt(frames_each)
        rank = int(np.linalg.matrix_rank(distinct))
        if rank < X.shape[1]:
            determined = False
            reason = undetermined_reason(rank, species, with_c, len(distinct))
            if not allow_undetermined:
                raise UndeterminedReferenceError(
                    _source(dataset),
                    f"{reason}; use energy_reference 'average' or isolated-atom energies (--e0s average / --e0s FILE), "
                    "or allow_undetermined=True (--allow-undetermined-reference) to go on with the minimum-norm "
                    "solution",
                    "energy",
                )
            log.warning(
                "%s: %s; going on with the minimum-norm solution (allow_undetermined): its per-element energies "
                "are one choice among many and do not transfer to other compositions",
                _source(dataset),
                reason,
            )
        sol, *_ = np.linalg.lstsq(X, y, rcond=None)
        coef, c = (sol[:-1], float(sol[-1])) if with_c else (sol, 0.0)
    resid_std, resid_mae, raw_std = _residual_stats(chunks, coef, c, n_labelled)
    return EnergyReference(
        species=tuple(species),
        energies_ev=tuple(float(x) for x in coef),
        intercept_ev=c,
        method=method,
        residual_std_per_atom_ev=resid_std,
        residual_mae_per_atom_ev=resid_mae,
        raw_std_per_atom_ev=raw_std,
        determined=determined,
    )


def _labelled_chunks(dataset, species: Sequence[int]):
    """A callable giving the labelled frames as (A (F', S) counts, y (F',) eV, n (F',) atoms) chunks: one chunk
    for an in-memory `Dataset` (computed once), chunks of a store view's frames read anew on each call (so no
    per-frame array of the whole view is held)."""
    if isinstance(dataset, Dataset):
        y = np.asarray(dataset.energy, np.float64)
        labelled = np.isfinite(y)
        one = [(composition_matrix(dataset, species)[labelled], y[labelled], np.asarray(dataset.n_atoms)[labelled])]
        return lambda: one

    def read():
        for part in dataset.chunks():
            y = part.energy
            labelled = np.isfinite(y)
            yield part.composition(species)[labelled], y[labelled], part.n_atoms[labelled]

    return read


def _distinct_rows(chunks, with_c: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(G, S[+1]) distinct rows x_g of X = [A | 1], the frames with each and the sum of their energies: the
    least squares Σ_i (y_i − x_i·c)² equals Σ_g (√w_g ȳ_g − √w_g x_g·c)² up to a constant (w_g frames, ȳ_g
    their mean energy), so it has the same solutions."""
    rows: dict[bytes, list] = {}
    for A, y, _ in chunks:
        X = np.concatenate([A, np.ones((len(A), 1))], axis=1) if with_c else A
        if not len(X):
            continue
        u, inv, cnt = np.unique(X, axis=0, return_inverse=True, return_counts=True)
        sums = np.bincount(inv.reshape(-1), weights=y, minlength=len(u))
        for row, k, e in zip(u, cnt, sums):
            acc = rows.setdefault(row.tobytes(), [row, 0, 0.0])
            acc[1] += int(k)
            acc[2] += float(e)
    distinct = np.array([r[0] for r in rows.values()])
    return distinct, np.array([r[1] for r in rows.values()], np.float64), np.array([r[2] for r in rows.values()])


def _residual_stats(chunks, coef: np.ndarray, c: float, n: int) -> tuple[float, float, float]:
    """Standard deviation and mean absolute deviation of the residual per atom r = (E − A·e − c)/N, and the
    standard deviation of E/N, over the labelled frames (eV/atom), in two passes over the chunks."""
    sum_r = sum_raw = 0.0
    for A, y, na in chunks():
        sum_r += np.sum((y - A @ coef - c) / na)
        sum_raw += np.sum(y / na)
    mean_r, mean_raw = sum_r / n, sum_raw / n
    sq_r = abs_r = sq_raw = 0.0
    for A, y, na in chunks():
        d = (y - A @ coef - c) / na - mean_r
        sq_r += np.sum(d**2)
        abs_r += np.sum(np.abs(d))
        sq_raw += np.sum((y / na - mean_raw) ** 2)
    return float(np.sqrt(sq_r / n)), float(abs_r / n), float(np.sqrt(sq_raw / n))
