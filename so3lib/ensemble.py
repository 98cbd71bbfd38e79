"""Deep ensembles of trained potentials: the mean prediction and the spread of the members.

For K members with energies E_k and forces F_k (same structure):

    E = (1/K) Σ_k E_k,     σ_E = s_E · std_k(E_k)
    F = (1/K) Σ_k F_k,     σ_F,ic = s_F · std_k(F_k,ic)          (population std, eV and eV/Å)

The mean energy is a conservative potential (its forces are the mean forces), so MD can be driven by it.
``s_E`` and ``s_F`` are the calibration factors fitted on the validation set (`fit_calibration`):
s² = Σ err² / Σ σ_raw², i.e. the scaled spread has the RMS of the real errors there (variance scaling).

Per structure the force uncertainty is summarised two ways: ``forces_std_rms`` = sqrt(mean_ic σ_F,ic²) (the
same measure as a force RMSE, for calibration) and ``forces_std_max`` = max_i ‖σ_F,i‖ (the largest atomic
force deviation, the usual stopping and selection criterion of active learning, as DP-GEN's model_devi_f).

A shallow ensemble (`so3lib.shallow_ensemble`, one model with K readout heads) gives the same outputs; every
function here that takes an ensemble takes it too (`gives_spread`).

On disk an ensemble run holds ``members/m<k>/`` (complete run folders, one per seed) and
``model/ensemble.yaml`` (their model folders, relative, and the calibration); `so3lib.load_potential` and
`so3lib.load_calculator` read it like a single run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import jraph
import numpy as np
import yaml

from so3lib.potential import Potential

ENSEMBLE_FILE = "ensemble.yaml"


@dataclasses.dataclass(frozen=True, eq=False)
class EnsemblePotential:
    """K potentials of one model and reference (their fitted scale/shift may differ); parameters are a tuple of
    the members' parameters. Called like `Potential` (mean outputs) plus the spread."""

    members: tuple[Potential, ...]
    energy_scale: float = 1.0  # calibration s_E
    forces_scale: float = 1.0  # calibration s_F

    def __post_init__(self):
        if len(self.members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(self.members)}")
        first = self.members[0]
        for k, m in enumerate(self.members[1:], 1):
            if m.model.config_view() != first.model.config_view():
                raise ValueError(f"ensemble member {k} has another model than member 0: {m.model.config_view()}")
            if m.reference.to_dict() != first.reference.to_dict():
                raise ValueError(f"ensemble member {k} has another energy reference than member 0")

    @property
    def model(self):
        return self.members[0].model

    @property
    def reference(self):
        return self.members[0].reference

    @property
    def cutoff(self) -> float:
        return self.members[0].cutoff

    @property
    def dtype(self):
        return self.members[0].dtype

    def __len__(self) -> int:
        return len(self.members)

    def residual_energy(self, params: Sequence, graph) -> jax.Array:
        """(G,) mean over members of E − E_ref (eV)."""
        return jnp.mean(jnp.stack([m.residual_energy(p, graph) for m, p in zip(self.members, params)]), axis=0)

    def reference_energy(self, graph) -> jax.Array:
        return self.members[0].reference_energy(graph)

    def __call__(self, params: Sequence, graph, compute_stress: bool = False) -> dict[str, jax.Array]:
        """`Potential`'s outputs averaged over the members, plus energy_std (G,), forces_std (N, 3) (calibrated),
        energy_members (K, G) and forces_members (K, N, 3)."""
        outs = [m(p, graph, compute_stress=compute_stress) for m, p in zip(self.members, params)]
        stacked = {k: jnp.stack([o[k] for o in outs]) for k in outs[0]}
        res = {k: jnp.mean(v, axis=0) for k, v in stacked.items()}
        res["energy_std"] = self.energy_scale * jnp.std(stacked["energy_residual"], axis=0)
        res["forces_std"] = self.forces_scale * jnp.std(stacked["forces"], axis=0)
        res["energy_members"] = stacked["energy"]
        res["forces_members"] = stacked["forces"]
        return res

    def with_calibration(self, energy_scale: float, forces_scale: float) -> EnsemblePotential:
        return dataclasses.replace(self, energy_scale=float(energy_scale), forces_scale=float(forces_scale))


def gives_spread(pot) -> bool:
    """The potential reports an uncertainty: an `EnsemblePotential` or a shallow ensemble."""
    from so3lib.shallow_ensemble import ShallowEnsemblePotential

    return isinstance(pot, (EnsemblePotential, ShallowEnsemblePotential))


# --------------------------------------------------------------------------------------------- on disk
def is_ensemble(run_dir: str | Path) -> bool:
    d = Path(run_dir)
    return (d / "model" / ENSEMBLE_FILE).exists() or (d / ENSEMBLE_FILE).exists()


