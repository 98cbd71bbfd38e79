"""Active learning against an oracle (`so3lib.active`): reference data from MD driven by the oracle (a small
initial training set at ``initial_temperature``, independent validation and test sets at ``temperature``, one
frame every ``reference_every`` steps after a burn-in), then ``rounds`` rounds: ``walkers`` Langevin runs of the
ensemble at ``temperature`` from training frames, each stopped above ``max_uncertainty``; up to ``n_select``
frames between the bounds, most uncertain first (another batch of runs while too few), labelled by the oracle
and the ensemble fine-tuned on them; the same with as many frames drawn at random from the same kind of
trajectories as the baseline. Writes the reference sets (reference_{initial,val,test}.extxyz), each strategy's
labelled frames (<strategy>/labelled.extxyz), active_learning.json (per round and strategy: training-set size,
the test errors against the oracle, the exploration, the candidates and the selected frames) and
active_learning.png (the curves).

Oracles: ``gfn2-xtb`` / ``gfn1-xtb`` (tblite, ``pip install 'so3lib[active]'``), ``emt`` (ASE's EMT: fast, for
trying the loop, not chemistry)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from so3lib.workflows.common import RunOptions, command_section
from so3lib.workflows.md_report import DynamicsOptions
from so3lib.workflows.presets import Preset, PresetTable

log = logging.getLogger("so3lib.active")

PRESETS = PresetTable(
    description="active",
    default=Preset(
        options={"temperature": 600.0, "steps": 400, "save_every": 10},
        training={
            "ensemble": 3,
            "max_epochs": None,
            "max_steps": 2000,
            "batch_size": 8,
            "learning_rate": 3e-3,
            "warmup_steps": 50,
            "eval_every_steps": 250,
            "early_stopping_patience": None,
        },
    ),
)


class ActiveOptions(RunOptions, DynamicsOptions):
    """Options of ``so3lib active``; the exploration MD is Langevin with the MD options of ``so3lib md``
    (--temperature, --steps per trajectory, --dt, --save-every, --friction, --skin)."""

    structure: str = Field(..., description="starting structure of the oracle's reference MD (any format so3lib reads)")
    frame: int = Field(0, description="frame of --structure")
    oracle: Literal["gfn2-xtb", "gfn1-xtb", "emt"] = Field("gfn2-xtb", description="the labelling calculator")
    oracle_threads: int = Field(
        1, ge=1, description="OpenMP threads of the tblite oracle (1: fastest for small molecules, no spinning threads)"
    )
    rounds: int = Field(3, ge=1, description="rounds of exploration, selection, labelling and fine-tuning")
    n_select: int = Field(10, ge=1, description="frames labelled per round (at most)")
    walkers: int = Field(4, ge=1, description="exploration trajectories per batch, each from a training frame")
    max_batches: int = Field(
        3, ge=1, description="batches of --walkers runs per round: another only while fewer than --n-select frames"
    )
    n_initial: int = Field(10, ge=2, description="initial training frames (oracle MD at --initial-temperature)")
    n_val: int = Field(20, ge=1, description="validation frames (oracle MD at --temperature; calibration, bounds)")
    n_test: int = Field(100, ge=1, description="test frames (independent oracle MD at --temperature)")
    initial_temperature: float = Field(300.0, gt=0, description="K: oracle MD of the initial training set")
    reference_every: int = Field(40, ge=1, description="oracle MD steps between two reference frames")
    e0s: Literal["average", "lstsq"] = Field("average", description="energy reference (one molecule: average)")
    bounds: Literal["validation", "absolute"] = Field(
        "validation",
        description="--min/--max-uncertainty in multiples of the round's median force spread on the validation "
        "set, or in eV/Å",
    )
    min_uncertainty: float = Field(1.0, ge=0, description="uncertainty strategy: candidates from this spread on")
    max_uncertainty: float = Field(
        4.0,
        gt=0,
        description="an exploration trajectory stops at the first frame whose spread (max atomic force std, "
        "calibrated) exceeds this, and no frame above it is labelled",
    )
    min_gap: int = Field(3, ge=1, description="saved frames between two selected frames of one trajectory")
    max_label_force: float = Field(
        20.0, gt=0, description="eV/Å: an oracle label with a larger atomic force is refused"
    )
    retrain: Literal["finetune", "scratch"] = Field(
        "finetune", description="rounds after the first: fine-tune the previous round's ensemble, or train anew"
    )
    finetune_steps: int | None = Field(None, ge=1, description="steps of a fine-tuning round (default: --max-steps)")
    finetune_learning_rate: float | None = Field(None, gt=0, description="default: --learning-rate")
    control: bool = Field(
        False,
        description="also fine-tune the same rounds without new frames (strategy none): what the extra steps give",
    )

    def loop(self, seed: int):
        from so3lib.active import LoopConfig

        shared = set(LoopConfig.model_fields) & set(type(self).model_fields)  # the same names, the same meaning
        return LoopConfig(**{k: getattr(self, k) for k in shared}, max_force_ev_per_a=self.max_label_force, seed=seed)


def preset(model: str, options: dict):
    return PRESETS.for_model(model)


def make_oracle(name: str, threads: int = 1):
    """The ASE calculator named ``name``; tblite's OpenMP runs on ``threads`` threads."""
    if name == "emt":
        from ase.calculators.emt import EMT

        return EMT()
    try:
        from tblite.ase import TBLite
    except ImportError as exc:
        raise ImportError(
            f"the {name} oracle needs tblite, an optional dependency: pip install 'so3lib[active]'"
        ) from exc
    _openmp_threads(threads)
    return TBLite(method="GFN2-xTB" if name == "gfn2-xtb" else "GFN1-xTB", verbosity=0)


