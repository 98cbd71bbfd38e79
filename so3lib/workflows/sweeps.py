"""Hyper-parameter sweeps (ablations) over any model option and training option.

A sweep file (or the same keys given as options):

    model: so3krates            # registry name
    train: path/to/train.npz    # any readable file, or  data: rmd17:ethanol  (rMD17 protocol, split 1)
    test: path/to/test.npz      # optional
    max_steps: 2000             # or max_minutes
    seeds: [0, 1]
    grid:                       # or  random: {cutoff: [3, 6], features: [32, 64, 128]}  with  samples: N
      cutoff: [4.0, 5.0]
      l_max: [1, 2, 3]
    batch_size: 16              # any other training option at the top level; fixed model options under model_options

Every point trains through so3lib.training.train in its own run folder (points/<name>/); re-running skips
finished points and resumes interrupted ones from their checkpoints. Writes sweep.csv, sweep.md (best first)
and plots/: each metric against each swept parameter (mean ± std over seeds) and accuracy against inference
cost with the Pareto front. ``workers=N`` trains the points in N processes at once (on a multi-GPU machine,
one GPU each); the tables and plots are then written from their finished run folders.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from so3lib import data
from so3lib.models import available, hyperparameters, make_config
from so3lib.training import DataConfig, RunConfig, TrainingConfig, train
from so3lib.workflows.common import Options

PRESETS = {
    "quick": {
        "model": "so3krates",
        "data": "rmd17:ethanol",
        "max_steps": 400,
        "seeds": [0],
        "grid": {"cutoff": [3.0, 4.0, 5.0], "l_max": [1, 2, 3]},
        "model_options": {"features": 32, "layers": 1, "heads": 2, "n_rbf": 16},
        "batch_size": 16,
        "eval_every_steps": 200,
        "warmup_steps": 20,
        "learning_rate": 2e-3,
        "n_test": 300,
    },
}
_SWEEP_KEYS = {
    "model",
    "train",
    "test",
    "data",
    "seeds",
    "grid",
    "random",
    "samples",
    "sample_seed",
    "model_options",
    "n_test",
    "e0s",
}


class SweepConfig(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())
    model: str
    train: str | None = None
    test: str | None = None
    data: str | None = None
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    grid: dict[str, list[Any]] | None = None
    random: dict[str, list[Any]] | None = None
    samples: int = Field(8, ge=1)
    sample_seed: int = 0
    model_options: dict[str, Any] = Field(default_factory=dict)
    n_test: int | None = Field(None, ge=1, description="use only the first N test frames")
    e0s: str | None = Field(None, description="energy reference (default: average for rmd17/md17 data, else lstsq)")

    @model_validator(mode="after")
    def _check(self):
        if self.model not in available():
            raise ValueError(f"unknown model '{self.model}'; registered: {available()}")
        if (self.grid is None) == (self.random is None):
            raise ValueError("give exactly one of 'grid' or 'random'")
        if self.train is None and self.data is None:
            raise ValueError("give 'train' (a data file) or 'data' (e.g. rmd17:ethanol)")
        space = self.grid or self.random
        if not space:
            raise ValueError("the sweep has no parameters")
        model_opts, train_opts = set(hyperparameters(self.model)), set(TrainingConfig.model_fields)
        for k, values in space.items():
            if k not in model_opts | train_opts:
                hint = f" ('{k}' is not an option of model '{self.model}')" if k in _all_model_options() else ""
                raise ValueError(
                    f"unknown parameter '{k}'{hint}; model options: {sorted(model_opts)}; training "
                    f"options: {sorted(train_opts)}"
                )
            if not isinstance(values, list) or len(values) == 0:
                raise ValueError(f"parameter '{k}' needs a non-empty list of values, got {values!r}")
        for k in self.training_options():
            if k not in train_opts:
                raise ValueError(f"unknown top-level option '{k}'; training options: {sorted(train_opts)}")
        return self

    def training_options(self) -> dict[str, Any]:
        return {k: v for k, v in (self.model_extra or {}).items()}

    def points(self) -> list[dict[str, Any]]:
        """The parameter settings, in a fixed order (grid: product; random: seeded choices/uniform ranges)."""
        if self.grid is not None:
            keys = list(self.grid)
            return [dict(zip(keys, combo)) for combo in itertools.product(*(self.grid[k] for k in keys))]
        rng = np.random.default_rng(self.sample_seed)
        out = []
        for _ in range(self.samples):
            p = {}
            for k, v in self.random.items():  # [lo, hi] of floats: uniform; otherwise a choice
                if len(v) == 2 and all(isinstance(x, float) for x in v):
                    p[k] = float(rng.uniform(v[0], v[1]))
                else:
                    p[k] = v[int(rng.integers(len(v)))]
            out.append(p)
        return out


def _all_model_options() -> set[str]:
    return {k for m in available() for k in hyperparameters(m)}


def point_name(params: dict, seed: int) -> str:
    return "_".join(f"{k}={v}" for k, v in params.items()) + f"_seed={seed}"


def load_sweep(path: str | Path) -> SweepConfig:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a sweep file is a mapping (model, train/data, grid or random, ...)")
    try:
        return SweepConfig.model_validate(raw)
    except ValidationError as exc:
        msg = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise ValueError(f"{path}: invalid sweep: {msg}") from None


def reference_options(sweep: SweepConfig) -> dict:
    """DataConfig fields of the sweep's energy reference (a single molecule needs 'average')."""
    from so3lib.workflows.common import LabelOptions

    default = "average" if sweep.data else "lstsq"
    return LabelOptions(e0s=sweep.e0s or default).reference()


