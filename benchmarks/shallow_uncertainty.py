"""The cheap alternative to a deep ensemble: a shallow ensemble (one SchNet whose last readout layer has K heads,
trained once with the usual loss on the heads' mean plus a Gaussian NLL of their spread). The same data, model
and training budget as benchmarks/ensemble_uncertainty.py (rMD17 ethanol split 01, ``--n-train`` frames, the 50
validation frames 950–999 for the calibration), scored on the same held-out sets: rMD17 test frames (in
distribution) and original MD17 ethanol (PBE+vdW-TS instead of PBE/def2-SVP: off distribution).

Per structure: the force RMSE against the calibrated RMS force spread (Spearman, calibration curve), for the
shallow ensemble trained with the energy NLL and with the energy + force NLL, beside the K-member ensemble of
benchmarks/results/ensemble_uncertainty.json (when it was run with the same --n-train, --steps, --features).
Cost: the training step of each variant against a plain model's, timed side by side on the same batches
(interleaved repeats, median), and the calculator time per call.

Writes benchmarks/results/shallow_uncertainty.json and .png.

usage: python benchmarks/shallow_uncertainty.py [--heads 8] [--n-train 500] [--steps 400] [--features 16]
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
from ensemble_uncertainty import calculator_ms  # noqa: E402  (benchmarks/: the same timing)
from work_folder import fresh_work_folder  # noqa: E402

import so3lib.data as data  # noqa: E402
from so3lib import ensemble as E  # noqa: E402
from so3lib.calculator import load_calculator  # noqa: E402
from so3lib.models import make_config  # noqa: E402
from so3lib.training import DataConfig, RunConfig, load_potential, train  # noqa: E402
from so3lib.training.run_folder import to_json, write_atomic  # noqa: E402

SHARED = Path(os.environ.get("SO3LIB_SHARED_DATA", ROOT.parent / "shared" / "data"))
ENSEMBLE_JSON = ROOT / "benchmarks" / "results" / "ensemble_uncertainty.json"
VARIANTS = {"shallow, energy NLL": False, "shallow, energy + force NLL": True}  # name: nll_forces


def run_config(args, heads: int | None, nll_forces: bool = False) -> RunConfig:
    """The ensemble benchmark's model and training, with ``heads`` readout heads (None: a plain model)."""
    training = {
        "batch_size": 16,
        "max_epochs": None,
        "max_steps": args.steps,
        "eval_every_steps": max(args.steps // 4, 1),
        "learning_rate": 3e-3,
    }
    if heads:
        training.update(nll_weight=args.nll_weight, nll_forces=nll_forces)
    return RunConfig(
        name="ethanol_shallow" if heads else "ethanol_plain",
        model=make_config("schnet", n_atom_basis=args.features, n_interactions=2, dtype="float64", readout_heads=heads),
        training=training,
        data=DataConfig(energy_reference="average"),
    )


def step_times(args, train_ds, n_repeat: int = 7, n_steps: int = 20) -> dict:
    """Median seconds per training step of a plain model and of each shallow variant on the same batches,
    timed in interleaved rounds (a machine shared with other work slows all of them alike)."""
    from so3lib.training.config import nll_weight
    from so3lib.training.optim import make_optimizer
    from so3lib.training.state import init_state
    from so3lib.training.step import make_train_step
    from so3lib.training.trainer import build_potential, make_loader

    steps, batches = {}, None
    names = {"plain": (None, False), **{k: (args.heads, v) for k, v in VARIANTS.items()}}
    for name, (heads, nll_forces) in names.items():
        cfg = run_config(args, heads, nll_forces)
        pot = build_potential(cfg, train_ds)
        if heads:
            pot = pot.with_force_spread(nll_forces)
        loader = make_loader(train_ds, pot, 16, True, 0, "training")
        batches = batches or [g for _, g in zip(range(n_steps), loader.epoch(0))]
        opt = make_optimizer(cfg.training, 100)
        params = pot.init(jax.random.PRNGKey(0), batches[0])
        step = make_train_step(pot, opt, 0.99, 0.0, 0.99, False, nll_weight(cfg.model, cfg.training))
        state = init_state(params, opt.init(params))
        state, loss, _ = step(state, batches[0])  # compile
        jax.block_until_ready(loss)
        steps[name] = [step, state]
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(n_repeat):
        for name, s in steps.items():
            t0 = time.perf_counter()
            for g in batches:
                s[1], loss, _ = s[0](s[1], g)
            jax.block_until_ready(loss)
            times[name].append((time.perf_counter() - t0) / len(batches))
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {
        "step_s_median": med,
        "step_time_ratio_to_plain": {k: med[k] / med["plain"] for k in med if k != "plain"},
        "n_repeat": n_repeat,
        "steps_per_repeat": len(batches),
    }


def md17_file() -> Path:
    """The original-MD17 file the ensemble benchmark scored (named in its JSON), else the one it would take."""
    names = ["md17_ethanol_first2000.npz", "md17_ethanol_first1050.npz"]
    if ENSEMBLE_JSON.exists():
        key = next(k for k in json.loads(ENSEMBLE_JSON.read_text())["uncertainty"] if k.startswith("MD17"))
        names = [key[key.index("(") + 1 : -1]]
    for name in names:
        for folder in (SHARED / "md17", ROOT / "tests" / "data" / "md17"):
            if (folder / name).exists():
                return folder / name
    raise FileNotFoundError(f"none of {names} in {SHARED / 'md17'} or tests/data/md17")


def force_norm_baseline(pred: dict, ds) -> float | None:
    """Spearman of the per-structure force RMSE against the RMS of the predicted forces: what a model without
    any uncertainty ranks by force magnitude alone."""
    err = E.per_structure_force_rmse(pred["forces_ev_per_a"] - ds.forces, pred["n_atoms"])
    return E.spearman(err, E.per_structure_force_rmse(pred["forces_ev_per_a"], pred["n_atoms"]))


def ensemble_reference(args) -> dict | None:
    """The K-member ensemble's reports from its benchmark, when it was run on the same budget."""
    if not ENSEMBLE_JSON.exists():
        return None
    ens = json.loads(ENSEMBLE_JSON.read_text())
    same = (ens["n_train"], ens["steps_per_member"], ens["model"]["n_atom_basis"]) == (
        args.n_train,
        args.steps,
        args.features,
    )
    if not same:
        print(f"{ENSEMBLE_JSON.name} was run with another budget: the ensemble is left out of the comparison")
        return None
    return ens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--n-train", type=int, default=500)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--features", type=int, default=16)
    ap.add_argument("--nll-weight", type=float, default=None, help="default: the library's")
    ap.add_argument("--work", default="/tmp/so3lib_shallow_bench")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "shallow_uncertainty.json"))
    args = ap.parse_args()
    fresh_work_folder(args.work)
    tr = data.read(data.bundled_path(data.samples.RMD17_ETHANOL_TRAIN))
    te = data.read(data.bundled_path(data.samples.RMD17_ETHANOL_TEST))
    md17_path = md17_file()
    md17 = data.read(md17_path)
    train_ds, val = tr.subset(np.arange(args.n_train)), tr.subset(np.arange(950, 1000))
    sets = {"rMD17 test (in distribution)": te, f"MD17 original ({md17_path.name})": md17}
    cost = step_times(args, train_ds)
    print(json.dumps(cost, indent=1))
    variants, preds = {}, {}
    for name, nll_forces in VARIANTS.items():
        run = Path(args.work) / name.replace(" ", "_").replace(",", "").replace("+", "and")
        t0 = time.perf_counter()
        res = train(run_config(args, args.heads, nll_forces), train_ds, val, None, out_dir=run, progress=True)
        wall = time.perf_counter() - t0
        pot, params = load_potential(run)
        reports = {}
        for set_name, ds in sets.items():
            preds[(name, set_name)] = E.predict_arrays(pot, params, ds)
            reports[set_name] = E.uncertainty_report(preds[(name, set_name)], ds)
        variants[name] = {
            "nll_forces": nll_forces,
            "nll_weight": res["nll_weight"],
            "calibration": res["calibration"],
            "val": res["val"],
            "train_time_s": res["train_time_s"],
            "wall_s": wall,
            "calculator_ms_per_call": calculator_ms(load_calculator(run), te[0].to_ase()),
            "uncertainty": reports,
            "spearman_force_rmse_vs_predicted_force_rms": {
                s: force_norm_baseline(preds[(name, s)], ds) for s, ds in sets.items()
            },
        }
        print(name, {k: v["forces"]["spearman_rmse_vs_std_rms"] for k, v in reports.items()})
    ens = ensemble_reference(args)
    result = {
        "heads": args.heads,
        "model": run_config(args, args.heads).model.config_view(),
        "n_train": args.n_train,
        "steps": args.steps,
        "variants": variants,
        "cost": cost,
        "ensemble": None
        if ens is None
        else {
            "source": str(ENSEMBLE_JSON.relative_to(ROOT)),
            "members": ens["members"],
            "val": ens["val"],
            "calibration": ens["calibration"],
            "uncertainty": ens["uncertainty"],
            "train_time_s_per_member": ens["cost"]["train_time_s_per_member"],
            "calculator_ms_per_call": ens["cost"]["calculator_ms_per_call_ensemble"],
            "command": ens["command"],
        },
        "machine": {"platform": platform.platform(), "jax_backend": jax.default_backend()},
        "command": " ".join(sys.argv),
    }
    out = Path(args.out)
    write_atomic(out, to_json(result))
    plot(result, preds, sets, out.with_suffix(".png"))


