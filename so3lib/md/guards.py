"""Blow-up guards checked by every MD engine after each chunk of steps: the run stops (or raises `MDBlowUp`)
naming the step and the reason, so a run that failed never reaches the analysis as if it had been fine.

In order: non-finite values; a runaway temperature (``max_temperature_k``); an atom that moved more than
``max_step_angstrom`` in one step (|v|·dt: at 300 K a hydrogen moves ~0.03 Å/fs, so a sound time step keeps this
below ~0.1 Å; dt = 50 fs moves it > 1 Å and the integrator is meaningless); the NVE total energy leaving its start
by more than ``max_energy_error_ev_per_atom``; and, for free molecules, the molecule splitting into more pieces
than it started with (two atoms are in one piece if a chain of pairs closer than the model cutoff joins them; a
piece beyond the cutoff feels no force from the rest: the molecule flew apart).
"""

from __future__ import annotations

import numpy as np


def n_fragments(positions: np.ndarray, cutoff_angstrom: float) -> int:
    """Number of connected pieces of a free structure (N, 3) joined by pairs closer than ``cutoff_angstrom``."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from so3lib.graph.neighbours import neighbour_list

    n = len(positions)
    i, j, _ = neighbour_list(positions, np.zeros((3, 3)), np.zeros(3, bool), cutoff_angstrom)
    graph = coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n))
    return int(connected_components(graph, directed=False)[0])


def failure(
    cfg,
    temperature_k: np.ndarray,
    step_displacement_angstrom: np.ndarray,
    positions: np.ndarray,
    potential_ev: float,
    energy_error_ev_per_atom: float | None,
    fragments0: int | None,
    cutoff_angstrom: float,
) -> tuple[int, str] | None:
    """(index within the chunk, reason) of the first guard that fails, or None. ``temperature_k`` and
    ``step_displacement_angstrom`` are per step of the chunk; ``positions``, ``potential_ev`` and
    ``energy_error_ev_per_atom`` (|E_tot − E_tot(0)|/N, NVE only, else None) are at its last step;
    ``fragments0``: pieces at step 0 (free molecules; None for periodic cells)."""
    temperature_k = np.asarray(temperature_k, float)
    disp = np.asarray(step_displacement_angstrom, float)
    last = len(temperature_k) - 1
    bad = ~np.isfinite(temperature_k) | ~np.isfinite(disp)
    if bad.any() or not np.isfinite(positions).all() or not np.isfinite(potential_ev):
        return (int(np.argmax(bad)) if bad.any() else last), "non-finite values"
    hot = temperature_k > cfg.max_temperature_k
    if hot.any():
        k = int(np.argmax(hot))
        return k, f"temperature {temperature_k[k]:.0f} K above the limit {cfg.max_temperature_k:.0f} K"
    far = disp > cfg.max_step_angstrom
    if far.any():
        k = int(np.argmax(far))
        return k, (
            f"an atom moved {disp[k]:.2f} Å in one step (limit {cfg.max_step_angstrom} Å): the time step "
            f"{cfg.dt_fs} fs is too large"
        )
    if energy_error_ev_per_atom is not None and energy_error_ev_per_atom > cfg.max_energy_error_ev_per_atom:
        return last, (
            f"the NVE total energy moved {1e3 * energy_error_ev_per_atom:.0f} meV/atom from its start (limit "
            f"{1e3 * cfg.max_energy_error_ev_per_atom:.0f} meV/atom): energy is not conserved"
        )
    if fragments0 is not None:
        n = n_fragments(positions, cutoff_angstrom)
        if n > fragments0:
            return last, (
                f"the molecule flew apart: {n} pieces more than the cutoff {cutoff_angstrom:.2f} Å apart "
                f"(started as {fragments0})"
            )
    return None


def frame_failure(
    cfg, frame: dict, e0_ev: float, n_atoms: int, fragments0: int | None, cutoff_angstrom: float
) -> str | None:
    """The reason `failure` gives for one saved frame (an `so3lib.md.engine.add_record` dict) of an engine that
    runs the steps between frames itself (OpenMM, LAMMPS), or None: its temperature, the largest displacement
    |v|·Δt one step makes at its velocities (ASE's unit), the NVE energy error against ``e0_ev`` (the total energy
    of the first frame) and its pieces."""
    from ase import units

    v_angstrom_per_fs = np.asarray(frame["velocities"], float) * units.fs
    disp = float(np.max(np.linalg.norm(v_angstrom_per_fs, axis=1))) * cfg.dt_fs
    e_tot = frame["potential_ev"] + frame["kinetic_ev"]
    err = abs(e_tot - e0_ev) / n_atoms if cfg.ensemble == "nve" else None
    fail = failure(
        cfg,
        [frame["temperature_k"]],
        [disp],
        np.asarray(frame["positions"], float),
        frame["potential_ev"],
        err,
        fragments0,
        cutoff_angstrom,
    )
    return None if fail is None else fail[1]