def resolve_data(sweep: SweepConfig):
    """(train, val, test, description) for a sweep."""
    if sweep.data:
        kind, _, name = sweep.data.partition(":")
        if kind not in ("rmd17", "md17"):
            raise ValueError(f"data '{sweep.data}': use rmd17:<molecule> or md17:<molecule>, or give 'train'")
        from so3lib.workflows.md17 import load

        train_ds, val_ds, test, src, _ = load(kind, name, 1)
    else:
        full = data.read(sweep.train)
        sp = data.random_split(len(full), (0.95, 0.05), seed=0)
        train_ds, val_ds, src = full.subset(sp["train"]), full.subset(sp["val"]), sweep.train
        test = data.read(sweep.test) if sweep.test else val_ds
    if sweep.n_test:
        test = test.subset(np.arange(min(sweep.n_test, len(test))))
    return train_ds, val_ds, test, src


def inference_ms_per_structure(run_dir: Path, test) -> float:
    """Energy+forces time per structure of the saved model on a batch of up to 64 test structures."""
    import jax

    from so3lib.training import load_potential, make_loader

    pot, params = load_potential(run_dir)
    loader = make_loader(test.subset(np.arange(min(64, len(test)))), pot, 64, False, 0, "test")
    g = next(loader.epoch(0))
    fn = jax.jit(pot.__call__)
    jax.block_until_ready(fn(params, g))
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(params, g))
        ts.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(ts)) / min(64, len(test))


