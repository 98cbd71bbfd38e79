"""Per-element linear energy reference: E ≈ Σ_Z n_Z · e_Z (+ c).

Fitted by least squares on the training split (or given as isolated-atom energies). The model learns the
remainder. The residual standard deviation per atom is the diagnostic that shows whether absolute energies of
different molecules are comparable: without a reference, the per-molecule offsets dominate the energy error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from so3lib.data.dataset import Dataset
from so3lib.data.errors import DataError


@dataclasses.dataclass(frozen=True)
class EnergyReference:
    """species: atomic numbers; energies_ev: e_Z per species (eV); intercept_ev: c (eV, per structure);
    residual_std_per_atom_ev / residual_mae_per_atom_ev: fit diagnostics on the training data."""

    species: tuple[int, ...]
    energies_ev: tuple[float, ...]
    intercept_ev: float = 0.0
    method: str = "lstsq"
    residual_std_per_atom_ev: float = float("nan")
    residual_mae_per_atom_ev: float = float("nan")
    raw_std_per_atom_ev: float = float("nan")

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
        if not isinstance(dataset, Dataset):  # a store view: from the stored composition, no atom scan
            self.check_species(np.asarray(dataset.species, np.int64), dataset.source)
            return dataset.composition(self.species) @ np.asarray(self.energies_ev) + self.intercept_ev
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


def fit_energy_reference(
    dataset, intercept: bool = False, isolated_atom_energies_ev: Mapping[int, float] | None = None
) -> EnergyReference:
    """Least-squares per-element reference on ``dataset`` (the training split), or the given isolated-atom
    energies. Frames without an energy label are ignored. With a single composition (one molecule) the
    minimum-norm solution is used: the reference then equals the mean energy of that molecule."""
    species = dataset.species
    labelled = np.isfinite(dataset.energy)
    if not labelled.any():
        raise DataError(
            getattr(dataset, "source", None) or dataset.meta["source"][0],
            "no frame has an energy label: cannot fit an energy reference",
            "energy",
        )
    A = composition_matrix(dataset, species)[labelled]
    y = dataset.energy[labelled]
    n_atoms = dataset.n_atoms[labelled]
    if isolated_atom_energies_ev is not None:
        missing = [z for z in species if z not in isolated_atom_energies_ev]
        if missing:
            raise DataError("<config>", f"isolated-atom energies lack elements {missing}", "isolated_atom_energies_ev")
        coef = np.array([float(isolated_atom_energies_ev[z]) for z in species])
        c, method = 0.0, "isolated_atoms"
    else:
        X = np.concatenate([A, np.ones((len(A), 1))], axis=1) if intercept else A
        sol, *_ = np.linalg.lstsq(X, y, rcond=None)
        coef, c = (sol[:-1], float(sol[-1])) if intercept else (sol, 0.0)
        method = "lstsq+intercept" if intercept else "lstsq"
    resid = (y - A @ coef - c) / n_atoms
    raw = y / n_atoms
    return EnergyReference(
        species=tuple(species),
        energies_ev=tuple(float(x) for x in coef),
        intercept_ev=c,
        method=method,
        residual_std_per_atom_ev=float(np.std(resid)),
        residual_mae_per_atom_ev=float(np.mean(np.abs(resid - resid.mean()))),
        raw_std_per_atom_ev=float(np.std(raw)),
    )
