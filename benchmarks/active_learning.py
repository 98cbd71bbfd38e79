"""Active learning on ethanol with GFN2-xTB (tblite) as the oracle: uncertainty selection against random
selection of the same number of frames from the same kind of ensemble MD, error against the oracle on an
independent 600 K oracle-MD test set per round. Runs ``so3lib active`` once per seed (each seed its own oracle
reference data, initial set, ensembles and exploration) and writes benchmarks/results/active_learning.json
(every seed's rounds and the mean over seeds) and active_learning.png (the curves).

usage: python benchmarks/active_learning.py [--seeds 0 1 2] [--work DIR] [extra so3lib active flags]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# one compilation cache for the run: the members of an ensemble and the rounds compile the same programs
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="so3lib-al-jax-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
from so3lib.cli import main  # noqa: E402

ARGS = [
    "--structure", str(ROOT / "so3lib" / "data" / "bundled" / "rmd17_ethanol_test_01.npz"),
    "--oracle", "gfn2-xtb",
    "--n-initial", "10", "--n-val", "20", "--n-test", "100", "--initial-temperature", "300",
    "--rounds", "3", "--n-select", "10", "--walkers", "4",
    "--temperature", "600", "--steps", "400", "--save-every", "10", "--min-gap", "3",
    "--bounds", "validation", "--min-uncertainty", "1", "--max-uncertainty", "4",
    "--ensemble", "3", "--model", "schnet", "--n-atom-basis", "16", "--n-interactions", "2",
    "--max-steps", "2000", "--finetune-steps", "1000", "--finetune-learning-rate", "1e-3", "--control",
]  # fmt: skip
OUT = ROOT / "benchmarks" / "results"
METRICS = ("forces_mae_ev_per_a", "forces_rmse_ev_per_a", "energy_mae_ev")


def mean_over_seeds(runs: dict) -> dict:
    """Per strategy and round: the training-set sizes and the mean, min and max of each test metric."""
    import numpy as np

    first = next(iter(runs.values()))["history"]
    out = {}
    for s, recs in first.items():
        rows = []
        for r in range(len(recs)):
            per = [run["history"][s][r] for run in runs.values()]
            row = {"round": r, "n_train": [p["n_train"] for p in per]}
            for m in METRICS:
                v = np.array([p["test"][m] for p in per])
                row[m] = {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max())}
            rows.append(row)
        out[s] = rows
    return out


def labelled_frames(run_dir: Path, run: dict) -> dict:
    """Per strategy: the mean oracle energy (eV) and the largest atomic force (eV/Å) of the frames it labelled
    (its labelled.extxyz), and the mean energy of the 600 K test set (reference_test.extxyz, None where absent)."""
    import numpy as np

    from so3lib import data

    out = {}
    for s in run["history"]:
        f = run_dir / s / "labelled.extxyz"
        if f.exists():
            ds = data.read(f)
            fmax = float(np.linalg.norm(ds.forces, axis=1).max())
            out[s] = {"energy_mean_ev": float(np.mean(ds.energy)), "max_force_ev_per_a": fmax, "frames": len(ds)}
    test = run_dir / "reference_test.extxyz"
    out["test_energy_mean_ev"] = float(np.mean(data.read(test).energy)) if test.exists() else None
    return out


COLOURS = {"uncertainty": "C3", "random": "C0", "none": "0.5"}


def plot(runs: dict, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4.2))
    panels = (("forces_mae_ev_per_a", "test force MAE vs GFN2-xTB (meV/Å)"), ("energy_mae_ev", "test energy MAE (meV)"))
    for s, rows in summary.items():
        rounds = [r["round"] for r in rows]
        n = "→".join(str(x) for x in sorted({r["n_train"][0] for r in rows}))
        for a, (name, label) in zip(ax, panels):
            for run in runs.values():
                a.plot(rounds, [1e3 * h["test"][name] for h in run["history"][s]], color=COLOURS[s], alpha=0.3, lw=1)
            mean = [1e3 * r[name]["mean"] for r in rows]
            a.plot(rounds, mean, "o-", color=COLOURS[s], label=f"{s} ({n} frames)")
            a.set_ylabel(label)
    for a in ax:
        a.set_xticks(rounds)
        a.set_xlabel("round")
        a.legend(fontsize=8)
    k = len(runs)
    fig.suptitle(f"ethanol, active learning against GFN2-xTB: mean of {k} seed{'s' * (k > 1)} (thin lines: each seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG from the committed JSON")
    ap.add_argument("--work", type=Path, default=None, help="folder of the runs; a seed finished there is reused")
    ns, extra = ap.parse_known_args()
    if ns.replot:
        res = json.loads((OUT / "active_learning.json").read_text())
        plot(res["runs"], res["mean_over_seeds"], OUT / "active_learning.png")
        sys.exit(0)
    work = ns.work or Path(tempfile.mkdtemp(prefix="so3lib_al_"))
    runs = {}
    for seed in ns.seeds:
        out = work / f"seed{seed}"
        if not (out / "active_learning.json").exists():
            code = main(["active", *ARGS, *extra, "--seed", str(seed), "--out", str(out), "--no-progress"])
            if code != 0:
                sys.exit(code)
        runs[seed] = json.loads((out / "active_learning.json").read_text())
    summary = mean_over_seeds(runs)
    labelled = {str(k): labelled_frames(work / f"seed{k}", runs[k]) for k in runs}
    seeds = " ".join(map(str, ns.seeds))
    result = {
        "command": f"python benchmarks/active_learning.py --seeds {seeds} {' '.join(extra)}".strip(),
        "so3lib_active_args": [*ARGS, *extra],
        "seeds": ns.seeds,
        "mean_over_seeds": summary,
        "labelled_frames": labelled,
        "runs": {str(k): v for k, v in runs.items()},
        "wall_time_s_per_seed": {str(k): v["wall_time_s"] for k, v in runs.items()},
        "machine": f"{os.cpu_count()} CPU cores (shared)",
    }
    (OUT / "active_learning.json").write_text(json.dumps(result, indent=1))
    plot(runs, summary, OUT / "active_learning.png")
    for s, rows in summary.items():
        print(s, [f"{1e3 * r['forces_mae_ev_per_a']['mean']:.0f}" for r in rows], "meV/Å")