def run_point(sweep: SweepConfig, params: dict, seed: int, out: Path, datasets, progress: bool) -> dict:
    train_ds, val_ds, test, src = datasets
    model_opts = {**sweep.model_options, **{k: v for k, v in params.items() if k in hyperparameters(sweep.model)}}
    train_opts = {
        "max_epochs": None,
        **sweep.training_options(),
        **{k: v for k, v in params.items() if k not in hyperparameters(sweep.model)},
        "seed": seed,
    }
    cfg = RunConfig(
        name=out.name,
        model=make_config(sweep.model, **model_opts),
        training=train_opts,
        data=DataConfig(train=str(src), split="sweep", **reference_options(sweep)),
    )
    from so3lib.training import run_folder

    # what the point computes, budget included: a re-run with other data or another budget is a new point
    fp = run_folder.fingerprint(cfg, {"train": train_ds, "val": val_ds, "test": test}, resumable=frozenset())
    stamp = out / "sweep_point.json"
    if out.exists() and any(out.iterdir()) and not run_folder.matches(stamp, fp):
        stale = _set_aside(out)
        print(f"  {out.name}: trained with other data or options; moved to {stale.name}, training again")
    if (out / "results.json").exists():
        res = json.loads((out / "results.json").read_text())
        print(f"  {out.name}: finished earlier, skipped")
    else:
        resume = (out / "checkpoints").exists() and any((out / "checkpoints").iterdir())
        print(f"  {out.name}: {'resuming' if resume else 'training'}")
        run_folder.RunFolder(out).claim()
        run_folder.write_json_atomic(stamp, fp)
        res = train(cfg, train_ds, val_ds, test, out_dir=out, resume=resume, progress=progress)
    steps_per_s = res.get("steps_per_s")
    row = {
        **params,
        "seed": seed,
        "energy_mae_mev": _mev(res["test"].get("energy_mae_ev")),
        "forces_mae_mev_per_a": _mev(res["test"].get("forces_mae_ev_per_a")),
        "n_parameters": res["n_parameters"],
        "compile_time_s": res["compile_time_s"],
        "train_time_s": res["train_time_s"],
        "time_per_step_ms": 1e3 / steps_per_s if steps_per_s else None,
        "inference_ms_per_structure": inference_ms_per_structure(out, test),
        "steps": res["steps"],
        "run": str(out),
    }
    return row


def _cell(v) -> str:
    return "–" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def _num(v) -> float:
    """A table value for plotting: absent (None) is NaN there, and the plots leave it out."""
    return float("nan") if v is None else v


def _mev(ev: float | None) -> float | None:
    return None if ev is None else 1e3 * ev


def _set_aside(folder: Path) -> Path:
    """Rename a stale point folder to <name>.stale-<k> (nothing so3lib trained is deleted)."""
    k = 1
    while folder.with_name(f"{folder.name}.stale-{k}").exists():
        k += 1
    return folder.rename(folder.with_name(f"{folder.name}.stale-{k}"))


