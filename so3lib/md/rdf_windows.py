"""RDFs averaged over windows of a temperature ramp, from any engine's frames, to compare with LAMMPS' own
``compute rdf`` (the seed study: how the structure of a periodic cell changes along T0 → T1).

g(r) per window = the mean over the window's frames of `stability.rdf` without smoothing, times N / (N − 1)
(LAMMPS normalises by the density of the other N − 1 atoms, `stability.rdf` by N / V); with the same bins the
two are then the same function of the same frames.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from so3lib.md import stability


def window_rdfs(
    res, cell: np.ndarray, pbc: np.ndarray, end_steps: np.ndarray, window_steps: int, r_max: float, n_bins: int
) -> np.ndarray:
    """(W, n_bins) g(r) of ``res`` (an `MDResult`) averaged over the frames with end − window < step ≤ end."""
    n = res.n_atoms
    out = []
    for end in end_steps:
        frames = np.flatnonzero((res.step > end - window_steps) & (res.step <= end))
        if not len(frames):
            raise ValueError(f"no recorded frame in the RDF window ending at step {end}")
        g = [stability.rdf(res.positions[k], cell, pbc, r_max, n_bins, smooth_angstrom=0.0)[1] for k in frames]
        out.append(np.mean(g, axis=0) * n / (n - 1))
    return np.asarray(out)


def compare(lammps_rdf, other: np.ndarray, res_lammps, res_other, window_steps: int) -> list[dict]:
    """Per window (those of ``other``, (W', B), W' ≤ W): the mean target and measured temperatures of both runs,
    the similarity (`stability.rdf_similarity`) of the two RDFs, and the largest |Δg|."""

    def mean_t(res, end):
        return float(np.mean(res.temperature_k[(res.step > end - window_steps) & (res.step <= end)]))

    rows = []
    for w, end in enumerate(lammps_rdf.end_step[: len(other)]):
        rows.append(
            {
                "end_step": int(end),
                "target_k": float(lammps_rdf.target_k[w]),
                "temperature_lammps_k": mean_t(res_lammps, end),
                "temperature_other_k": mean_t(res_other, end),
                "rdf_similarity": stability.rdf_similarity(lammps_rdf.g[w], other[w]),
                "rdf_max_abs_difference": float(np.max(np.abs(lammps_rdf.g[w] - other[w]))),
            }
        )
    return rows


def plot(lammps_rdf, other: np.ndarray | None, path: Path, title: str, other_label: str = "jax-md") -> None:
    """g(r) of every window: LAMMPS' compute rdf (solid) and the other engine's (dashed), coloured by T."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    cmap = plt.get_cmap("plasma")
    n = len(lammps_rdf.end_step)
    for w in range(n):
        c = cmap(0.85 * w / max(n - 1, 1))
        ax.plot(lammps_rdf.r, lammps_rdf.g[w], color=c, label=f"{lammps_rdf.target_k[w]:.0f} K (LAMMPS)")
        if other is not None and w < len(other):
            ax.plot(lammps_rdf.r, other[w], "--", color=c, alpha=0.8)
    ax.set_xlabel("r (Å)")
    ax.set_ylabel("g(r)")
    ax.set_title(title + ("" if other is None else f"; dashed: {other_label}"))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
