"""Fine-tuning (``init_from``): a new run whose parameters start from a trained run's best (EMA) weights.

    pot, params = start(cfg, train_ds)        # cfg.training.init_from = "runs/ethanol"

What is carried over and what is new:

- **model**: the run's model configuration, its fitted constants included (⟨N⟩, BPNN descriptor statistics);
  options that contradict it (another model family, another cutoff, another width) are refused, never mixed in;
- **scale and shift**: the run's, so at step 0 the potential is exactly the trained one
  (E = Σ_i [scale·e_i + shift] + Σ_i e_ref(Z_i));
- **energy reference** e_ref (``init_reference``): ``keep`` the run's (an element new to it is an error);
  ``refit``: fit it (with the run's ``energy_reference`` method) to what the starting model leaves unexplained,
  E − E_θ where E_θ = Σ_i [scale·e_i + shift] is the starting model's residual energy, so the fine-tuning starts
  without a constant energy offset on the new data; ``refit-new``: keep the known elements' e_Z and fit only the
  new ones the same way, E − E_θ − Σ_{Z known} n_Z e_Z ≈ Σ_{Z new} n_Z e_Z;
- **optimiser**: fresh (new Adam moments, the warm-up and decay schedule from step 0);
- **freeze** = ``representation``: the gradient of every parameter outside the model's readout
  (`ModelConfig.readout_params`) is set to zero (`optax.multi_transform` with `optax.set_to_zero`).

The run's potential and parameters are hashed into the new run's fingerprint, so a fine-tuned run resumes
exactly, and is refused if the run it started from changed.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np

from so3lib.data.errors import DataError, UndeterminedReferenceError
from so3lib.data.reference import EnergyReference, composition_matrix, fit_energy_reference
from so3lib.models.registry import ModelConfig
from so3lib.potential import Potential, make_potential

log = logging.getLogger("so3lib.train")
TRAINED, FROZEN = "trained", "frozen"


def _model_dir(run: str | Path) -> Path:
    d = Path(run)
    return d / "model" if (d / "model").is_dir() else d


def _load(run: str | Path):
    from so3lib.training.saving import load_potential

    try:
        return load_potential(run)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"--init-from {run}: {exc}") from None


def load_init(run: str | Path) -> tuple[Potential, Any]:
    """(Potential, params) of the single-model run to start from, or FileNotFoundError naming ``--init-from``
    (an ensemble run is fine-tuned member by member: `so3lib.training.ensemble.member_config`)."""
    from so3lib.ensemble import is_ensemble

    if is_ensemble(run):
        raise ValueError(
            f"--init-from {run} is an ensemble run: fine-tune it as an ensemble (--ensemble K, member k from its "
            "member k), or start from one of its members/m<k>"
        )
    return _load(run)


def init_model(run: str | Path) -> ModelConfig:
    """The model configuration of a trained run, single model or ensemble (for the command line's defaults)."""
    return _load(run)[0].model


def check_model(init: ModelConfig, asked: ModelConfig, run: str | Path) -> None:
    """Refuse options that contradict the run's model. A field left None in ``asked`` (to be fitted) takes the
    run's value."""
    if asked.name != init.name:
        raise ValueError(
            f"--init-from {run} holds a {init.name} model; the options ask for --model {asked.name}: fine-tuning "
            f"keeps the model it starts from (drop --model, or train a {asked.name} from scratch)"
        )
    a, b = init.config_view(), asked.config_view()
    diff = [k for k in {**a, **b} if k != "name" and b.get(k) is not None and b.get(k) != a.get(k)]
    if diff:
        shown = "; ".join(f"--{k.replace('_', '-')} {_show(b[k])} (the run has {_show(a.get(k))})" for k in diff[:6])
        raise ValueError(
            f"--init-from {run}: the options contradict its {init.name} model: {shown}; fine-tuning keeps the "
            "model it starts from (drop these options, or train from scratch)"
        )


def _show(v) -> str:
    text = str(v)
    return text if len(text) <= 40 else text[:37] + "..."


def check_elements(model: ModelConfig, train_ds, run: str | Path) -> None:
    """Models with per-element parameters (BPNN) cannot take elements they have no network for."""
    known = getattr(model, "species", None)
    if known is None:
        return
    new = sorted(set(np.asarray(train_ds.species).tolist()) - set(known))
    if new:
        raise DataError(
            _source(train_ds),
            f"elements {new} are new to the {model.name} model of --init-from {run}, which has networks for "
            f"{list(known)} only: it cannot be fine-tuned on them (train from scratch)",
            "numbers",
        )


def _source(ds) -> str:
    return str(getattr(ds, "source", None) or ds.meta["source"][0])


def refit_new_elements(ref: EnergyReference, train_ds) -> EnergyReference:
    """``ref`` with e_Z of the elements it lacks fitted by least squares on E − Σ_{Z known} n_Z e_Z − c over the
    labelled frames; the known elements keep theirs. Undetermined (the new elements' counts of rank below their
    number): `UndeterminedReferenceError`."""
    new = sorted(set(np.asarray(train_ds.species).tolist()) - set(ref.species))
    if not new:
        return ref
    labelled = np.isfinite(np.asarray(train_ds.energy, np.float64))
    if not labelled.any():
        raise DataError(_source(train_ds), "no frame has an energy label: cannot fit the new elements", "energy")
    species = [int(z) for z in np.asarray(train_ds.species)]  # composition_matrix needs every element present
    counts = composition_matrix(train_ds, species)[labelled]
    old = dict(zip(ref.species, ref.energies_ev))
    known = counts @ np.array([old.get(z, 0.0) for z in species])
    y = np.asarray(train_ds.energy, np.float64)[labelled] - known - ref.intercept_ev
    A = counts[:, [species.index(z) for z in new]]
    rank = int(np.linalg.matrix_rank(np.unique(A, axis=0)))
    if rank < len(new):
        raise UndeterminedReferenceError(
            _source(train_ds),
            f"the reference energies of the new elements {new} are not determined by the training compositions "
            f"(rank {rank} for {len(new)} elements); use --init-reference refit with --e0s average or a file of "
            "isolated-atom energies",
            "energy",
        )
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    energies = old | {z: float(c) for z, c in zip(new, coef)}
    resid = (y - A @ coef) / np.asarray(train_ds.n_atoms)[labelled]
    species = tuple(sorted(energies))
    return EnergyReference(
        species=species,
        energies_ev=tuple(energies[z] for z in species),
        intercept_ev=ref.intercept_ev,
        method=ref.method,
        residual_std_per_atom_ev=float(np.std(resid)),
        residual_mae_per_atom_ev=float(np.mean(np.abs(resid - resid.mean()))),
        raw_std_per_atom_ev=ref.raw_std_per_atom_ev,
        determined=ref.determined,
    )


FIT_SAMPLE = 2000  # frames of a streamed training set the starting model is evaluated on to refit the reference


def unexplained(pot: Potential, params, train_ds):
    """The training set (a sample of a store's view) with energies E − E_θ: what the starting model's residual
    energy E_θ leaves to the reference."""
    import copy

    from so3lib.data.dataset import Dataset
    from so3lib.prediction import predict_dataset

    ds = train_ds if isinstance(train_ds, Dataset) else train_ds.sample(FIT_SAMPLE)
    species = tuple(int(z) for z in np.asarray(ds.species))
    zero = EnergyReference(species=species, energies_ev=(0.0,) * len(species))
    e_model = predict_dataset(make_potential(pot.model, zero, pot.scale, pot.shift), params, ds, 64)["energy_ev"]
    out = copy.copy(ds)
    out.energy = np.asarray(ds.energy, np.float64) - e_model
    return out


def energy_reference(ref: EnergyReference, train_ds, mode: str, data_cfg, run: str | Path) -> EnergyReference:
    """The fine-tuned run's reference: ``keep``, ``refit`` (as `build_potential`) or ``refit-new``; for the
    last two ``train_ds`` holds the energies the reference is fitted to (`unexplained`)."""
    if mode == "refit":
        return fit_energy_reference(
            train_ds,
            method=data_cfg.energy_reference,
            isolated_atom_energies_ev=data_cfg.isolated_atom_energies_ev
            if data_cfg.energy_reference == "isolated_atoms"
            else None,
            allow_undetermined=data_cfg.allow_undetermined_reference,
        )
    if mode == "refit-new":
        return refit_new_elements(ref, train_ds)
    new = sorted(set(np.asarray(train_ds.species).tolist()) - set(ref.species))
    if new:
        raise DataError(
            _source(train_ds),
            f"elements {new} are new to --init-from {run} (its energy reference knows {list(ref.species)}): "
            "--init-reference refit-new fits their reference energies on the new data, refit fits all",
            "numbers",
        )
    return ref


def freeze_labels(model: ModelConfig, params, freeze: str):
    """A tree like ``params`` of 'trained'/'frozen' labels for `optax.multi_transform` (None: nothing frozen).
    ``representation``: everything outside ``model.readout_params()`` is frozen."""
    if freeze == "none":
        return None
    readout = model.readout_params()
    if readout is None:
        raise ValueError(f"--freeze {freeze}: model {model.name} does not name its readout parameters")
    top = params["params"] if "params" in params else params
    missing = [k for k in readout if k not in top]
    if missing:
        raise ValueError(f"--freeze {freeze}: the {model.name} parameters have no {missing} (they have {sorted(top)})")

    def label(path, _):
        names = [getattr(p, "key", None) for p in path]
        names = names[1:] if names and names[0] == "params" else names
        return TRAINED if names and names[0] in readout else FROZEN

    return jax.tree_util.tree_map_with_path(label, params)


def init_fingerprint(run: str | Path) -> dict[str, Any]:
    """Content hash of the run a fine-tuned run starts from (its potential.yaml and params.msgpack)."""
    d = _model_dir(run)
    h = hashlib.sha256()
    for name in ("potential.yaml", "params.msgpack"):
        h.update((d / name).read_bytes())
    return {"sha256": h.hexdigest()[:16]}


def start(cfg, train_ds) -> tuple[Potential, Any, dict[str, Any]]:
    """(Potential, initial params, summary for results.json) of a fine-tuned run ``cfg`` (``init_from`` set)."""
    from so3lib.training.config import DataConfig

    tc = cfg.training
    run = tc.init_from
    init_pot, params = load_init(run)
    check_model(init_pot.model, cfg.model, run)
    check_elements(init_pot.model, train_ds, run)
    data_cfg = cfg.data if cfg.data is not None else DataConfig()
    params = jax.tree_util.tree_map(np.asarray, params)
    fit_ds = train_ds if tc.init_reference == "keep" else unexplained(init_pot, params, train_ds)
    ref = energy_reference(init_pot.reference, fit_ds, tc.init_reference, data_cfg, run)
    pot = make_potential(init_pot.model, ref, init_pot.scale, init_pot.shift)
    summary = {
        "from": str(run),
        "reference": tc.init_reference,
        "freeze": tc.freeze,
        "new_elements": sorted(set(ref.species) - set(init_pot.reference.species)),
    }
    log.info("fine-tuning from %s: %s", run, summary)
    return pot, params, summary


def check_params(pot: Potential, params, template, run: str | Path) -> None:
    """The run's parameters must have the shapes the model builds (``template``: freshly initialised ones)."""
    from flax.core import unfreeze

    shapes = lambda t: jax.tree_util.tree_map(lambda x: tuple(np.shape(x)), unfreeze(t))  # noqa: E731
    if shapes(params) != shapes(template):
        raise ValueError(
            f"--init-from {run}: its saved parameters do not fit its {pot.model.name} model configuration "
            "(a damaged or hand-edited model/ folder)"
        )
