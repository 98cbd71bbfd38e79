"""MD trajectories as extended XYZ that ASE reads back in full: ``ase.io.read(path, index=":")`` gives, per
saved frame, positions (Å), ``get_potential_energy()`` (eV, with the per-element reference), ``get_forces()``
(eV/Å), ``get_velocities()`` (ASE's unit, Å/(Å·sqrt(amu/eV))), for periodic runs ``get_stress()`` (eV/Å³, the
potential part, ASE's sign) and the cell, and in ``info`` the step, time_fs and temperature_k."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def trajectory_frames(atoms, res, monitor=None) -> list:
    """ase.Atoms of every record of an `MDResult` ``res`` of the structure ``atoms``, each with a
    SinglePointCalculator holding what the engine recorded (a quantity it did not record is left out); with an
    ensemble's uncertainty ``monitor`` also ``energy_std_ev``, ``forces_std_max_ev_per_a``, ``uncertain`` (info)
    and ``forces_std`` (arrays) of every frame."""
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.stress import full_3x3_to_voigt_6_stress

    frames = []
    for k, p in enumerate(res.positions):
        f = atoms.copy()
        f.calc = None
        f.set_constraint()
        f.positions = p
        if res.cells is not None:
            f.cell = res.cells[k]
        if res.velocities is not None:
            f.set_velocities(res.velocities[k])
        f.info.update(step=int(res.step[k]), time_fs=float(res.time_fs[k]), temperature_k=float(res.temperature_k[k]))
        results = {"energy": float(res.potential_ev[k])}
        if res.forces is not None:
            results["forces"] = np.asarray(res.forces[k], float)
        if res.stress is not None:
            results["stress"] = full_3x3_to_voigt_6_stress(np.asarray(res.stress[k], float))
        if monitor is not None:  # an ensemble: the spread on this frame
            f.info.update(
                energy_std_ev=float(monitor.energy_std_ev[k]),
                forces_std_max_ev_per_a=float(monitor.forces_std_max_ev_per_a[k]),
                uncertain=bool(monitor.above[k]),
            )
            f.arrays["forces_std"] = np.asarray(monitor.forces_std[k], float)
        f.calc = SinglePointCalculator(f, **results)
        frames.append(f)
    return frames


def write_trajectory(path: Path | str, atoms, res, monitor=None) -> None:
    """Write ``res`` as extxyz to ``path`` (a temporary file renamed into place: never half written)."""
    import ase.io

    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    ase.io.write(tmp, trajectory_frames(atoms, res, monitor), format="extxyz")
    tmp.replace(path)