def save_ensemble(run_dir: str | Path, member_dirs: Sequence[str | Path], calibration: dict) -> Path:
    """``<run>/model/ensemble.yaml``: the members' folders relative to it, and the calibration."""
    from so3lib.training.run_folder import write_atomic

    d = Path(run_dir) / "model"
    d.mkdir(parents=True, exist_ok=True)
    rel = [str(Path(_relpath(Path(m), d))) for m in member_dirs]
    write_atomic(d / ENSEMBLE_FILE, yaml.safe_dump({"members": rel, "calibration": calibration}, sort_keys=False))
    return d / ENSEMBLE_FILE


def _relpath(target: Path, start: Path) -> str:
    import os

    return os.path.relpath(target.resolve(), start.resolve())


def load_ensemble(run_dir: str | Path) -> tuple[EnsemblePotential, tuple]:
    """(EnsemblePotential, member parameters) from an ensemble run folder (or its ``model/``)."""
    from so3lib.training.saving import load_potential

    d = Path(run_dir)
    f = d / "model" / ENSEMBLE_FILE if (d / "model" / ENSEMBLE_FILE).exists() else d / ENSEMBLE_FILE
    spec = yaml.safe_load(f.read_text())
    pots, params = [], []
    for m in spec["members"]:
        p, q = load_potential(f.parent / m)
        pots.append(p)
        params.append(q)
    cal = spec.get("calibration") or {}
    return EnsemblePotential(tuple(pots), cal.get("energy_scale", 1.0), cal.get("forces_scale", 1.0)), tuple(params)


# --------------------------------------------------------------------------------------------- arrays
def predict_arrays(pot, params, ds, batch_size: int = 64, progress: bool = False) -> dict[str, np.ndarray]:
    """Batched predictions of a `Potential`, `EnsemblePotential` or shallow ensemble on every frame of ``ds``
    (float64 on the host): energy_ev (F,), forces_ev_per_a (ΣN, 3), and for an ensemble energy_std_ev (F,),
    forces_std_ev_per_a (ΣN, 3) (calibrated), forces_std_rms_ev_per_a and forces_std_max_ev_per_a (F,)."""
    from tqdm.auto import tqdm

    from so3lib.training.trainer import make_loader

    loader = make_loader(ds, pot, batch_size, False, 0, "prediction")
    fn = jax.jit(pot.__call__)
    ens = gives_spread(pot)
    keys = ["energy_residual", "forces"] + (["energy_std", "forces_std"] if ens else [])
    acc: dict[str, list] = {k: [] for k in keys}
    for g in tqdm(loader.epoch(0), total=len(loader), desc="predict", disable=not progress):
        out = fn(params, g)
        n_graph = int(np.sum(np.asarray(jraph.get_graph_padding_mask(g))))  # real graphs come first
        real = np.asarray(jraph.get_node_padding_mask(g))
        acc["energy_residual"].append(np.asarray(out["energy_residual"], np.float64)[:n_graph])
        acc["forces"].append(np.asarray(out["forces"], np.float64)[real])
        if ens:
            acc["energy_std"].append(np.asarray(out["energy_std"], np.float64)[:n_graph])
            acc["forces_std"].append(np.asarray(out["forces_std"], np.float64)[real])
    cat = {k: np.concatenate(v) for k, v in acc.items()}
    res = {
        "energy_ev": cat["energy_residual"] + pot.reference.energy(ds),
        "forces_ev_per_a": cat["forces"],
        "n_atoms": np.asarray(ds.n_atoms),
    }
    if ens:
        res["energy_std_ev"] = cat["energy_std"]
        res["forces_std_ev_per_a"] = cat["forces_std"]
        res.update(per_structure_force_spread(cat["forces_std"], np.asarray(ds.n_atoms)))
    return res


def per_structure_force_spread(forces_std: np.ndarray, n_atoms: np.ndarray) -> dict[str, np.ndarray]:
    """(F,) forces_std_rms = sqrt(mean_ic σ²) and forces_std_max = max_i ‖σ_i‖ from (ΣN, 3) σ."""
    idx = np.repeat(np.arange(len(n_atoms)), n_atoms)
    var = np.bincount(idx, (forces_std**2).sum(axis=1), minlength=len(n_atoms))
    norm = np.linalg.norm(forces_std, axis=1)
    mx = np.full(len(n_atoms), -np.inf)
    np.maximum.at(mx, idx, norm)
    return {"forces_std_rms_ev_per_a": np.sqrt(var / (3 * n_atoms)), "forces_std_max_ev_per_a": mx}


