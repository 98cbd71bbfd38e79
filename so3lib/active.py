"""Active learning with an oracle: MD with an ensemble, the most uncertain frames labelled by any ASE calculator
(the oracle: GFN2-xTB through tblite, DFT, EMT, …), the ensemble retrained, repeated.

Round r (r = 0 … R): train a K-member ensemble on the labelled set D_r (from scratch: fine-tuning a previous
round is not used yet), measure its errors against the oracle on an independent test set, then run MD with it
from the start structure (the ASE engine, the spread recorded on every saved frame) and add to D_r the ``n_select``
saved frames of largest forces_std_max (``strategy="uncertainty"``) or ``n_select`` saved frames drawn at
random from the same trajectory (``strategy="random"``, the baseline), labelled by the oracle.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from so3lib.data.dataset import Dataset, Structure

log = logging.getLogger("so3lib.active")
Strategy = Literal["uncertainty", "random"]


def label(frames: Sequence, oracle, source: str = "<oracle>") -> tuple[Dataset | None, int]:
    """(Dataset of ``frames`` (ase.Atoms) with the oracle's energy (eV) and forces (eV/Å), number of frames the
    oracle failed on, gave non-finite labels for or with non-finite positions: left out, counted, never NaN)."""
    structures, failed = [], 0
    for atoms in frames:
        a = atoms.copy()
        a.calc = oracle
        try:
            e, f = float(a.get_potential_energy()), np.array(a.get_forces(), float)
        except Exception as exc:  # an oracle that cannot do the geometry (SCF not converged, …)
            log.warning("oracle failed on a frame: %s", exc)
            failed += 1
            continue
        if not (np.isfinite(e) and np.isfinite(f).all() and np.isfinite(a.positions).all()):
            failed += 1
            continue
        s = Structure.from_ase(a)
        structures.append(Structure(s.numbers, s.positions, s.cell, s.pbc, energy=e, forces=f))
    if not structures:
        return None, failed
    return Dataset.from_structures(structures, source=source), failed


def oracle_md(start, oracle, temperature_k: float, steps: int, save_every: int, seed: int, dt_fs: float = 0.5):
    """Frames (ase.Atoms) of Langevin MD driven by the oracle itself, every ``save_every`` steps (for reference
    data: an initial training set, an independent test set)."""
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary

    atoms = start.copy()
    atoms.calc = oracle
    rng = np.random.default_rng(seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_k, rng=rng)
    Stationary(atoms)
    dyn = Langevin(atoms, dt_fs * units.fs, temperature_K=temperature_k, friction=0.01 / units.fs, rng=rng)
    frames = []
    for _ in range(steps // save_every):
        dyn.run(save_every)
        f = atoms.copy()
        f.calc = None
        frames.append(f)
    return frames


def explore(pot, params, start, md_cfg, max_uncertainty: float | None = None) -> tuple[list, np.ndarray]:
    """MD with the ensemble from ``start`` (ASE engine): the saved frames after step 0 and their forces_std_max
    (eV/Å); a blow-up ends the trajectory there, and so does the first frame above ``max_uncertainty``."""
    from so3lib.calculator import So3libCalculator
    from so3lib.md.ase_engine import run_md_ase
    from so3lib.md.uncertainty import UncertaintyMonitor

    mon = UncertaintyMonitor(pot, params, start, max_uncertainty, "stop" if max_uncertainty else "mark")
    res = run_md_ase(So3libCalculator(pot, params), start, md_cfg, progress=False, raise_on_blowup=False, monitor=mon)
    frames = []
    for p in res.positions[1:]:
        a = start.copy()
        a.calc = None
        a.positions = p
        frames.append(a)
    return frames, np.asarray(mon.forces_std_max_ev_per_a[1 : len(frames) + 1])


def select(
    uncertainty: np.ndarray,
    n: int,
    strategy: Strategy,
    rng: np.random.Generator,
    max_uncertainty: float | None = None,
) -> np.ndarray:
    """Indices of ``n`` frames among the candidates (finite uncertainty, at most ``max_uncertainty``): the largest
    uncertainties, or drawn at random (without replacement). Frames beyond the bound are left out: there the
    ensemble MD has left the physical region (broken, compressed geometries), and such labels teach nothing
    about the dynamics the model is for."""
    ok = np.isfinite(uncertainty)
    if max_uncertainty is not None:
        ok &= uncertainty <= max_uncertainty
    ok = np.nonzero(ok)[0]
    n = min(n, len(ok))
    if strategy == "uncertainty":
        return ok[np.argsort(-uncertainty[ok], kind="stable")[:n]]
    return np.sort(rng.choice(ok, n, replace=False))


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


def run_loop(
    cfg,
    initial: Dataset,
    val: Dataset,
    test: Dataset,
    start,
    oracle,
    md_cfg,
    rounds: int,
    n_select: int,
    out: str | Path,
    strategies: Sequence[Strategy] = ("uncertainty", "random"),
    seed: int = 0,
    progress: bool = True,
    max_uncertainty: float | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """The loop for each strategy from the same initial set (round 0 trained once and shared). Run folders
    ``out/round0`` and ``out/<strategy>/round<r>``. Returns per strategy one record per round."""
    from so3lib.training import load_potential, train

    if not cfg.training.ensemble:
        raise ValueError("active learning needs an ensemble: set training.ensemble (--ensemble K, K >= 2)")
    if rounds < 1 or n_select < 1:
        raise ValueError(f"active learning needs rounds >= 1 and n_select >= 1, got {rounds} and {n_select}")
    out = Path(out)
    train(cfg, initial, val, None, out_dir=out / "round0", progress=progress)
    models = {s: load_potential(out / "round0") for s in strategies}
    data = {s: initial for s in strategies}
    history: dict[str, list[dict[str, Any]]] = {s: [] for s in strategies}
    for r in range(rounds + 1):
        for s in strategies:
            if r > 0:
                run_dir = out / s / f"round{r}"
                train(cfg, data[s], val, None, out_dir=run_dir, progress=progress)
                models[s] = load_potential(run_dir)
            pot, params = models[s]
            rec: dict[str, Any] = {"round": r, "n_train": len(data[s]), "test": oracle_errors(pot, params, test)}
            if r < rounds:
                md = md_cfg.model_copy(update={"seed": md_cfg.seed + r})
                frames, unc = explore(pot, params, start, md, max_uncertainty)
                pick = select(unc, n_select, s, np.random.default_rng([seed, r]), max_uncertainty)
                new, failed = label([frames[i] for i in pick], oracle, f"<oracle round {r}>")
                if new is not None:
                    data[s] = Dataset.concatenate([data[s], new])
                rec.update(
                    md_frames=len(frames),
                    md_max_forces_std_ev_per_a=float(np.max(unc)) if len(unc) else None,
                    selected_mean_forces_std_ev_per_a=float(np.mean(unc[pick])) if len(pick) else None,
                    pool_mean_forces_std_ev_per_a=float(np.mean(unc)) if len(unc) else None,
                    labelled=0 if new is None else len(new),
                    oracle_failed=failed,
                )
            history[s].append(rec)
            log.info("active learning %s round %d: %s", s, r, rec)
    return history