def write_outputs(rows: list[dict], keys: list[str], out: Path) -> None:
    import io

    from so3lib.training.run_folder import write_atomic

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    write_atomic(out / "sweep.csv", buf.getvalue())
    best = sorted(rows, key=lambda r: math.inf if r["forces_mae_mev_per_a"] is None else r["forces_mae_mev_per_a"])
    cols = keys + [
        "seed",
        "energy_mae_mev",
        "forces_mae_mev_per_a",
        "n_parameters",
        "time_per_step_ms",
        "inference_ms_per_structure",
        "compile_time_s",
        "train_time_s",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in best:
        lines.append("| " + " | ".join(_cell(r[c]) for c in cols) + " |")
    write_atomic(out / "sweep.md", "# Sweep results, best force MAE first\n\n" + "\n".join(lines) + "\n")
    plot_sweep(rows, keys, out / "plots")


def pareto_front(cost: np.ndarray, err: np.ndarray) -> np.ndarray:
    """Indices of points no other point beats in both cost and error, by increasing cost."""
    order = np.lexsort((err, cost))
    front, best = [], math.inf
    for i in order:
        if err[i] < best:
            front.append(i)
            best = err[i]
    return np.array(front, int)


def plot_sweep(rows: list[dict], keys: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    metrics = [
        ("forces_mae_mev_per_a", "force MAE (meV/Å)"),
        ("energy_mae_mev", "energy MAE (meV)"),
        ("time_per_step_ms", "time per step (ms)"),
    ]
    fig, axes = plt.subplots(len(metrics), len(keys), figsize=(4 * len(keys), 3.2 * len(metrics)), squeeze=False)
    for j, k in enumerate(keys):
        values = sorted({r[k] for r in rows}, key=lambda v: (isinstance(v, str), v))
        for i, (m, label) in enumerate(metrics):
            means = [np.nanmean([_num(r[m]) for r in rows if r[k] == v]) for v in values]
            stds = [np.nanstd([_num(r[m]) for r in rows if r[k] == v]) for v in values]
            x = np.arange(len(values)) if any(isinstance(v, str) for v in values) else np.array(values, float)
            axes[i, j].errorbar(x, means, yerr=stds, marker="o", capsize=3)
            if any(isinstance(v, str) for v in values):
                axes[i, j].set_xticks(x, [str(v) for v in values])
            axes[i, j].set_xlabel(k)
            axes[i, j].set_ylabel(label)
            axes[i, j].grid(alpha=0.3)
    fig.suptitle("metric against each swept parameter (mean ± std over the other parameters and seeds)")
    fig.tight_layout()
    fig.savefig(out / "metrics_vs_parameters.png", dpi=120)
    plt.close(fig)

    cost = np.array([_num(r["inference_ms_per_structure"]) for r in rows])
    err = np.array([_num(r["forces_mae_mev_per_a"]) for r in rows])
    front = pareto_front(cost, err)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.scatter(cost, err, c="C0", s=30, label="points")
    for r, c, e in zip(rows, cost, err):
        ax.annotate(",".join(f"{r[k]}" for k in keys), (c, e), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.plot(cost[front], err[front], "r-o", ms=5, label="Pareto front")
    ax.set_xlabel("inference time per structure (ms, energy + forces)")
    ax.set_ylabel("test force MAE (meV/Å)")
    ax.set_title("accuracy against cost (" + ", ".join(keys) + ")")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=120)
    plt.close(fig)


def run_sweep(
    sweep: SweepConfig, out: Path, progress: bool = False, shard: tuple[int, int] | None = None
) -> list[dict]:
    """Train every (point, seed) not finished yet, then write the tables and plots. With ``shard=(k, n)``
    only jobs k, k+n, ... are trained and nothing is written (a worker of ``--workers n``)."""
    from so3lib.training.run_folder import RunFolder, write_atomic

    RunFolder(out, kind="sweep").claim()
    write_atomic(
        out / "sweep.yaml", yaml.safe_dump(sweep.model_dump(mode="json") | sweep.training_options(), sort_keys=False)
    )
    datasets = resolve_data(sweep)
    jobs = [(p, s) for p in sweep.points() for s in sweep.seeds]
    keys = list(sweep.grid or sweep.random)
    if shard is not None:
        for i, (p, s) in enumerate(jobs):
            if i % shard[1] == shard[0]:
                run_point(sweep, p, s, out / "points" / point_name(p, s), datasets, progress)
        return []
    print(f"sweep of {len(jobs)} runs ({len(sweep.points())} points × {len(sweep.seeds)} seeds) over {keys} → {out}")
    rows = [run_point(sweep, p, s, out / "points" / point_name(p, s), datasets, progress) for p, s in jobs]
    write_outputs(rows, keys, out)
    print((out / "sweep.md").read_text())
    return rows


def run_workers(argv: list[str], n: int) -> None:
    """Run ``n`` copies of this command on shards of the points, concurrently; one GPU each if GPUs exist."""
    import os
    import subprocess
    import sys

    import jax

    gpus = [d.id for d in jax.devices() if d.platform == "gpu"]
    procs = []
    for k in range(n):
        env = dict(os.environ)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(gpus[k % len(gpus)])
        procs.append(subprocess.Popen([sys.executable, "-m", "so3lib", "sweep", *argv, "--shard", f"{k}/{n}"], env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"sweep workers failed with exit codes {codes}; re-run to resume the unfinished points")


def _parse_value(v: str):
    for t in (int, float):
        try:
            return t(v)
        except ValueError:
            pass
    return v


class SweepOptions(Options):
    """Options of ``so3lib sweep`` (the sweep itself is a sweep file, a preset or these options)."""

    sweep: str | None = Field(None, description="sweep YAML file (the same as --config)")
    preset: Literal[tuple(PRESETS)] | None = Field(None, description="a built-in sweep")
    model: str | None = Field(None, description="model name (overrides the file)")
    data: str | None = Field(None, description="protocol data, e.g. rmd17:ethanol")
    train: str | None = Field(None, description="training file")
    test: str | None = Field(None, description="test file")
    param: list[str] = Field(
        default_factory=list, description="swept values (repeatable)", json_schema_extra={"metavar": "NAME=V1,V2,..."}
    )
    random: int | None = Field(None, ge=1, description="sample N random points instead of the grid")
    sample_seed: int = Field(0, description="seed of the random points")
    seeds: list[int] | None = Field(None, description="training seeds of every point")
    max_steps: int | None = Field(None, ge=1, description="training steps per point")
    max_minutes: float | None = Field(None, gt=0, description="minutes per point")
    e0s: str | None = Field(None, description="energy reference (default: average for rmd17/md17 data, else lstsq)")
    workers: int = Field(1, ge=1, description="train points in N processes at once (one GPU each)")
    shard: str | None = Field(
        None, description="internal: train only shard k/n of the points", json_schema_extra={"hidden": True}
    )
    out: str | None = Field(None, description="sweep folder (default runs/sweep_<model>)")
    progress: bool = Field(False, description="progress bars of the point runs")


def build_sweep(opts: SweepOptions) -> SweepConfig:
    """The sweep of a file or preset with the options on top."""
    if opts.sweep:
        loaded = load_sweep(opts.sweep)
        spec = loaded.model_dump(mode="json") | loaded.training_options()
    elif opts.preset:
        if opts.preset not in PRESETS:
            raise ValueError(f"unknown sweep preset '{opts.preset}'; built-in: {sorted(PRESETS)}")
        spec = json.loads(json.dumps(PRESETS[opts.preset]))
    else:
        spec = {}
    for k in ("model", "data", "train", "test"):
        if getattr(opts, k):
            spec[k] = getattr(opts, k)
    if opts.param:
        space = {}
        for p in opts.param:
            name, eq, vals = p.partition("=")
            if not eq or not vals.strip():
                raise ValueError(f"--param '{p}': expected NAME=V1,V2,...")
            space[name.strip()] = [_parse_value(v) for v in vals.split(",") if v.strip()]
        spec.pop("grid", None)
        spec.pop("random", None)
        spec["random" if opts.random else "grid"] = space
    if opts.random:
        spec["samples"], spec["sample_seed"] = opts.random, opts.sample_seed
    if opts.seeds:
        spec["seeds"] = opts.seeds
    if opts.max_steps:
        spec["max_steps"] = opts.max_steps
    if opts.max_minutes:
        spec["max_minutes"] = opts.max_minutes
    if opts.e0s:
        spec["e0s"] = opts.e0s
    spec = {k: v for k, v in spec.items() if v is not None}
    try:
        return SweepConfig.model_validate(spec)
    except ValidationError as exc:
        msgs = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise ValueError("invalid sweep: " + msgs) from None


def run(opts: SweepOptions, argv: list[str] | None = None) -> dict:
    """Run (or resume) the sweep; with ``workers > 1`` the points train in worker processes started with
    ``argv`` (the command line without --workers). Returns {"rows", "out"}."""
    sweep = build_sweep(opts)
    out = Path(opts.out or f"runs/sweep_{sweep.model}")
    if opts.shard:
        k, n = (int(x) for x in opts.shard.split("/"))
        return {"rows": run_sweep(sweep, out, progress=opts.progress, shard=(k, n)), "out": str(out)}
    from so3lib.training.run_folder import RunFolder

    with RunFolder(out, kind="sweep").lock():  # one sweep per folder; its workers train the points inside it
        if opts.workers > 1:
            run_workers([*(argv or []), *([] if opts.out else ["--out", str(out)])], opts.workers)
        return {"rows": run_sweep(sweep, out, progress=opts.progress), "out": str(out)}
