"""Active learning with an oracle: MD with an ensemble, uncertain frames labelled by any ASE calculator (the
oracle: GFN2-xTB through tblite, DFT, EMT, …), the ensemble fine-tuned on them, repeated.

Round r = 0 … R of each strategy (``uncertainty``, and ``random`` as the baseline), from the same initial set
D_0 (round 0 is trained once and shared):

1. **model**: round 0 a K-member ensemble trained from scratch on D_0; round r > 0 fine-tuned on D_r from round
   r − 1's ensemble (``retrain="finetune"``: member k from member k through ``init_from``, the energy reference,
   scale and shift kept, so every round's energies stand on round 0's reference; a fresh optimiser for
   ``finetune_steps`` steps), or trained from scratch (``retrain="scratch"``);
2. **test**: the ensemble mean against the oracle on an independent test set;
3. **explore**: ``walkers`` Langevin trajectories of the ensemble, each from a frame of D_r drawn at random
   (another batch, up to ``max_batches``, while fewer than ``n_select`` frames can be selected),
   with the calibrated spread σ = max_i ‖σ_F,i‖ (eV/Å, `so3lib.md.uncertainty`) on every saved frame; a
   trajectory stops at the first frame with σ > σ_hi: beyond it the model extrapolates and the MD leaves the
   physical region (broken, compressed geometries), and such frames teach nothing about the dynamics the model
   is for, so they are never labelled;
4. **select**: the candidates are the saved frames after step 0 with σ ≤ σ_hi and no two atoms closer than half
   the sum of their covalent radii; ``uncertainty`` takes those with σ ≥ σ_lo in decreasing σ, ``random`` draws
   from all candidates uniformly; both skip a frame fewer than ``min_gap`` saved frames from one already taken
   from the same trajectory (neighbouring frames carry the same information) and take at most ``n_select``
   (``random`` as many as ``uncertainty`` took in the round: the same number of frames);
5. **label**: the oracle's energy and forces, kept when finite and max_i ‖F_i‖ ≤ ``max_force_ev_per_a`` (refused
   frames are counted, never NaN); D_{r+1} = D_r ∪ the labelled frames.

The bounds (σ_lo, σ_hi) are in eV/Å (``bounds="absolute"``) or multiples of the median σ of the round's
ensemble on the validation set (``bounds="validation"``, the default): a candidate is a frame the model is more
uncertain about than about a typical frame of the target distribution, but not wildly so. Both strategies
explore with the same rules, so the comparison isolates the selection. The control ``none`` labels nothing and
fine-tunes the same rounds on D_0 alone: what the extra optimisation steps give without new data.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from so3lib.data.dataset import Dataset, Structure

log = logging.getLogger("so3lib.active")
Strategy = Literal["uncertainty", "random", "none"]


class LoopConfig(BaseModel):
    """The loop's settings (the exploration MD itself is an `MDConfig`)."""

    model_config = ConfigDict(extra="forbid")
    rounds: int = Field(3, ge=1)
    n_select: int = Field(10, ge=1, description="frames labelled per round (at most)")
    walkers: int = Field(4, ge=1, description="exploration trajectories per batch, each from a training frame")
    max_batches: int = Field(3, ge=1, description="batches of walkers per round, more only while too few frames")
    bounds: Literal["validation", "absolute"] = "validation"
    min_uncertainty: float = Field(1.0, ge=0, description="σ_lo: eV/Å, or × the validation median")
    max_uncertainty: float = Field(4.0, gt=0, description="σ_hi: eV/Å, or × the validation median")
    min_gap: int = Field(3, ge=1, description="saved frames between two selected frames of one trajectory")
    max_force_ev_per_a: float = Field(20.0, gt=0, description="a label with a larger atomic force is refused")
    retrain: Literal["finetune", "scratch"] = "finetune"
    finetune_steps: int | None = Field(None, ge=1, description="steps of a fine-tuning round (None: max_steps)")
    finetune_learning_rate: float | None = Field(None, gt=0, description="None: the training learning rate")
    seed: int = 0

    @model_validator(mode="after")
    def _bounds(self):
        if not self.min_uncertainty < self.max_uncertainty:
            raise ValueError(
                f"the uncertainty bounds must satisfy min < max, got min {self.min_uncertainty} and max "
                f"{self.max_uncertainty}"
            )
        return self


