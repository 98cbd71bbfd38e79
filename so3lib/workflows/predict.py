"""A trained run evaluated on a file: predicted energy, forces (and stress for periodic frames) of every
frame, written as extxyz that ASE reads back (``energy``/``forces`` through the single-point calculator, the
file's own labels kept as ``REF_energy``/``REF_forces``), and the errors where the file has labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pydantic import Field

from so3lib.training.run_folder import to_json, write_atomic
from so3lib.workflows.common import Format, LabelKeys


class PredictOptions(LabelKeys):
    """Options of ``so3lib predict``."""

    run: str = Field(..., description="a trained so3lib run folder")
    file: str = Field(..., description="structures to predict (any format so3lib reads)")
    format: Format | None = Field(None, description="file format (default: detected)")
    out: str | None = Field(None, description="predictions file (default <file stem>_pred.extxyz in the cwd)")
    progress: bool = Field(True, description="progress bar")


def errors(ref: np.ndarray, pred: np.ndarray) -> dict[str, float] | None:
    """MAE and RMSE over the finite reference values; None when there is none."""
    ok = np.isfinite(ref)
    if not ok.any():
        return None
    d = pred[ok] - ref[ok]
    return {"mae": float(np.mean(np.abs(d))), "rmse": float(np.sqrt(np.mean(d**2))), "count": int(ok.sum())}


def _ours(out: Path) -> bool:
    """A predictions file so3lib wrote: its summary beside it names it."""
    try:
        return json.loads(out.with_suffix(".json").read_text()).get("predictions") == str(out)
    except (OSError, ValueError, AttributeError):
        return False


def run(opts: PredictOptions) -> dict:
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator
    from tqdm.auto import tqdm

    from so3lib.calculator import load_calculator

    ds = opts.read(opts.file, opts.format)
    calc = load_calculator(opts.run)
    calc.potential.reference.check_species(np.asarray(ds.species), opts.file)
    out = Path(opts.out or f"{Path(opts.file).stem}_pred.extxyz")
    if out.exists() and not _ours(out):
        raise FileExistsError(f"{out}: exists and was not written by so3lib predict; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    frames, e_ref, e_pred, n_atoms, f_ref, f_pred, f_std = [], [], [], [], [], [], []
    for i in tqdm(range(len(ds)), desc="predict", disable=not opts.progress):
        s = ds[i]
        atoms = s.to_ase()
        atoms.calc = None
        props = ["energy", "forces"] + (["stress"] if atoms.pbc.all() else [])
        calc.calculate(atoms, props)
        res = dict(calc.results)
        if s.energy is not None and np.isfinite(s.energy):
            atoms.info["REF_energy"] = float(s.energy)
        if s.forces is not None:
            atoms.arrays["REF_forces"] = np.asarray(s.forces, float)
        if "energy_std" in res:  # an ensemble run: the members' calibrated spread
            atoms.info["energy_std"] = res["energy_std"]
            atoms.arrays["forces_std"] = res["forces_std"]
            f_std.append(res["forces_std"])
        atoms.calc = SinglePointCalculator(atoms, **{k: res[k] for k in props})
        frames.append(atoms)
        e_ref.append(np.nan if s.energy is None else s.energy)
        e_pred.append(res["energy"])
        n_atoms.append(len(atoms))
        f_ref.append(np.full((len(atoms), 3), np.nan) if s.forces is None else np.asarray(s.forces, float))
        f_pred.append(res["forces"])
    tmp = out.with_name(f".{out.name}.tmp")
    ase.io.write(tmp, frames, format="extxyz")
    tmp.replace(out)
    e_ref, e_pred, n = np.asarray(e_ref, float), np.asarray(e_pred, float), np.asarray(n_atoms, float)
    metrics = {
        "frames": len(ds),
        "energy_ev": errors(e_ref, e_pred),
        "energy_per_atom_ev": errors(e_ref / n, e_pred / n),
        "forces_ev_per_a": errors(np.concatenate(f_ref).ravel(), np.concatenate(f_pred).ravel()),
    }
    if f_std:  # how the spread ranks the real force errors (None without labels)
        from so3lib.ensemble import per_structure_force_rmse, per_structure_force_spread, spearman

        n_int = n.astype(int)
        spread = per_structure_force_spread(np.concatenate(f_std), n_int)["forces_std_rms_ev_per_a"]
        err = per_structure_force_rmse(np.concatenate(f_pred) - np.concatenate(f_ref), n_int)
        metrics["uncertainty"] = {
            "rms_forces_std_ev_per_a": float(np.sqrt(np.mean(spread**2))),
            "spearman_force_rmse_vs_std": spearman(err, spread),
        }
    summary = {"run": opts.run, "file": opts.file, "predictions": str(out), "metrics": metrics}
    write_atomic(out.with_suffix(".json"), to_json(summary))
    return summary
