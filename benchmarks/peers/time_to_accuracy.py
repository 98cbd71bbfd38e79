"""Time to accuracy: so3lib and its peers trained for the same wall-clock budget on the same split, one after
another (each run has the machine to itself as far as this script is concerned: nothing of the benchmark runs
beside it), then tested on the same frames.

rMD17 ethanol split 01 (the md17 protocol: 950 training and 50 validation frames drawn from the train file with
seed 1, all 1000 test frames), batch 32, cutoff 5 Å. Each run records its validation errors against training
wall time (at every evaluation: so3lib's metrics.csv, the peer's curve) and the test errors of the model it
selected (lowest validation loss). The wall time counts from the first step (compilation included for so3lib,
evaluations included for both), not the setup before it.

    python benchmarks/peers/time_to_accuracy.py --budget-minutes 6
    python benchmarks/peers/time_to_accuracy.py --budget-minutes 1 --label "shared-machine smoke run" \\
        --out benchmarks/results/time_to_accuracy_smoke.json

Runs (``--runs``, default all whose venv exists): ``so3lib-schnet`` (``so3lib md17 --model schnet
--max-minutes M --batch-size 32``: the learning rate scheduled over the budget), ``so3lib-schnet-steps`` (the
same with ``--schedule-over steps``: the step schedule that ignores the budget), ``so3lib-so3krates``,
``schnetpack-schnet`` (`tta_schnetpack.py`). Writes the JSON and a PNG of the curves beside it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE.parent))
from work_folder import fresh_work_folder  # noqa: E402  (benchmarks/)

SO3LIB = {
    "so3lib-schnet": ("so3lib SchNet F=128 T=3", ["--model", "schnet"]),
    "so3lib-schnet-steps": (
        "so3lib SchNet F=128 T=3, step schedule",
        ["--model", "schnet", "--schedule-over", "steps"],
    ),
    "so3lib-so3krates": ("so3lib SO3krates F=132 L=3 T=3", ["--model", "so3krates"]),
}
PEERS = {"schnetpack-schnet": ("SchNetPack SchNet F=128 T=3", "schnetpack", "tta_schnetpack.py")}
BATCH = 32


def export_split(path: Path, data_dir: str | None) -> dict:
    """The protocol's split as npz (train/val/test positions Å, energy eV, forces eV/Å) for the peers."""
    from so3lib.workflows.md17 import load

    tr, va, te, source, _ = load("rmd17", "ethanol", 1, data_dir)
    n = int(tr.offsets[1])
    arrays = {"numbers": tr.numbers[:n].astype(np.int64), "cutoff_angstrom": np.float64(5.0)}
    for name, ds in (("train", tr), ("val", va), ("test", te)):
        arrays[f"{name}_positions"] = ds.positions.reshape(len(ds), n, 3)
        arrays[f"{name}_energy"] = ds.energy
        arrays[f"{name}_forces"] = ds.forces.reshape(len(ds), n, 3)
    arrays["energy_per_atom_mean_ev"] = np.float64(np.mean(tr.energy / n))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return {"source": source, "n_train": len(tr), "n_val": len(va), "n_test": len(te), "file": str(path)}