def plot(result, preds, sets, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.5))
    first = next(iter(result["variants"]))
    for i, set_name in enumerate(sets):  # per-structure scatter of the energy-NLL variant
        ds, p = sets[set_name], preds[(first, set_name)]
        err = E.per_structure_force_rmse(p["forces_ev_per_a"] - ds.forces, p["n_atoms"])
        r = result["variants"][first]["uncertainty"][set_name]["forces"]["spearman_rmse_vs_std_rms"]
        ax[0].scatter(
            1e3 * p["forces_std_rms_ev_per_a"], 1e3 * err, s=4, alpha=0.4, color=f"C{i}", label=f"{set_name}, ρ={r:.2f}"
        )
    ax[0].set_xlabel("predicted σ_F (RMS over the structure, meV/Å)")
    ax[0].set_ylabel("force RMSE of the structure (meV/Å)")
    ax[0].set_title(f"{first}, {result['heads']} heads: per structure")
    ax[0].legend(fontsize=7)
    styles = {name: ("-", "o") for name in result["variants"]}
    styles[list(result["variants"])[-1]] = ("-.", "s")
    curves = {name: v["uncertainty"] for name, v in result["variants"].items()}
    if result["ensemble"]:
        name = f"ensemble of {result['ensemble']['members']}"
        curves[name] = result["ensemble"]["uncertainty"]
        styles[name] = ("--", "^")
    for j, set_name in enumerate(sets):
        hi = 0.0
        for name, reps in curves.items():
            rep = reps.get(set_name)
            if not rep:
                continue
            c, r = rep["forces"]["calibration_curve"], rep["forces"]["spearman_rmse_vs_std_rms"]
            x, y = 1e3 * np.asarray(c["rms_std"]), 1e3 * np.asarray(c["rmse"])
            ls, mk = styles[name]
            ax[1 + j].plot(x, y, ls, marker=mk, ms=4, label=f"{name} (ρ={r:.2f})")
            hi = max(hi, x.max(), y.max())
        ax[1 + j].plot([0, hi], [0, hi], "k:", lw=1, label="calibrated")
        ax[1 + j].set_xlabel("RMS σ_F per decile of σ (meV/Å)")
        ax[1 + j].set_ylabel("force RMSE per decile (meV/Å)")
        ax[1 + j].set_title(f"calibration: {set_name}", fontsize=9)
        ax[1 + j].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
