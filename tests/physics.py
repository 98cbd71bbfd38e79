"""Helpers for the physics tests (float64)."""

from __future__ import annotations

import jax
import numpy as np

from so3lib.data import fit_energy_reference
from so3lib.graph import GraphBudget, NeighbourTable, build_batch
from so3lib.models import make_config
from so3lib.potential import Potential, fit_scale_shift


def make_potential(name: str, opts: dict, ds, seed: int = 0):
    """An untrained float64 potential; its energy reference is 'average' (determined for any data, also for the
    single-molecule sets the physics tests use)."""
    cfg = make_config(name, dtype="float64", **opts).fit(ds)
    ref = fit_energy_reference(ds, method="average")
    pot = Potential(cfg, ref, *fit_scale_shift(ds, ref))
    g = graph(pot, ds, [0])
    params = pot.init(jax.random.PRNGKey(seed), g)
    return pot, params


def graph(pot, ds, frames, budget: GraphBudget | None = None):
    table = NeighbourTable.build(ds, pot.cutoff, triplet_cutoff=pot.model.triplet_cutoff)
    return build_batch(ds, table, frames, budget, np.float64, pot.reference.energy(ds))


def structure_graph(pot, s, budget=None):
    import ase

    from so3lib.calculator import _single_frame

    atoms = ase.Atoms(numbers=s.numbers, positions=s.positions, cell=s.cell, pbc=s.pbc)
    ds = _single_frame(atoms)
    return build_batch(
        ds, NeighbourTable.build(ds, pot.cutoff, triplet_cutoff=pot.model.triplet_cutoff), [0], budget, np.float64
    )


_JIT: dict = {}


def jitted(pot):
    """One jitted potential call per potential object (shared by all helpers of a test)."""
    key = id(pot)
    if key not in _JIT:
        _JIT[key] = (pot, jax.jit(pot.__call__, static_argnames="compute_stress"))
    return _JIT[key][1]


def _energy_fn(pot):
    fn = jitted(pot)
    return lambda p, g: fn(p, g, compute_stress=False)["energy_residual"][0]


def fd_forces(pot, params, s, atoms_idx, h=1e-5):
    """−dE/dr by central differences for the given atoms, in float64 (E from the jitted energy)."""
    energy = _energy_fn(pot)
    out = np.zeros((len(atoms_idx), 3))
    for k, a in enumerate(atoms_idx):
        for c in range(3):
            vals = []
            for sgn in (1, -1):
                pos = s.positions.copy()
                pos[a, c] += sgn * h
                s2 = type(s)(numbers=s.numbers, positions=pos, cell=s.cell, pbc=s.pbc)
                vals.append(float(energy(params, structure_graph(pot, s2))))
            out[k, c] = -(vals[0] - vals[1]) / (2 * h)
    return out


def fd_stress(pot, params, s, h=1e-6):
    """(1/V) dE/dε by central differences of a homogeneous strain of positions and cell."""
    energy = _energy_fn(pot)
    vol = abs(np.linalg.det(s.cell))
    out = np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            vals = []
            for sgn in (1, -1):
                eps = np.zeros((3, 3))
                eps[i, j] = sgn * h
                eps = 0.5 * (eps + eps.T)
                m = np.eye(3) + eps
                s2 = type(s)(numbers=s.numbers, positions=s.positions @ m, cell=s.cell @ m, pbc=s.pbc)
                vals.append(float(energy(params, structure_graph(pot, s2))))
            out[i, j] = (vals[0] - vals[1]) / (2 * h) / vol
    return out
