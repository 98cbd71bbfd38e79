"""A trained potential on disk: ``<run>/model/potential.yaml`` (model config, reference, scale, shift) and
``<run>/model/params.msgpack`` (flax serialisation)."""

from __future__ import annotations

from pathlib import Path

import flax.serialization
import jax
import numpy as np
import yaml

from so3lib.potential import Potential


def save_potential(directory: str | Path, potential: Potential, params) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "potential.yaml").write_text(yaml.safe_dump(potential.to_dict(), sort_keys=False))
    host = jax.tree_util.tree_map(np.asarray, params)
    (d / "params.msgpack").write_bytes(flax.serialization.msgpack_serialize(flax.serialization.to_state_dict(host)))
    return d


def load_potential(run_dir: str | Path) -> tuple[Potential, dict]:
    """(Potential, params) from a run folder (or its ``model/`` subfolder); for an ensemble run (``--ensemble``)
    an `so3lib.ensemble.EnsemblePotential` and the tuple of its members' parameters."""
    d = Path(run_dir)
    if not d.exists():
        raise FileNotFoundError(f"{d}: no such run folder")
    from so3lib.ensemble import is_ensemble, load_ensemble

    if is_ensemble(d):
        return load_ensemble(d)
    if (d / "model").is_dir():
        d = d / "model"
    for f in ("potential.yaml", "params.msgpack"):
        if not (d / f).exists():
            raise FileNotFoundError(f"{d / f} missing: is {run_dir} a finished so3lib run?")
    pot = Potential.from_dict(yaml.safe_load((d / "potential.yaml").read_text()))
    params = flax.serialization.msgpack_restore((d / "params.msgpack").read_bytes())
    return pot, params
