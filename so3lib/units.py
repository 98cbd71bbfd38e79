"""Unit conversions into so3lib's internal units: Å, eV, eV/Å, eV/Å³.

All values come from ``ase.units`` (CODATA 2014) so so3lib, ASE and the readers agree exactly.
"""

from __future__ import annotations

import ase.units as _u

KCAL_PER_MOL_EV: float = _u.kcal / _u.mol  #: 1 kcal/mol in eV (0.0433641...)
HARTREE_EV: float = _u.Hartree  #: 1 hartree in eV (27.2113...)
BOHR_ANGSTROM: float = _u.Bohr  #: 1 bohr in Å (0.529177...)
HARTREE_PER_BOHR_EV_PER_ANGSTROM: float = _u.Hartree / _u.Bohr  #: 51.422...
GPA_EV_PER_ANGSTROM3: float = _u.GPa  #: 1 GPa in eV/Å³
KBAR_EV_PER_ANGSTROM3: float = 0.1 * _u.GPa  #: 1 kbar in eV/Å³

ENERGY_UNITS_EV = {
    "ev": 1.0,
    "kcal/mol": KCAL_PER_MOL_EV,
    "hartree": HARTREE_EV,
    "ha": HARTREE_EV,
    "kj/mol": _u.kJ / _u.mol,
    "mev": 1e-3,
}
LENGTH_UNITS_ANGSTROM = {"ang": 1.0, "angstrom": 1.0, "a": 1.0, "bohr": BOHR_ANGSTROM, "nm": 10.0}