def per_structure_force_rmse(err: np.ndarray, n_atoms: np.ndarray) -> np.ndarray:
    """(F,) sqrt(mean_ic err²) of (ΣN, 3) force errors (NaN for an unlabelled structure)."""
    idx = np.repeat(np.arange(len(n_atoms)), n_atoms)
    return np.sqrt(np.bincount(idx, (err**2).sum(axis=1), minlength=len(n_atoms)) / (3 * n_atoms))


# --------------------------------------------------------------------------------------------- calibration
def fit_calibration(err: np.ndarray, std: np.ndarray) -> float | None:
    """s with s² = Σ err² / Σ σ² over the finite pairs (None when there is none or the spread is zero)."""
    err, std = np.ravel(err), np.ravel(std)
    ok = np.isfinite(err) & np.isfinite(std)
    den = float(np.sum(std[ok] ** 2))
    if not ok.any() or den <= 0:
        return None
    return float(np.sqrt(np.sum(err[ok] ** 2) / den))


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman rank correlation over the finite pairs (None for fewer than 3)."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        return None
    r = spearmanr(x[ok], y[ok]).statistic
    return float(r) if np.isfinite(r) else None


def calibration_curve(err: np.ndarray, std: np.ndarray, n_bins: int = 10) -> dict[str, list[float]]:
    """Structures binned by predicted σ (equal-count bins): per bin the RMS σ and the RMSE of the real errors
    (a calibrated spread lies on the diagonal)."""
    ok = np.isfinite(err) & np.isfinite(std)
    err, std = np.asarray(err)[ok], np.asarray(std)[ok]
    order = np.argsort(std)
    bins = [b for b in np.array_split(order, min(n_bins, max(len(order), 1))) if len(b)]
    return {
        "rms_std": [float(np.sqrt(np.mean(std[b] ** 2))) for b in bins],
        "rmse": [float(np.sqrt(np.mean(err[b] ** 2))) for b in bins],
        "count": [len(b) for b in bins],
    }


def uncertainty_report(pred: dict, ds) -> dict | None:
    """How the (calibrated) spread ranks and matches the real errors of ``pred`` (from `predict_arrays`) on the
    labelled frames of ``ds``: Spearman of per-structure force RMSE vs forces_std_rms and vs forces_std_max, of
    |energy error| vs energy_std, the RMSE/RMS-σ ratios and the calibration curve. None without labels."""
    if "forces_std_ev_per_a" not in pred:
        return None
    out: dict = {"n_structures": len(pred["energy_ev"])}
    if ds.forces is not None:
        f_err = per_structure_force_rmse(pred["forces_ev_per_a"] - ds.forces, pred["n_atoms"])
        s_rms, s_max = pred["forces_std_rms_ev_per_a"], pred["forces_std_max_ev_per_a"]
        out["forces"] = {
            "spearman_rmse_vs_std_rms": spearman(f_err, s_rms),
            "spearman_rmse_vs_std_max": spearman(f_err, s_max),
            "rmse_ev_per_a": float(np.sqrt(np.nanmean(f_err**2))),
            "rms_std_ev_per_a": float(np.sqrt(np.mean(s_rms**2))),
            "calibration_curve": calibration_curve(f_err, s_rms),
        }
    e_err = pred["energy_ev"] - ds.energy
    if np.isfinite(e_err).any():
        out["energy"] = {
            "spearman_abs_error_vs_std": spearman(np.abs(e_err), pred["energy_std_ev"]),
            "rmse_ev": float(np.sqrt(np.nanmean(e_err**2))),
            "rms_std_ev": float(np.sqrt(np.mean(pred["energy_std_ev"] ** 2))),
            "calibration_curve": calibration_curve(e_err, pred["energy_std_ev"]),
        }
    return out


def calibration_plot(reports: dict[str, dict], path: str | Path, title: str) -> None:
    """RMSE against RMS σ per σ bin (forces, per structure) for each named report, with the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4.5))
    hi = 0.0
    for name, rep in reports.items():
        if not rep or "forces" not in rep:
            continue
        c = rep["forces"]["calibration_curve"]
        x, y = 1e3 * np.asarray(c["rms_std"]), 1e3 * np.asarray(c["rmse"])
        r = rep["forces"]["spearman_rmse_vs_std_rms"]
        ax.plot(x, y, "o-", label=f"{name} (Spearman {r:.2f})" if r is not None else name)
        hi = max(hi, x.max(initial=0), y.max(initial=0))
    ax.plot([0, hi], [0, hi], "k--", lw=1, label="calibrated")
    ax.set_xlabel("predicted σ_F, RMS per bin (meV/Å)")
    ax.set_ylabel("force RMSE per bin (meV/Å)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
