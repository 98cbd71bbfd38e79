"""Stability analysis of MD trajectories: radial distribution functions, their similarity to the first frame,
bond breaking for molecules, and NVE energy drift."""

from __future__ import annotations

import numpy as np

from so3lib.graph.neighbours import neighbour_list


def rdf(
    positions: np.ndarray,
    cell: np.ndarray,
    pbc: np.ndarray,
    r_max: float = 6.0,
    n_bins: int = 120,
    smooth_angstrom: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """(bin centres Å, g(r)) of one frame, each pair distance broadened by a Gaussian of width
    ``smooth_angstrom`` (few-atom molecules otherwise give spiky, noisy histograms). Periodic: normalised by the
    ideal-gas pair density (g → 1 at large r). Free molecules: the pair-distance density per shell volume,
    normalised to unit area (shape only)."""
    _, _, _, d = neighbour_list(positions, cell, pbc, r_max, return_distances=True)
    edges = np.linspace(0.0, r_max, n_bins + 1)
    hist, _ = np.histogram(d, bins=edges)
    if smooth_angstrom > 0:
        width = smooth_angstrom / (edges[1] - edges[0])
        k = np.arange(-int(4 * width) - 1, int(4 * width) + 2)
        kernel = np.exp(-0.5 * (k / width) ** 2)
        hist = np.convolve(hist.astype(float), kernel / kernel.sum(), mode="same")
    centres = 0.5 * (edges[1:] + edges[:-1])
    shell = 4.0 / 3.0 * np.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
    n = len(positions)
    if np.all(pbc):
        rho = n / abs(np.linalg.det(cell))
        g = hist / (n * rho * shell)
    else:
        g = hist / shell
        area = np.sum(g) * (edges[1] - edges[0])
        g = g / area if area > 0 else g
    return centres, g


def rdf_similarity(g: np.ndarray, g0: np.ndarray) -> float:
    """1 − ‖g − g0‖₁ / (‖g‖₁ + ‖g0‖₁): 1 for identical RDFs, 0 for disjoint ones."""
    den = np.sum(np.abs(g)) + np.sum(np.abs(g0))
    return float(1.0 - np.sum(np.abs(g - g0)) / den) if den > 0 else 1.0


def bonds(positions: np.ndarray, numbers: np.ndarray, factor: float = 1.2) -> np.ndarray:
    """(B, 2) atom pairs closer than ``factor`` × the sum of covalent radii (ASE's table)."""
    from ase.data import covalent_radii

    r = covalent_radii[numbers]
    d = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
    i, j = np.nonzero(np.triu(d < factor * (r[:, None] + r[None]), k=1))
    return np.stack([i, j], axis=1)


def first_broken_bond(frames: np.ndarray, numbers: np.ndarray, stretch: float = 1.5) -> int | None:
    """Index of the first frame in which a bond of frame 0 is longer than ``stretch`` × its initial length."""
    b = bonds(frames[0], numbers)
    if len(b) == 0:
        return None
    d0 = np.linalg.norm(frames[0][b[:, 0]] - frames[0][b[:, 1]], axis=1)
    for k, p in enumerate(frames):
        if np.any(np.linalg.norm(p[b[:, 0]] - p[b[:, 1]], axis=1) > stretch * d0):
            return k
    return None


def nve_drift_mev_per_atom_per_ps(time_fs: np.ndarray, total_ev: np.ndarray, n_atoms: int) -> float:
    """Slope of a linear fit of the total energy per atom against time (meV/atom/ps)."""
    if len(time_fs) < 2:
        return float("nan")
    slope = np.polyfit(np.asarray(time_fs) * 1e-3, np.asarray(total_ev) / n_atoms, 1)[0]
    return float(1e3 * slope)
