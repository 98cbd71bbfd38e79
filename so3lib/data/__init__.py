"""Data layer: readers → validated `Dataset` (Å, eV), splits, per-element energy reference, bundled samples."""

from so3lib.data.dataset import Dataset, Structure
from so3lib.data.errors import DataError, UndeterminedReferenceError
from so3lib.data.readers import FORMATS, detect_format, iter_spice_groups, read
from so3lib.data.reference import EnergyReference, fit_energy_reference, load_isolated_atom_energies
from so3lib.data.samples import BUNDLED_DIR, bundled_path
from so3lib.data.splits import (
    count_split,
    load_splits,
    random_split,
    save_splits,
    split_by_group,
    split_by_group_rank,
)

__all__ = [
    "Dataset",
    "Structure",
    "DataError",
    "UndeterminedReferenceError",
    "FORMATS",
    "detect_format",
    "iter_spice_groups",
    "read",
    "EnergyReference",
    "fit_energy_reference",
    "load_isolated_atom_energies",
    "BUNDLED_DIR",
    "bundled_path",
    "count_split",
    "load_splits",
    "random_split",
    "save_splits",
    "split_by_group",
    "split_by_group_rank",
]