# --------------------------------------------------------------------------------------------- the oracle
def label(
    frames: Sequence, oracle, source: str = "<oracle>", max_force_ev_per_a: float | None = None
) -> tuple[Dataset | None, dict[str, int]]:
    """(Dataset of ``frames`` (ase.Atoms) with the oracle's energy (eV) and forces (eV/Å), the frames refused:
    ``failed`` (the oracle raised: SCF not converged, …), ``nonfinite`` (positions or labels NaN/inf),
    ``force_above_bound`` (an atomic force above ``max_force_ev_per_a``)). Refused frames are left out."""
    structures, refused = [], {"failed": 0, "nonfinite": 0, "force_above_bound": 0}
    for atoms in frames:
        a = atoms.copy()
        if not np.isfinite(a.positions).all():
            refused["nonfinite"] += 1
            continue
        a.calc = oracle
        try:
            e, f = float(a.get_potential_energy()), np.array(a.get_forces(), float)
        except Exception as exc:  # an oracle that cannot do the geometry
            log.warning("oracle failed on a frame: %s", exc)
            refused["failed"] += 1
            continue
        if not (np.isfinite(e) and np.isfinite(f).all()):
            refused["nonfinite"] += 1
            continue
        if max_force_ev_per_a is not None and np.linalg.norm(f, axis=1).max() > max_force_ev_per_a:
            refused["force_above_bound"] += 1
            continue
        s = Structure.from_ase(a)
        structures.append(Structure(s.numbers, s.positions, s.cell, s.pbc, energy=e, forces=f))
    if not structures:
        return None, refused
    return Dataset.from_structures(structures, source=source), refused


def oracle_md(
    start,
    oracle,
    temperature_k: float,
    n_frames: int,
    every: int,
    seed: int,
    dt_fs: float = 0.5,
    burn_in_steps: int = 200,
    friction_per_fs: float = 0.01,
):
    """``n_frames`` frames (ase.Atoms) of Langevin MD driven by the oracle itself, one every ``every`` steps
    after ``burn_in_steps`` of equilibration (reference data: an initial training set, an independent test
    set). The centre of mass is held fixed."""
    from ase import units
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary

    atoms = start.copy()
    atoms.calc = oracle
    atoms.set_constraint(FixCom())
    rng = np.random.default_rng(seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_k, rng=rng)
    Stationary(atoms)
    dyn = Langevin(
        atoms, dt_fs * units.fs, temperature_K=temperature_k, friction=friction_per_fs / units.fs, rng=rng, fixcm=False
    )
    if burn_in_steps:
        dyn.run(burn_in_steps)
    frames = []
    for _ in range(n_frames):
        dyn.run(every)
        f = atoms.copy()
        f.calc = None
        f.set_constraint()
        frames.append(f)
    return frames


# --------------------------------------------------------------------------------------------- exploration
@dataclasses.dataclass
class Trajectory:
    """One exploration run: the saved frames after step 0 (ase.Atoms; the last is the one above the bound when
    the run stopped there), their σ = max_i ‖σ_F,i‖ (eV/Å), the training frame it started from, and the step it
    stopped at (None: it ran to the end)."""

    frames: list
    sigma_ev_per_a: np.ndarray
    start_index: int
    steps: int
    stopped_at_step: int | None


def explore(pot, params, starts: Sequence, start_indices: Sequence[int], md_cfg, max_uncertainty: float | None):
    """One `Trajectory` per start structure: Langevin MD with the ensemble (ASE engine, ``md_cfg``; trajectory w
    with seed ``md_cfg.seed + w``), each stopped at the first saved frame with σ above ``max_uncertainty``
    (eV/Å) or at a blow-up."""
    from so3lib.calculator import So3libCalculator
    from so3lib.md.ase_engine import run_md_ase
    from so3lib.md.uncertainty import UncertaintyMonitor

    calc = So3libCalculator(pot, params, skin=md_cfg.skin_angstrom)
    out = []
    for w, (start, k) in enumerate(zip(starts, start_indices)):
        mon = UncertaintyMonitor(pot, params, start, max_uncertainty, "stop" if max_uncertainty else "mark")
        cfg = md_cfg.model_copy(update={"seed": md_cfg.seed + w})
        res = run_md_ase(calc, start, cfg, progress=False, raise_on_blowup=False, monitor=mon)
        n = min(len(res.positions), len(mon.forces_std_max_ev_per_a))  # a blow-up can end before the monitor
        frames = []
        for p in res.positions[1:n]:
            a = start.copy()
            a.calc = None
            a.positions = p
            frames.append(a)
        sigma = np.asarray(mon.forces_std_max_ev_per_a[1:n], float)
        out.append(Trajectory(frames, sigma, int(k), int(res.step[n - 1]), mon.stopped_at_step))
    return out


