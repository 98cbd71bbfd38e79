"""A trained run evaluated on a file, in batches: predicted energy, per-atom energies, forces (and stress for
periodic frames) of every frame, written as extxyz that ASE reads back (``energy``/``forces``/``energies``/
``stress`` through the single-point calculator, the file's own labels kept as ``REF_energy``/``REF_forces``/
``REF_stress``, an ensemble's spreads as ``energy_std`` in info and ``forces_std`` in arrays), and where the file
has labels their errors (``<out>.json``) and parity plots (``<out stem>_parity_{energy,forces}.png``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pydantic import Field

from so3lib.prediction import errors, label_errors  # noqa: F401  (errors: kept importable from here)
from so3lib.training.run_folder import to_json, write_atomic
from so3lib.workflows.common import Format, LabelKeys


class PredictOptions(LabelKeys):
    """Options of ``so3lib predict``."""

    run: str = Field(..., description="a trained so3lib run folder")
    file: str = Field(..., description="structures to predict (any format so3lib reads)")
    format: Format | None = Field(None, description="file format (default: detected)")
    out: str | None = Field(None, description="predictions file (default <file stem>_pred.extxyz in the cwd)")
    batch_size: int = Field(32, ge=1, description="structures per batch")
    plots: bool = Field(True, description="parity plots of the labelled energies and forces")
    progress: bool = Field(True, description="progress bar")


def _ours(out: Path, path: Path) -> bool:
    """A file so3lib predict wrote: the summary beside the predictions names it."""
    try:
        summary = json.loads(out.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(summary, dict):
        return False
    if summary.get("predictions") != str(out):
        return False
    return path in (out, out.with_suffix(".json")) or str(path) in (summary.get("plots") or {}).values()


def load_model(run: str):
    """(Potential, params) of a run folder; for an ensemble run (EnsemblePotential, the members' params)."""
    from so3lib.training.saving import load_potential

    return load_potential(run)


def run(opts: PredictOptions) -> dict:
    from so3lib.prediction import predict_dataset, write_predictions

    ds = opts.read(opts.file, opts.format)
    pot, params = load_model(opts.run)
    pot.reference.check_species(np.asarray(ds.species), opts.file)
    out = Path(opts.out or f"{Path(opts.file).stem}_pred.extxyz")
    plots = {k: out.with_name(f"{out.stem}_parity_{k}.png") for k in ("energy", "forces")} if opts.plots else {}
    for path in (out, out.with_suffix(".json"), *plots.values()):
        if path.exists() and not _ours(out, path):
            raise FileExistsError(f"{path}: exists and was not written by so3lib predict; choose another --out")
    pred = predict_dataset(pot, params, ds, opts.batch_size, progress=opts.progress)
    write_predictions(out, ds, pred)
    metrics = {"frames": len(ds), **label_errors(ds, pred)}
    if "forces_std" in pred:  # an ensemble: how its spread ranks the real force errors (None without labels)
        metrics["uncertainty"] = _uncertainty(ds, pred)
    drawn = _parity(ds, pred, plots, Path(opts.file).name)
    summary = {
        "run": opts.run,
        "file": opts.file,
        "predictions": str(out),
        "plots": {k: str(v) for k, v in drawn.items()},
        "metrics": metrics,
    }
    write_atomic(out.with_suffix(".json"), to_json(summary))
    return summary


def _uncertainty(ds, pred: dict) -> dict:
    """RMS force spread of an ensemble and its Spearman rank correlation with the per-structure force RMSE."""
    from so3lib.ensemble import per_structure_force_rmse, per_structure_force_spread, spearman

    n = np.asarray(ds.n_atoms, int)
    spread = per_structure_force_spread(np.asarray(pred["forces_std"], float), n)["forces_std_rms_ev_per_a"]
    out = {"rms_forces_std_ev_per_a": float(np.sqrt(np.mean(spread**2))), "spearman_force_rmse_vs_std": None}
    if ds.forces is not None and np.isfinite(ds.forces).all():
        err = per_structure_force_rmse(pred["forces_ev_per_angstrom"] - np.asarray(ds.forces, float), n)
        out["spearman_force_rmse_vs_std"] = spearman(err, spread)
    return out


def _parity(ds, pred: dict, plots: dict[str, Path], name: str) -> dict[str, Path]:
    """The parity plots of what is labelled (an absent label draws nothing)."""
    if not plots:
        return {}
    from so3lib import plotting

    n = np.asarray(ds.n_atoms, float)
    drawn = {}
    e = plotting.parity(
        np.asarray(ds.energy, float) / n, pred["energy_ev"] / n, plots["energy"], "energy per atom", "eV/atom", name
    )
    if e is not None:
        drawn["energy"] = e
    if ds.forces is not None:
        f = plotting.parity(ds.forces, pred["forces_ev_per_angstrom"], plots["forces"], "force component", "eV/Å", name)
        if f is not None:
            drawn["forces"] = f
    return drawn
