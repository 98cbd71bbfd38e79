"""Descriptor analysis for Behler–Parrinello symmetry functions: statistics over a dataset and PNG figures
(energy against summed descriptors, per-function magnitude ranges, descriptor correlation).

    stats = descriptor_analysis(config, dataset, out_dir="analysis/")   # config: a fitted BPNNConfig
"""

from __future__ import annotations

from pathlib import Path

import jax
import jraph
import numpy as np

from so3lib.data.dataset import Dataset
from so3lib.models.bpnn import ANGULAR, RADIAL, BPNNConfig, descriptors


def raw_descriptors(cfg: BPNNConfig, dataset: Dataset, batch_size: int = 64) -> np.ndarray:
    """(A, D) unstandardised descriptors of every atom of ``dataset``, in dataset atom order."""
    from so3lib.graph.batching import GraphLoader

    loader = GraphLoader(
        dataset,
        cfg.cutoff,
        batch_size,
        shuffle=False,
        triplet_cutoff=cfg.triplet_cutoff,
        dtype=np.float64 if cfg.dtype == "float64" else np.float32,
    )
    fn = jax.jit(lambda g: descriptors(cfg, g))
    out = []
    for g in loader.epoch(0):
        out.append(np.asarray(fn(g), np.float64)[np.asarray(jraph.get_node_padding_mask(g))])
    return np.concatenate(out)


def column_kinds(cfg: BPNNConfig) -> list[str]:
    """Kind (G1..G5, ANI) of every descriptor column."""
    S = len(cfg.species)
    P = S * (S + 1) // 2
    rad = [s.kind for s in cfg.symmetry_functions if s.kind in RADIAL]
    ang = [s.kind for s in cfg.symmetry_functions if s.kind in ANGULAR]
    return rad * S + ang * P


def descriptor_analysis(cfg: BPNNConfig, dataset: Dataset, out_dir: str | Path | None = None) -> dict:
    """Per-kind magnitude statistics (the |G1| > |G3| > |G2| ≫ |G5| > |G4| hierarchy), per-frame summed
    descriptors against energy, and the correlation matrix; writes three PNGs when ``out_dir`` is given."""
    G = raw_descriptors(cfg, dataset)
    kinds = np.array(column_kinds(cfg))
    frame = dataset.atom_frame_index()
    stats = {}
    for k in dict.fromkeys(kinds):
        v = np.abs(G[:, kinds == k])
        stats[k] = {
            "columns": int((kinds == k).sum()),
            "mean_abs": float(v.mean()),
            "median_abs": float(np.median(v)),
            "max_abs": float(v.max()),
            "p05_abs": float(np.quantile(v, 0.05)),
            "p95_abs": float(np.quantile(v, 0.95)),
        }
    summed = {k: np.bincount(frame, weights=G[:, kinds == k].sum(axis=1), minlength=len(dataset)) for k in stats}
    energy_per_atom = dataset.energy / dataset.n_atoms
    corr_energy = {
        k: float(np.corrcoef(v, energy_per_atom)[0, 1]) if np.std(v) > 0 else float("nan") for k, v in summed.items()
    }
    varying = G.std(axis=0) > 1e-12
    corr = np.corrcoef(G[:, varying].T) if varying.sum() > 1 else np.ones((1, 1))
    result = {
        "per_kind": stats,
        "corr_with_energy_per_atom": corr_energy,
        "mean_abs_correlation": float(np.mean(np.abs(corr[np.triu_indices(len(corr), 1)]))) if len(corr) > 1 else 0.0,
        "hierarchy": sorted(stats, key=lambda k: -stats[k]["mean_abs"]),
    }
    if out_dir is not None:
        _plots(Path(out_dir), stats, summed, energy_per_atom, corr, kinds[varying], G, kinds)
    return result


def _plots(out: Path, stats, summed, energy_per_atom, corr, corr_kinds, G, kinds) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    data = [np.abs(G[:, kinds == k]).ravel() + 1e-12 for k in stats]
    ax.boxplot(data, showfliers=False)
    ax.set_xticks(range(1, len(stats) + 1), list(stats))
    ax.set_yscale("log")
    ax.set_ylabel("|G| (raw, per atom)")
    ax.set_title("descriptor magnitudes by function type")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out / "descriptor_magnitudes.png", dpi=120)
    plt.close(fig)

    n = len(summed)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.2), squeeze=False)
    for ax, (k, v) in zip(axes[0], summed.items()):
        ax.scatter(v, energy_per_atom, s=4, alpha=0.5)
        ax.set_xlabel(f"Σ {k} per frame")
        ax.set_ylabel("energy per atom (eV)")
        ax.grid(alpha=0.3)
    fig.suptitle("E(G): energy against summed descriptors")
    fig.tight_layout()
    fig.savefig(out / "energy_vs_descriptors.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(corr, cmap="RdBu_r", vmin=-1, vmax=1)
    fig.colorbar(im, ax=ax, label="Pearson correlation")
    ax.set_title(f"descriptor correlation ({len(corr)} varying columns)")
    fig.tight_layout()
    fig.savefig(out / "descriptor_correlation.png", dpi=120)
    plt.close(fig)