def too_close(atoms, factor: float = 0.5) -> bool:
    """Two atoms closer than ``factor`` × the sum of their covalent radii (a geometry no MD should reach)."""
    from so3lib.md.stability import first_too_close

    return first_too_close([atoms.positions], atoms.numbers, atoms.cell.array, atoms.pbc, factor) is not None


def select(
    sigma: np.ndarray,
    n: int,
    strategy: Strategy,
    rng: np.random.Generator,
    min_uncertainty: float | None = None,
    max_uncertainty: float | None = None,
    trajectory: np.ndarray | None = None,
    frame: np.ndarray | None = None,
    min_gap: int = 1,
) -> np.ndarray:
    """Indices of at most ``n`` candidates (finite σ ≤ ``max_uncertainty``): ``uncertainty`` those with σ ≥
    ``min_uncertainty`` in decreasing σ, ``random`` a uniform draw of all of them; either skips a candidate
    fewer than ``min_gap`` saved frames (``frame``) from one already taken of the same ``trajectory``."""
    sigma = np.asarray(sigma, float)
    ok = np.isfinite(sigma)
    if max_uncertainty is not None:
        ok &= sigma <= max_uncertainty
    if strategy == "uncertainty":
        if min_uncertainty is not None:
            ok &= sigma >= min_uncertainty
        idx = np.nonzero(ok)[0]
        order = idx[np.argsort(-sigma[idx], kind="stable")]
    elif strategy == "random":
        order = rng.permutation(np.nonzero(ok)[0])
    else:
        raise ValueError(f"unknown selection strategy {strategy!r} (uncertainty or random)")
    traj = np.zeros(len(sigma), int) if trajectory is None else np.asarray(trajectory)
    pos = np.arange(len(sigma)) if frame is None else np.asarray(frame)
    taken: list[int] = []
    for i in order:
        if len(taken) == n:
            break
        if any(traj[j] == traj[i] and abs(int(pos[j]) - int(pos[i])) < min_gap for j in taken):
            continue
        taken.append(int(i))
    return np.asarray(taken, int)


# --------------------------------------------------------------------------------------------- errors
def forces_std_max(pot, params, ds: Dataset) -> np.ndarray:
    """(F,) σ = max_i ‖σ_F,i‖ (eV/Å, calibrated) of the ensemble on every frame of ``ds``."""
    from so3lib.ensemble import predict_arrays

    return predict_arrays(pot, params, ds)["forces_std_max_ev_per_a"]


def oracle_errors(pot, params, test: Dataset) -> dict[str, float]:
    """The ensemble mean against the oracle on ``test``: force MAE/RMSE (eV/Å), energy MAE (eV), the spread."""
    from so3lib.ensemble import per_structure_force_rmse, predict_arrays, spearman

    p = predict_arrays(pot, params, test)
    df = p["forces_ev_per_a"] - test.forces
    de = p["energy_ev"] - test.energy
    out = {
        "forces_mae_ev_per_a": float(np.mean(np.abs(df))),
        "forces_rmse_ev_per_a": float(np.sqrt(np.mean(df**2))),
        "energy_mae_ev": float(np.mean(np.abs(de))),
    }
    if "forces_std_rms_ev_per_a" in p:
        out["rms_forces_std_ev_per_a"] = float(np.sqrt(np.mean(p["forces_std_rms_ev_per_a"] ** 2)))
        out["spearman_rmse_vs_std"] = spearman(per_structure_force_rmse(df, p["n_atoms"]), p["forces_std_rms_ev_per_a"])
    return out


