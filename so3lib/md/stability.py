"""Stability analysis of MD trajectories: radial distribution functions, their similarity to the first frame,
bond breaking for molecules, atoms too close, lattice sites lost for periodic cells, and NVE energy drift.

Heated is not broken. The RDF of a crystal broadens as it gets hotter, so its similarity to a colder first frame
falls with temperature alone (a Li vacancy cell going from its lattice to 300 K drops below 0.8): it is reported,
not used as a failure. A periodic cell is broken when its atoms leave the sites of the first frame (Lindemann's
idea, without atom identities so that a vacancy hop or an atom swap is no failure): the median distance of the
atoms to the nearest first-frame position, over the median nearest-neighbour distance d_nn of the first frame.
In the mlearn Li AIMD (DFT, 53–54 atoms), measured against the ideal bcc sites, solid cells at 300–907 K give
0.08–0.14 (0.15–0.18 against a 300 K snapshot as the first frame) and molten ones (680 and 907 K) 0.25–0.49:
the threshold is ``SITE_LOSS_THRESHOLD`` = 0.22. It assumes a solid start (a liquid's atoms leave their sites by
design: judge liquids by the RDF). Atoms closer than half the sum of
their covalent radii are broken in any structure."""

from __future__ import annotations

import numpy as np

from so3lib.graph.neighbours import neighbour_list

SITE_LOSS_THRESHOLD = 0.22  # median distance to the nearest frame-0 site / d_nn above which the lattice is lost


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


def first_too_close(frames: np.ndarray, numbers: np.ndarray, cell, pbc, factor: float = 0.5) -> int | None:
    """Index of the first frame with two atoms closer than ``factor`` × the sum of their covalent radii."""
    from ase.data import covalent_radii

    r = covalent_radii[numbers]
    reach = float(2 * factor * r.max())
    for k, p in enumerate(frames):
        i, j, _, d = neighbour_list(p, cell, pbc, reach, return_distances=True)
        if np.any(d < factor * (r[i] + r[j])):
            return k
    return None


def site_loss(frames: np.ndarray, cell, pbc) -> np.ndarray:
    """(R,) per frame: median over atoms of the distance to the nearest frame-0 position (minimum image), over
    the median nearest-neighbour distance d_nn of frame 0 (values above 0.5 are reported as 0.5)."""
    n = len(frames[0])
    _, i0, _, d0 = neighbour_list(frames[0], cell, pbc, 8.0, return_distances=True)
    nn = np.full(n, np.inf)
    np.minimum.at(nn, i0, d0)
    d_nn = float(np.median(nn[np.isfinite(nn)])) if np.isfinite(nn).any() else 1.0
    out = []
    for p in frames:
        both = np.concatenate([frames[0], p])
        i, j, _, d = neighbour_list(both, cell, pbc, 0.5 * d_nn, return_distances=True)
        keep = (i >= n) & (j < n)  # a frame-k atom and a frame-0 position
        near = np.full(n, 0.5 * d_nn)
        np.minimum.at(near, i[keep] - n, d[keep])
        out.append(float(np.median(near)) / d_nn)
    return np.asarray(out)


def nve_drift_mev_per_atom_per_ps(time_fs: np.ndarray, total_ev: np.ndarray, n_atoms: int) -> float:
    """Slope of a linear fit of the total energy per atom against time (meV/atom/ps)."""
    if len(time_fs) < 2:
        return float("nan")
    slope = np.polyfit(np.asarray(time_fs) * 1e-3, np.asarray(total_ev) / n_atoms, 1)[0]
    return float(1e3 * slope)
