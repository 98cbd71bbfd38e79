"""Training a deep ensemble (``--ensemble K``): K members trained one after another with seeds seed, seed+1, …
(different initial parameters and batch orders, the same data and split), each a complete run folder
``<run>/members/m<k>/`` (fine-tuned from an ensemble run, ``--init-from``, member k starts from its member k);
then the spread is calibrated on the validation set and the ensemble mean is tested.

Writes, beside the members: ``config.yaml`` (the ensemble's own, ``--config`` repeats it), ``model/ensemble.yaml``
(members and calibration, read by `so3lib.load_potential` / `load_calculator`), ``results.json`` (the mean's
errors, each member's, the calibration and how the spread ranks the errors) and ``plots/calibration.png``.

Members are trained sequentially, not vmapped over stacked parameters: each keeps the single-model loop
(EMA, early stopping, checkpoints and exact resume per member) unchanged, and the cost is K single trainings.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from so3lib import ensemble as ens_lib
from so3lib.training import run_folder
from so3lib.training.config import RunConfig

log = logging.getLogger("so3lib.train")


def member_config(cfg: RunConfig, k: int) -> RunConfig:
    """Member ``k``: the run's configuration with seed + k and no ensemble; fine-tuning from an ensemble run
    (``init_from``), member k starts from its member k (`init_members`)."""
    update: dict[str, Any] = {"ensemble": None, "seed": cfg.training.seed + k}
    if cfg.training.init_from and ens_lib.is_ensemble(cfg.training.init_from):
        update["init_from"] = str(init_members(cfg.training.init_from, int(cfg.training.ensemble))[k])
    tc = cfg.training.model_copy(update=update)
    return cfg.model_copy(update={"name": f"{cfg.name}_m{k}", "training": tc})


def init_members(run: str | Path, n: int) -> list[Path]:
    """The model folders of the members of the ensemble run ``run`` (``--init-from``), which must have ``n``:
    fine-tuning an ensemble keeps each member's own weights, so the spread carries over."""
    import yaml

    d = Path(run)
    f = (
        d / "model" / ens_lib.ENSEMBLE_FILE
        if (d / "model" / ens_lib.ENSEMBLE_FILE).exists()
        else d / ens_lib.ENSEMBLE_FILE
    )
    members = [Path(os.path.normpath(f.parent / m)) for m in yaml.safe_load(f.read_text())["members"]]
    if len(members) != n:
        raise ValueError(
            f"--init-from {run} is an ensemble of {len(members)} members, the options ask for --ensemble {n}: "
            "fine-tuning an ensemble starts each member from its own (give the same number)"
        )
    return members


def train_ensemble(
    cfg: RunConfig,
    train_ds,
    val_ds,
    test_ds=None,
    out_dir: str | Path = "runs/run",
    resume: bool = False,
    progress: bool = True,
    splits: dict | None = None,
) -> dict[str, Any]:
    """Train ``cfg.training.ensemble`` members into ``out_dir/members/m<k>``, calibrate, test; returns results."""
    from so3lib.training.trainer import evaluate, make_eval_fn, make_loader, train

    t0 = time.perf_counter()
    out = Path(out_dir)
    n = int(cfg.training.ensemble)
    with run_folder.RunFolder(out).lock():
        if (out / "model" / ens_lib.ENSEMBLE_FILE).exists() and not resume:
            raise FileExistsError(
                f"{out} already holds an ensemble run: pass --resume to continue it, or choose another output folder"
            )
        run_folder.write_atomic(out / "config.yaml", cfg.to_yaml())
        if splits:
            from so3lib.data.splits import save_splits

            save_splits(out / "splits.npz", splits)
        members, member_dirs = [], []
        for k in range(n):
            d = out / "members" / f"m{k}"
            log.info("ensemble member %d/%d (seed %d) → %s", k + 1, n, cfg.training.seed + k, d)
            res = train(member_config(cfg, k), train_ds, val_ds, test_ds, d, resume, progress, splits)
            members.append(res)
            member_dirs.append(d / "model")
        pots, params = [], []
        from so3lib.training.saving import load_potential

        for d in member_dirs:
            p, q = load_potential(d)
            pots.append(p)
            params.append(q)
        params = tuple(params)
        raw = ens_lib.EnsemblePotential(tuple(pots))
        eval_bs = cfg.training.eval_batch_size or max(cfg.training.batch_size, 64)
        cal = calibrate(raw, params, val_ds, eval_bs)
        ens = raw.with_calibration(cal["energy_scale"] or 1.0, cal["forces_scale"] or 1.0)
        ens_lib.save_ensemble(out, member_dirs, cal)
        stress = cfg.training.stress_weight > 0
        eval_fn = make_eval_fn(ens, stress)
        results: dict[str, Any] = {
            "model": cfg.model.name,
            "ensemble": n,
            "n_parameters": int(sum(m["n_parameters"] for m in members)),
            "n_parameters_per_member": members[0]["n_parameters"],
            "train_time_s": float(sum(m["train_time_s"] or 0.0 for m in members)),
            "train_time_s_per_member": [m["train_time_s"] for m in members],
            "n_train": len(train_ds),
            "n_val": len(val_ds),
            "calibration": cal,
            "members": [{k: m.get(k) for k in ("val", "test", "steps", "best_step", "train_time_s")} for m in members],
        }
        val_loader = make_loader(val_ds, ens, eval_bs, False, 0, "validation")
        results["val"] = _without_mse(evaluate(ens, params, val_loader, eval_fn))
        reports = {
            "validation": ens_lib.uncertainty_report(ens_lib.predict_arrays(ens, params, val_ds, eval_bs), val_ds)
        }
        if test_ds is not None:
            test_loader = make_loader(test_ds, ens, eval_bs, False, 0, "test")
            results["test"] = _without_mse(evaluate(ens, params, test_loader, eval_fn))
            pred = ens_lib.predict_arrays(ens, params, test_ds, eval_bs)
            reports["test"] = ens_lib.uncertainty_report(pred, test_ds)
        results["uncertainty"] = reports
        (out / "plots").mkdir(parents=True, exist_ok=True)
        ens_lib.calibration_plot(reports, out / "plots" / "calibration.png", f"{cfg.name}: {n}-member ensemble")
        results["wall_time_s"] = time.perf_counter() - t0
        run_folder.write_atomic(out / "results.json", run_folder.to_json(results))
        return results


def calibrate(ens, params, val_ds, batch_size: int = 64) -> dict[str, Any]:
    """Variance-scaling factors on the validation set: s² = Σ err² / Σ σ_raw² for the energies (per structure)
    and the force components (None where the labels are absent). ``ens``: an `EnsemblePotential` or a shallow
    ensemble (`so3lib.shallow_ensemble.ShallowEnsemblePotential`)."""
    pred = ens_lib.predict_arrays(ens.with_calibration(1.0, 1.0), params, val_ds, batch_size)
    e_err = pred["energy_ev"] - val_ds.energy
    f_err = None if val_ds.forces is None else pred["forces_ev_per_a"] - val_ds.forces
    return {
        "energy_scale": ens_lib.fit_calibration(e_err, pred["energy_std_ev"]),
        "forces_scale": None if f_err is None else ens_lib.fit_calibration(f_err, pred["forces_std_ev_per_a"]),
        "fitted_on": "validation",
        "n_structures": len(val_ds),
        "method": "variance scaling: s^2 = sum(err^2) / sum(std_raw^2)",
    }


def _without_mse(m: dict) -> dict:
    return {k: v for k, v in m.items() if not k.startswith("mse")}
