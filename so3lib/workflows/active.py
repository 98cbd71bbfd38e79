"""Active learning against an oracle (`so3lib.active`): reference data from MD driven by the oracle (a small
initial training set at ``initial_temperature``, an independent test set and a validation set at
``temperature``), then ``rounds`` rounds of ensemble MD at ``temperature``, the ``n_select`` most uncertain
saved frames labelled by the oracle and the ensemble retrained; the same with ``n_select`` random frames of the
same trajectories as the baseline. Writes active_learning.json (per round and strategy: training-set size, the
test errors against the oracle, the spread of the selected frames) and active_learning.png (the curves).

Oracles: ``gfn2-xtb`` / ``gfn1-xtb`` (tblite, ``pip install 'so3lib[active]'``), ``emt`` (ASE's EMT: fast, for
trying the loop, not chemistry)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from so3lib.workflows.common import RunOptions, command_section
from so3lib.workflows.presets import Preset, PresetTable

PRESETS = PresetTable(
    description="active",
    default=Preset(
        model={"dtype": "float64"},
        training={
            "ensemble": 3,
            "max_epochs": None,
            "max_steps": 300,
            "batch_size": 8,
            "learning_rate": 3e-3,
            "eval_every_steps": 100,
        },
    ),
)


class ActiveOptions(RunOptions):
    """Options of ``so3lib active``."""

    structure: str = Field(..., description="starting structure (any format so3lib reads)")
    frame: int = Field(0, description="frame of --structure")
    oracle: Literal["gfn2-xtb", "gfn1-xtb", "emt"] = Field("gfn2-xtb", description="the labelling calculator")
    rounds: int = Field(3, ge=1, description="rounds of MD, selection, labelling and retraining")
    n_select: int = Field(10, ge=1, description="frames labelled per round")
    n_initial: int = Field(10, ge=2, description="initial training frames (oracle MD at --initial-temperature)")
    n_val: int = Field(10, ge=1, description="validation frames (oracle MD at --temperature; calibration)")
    n_test: int = Field(50, ge=1, description="test frames (independent oracle MD at --temperature)")
    initial_temperature: float = Field(300.0, gt=0, description="K: MD of the initial training set")
    temperature: float = Field(600.0, gt=0, description="K: exploration MD and the test set")
    md_steps: int = Field(400, ge=1, description="steps of each round's ensemble MD")
    save_every: int = Field(10, ge=1, description="candidate frames every K steps")
    dt: float = Field(0.5, gt=0, description="time step (fs)")
    e0s: Literal["average", "lstsq"] = Field("average", description="energy reference (one molecule: average)")
    max_uncertainty: float | None = Field(
        None,
        gt=0,
        description="eV/Å: the exploration MD stops at the first frame whose calibrated force spread exceeds this, "
        "and only frames at or below it are candidates (beyond it the MD leaves the physical region; default: no "
        "bound)",
    )


def preset(model: str, options: dict):
    return PRESETS.for_model(model)


def make_oracle(name: str):
    """The ASE calculator named ``name``."""
    if name == "emt":
        from ase.calculators.emt import EMT

        return EMT()
    try:
        from tblite.ase import TBLite
    except ImportError as exc:
        raise ImportError(
            f"the {name} oracle needs tblite, an optional dependency: pip install 'so3lib[active]'"
        ) from exc
    return TBLite(method="GFN2-xTB" if name == "gfn2-xtb" else "GFN1-xTB", verbosity=0)


def run(opts: ActiveOptions, model, training) -> dict:
    from so3lib import active
    from so3lib.md import MDConfig
    from so3lib.training import DataConfig, RunConfig
    from so3lib.training.run_folder import RunFolder, to_json, write_atomic
    from so3lib.workflows.md_report import load_structure

    if not training.ensemble:
        raise ValueError("active learning needs an ensemble: --ensemble K with K >= 2")
    t0 = time.perf_counter()
    seed = training.seed  # of the oracle MD, the exploration and the random baseline too
    start = load_structure(opts.structure, opts.frame)
    oracle = make_oracle(opts.oracle)
    out = RunFolder(opts.out or f"runs/active_{Path(opts.structure).stem}", kind="active learning").claim()
    every = 20  # oracle MD: a frame every 20 steps of 0.5 fs
    ref = {}
    for name, n, temp, md_seed in (
        ("initial", opts.n_initial, opts.initial_temperature, seed),
        ("val", opts.n_val, opts.temperature, seed + 1000),
        ("test", opts.n_test, opts.temperature, seed + 2000),
    ):
        frames = active.oracle_md(start, oracle, temp, n * every, every, md_seed)
        ds, failed = active.label(frames, oracle, f"<oracle {opts.oracle} MD {temp:g} K>")
        if ds is None:
            raise ValueError(f"the {opts.oracle} oracle failed on every {name} frame from {opts.structure}")
        ref[name] = ds
    t_ref = time.perf_counter() - t0
    cfg = RunConfig(
        name=opts.name or "active",
        model=model,
        training=training,
        data=DataConfig(energy_reference=opts.e0s),
        command=command_section("active", opts),
    )
    md = MDConfig(
        ensemble="nvt-langevin",
        temperature_k=opts.temperature,
        steps=opts.md_steps,
        dt_fs=opts.dt,
        save_every=opts.save_every,
        seed=seed,
    )
    history = active.run_loop(
        cfg,
        ref["initial"],
        ref["val"],
        ref["test"],
        start,
        oracle,
        md,
        opts.rounds,
        opts.n_select,
        out,
        seed=seed,
        progress=opts.progress,
        max_uncertainty=opts.max_uncertainty,
    )
    summary = {
        "oracle": opts.oracle,
        "structure": opts.structure,
        "n_initial": len(ref["initial"]),
        "n_val": len(ref["val"]),
        "n_test": len(ref["test"]),
        "ensemble": training.ensemble,
        "model": model.config_view(),
        "history": history,
        "reference_data_time_s": t_ref,
        "wall_time_s": time.perf_counter() - t0,
        "options": opts.model_dump(mode="json"),
    }
    write_atomic(out / "active_learning.json", to_json(summary))
    plot(history, out / "active_learning.png", f"{start.get_chemical_formula()}: oracle {opts.oracle}")
    summary["out"] = str(out)
    return summary


def plot(history: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for s, recs in history.items():
        n = [r["n_train"] for r in recs]
        ax.plot(n, [1e3 * r["test"]["forces_mae_ev_per_a"] for r in recs], "o-", label=f"{s}: force MAE")
        ax.plot(n, [1e3 * r["test"]["forces_rmse_ev_per_a"] for r in recs], "s--", alpha=0.6, label=f"{s}: RMSE")
    ax.set_xlabel("labelled training frames")
    ax.set_ylabel("test error vs oracle (meV/Å)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
