"""ASE calculator for a trained so3lib potential.

    calc = so3lib.load_calculator("runs/ethanol")
    atoms.calc = calc; atoms.get_potential_energy(); atoms.get_forces(); atoms.get_stress()

An ensemble run (``--ensemble K``) gives the members' mean as energy/forces/stress and their calibrated spread
as ``calc.results["energy_std"]`` (eV) and ``calc.results["forces_std"]`` (N, 3) eV/Å.

One jitted function serves every call; inputs are padded to a geometric ladder of sizes (see
`so3lib.graph.dynamic_budget`), so it compiles once per size class and reuses it. The neighbour list is built
with a skin and reused while no atom moved more than skin/2 and the cell and atoms are unchanged (exact: edges
between r_cut and r_cut + skin contribute exactly zero through the cutoff function).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from ase.calculators.calculator import Calculator, all_changes

from so3lib.data.dataset import Dataset
from so3lib.data.errors import DataError
from so3lib.graph.batching import GraphBudget, NeighbourTable, build_batch, dynamic_budget
from so3lib.potential import Potential


class So3libCalculator(Calculator):
    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress", "energy_std", "forces_std"]

    def __init__(self, potential: Potential, params, skin: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        if skin < 0:
            raise ValueError(f"skin must be >= 0 Å, got {skin}")
        self.potential, self.params, self.skin = potential, params, float(skin)
        self._fn = jax.jit(potential.__call__, static_argnames="compute_stress")
        self._nl = None  # (positions, cell, pbc, numbers, table)
        self.n_neighbour_builds = 0
        self.shapes: set[tuple] = set()

    def _neighbours(self, atoms) -> NeighbourTable:
        pos, cell, pbc, z = atoms.positions, atoms.cell.array, atoms.pbc, atoms.numbers
        if self._nl is not None:
            p0, c0, b0, z0, table = self._nl
            if (
                len(z0) == len(z)
                and np.array_equal(z0, z)
                and np.array_equal(b0, pbc)
                and np.allclose(c0, cell)
                and np.max(np.linalg.norm(pos - p0, axis=1)) < 0.5 * self.skin
            ):
                return table
        ds = _single_frame(atoms)
        tc = self.potential.model.triplet_cutoff
        table = NeighbourTable.build(
            ds, self.potential.cutoff + self.skin, triplet_cutoff=None if tc is None else tc + self.skin
        )
        self._nl = (pos.copy(), cell.copy(), pbc.copy(), z.copy(), table)
        self.n_neighbour_builds += 1
        return table

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        self.potential.reference.check_species(atoms.numbers, f"structure {atoms.get_chemical_formula()}")
        table = self._neighbours(atoms)
        ds = _single_frame(atoms)
        n_trip = int(table.triplet_offsets[-1]) if table.triplets is not None else 0
        budget = dynamic_budget(len(atoms), int(table.offsets[-1]), 1, n_trip)
        budget = GraphBudget(budget.n_node, budget.n_edge, 2, budget.n_triplet)
        dtype = np.float64 if self.potential.model.dtype == "float64" else np.float32
        g = build_batch(ds, table, [0], budget, dtype)
        self.shapes.add((budget.n_node, budget.n_edge))
        stress = bool(atoms.pbc.any()) and "stress" in properties
        out = self._fn(self.params, g, compute_stress=stress)
        e = float(np.asarray(out["energy_residual"], np.float64)[0]) + float(self.potential.reference.energy(ds)[0])
        self.results["energy"] = self.results["free_energy"] = e
        self.results["forces"] = np.asarray(out["forces"], np.float64)[: len(atoms)]
        ref = self.potential.reference  # per-atom energies: the model's contributions plus e_ref(Z_i); Σ = energy
        self.results["energies"] = (
            np.asarray(out["atomic_energy_residual"], np.float64)[: len(atoms)]
            + ref.table()[atoms.numbers]
            + ref.intercept_ev / len(atoms)
        )
        if "energy_std" in out:  # an ensemble (so3lib.ensemble): the calibrated spread of the members
            self.results["energy_std"] = float(np.asarray(out["energy_std"], np.float64)[0])
            self.results["forces_std"] = np.asarray(out["forces_std"], np.float64)[: len(atoms)]
        if stress:
            from ase.stress import full_3x3_to_voigt_6_stress

            self.results["stress"] = full_3x3_to_voigt_6_stress(np.asarray(out["stress"], np.float64)[0])


def _single_frame(atoms) -> Dataset:
    n = len(atoms)
    if n == 0:
        raise DataError("<atoms>", "empty structure")
    finite = np.isfinite(atoms.positions).all(axis=1)
    if not finite.all():
        raise DataError("<atoms>", f"NaN or infinite position of atom {int(np.argmin(finite))}", "positions")
    cell, pbc = np.asarray(atoms.cell.array, float), np.asarray(atoms.pbc, bool)
    if not np.isfinite(cell).all():
        raise DataError("<atoms>", "NaN or infinite cell", "cell")
    if pbc.any():
        lengths = np.linalg.norm(cell, axis=1)
        flat = [int(i) for i in np.nonzero(pbc & (lengths < 1e-6))[0]]
        if flat or (pbc.all() and abs(np.linalg.det(cell)) < 1e-6):
            raise DataError(
                "<atoms>",
                f"pbc={pbc.tolist()} but the cell {np.round(cell, 4).tolist()} is degenerate"
                + (f" (no lattice vector along periodic direction(s) {flat})" if flat else "")
                + ": set atoms.cell, or pbc=False for a molecule",
                "cell",
            )
    return Dataset(
        np.asarray(atoms.numbers, np.int32),
        np.asarray(atoms.positions, np.float64),
        np.array([0, n], np.int64),
        np.asarray(atoms.cell.array, np.float64)[None],
        np.asarray(atoms.pbc, bool)[None],
        np.full(1, np.nan),
        None,
        None,
        {"frame": np.zeros(1, int), "source": np.array(["<atoms>"], object)},
    )


def load_calculator(run_dir: str | Path, skin: float = 0.5, **kwargs) -> So3libCalculator:
    """An ASE calculator from a finished run folder (its best EMA parameters)."""
    from so3lib.training.saving import load_potential

    pot, params = load_potential(run_dir)
    return So3libCalculator(pot, params, skin=skin, **kwargs)