# --------------------------------------------------------------------------------------------- the loop
def round_config(cfg, loop: LoopConfig, previous: Path | None):
    """The run configuration of a round: ``cfg`` itself for round 0 (``previous`` None) and with
    ``retrain="scratch"``; else fine-tuning from ``previous`` (the energy reference kept, a fresh optimiser for
    ``finetune_steps``, at ``finetune_learning_rate``)."""
    if previous is None or loop.retrain == "scratch":
        return cfg
    tc = cfg.training
    update: dict[str, Any] = {"init_from": str(previous), "init_reference": "keep"}
    if loop.finetune_steps is not None:
        update.update(max_steps=loop.finetune_steps, max_epochs=None)
    if loop.finetune_learning_rate is not None:
        update["learning_rate"] = loop.finetune_learning_rate
    return cfg.model_copy(update={"training": tc.model_copy(update=update)})


def _bounds(pot, params, val: Dataset, loop: LoopConfig) -> tuple[float, float, float]:
    """(σ_lo, σ_hi) in eV/Å and the validation median of σ (eV/Å)."""
    med = float(np.median(forces_std_max(pot, params, val)))
    f = med if loop.bounds == "validation" else 1.0
    return f * loop.min_uncertainty, f * loop.max_uncertainty, med


def _mean(x) -> float | None:
    return float(np.mean(x)) if len(x) else None


def explore_and_select(pot, params, data: Dataset, val: Dataset, oracle, md_cfg, loop, strategy, r, n=None):
    """Round ``r``'s exploration, selection and labelling of ``n`` frames (default ``loop.n_select``) for
    ``strategy``: (labelled Dataset or None, record). While fewer than ``n`` frames can be selected, another batch
    of ``loop.walkers`` runs explores, up to ``loop.max_batches`` batches (short runs that all stop early leave
    few frames far enough apart)."""
    t0 = time.perf_counter()
    n = loop.n_select if n is None else n
    lo, hi, med = _bounds(pot, params, val, loop)
    rng = np.random.default_rng([loop.seed, 1, r])  # the starts: the same for both strategies in round 0
    trajs, starts, frames, sigma, traj, pos, close = [], [], [], [], [], [], 0
    for batch in range(loop.max_batches):
        first = rng.choice(len(data), loop.walkers, replace=loop.walkers > len(data))
        atoms = [data[int(k)].to_ase() for k in first]
        md = md_cfg.model_copy(update={"seed": md_cfg.seed + 1000 * r + 100 * batch})
        for t in explore(pot, params, atoms, first, md, hi):
            for k, (a, s) in enumerate(zip(t.frames, t.sigma_ev_per_a)):
                if s > hi or not np.isfinite(s):
                    continue  # the frame the run stopped at
                if too_close(a):
                    close += 1
                    continue
                frames.append(a)
                sigma.append(s)
                traj.append(len(trajs))
                pos.append(k)
            trajs.append(t)
        starts += [int(k) for k in first]
        s_arr = np.asarray(sigma, float)
        pick = select(s_arr, n, strategy, np.random.default_rng([loop.seed, 2, r]), lo, hi, traj, pos, loop.min_gap)
        if len(pick) >= n:
            break
    sigma = np.asarray(sigma, float)
    t_explore = time.perf_counter() - t0
    t1 = time.perf_counter()
    new, refused = label([frames[i] for i in pick], oracle, f"<oracle, {strategy} round {r}>", loop.max_force_ev_per_a)
    record = {
        "val_median_forces_std_max_ev_per_a": med,
        "bounds_ev_per_a": [lo, hi],
        "exploration": {
            "trajectories": len(trajs),
            "batches": batch + 1,
            "start_frames": starts,
            "steps": [t.steps for t in trajs],
            "stopped_above_bound": sum(t.stopped_at_step is not None for t in trajs),
            "saved_frames": int(sum(len(t.frames) for t in trajs)),
            "forces_std_max_ev_per_a": [t.sigma_ev_per_a.tolist() for t in trajs],  # per saved frame after step 0
            "max_forces_std_ev_per_a": max(
                (float(np.max(t.sigma_ev_per_a)) for t in trajs if len(t.sigma_ev_per_a)), default=None
            ),
        },
        "candidates": len(frames),
        "candidates_too_close": close,
        "candidates_in_bounds": int(np.sum(sigma >= lo)),
        "candidates_mean_forces_std_ev_per_a": _mean(sigma),
        "selected": len(pick),
        "selected_frames": [[int(traj[i]), int(pos[i])] for i in pick],  # (trajectory, saved frame after step 0)
        "selected_mean_forces_std_ev_per_a": _mean(sigma[pick]),
        "labelled": 0 if new is None else len(new),
        "refused": refused,
        "explore_s": t_explore,
        "label_s": time.perf_counter() - t1,
    }
    return new, record