def _openmp_threads(n: int) -> None:
    """Set the OpenMP threads of the calling thread (libgomp's omp_set_num_threads, which tblite links): by
    default OpenMP takes every core, and on a shared machine its spinning threads make a 9-atom GFN2-xTB call
    tens of times slower (measured: 200 MD steps of ethanol 53 s against 3 s on one thread)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("gomp") or "libgomp.so.1"
    try:
        ctypes.CDLL(name).omp_set_num_threads(int(n))
    except (OSError, AttributeError) as exc:
        log.warning("could not set the oracle's OpenMP threads to %d (%s): it runs with OpenMP's default", n, exc)


def run(opts: ActiveOptions, model, training) -> dict:
    import jax

    from so3lib import active
    from so3lib.training import DataConfig, RunConfig
    from so3lib.training.run_folder import RunFolder, to_json, write_atomic
    from so3lib.workflows.md_report import load_structure

    if not training.ensemble:
        raise ValueError("active learning needs an ensemble: --ensemble K with K >= 2")
    if model.dtype == "float64" and not jax.config.jax_enable_x64:
        raise ValueError("--dtype float64 needs JAX's 64-bit mode: set JAX_ENABLE_X64=1 (or train in float32)")
    t0 = time.perf_counter()
    seed = training.seed  # of the oracle MD, the exploration and the random baseline too
    start = load_structure(opts.structure, opts.frame)
    oracle = make_oracle(opts.oracle, opts.oracle_threads)
    loop = opts.loop(seed)
    out = RunFolder(opts.out or f"runs/active_{Path(opts.structure).stem}", kind="active learning").claim()
    ref = {}
    for name, n, temp, md_seed in (
        ("initial", opts.n_initial, opts.initial_temperature, seed),
        ("val", opts.n_val, opts.temperature, seed + 1000),
        ("test", opts.n_test, opts.temperature, seed + 2000),
    ):
        frames = active.oracle_md(start, oracle, temp, n, opts.reference_every, md_seed, opts.dt)
        ds, refused = active.label(frames, oracle, f"<oracle {opts.oracle} MD {temp:g} K, {name}>")
        if ds is None:
            raise ValueError(f"the {opts.oracle} oracle failed on every {name} frame from {opts.structure}: {refused}")
        ref[name] = ds
        active.write_frames(out / f"reference_{name}.extxyz", ds, {"oracle_md_temperature_k": temp})
    t_ref = time.perf_counter() - t0
    cfg = RunConfig(
        name=opts.name or "active",
        model=model,
        training=training,
        data=DataConfig(energy_reference=opts.e0s),
        command=command_section("active", opts),
    )
    md = opts.md_config(ensemble="nvt-langevin", seed=seed)
    history = active.run_loop(
        cfg,
        ref["initial"],
        ref["val"],
        ref["test"],
        oracle,
        md,
        loop,
        out,
        ("uncertainty", "random", "none") if opts.control else ("uncertainty", "random"),
        progress=opts.progress,
    )
    summary = {
        "oracle": opts.oracle,
        "structure": opts.structure,
        "n_initial": len(ref["initial"]),
        "n_val": len(ref["val"]),
        "n_test": len(ref["test"]),
        "ensemble": training.ensemble,
        "model": model.config_view(),
        "training": training.model_dump(mode="json"),
        "loop": loop.model_dump(mode="json"),
        "exploration_md": md.model_dump(mode="json"),
        "history": history,
        "reference_data_time_s": t_ref,
        "wall_time_s": time.perf_counter() - t0,
        "options": opts.model_dump(mode="json"),
    }
    write_atomic(out / "active_learning.json", to_json(summary))
    plot(history, out / "active_learning.png", f"{start.get_chemical_formula()}: oracle {opts.oracle}")
    summary["out"] = str(out)
    return summary


COLOURS = {"uncertainty": "C3", "random": "C0", "none": "0.5"}


def plot(history: dict, path: Path, title: str) -> None:
    """Test force MAE and RMSE against the oracle per round, one colour per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for s, recs in history.items():
        r = [x["round"] for x in recs]
        n = " → ".join(str(x["n_train"]) for x in recs)
        c = COLOURS.get(s)
        ax.plot(r, [1e3 * x["test"]["forces_mae_ev_per_a"] for x in recs], "o-", color=c, label=f"{s} MAE ({n} frames)")
        ax.plot(
            r, [1e3 * x["test"]["forces_rmse_ev_per_a"] for x in recs], "s--", color=c, alpha=0.5, label=f"{s} RMSE"
        )
    ax.set_xticks(r)
    ax.set_xlabel("round")
    ax.set_ylabel("test force error vs oracle (meV/Å)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
