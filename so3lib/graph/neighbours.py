"""Neighbour lists within a cutoff, free space or periodic (any mix of pbc), via vesin.

Convention (used everywhere in so3lib): an edge j → i has ``receivers = i`` (the centre), ``senders = j`` (the
neighbour) and an integer cell shift S, so the edge vector is ``r_ij = r_j − r_i + S · cell`` (rows of ``cell``
are lattice vectors). Edge vectors are recomputed from positions inside differentiated code.
"""

from __future__ import annotations

import numpy as np


def neighbour_list(
    positions: np.ndarray,
    cell: np.ndarray,
    pbc: np.ndarray,
    cutoff: float,
    return_distances: bool = False,
    backend: str = "vesin",
):
    """Full neighbour list (both directions) of pairs closer than ``cutoff`` Å.

    positions (n, 3) Å; cell (3, 3) Å; pbc (3,) bool. Returns senders (E,) int32, receivers (E,) int32,
    shifts (E, 3) int32 [, distances (E,) Å]. Self-pairs only appear through periodic images."""
    positions = np.ascontiguousarray(positions, dtype=np.float64)
    pbc = np.asarray(pbc, bool)
    box = np.asarray(cell, np.float64) if pbc.any() else np.zeros((3, 3))
    if backend == "vesin":
        from vesin import NeighborList

        nl = NeighborList(cutoff=float(cutoff), full_list=True)
        i, j, S, d = nl.compute(
            points=positions, box=box, periodic=pbc.tolist() if pbc.any() else False, quantities="ijSd"
        )
    elif backend == "matscipy":
        from matscipy.neighbours import neighbour_list as msp

        mbox = box if pbc.any() else np.eye(3) * (np.ptp(positions, axis=0).max() + 2 * cutoff + 1.0)
        i, j, S, d = msp("ijSd", positions=positions, cutoff=float(cutoff), cell=mbox, pbc=pbc)
    else:
        raise ValueError(f"unknown neighbour-list backend '{backend}' (vesin or matscipy)")
    out = (np.asarray(j, np.int32), np.asarray(i, np.int32), np.asarray(S, np.int32))  # vesin: uint64 → int32
    return out + (np.asarray(d, np.float64),) if return_distances else out