def write_frames(path: Path, ds: Dataset, info: dict[str, Any] | None = None, append: bool = False) -> None:
    """Write (or append) the labelled frames of ``ds`` to ``path`` (extxyz, energy and forces through the
    single-point calculator, ``info`` in every frame's info)."""
    import ase.io

    path.parent.mkdir(parents=True, exist_ok=True)
    frames = []
    for k in range(len(ds)):
        a = ds[k].to_ase()
        a.info.update(info or {})
        frames.append(a)
    ase.io.write(path, frames, format="extxyz", append=append and path.exists())


def run_loop(
    cfg,
    initial: Dataset,
    val: Dataset,
    test: Dataset,
    oracle,
    md_cfg,
    loop: LoopConfig,
    out: str | Path,
    strategies: Sequence[Strategy] = ("uncertainty", "random"),
    progress: bool = True,
) -> dict[str, list[dict[str, Any]]]:
    """The loop for each strategy from the same initial set (round 0 trained once and shared). Run folders
    ``out/round0`` and ``out/<strategy>/round<r>``, the labelled frames in ``out/<strategy>/labelled.extxyz``.
    Returns per strategy one record per round."""
    from so3lib.training import load_potential, train

    if not cfg.training.ensemble:
        raise ValueError("active learning needs an ensemble: set training.ensemble (--ensemble K, K >= 2)")
    unknown = set(strategies) - {"uncertainty", "random", "none"}
    if unknown:
        raise ValueError(f"unknown selection strategies {sorted(unknown)} (uncertainty, random, none)")
    out = Path(out)
    t0 = time.perf_counter()
    train(cfg, initial, val, None, out_dir=out / "round0", progress=progress)
    t_round0 = time.perf_counter() - t0
    runs = {s: out / "round0" for s in strategies}
    data = {s: initial for s in strategies}
    history: dict[str, list[dict[str, Any]]] = {s: [] for s in strategies}
    for r in range(loop.rounds + 1):
        for s in strategies:
            t_train = t_round0
            if r > 0:
                run_dir = out / s / f"round{r}"
                t0 = time.perf_counter()
                train(round_config(cfg, loop, runs[s]), data[s], val, None, out_dir=run_dir, progress=progress)
                t_train, runs[s] = time.perf_counter() - t0, run_dir
            pot, params = load_potential(runs[s])
            rec: dict[str, Any] = {
                "round": r,
                "n_train": len(data[s]),
                "trained": "scratch" if r == 0 or loop.retrain == "scratch" else "finetune from round " + str(r - 1),
                "train_s": t_train,
                "test": oracle_errors(pot, params, test),
            }
            if r < loop.rounds and s != "none":  # the control: no exploration, no new frames
                n = loop.n_select  # random: as many frames as the uncertainty strategy took this round
                if s == "random" and "uncertainty" in history and len(history["uncertainty"]) > r:
                    n = history["uncertainty"][r]["selected"]
                new, sel = explore_and_select(pot, params, data[s], val, oracle, md_cfg, loop, s, r, n)
                if new is not None:
                    data[s] = Dataset.concatenate([data[s], new])
                    write_frames(out / s / "labelled.extxyz", new, {"active_learning_round": r}, append=True)
                rec.update(sel)
            history[s].append(rec)
            log.info(
                "active learning %s round %d: %d training frames, test force MAE %.1f meV/Å",
                s,
                r,
                rec["n_train"],
                1e3 * rec["test"]["forces_mae_ev_per_a"],
            )
    return history
