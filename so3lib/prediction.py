"""Batched prediction of a dataset with a potential, and the predictions written as extxyz that ASE reads back.

    pred = predict_dataset(potential, params, dataset, batch_size=32)
    write_predictions("pred.extxyz", dataset, pred)
    frames = ase.io.read("pred.extxyz", ":")   # frames[i].get_potential_energy(), .get_forces(), ...

The arrays of `predict_dataset` (F frames, N atoms of all frames in the dataset's order, ``dataset.offsets``):

    energy_ev               (F,)       E = Σ_i ε_i
    atomic_energies_ev      (N,)       ε_i = scale · e_i + shift + e_ref(Z_i)   (eV; they sum to the energy)
    forces_ev_per_angstrom  (N, 3)     F = −∂E/∂r
    stress                  (F, 3, 3)  σ = (1/V) ∂E/∂ε in eV/Å³; NaN for frames without a full periodic cell
                                       (present only when some frame has one)
    energy_std              (F,)       optional (ensembles): spread of the members' energies, eV
    forces_std              (N, ...)   optional (ensembles): spread of the members' forces, eV/Å

Energies are formed on the host in float64 (reference + the device's residual), so float32 models keep meV
precision on large absolute energies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from so3lib.graph.batching import GraphLoader
from so3lib.potential import Potential

OPTIONAL = ("energy_std", "forces_std")  # written when present (ensembles)


def periodic_frames(dataset) -> np.ndarray:
    """(F,) bool: frames with a full periodic cell (where stress is defined)."""
    return np.asarray(dataset.pbc, bool).all(axis=1)


def predict_dataset(
    potential: Potential,
    params,
    dataset,
    batch_size: int = 32,
    progress: bool = False,
    loader: GraphLoader | None = None,
    fn=None,
) -> dict[str, np.ndarray]:
    """Energies, per-atom energies, forces and (for periodic frames) stress of every frame of ``dataset`` (a
    `Dataset`), in batches padded to a small ladder of shapes (one compilation per shape).

    ``loader`` (unshuffled, over ``dataset``) and ``fn`` (``(params, graph) -> potential outputs``, jitted) reuse
    what a caller has built and compiled already (the trainer's test loader and evaluation); stress is then
    returned when ``fn`` computes it."""
    from tqdm.auto import tqdm

    potential.reference.check_species(np.asarray(dataset.species), str(dataset.meta["source"][0]))
    if loader is None:
        loader = GraphLoader(
            dataset,
            potential.cutoff,
            batch_size,
            shuffle=False,
            dtype=np.float64 if potential.model.dtype == "float64" else np.float32,
            triplet_cutoff=potential.model.triplet_cutoff,
        )
    if loader.shuffle or loader.n_shards != 1 or len(loader.dataset) != len(dataset):
        raise ValueError("predict_dataset needs an unshuffled, unsharded loader over the dataset")
    batch_size = loader.batch_size
    periodic = periodic_frames(dataset)
    fn = fn or _jitted(potential, bool(periodic.any()))
    stress = False
    n_atoms = np.asarray(dataset.n_atoms)
    resid_e, resid_atoms, forces, sigma = [], [], [], []
    spread = {k: [] for k in OPTIONAL}
    batches = tqdm(loader.epoch(0), total=len(loader), desc="predict", disable=not progress, unit="batch")
    for k, g in enumerate(batches):
        n_graph = min(batch_size, len(dataset) - k * batch_size)
        n_node = int(n_atoms[k * batch_size : k * batch_size + n_graph].sum())
        out = fn(params, g)
        resid_e.append(np.asarray(out["energy_residual"], np.float64)[:n_graph])
        resid_atoms.append(np.asarray(out["atomic_energy_residual"], np.float64)[:n_node])
        forces.append(np.asarray(out["forces"], np.float64)[:n_node])
        if "energy_std" in out:  # an ensemble (so3lib.ensemble): the calibrated spread of its members
            spread["energy_std"].append(np.asarray(out["energy_std"], np.float64)[:n_graph])
            spread["forces_std"].append(np.asarray(out["forces_std"], np.float64)[:n_node])
        if "stress" in out:
            stress = True
            sigma.append(np.asarray(out["stress"], np.float64)[:n_graph])
    table = potential.reference.table()
    atomic = np.concatenate(resid_atoms) + table[np.asarray(dataset.numbers)]
    pred = {
        "energy_ev": np.concatenate(resid_e) + potential.reference.energy(dataset),
        "atomic_energies_ev": atomic,
        "forces_ev_per_angstrom": np.concatenate(forces),
    }
    if potential.reference.intercept_ev:  # a per-structure constant: shared out over the atoms
        pred["atomic_energies_ev"] = atomic + np.repeat(potential.reference.intercept_ev / n_atoms, n_atoms)
    pred.update({k: np.concatenate(v) for k, v in spread.items() if v})
    if stress and periodic.any():
        pred["stress"] = np.where(periodic[:, None, None], np.concatenate(sigma), np.nan)
    return pred


_FNS: dict[tuple[int, bool], Any] = {}


def _jitted(potential: Potential, stress: bool):
    key = (id(potential), stress)
    if key not in _FNS:
        _FNS.clear()  # one potential at a time
        _FNS[key] = jax.jit(lambda p, g: potential(p, g, compute_stress=stress))
    return _FNS[key]


def frames_of(dataset, pred: dict[str, np.ndarray]):
    """The predictions as ASE Atoms: ``energy``, ``forces``, per-atom ``energies`` and (periodic) ``stress``
    through the single-point calculator; the dataset's labels as ``REF_energy``/``REF_forces``/``REF_stress``;
    ensemble spreads as ``energy_std`` (info) and ``forces_std`` (arrays)."""
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.stress import full_3x3_to_voigt_6_stress

    off = np.asarray(dataset.offsets)
    frames = []
    for i in range(len(dataset)):
        s = dataset[i]
        atoms = s.to_ase()
        atoms.calc = None
        a, b = off[i], off[i + 1]
        for key in list(atoms.info):  # labels the reader left on the frame are written only as REF_*
            if key in ("energy", "free_energy", "stress", "virial", *OPTIONAL):
                del atoms.info[key]
        if s.energy is not None and np.isfinite(s.energy):
            atoms.info["REF_energy"] = float(s.energy)
        if s.forces is not None and np.isfinite(s.forces).all():
            atoms.arrays["REF_forces"] = np.asarray(s.forces, float)
        if getattr(s, "stress", None) is not None and np.isfinite(s.stress).all() and atoms.pbc.all():
            atoms.info["REF_stress"] = full_3x3_to_voigt_6_stress(np.asarray(s.stress, float))
        results = {
            "energy": float(pred["energy_ev"][i]),
            "free_energy": float(pred["energy_ev"][i]),
            "energies": pred["atomic_energies_ev"][a:b],
            "forces": pred["forces_ev_per_angstrom"][a:b],
        }
        if "stress" in pred and np.isfinite(pred["stress"][i]).all():
            results["stress"] = full_3x3_to_voigt_6_stress(pred["stress"][i])
        if "energy_std" in pred:
            atoms.info["energy_std"] = float(pred["energy_std"][i])
        if "forces_std" in pred:
            atoms.arrays["forces_std"] = np.asarray(pred["forces_std"][a:b], float)
        atoms.calc = SinglePointCalculator(atoms, **results)
        frames.append(atoms)
    return frames


def write_predictions(path: str | Path, dataset, pred: dict[str, np.ndarray]) -> Path:
    """Write `frames_of` as extxyz through a temporary file renamed into place."""
    import ase.io

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    ase.io.write(tmp, frames_of(dataset, pred), format="extxyz")
    tmp.replace(path)
    return path


def label_errors(dataset, pred: dict[str, np.ndarray]) -> dict[str, dict | None]:
    """MAE/RMSE (float64, eV, eV/atom, eV/Å, eV/Å³) over the labelled values; None where none is labelled."""
    n = np.asarray(dataset.n_atoms, float)
    e_ref = np.asarray(dataset.energy, float)
    f_ref = np.full((int(n.sum()), 3), np.nan) if dataset.forces is None else np.asarray(dataset.forces, float)
    out = {
        "energy_ev": errors(e_ref, pred["energy_ev"]),
        "energy_per_atom_ev": errors(e_ref / n, pred["energy_ev"] / n),
        "forces_ev_per_a": errors(f_ref.ravel(), pred["forces_ev_per_angstrom"].ravel()),
    }
    if "stress" in pred and dataset.stress is not None:
        s_ref = np.where(periodic_frames(dataset)[:, None, None], np.asarray(dataset.stress, float), np.nan)
        out["stress_ev_per_a3"] = errors(s_ref.ravel(), pred["stress"].ravel())
    return out


def errors(ref: np.ndarray, pred: np.ndarray) -> dict[str, float] | None:
    """MAE and RMSE over the finite reference values; None when there is none."""
    ok = np.isfinite(ref)
    if not ok.any():
        return None
    d = pred[ok] - ref[ok]
    return {"mae": float(np.mean(np.abs(d))), "rmse": float(np.sqrt(np.mean(d**2))), "count": int(ok.sum())}