def run_so3lib(key: str, minutes: float, work: Path, extra: list[str]) -> dict:
    label, flags = SO3LIB[key]
    out = work / key
    cmd = [sys.executable, "-m", "so3lib", "md17", *flags, "--max-minutes", str(minutes), "--batch-size", str(BATCH)]
    cmd += ["--out", str(out), "--no-progress", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        return {"label": label, "command": _shown(cmd), "error": (p.stderr or p.stdout)[-3000:]}
    res = json.loads((out / "results.json").read_text())
    with open(out / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    curve = [
        {
            "time_s": float(r["time_s"]),
            "step": int(r["step"]),
            "val_forces_mae_mev_per_a": float(r["val_forces_mae_mev_per_a"]),
            "val_energy_mae_mev": float(r["val_energy_mae_mev"]),
            "learning_rate": float(r["learning_rate"]),
        }
        for r in rows
    ]
    t = res["test"]
    return {
        "label": label,
        "command": _shown(cmd),
        "train_time_s": res["train_time_s"],
        "process_wall_s": wall,
        "compile_time_s": res.get("compile_time_s"),
        "steps": res["steps"],
        "steps_per_s": res["steps"] / res["train_time_s"],
        "best_step": res["best_step"],
        "stopped_because": res["stopped_because"],
        "test": {
            "energy_mae_mev": 1e3 * t["energy_mae_ev"],
            "forces_mae_mev_per_a": 1e3 * t["forces_mae_ev_per_a"],
        },
        "final_learning_rate": curve[-1]["learning_rate"] if curve else None,
        "curve": curve,
    }


def run_peer(key: str, minutes: float, work: Path, split: Path, venvs: Path) -> dict:
    label, venv, script = PEERS[key]
    py = venvs / venv / "bin" / "python"
    if not py.exists():
        return {"label": label, "skipped": f"no venv {venvs / venv} (bash benchmarks/peers/make_venvs.sh)"}
    out = work / f"{key}.json"
    cmd = [str(py), str(HERE / script), "--split", str(split), "--budget-minutes", str(minutes), "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        return {"label": label, "command": _shown(cmd), "error": p.stderr[-3000:]}
    res = json.loads(out.read_text())
    test = res.pop("test")
    res["test"] = {"energy_mae_mev": test["energy_mae_mev"], "forces_mae_mev_per_a": test["forces_mae_mev_per_a"]}
    return {"label": label, "command": _shown(cmd), "process_wall_s": wall, **res}


def _shown(cmd: list[str]) -> str:
    return " ".join(str(c).replace(str(ROOT) + "/", "").replace(str(Path.home()), "~") for c in cmd)


def _title(doc: dict) -> str:
    return f"rMD17 ethanol, {doc['budget_minutes']:g} min of training each, {doc['date']}\n{doc['label']}"


def plot(runs: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for r in runs.values():
        if not r.get("curve"):
            continue
        t = [c["time_s"] for c in r["curve"]]
        v = [c["val_forces_mae_mev_per_a"] for c in r["curve"]]
        label = f"{r['label']}: test F {r['test']['forces_mae_mev_per_a']:.1f} meV/Å"
        (line,) = ax.plot(t, v, "-", marker=".", ms=3, lw=1.2, label=label)
        ax.plot([r["train_time_s"]], [r["test"]["forces_mae_mev_per_a"]], "o", ms=7, color=line.get_color())
    ax.set_xlabel("training wall time (s)")
    ax.set_ylabel("validation force MAE (meV/Å); dot: test")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-minutes", type=float, required=True)
    ap.add_argument("--runs", nargs="+", choices=[*SO3LIB, *PEERS], default=None)
    ap.add_argument("--venvs", default=os.environ.get("SO3LIB_PEERS_DIR", str(Path.home() / ".cache" / "so3lib-peers")))
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--label", default="shared machine")
    ap.add_argument("--so3lib-args", nargs=argparse.REMAINDER, default=[], help="more flags for every so3lib run")
    ap.add_argument("--work", default=str(ROOT / "runs" / "time_to_accuracy"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "time_to_accuracy.json"))
    ap.add_argument("--plot-only", metavar="JSON", help="draw the PNG of a results file again, train nothing")
    a = ap.parse_args(argv)
    if a.plot_only:
        doc = json.loads(Path(a.plot_only).read_text())
        plot(doc["runs"], Path(a.plot_only).with_suffix(".png"), _title(doc))
        return doc
    work, venvs = fresh_work_folder(a.work), Path(a.venvs).expanduser()
    split = work / "split.npz"
    data = export_split(split, a.data_dir)
    keys = a.runs or [*SO3LIB, *PEERS]
    runs, loads = {}, {}
    for key in keys:
        loads[key] = {"before": os.getloadavg()}
        print(f"== {key}: {a.budget_minutes} min ...", flush=True)
        if key in SO3LIB:
            r = run_so3lib(key, a.budget_minutes, work, a.so3lib_args)
        else:
            r = run_peer(key, a.budget_minutes, work, split, venvs)
        loads[key]["after"] = os.getloadavg()
        r["load_avg"] = loads[key]
        runs[key] = r
        if "test" in r:
            print(
                f"   {r['steps']} steps in {r['train_time_s']:.0f} s: test E {r['test']['energy_mae_mev']:.1f} meV, "
                f"F {r['test']['forces_mae_mev_per_a']:.1f} meV/Å",
                flush=True,
            )
        else:
            print(f"   {r.get('error') or r.get('skipped')}", flush=True)
    doc = {
        "what": "time to accuracy: the same wall-clock training budget, the same split and test frames",
        "label": a.label,
        "command": "python benchmarks/peers/time_to_accuracy.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "budget_minutes": a.budget_minutes,
        "batch_size": BATCH,
        "data": data,
        "runs": runs,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    plot(runs, out.with_suffix(".png"), _title(doc))
    print("| run | steps | test E MAE (meV) | test F MAE (meV/Å) |\n|---|---|---|---|")
    for r in runs.values():
        if "test" in r:
            t = r["test"]
            print(f"| {r['label']} | {r['steps']} | {t['energy_mae_mev']:.1f} | {t['forces_mae_mev_per_a']:.1f} |")
    print(f"wrote {out}")
    return doc


if __name__ == "__main__":
    main()
