"""Does the ensemble spread rank the real errors? A K-member SchNet ensemble trained on rMD17 ethanol (split 01,
``--n-train`` frames, 50 validation frames for the calibration), tested in distribution (rMD17 test frames) and
off it (original MD17 ethanol: PBE+vdW-TS instead of PBE/def2-SVP, frames of the consecutive trajectory).
Per structure: force RMSE against the calibrated RMS spread (Spearman, calibration curve), and what the
ensemble costs (training time per member; calculator time per call against one member).

Writes benchmarks/results/ensemble_uncertainty.json and .png.

usage: python benchmarks/ensemble_uncertainty.py [--members 4] [--n-train 500] [--steps 400] [--features 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
from work_folder import fresh_work_folder  # noqa: E402  (benchmarks/)

import so3lib.data as data  # noqa: E402
from so3lib import ensemble as E  # noqa: E402
from so3lib.calculator import load_calculator  # noqa: E402
from so3lib.models import make_config  # noqa: E402
from so3lib.training import DataConfig, RunConfig, load_potential, train  # noqa: E402
from so3lib.training.run_folder import to_json, write_atomic  # noqa: E402

SHARED = Path(os.environ.get("SO3LIB_SHARED_DATA", ROOT.parent / "shared" / "data"))


def calculator_ms(calc, atoms, n: int = 50) -> float:
    atoms = atoms.copy()
    atoms.calc = calc
    atoms.get_forces()  # compile
    rng = np.random.default_rng(0)
    p0 = atoms.positions.copy()
    t0 = time.perf_counter()
    for _ in range(n):
        atoms.positions = p0 + 1e-3 * rng.normal(size=p0.shape)
        atoms.get_forces()
    return 1e3 * (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--n-train", type=int, default=500)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--features", type=int, default=16)
    ap.add_argument("--work", default="/tmp/so3lib_ensemble_bench")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ensemble_uncertainty.json"))
    args = ap.parse_args()
    fresh_work_folder(args.work)
    tr = data.read(data.bundled_path(data.samples.RMD17_ETHANOL_TRAIN))
    te = data.read(data.bundled_path(data.samples.RMD17_ETHANOL_TEST))
    md17_path = SHARED / "md17" / "md17_ethanol_first2000.npz"
    if not md17_path.exists():
        md17_path = ROOT / "tests" / "data" / "md17" / "md17_ethanol_first1050.npz"
    md17 = data.read(md17_path)
    cfg = RunConfig(
        name="ethanol_ensemble",
        model=make_config("schnet", n_atom_basis=args.features, n_interactions=2, dtype="float64"),
        training={
            "batch_size": 16,
            "max_epochs": None,
            "max_steps": args.steps,
            "eval_every_steps": max(args.steps // 4, 1),
            "learning_rate": 3e-3,
            "ensemble": args.members,
        },
        data=DataConfig(energy_reference="average"),
    )
    val = tr.subset(np.arange(950, 1000))
    t0 = time.perf_counter()
    res = train(cfg, tr.subset(np.arange(args.n_train)), val, None, out_dir=Path(args.work) / "run", progress=True)
    wall = time.perf_counter() - t0
    pot, params = load_potential(Path(args.work) / "run")
    sets = {"rMD17 test (in distribution)": te, f"MD17 original ({md17_path.name})": md17}
    reports, preds = {}, {}
    for name, ds in sets.items():
        preds[name] = E.predict_arrays(pot, params, ds)
        reports[name] = E.uncertainty_report(preds[name], ds)
    atoms = te[0].to_ase()
    cost = {
        "train_time_s_per_member": res["train_time_s_per_member"],
        "ensemble_wall_s": wall,
        "calculator_ms_per_call_ensemble": calculator_ms(load_calculator(Path(args.work) / "run"), atoms),
        "calculator_ms_per_call_one_member": calculator_ms(
            load_calculator(Path(args.work) / "run" / "members" / "m0"), atoms
        ),
    }
    result = {
        "members": args.members,
        "model": cfg.model.config_view(),
        "n_train": args.n_train,
        "steps_per_member": args.steps,
        "calibration": res["calibration"],
        "val": res["val"],
        "members_val_forces_mae_ev_per_a": [m["val"]["forces_mae_ev_per_a"] for m in res["members"]],
        "uncertainty": reports,
        "cost": cost,
        "machine": {"platform": platform.platform(), "jax_backend": jax.default_backend()},
        "command": " ".join(sys.argv),
    }
    out = Path(args.out)
    write_atomic(out, to_json(result))
    plot(reports, preds, sets, out.with_suffix(".png"))
    print(json.dumps({k: v["forces"]["spearman_rmse_vs_std_rms"] for k, v in reports.items()}, indent=1))
    print(json.dumps(cost, indent=1))


def plot(reports, preds, sets, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4.3))
    hi = 0.0
    for i, (name, rep) in enumerate(reports.items()):
        ds, p = sets[name], preds[name]
        err = E.per_structure_force_rmse(p["forces_ev_per_a"] - ds.forces, p["n_atoms"])
        r = rep["forces"]["spearman_rmse_vs_std_rms"]
        ax[0].scatter(
            1e3 * p["forces_std_rms_ev_per_a"], 1e3 * err, s=4, alpha=0.4, color=f"C{i}", label=f"{name}, ρ={r:.2f}"
        )
        c = rep["forces"]["calibration_curve"]
        ax[1].plot(1e3 * np.asarray(c["rms_std"]), 1e3 * np.asarray(c["rmse"]), "o-", color=f"C{i}", label=name)
        hi = max(hi, 1e3 * max(c["rms_std"] + c["rmse"]))
    ax[0].set_xlabel("predicted σ_F (RMS over the structure, meV/Å)")
    ax[0].set_ylabel("force RMSE of the structure (meV/Å)")
    ax[0].legend(fontsize=7)
    ax[0].set_title("per structure (Spearman ρ)")
    ax[1].plot([0, hi], [0, hi], "k--", lw=1, label="calibrated")
    ax[1].set_xlabel("RMS σ_F per decile of σ (meV/Å)")
    ax[1].set_ylabel("force RMSE per decile (meV/Å)")
    ax[1].legend(fontsize=7)
    ax[1].set_title("calibration (scale fitted on rMD17 validation)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
