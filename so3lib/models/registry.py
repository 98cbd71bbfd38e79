"""Model registry: one config class per model name, validated on construction, round-tripping to YAML.

cfg = so3lib.models.make_config("schnet", cutoff=5.0, n_atom_basis=64)
module = cfg.build()                 # flax.linen.Module: GraphsTuple -> per-atom energies (N,)
cfg2 = so3lib.models.config_from_dict(cfg.to_dict())
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, Literal

import flax.linen as nn
import jax.numpy as jnp
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

_REGISTRY: dict[str, type[ModelConfig]] = {}
# built-in models: name -> module that registers it on import (imported on first use)
_BUILTIN = {"bpnn": "so3lib.models.bpnn", "schnet": "so3lib.models.schnet", "so3krates": "so3lib.models.so3krates"}


class ModelConfig(BaseModel):
    """Fields shared by every model. Subclasses add their hyper-parameters and implement `module()`."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    name: str
    cutoff: float = Field(5.0, gt=0.0, le=30.0, description="cutoff radius r_cut in Å")
    dtype: Literal["float32", "float64"] = Field("float32", description="parameter and compute dtype")
    readout_heads: int | None = Field(
        None,
        le=64,
        description="shallow ensemble: K heads on the last readout layer (one model; energy = their mean, the "
        "spread of the heads the uncertainty, trained with a Gaussian NLL); none: one output",
    )

    @field_validator("readout_heads")
    @classmethod
    def _heads(cls, v):
        if v is not None and v < 2:
            raise ValueError(
                f"readout_heads {v}: a shallow ensemble needs at least 2 heads (leave it out for one output)"
            )
        return v

    @property
    def n_outputs(self) -> int:
        """Width of the last readout layer: K heads, or 1."""
        return self.readout_heads or 1

    def build(self) -> nn.Module:
        """The flax module for this configuration."""
        raise NotImplementedError

    def fit(self, dataset) -> ModelConfig:
        """A copy with data-dependent constants (left as None by the user) fitted on the training set, e.g. the
        mean neighbour count or descriptor statistics. Deterministic, so a resumed run fits the same values."""
        return self

    @property
    def triplet_cutoff(self) -> float | None:
        """Cutoff (Å) for the angular triplets a model needs in its batches; None: no triplets."""
        return None

    def readout_params(self) -> tuple[str, ...] | None:
        """Names of the top-level parameter collections that form the readout (what fine-tuning with a frozen
        representation still trains); None: the model does not say (freezing is refused)."""
        return None

    def config_view(self) -> dict[str, Any]:
        """What goes into a run's config.yaml (large fitted arrays are kept in model/potential.yaml only)."""
        return self.to_dict()

    @property
    def jnp_dtype(self):
        return jnp.float64 if self.dtype == "float64" else jnp.float32

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain data; ``readout_heads`` only when set (a one-output model's config stays as it was)."""
        d = self.model_dump(mode="json")
        if d.get("readout_heads") is None:
            d.pop("readout_heads", None)
        return d

    def replace(self, **changes) -> ModelConfig:
        return type(self)(**{**self.to_dict(), **changes})


def register(name: str):
    """Class decorator registering a `ModelConfig` subclass under ``name``."""

    def deco(cls):
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' registered twice")
        _REGISTRY[name] = cls
        return cls

    return deco


def available() -> list[str]:
    """Names of every model, built-in (imported or not) and registered."""
    return sorted(set(_REGISTRY) | set(_BUILTIN))


def get(name: str) -> type[ModelConfig]:
    """The config class of a registered model (a built-in model's module is imported here, once)."""
    if name not in _REGISTRY and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in _REGISTRY:
        raise KeyError(f"unknown model '{name}'; registered models: {available()}")
    return _REGISTRY[name]


def make_config(name: str, **kwargs) -> ModelConfig:
    """Validated config for model ``name``; a clear error names unknown or invalid options."""
    cls = get(name)
    try:
        return cls(name=name, **kwargs)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e['loc'])}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()
        )
        raise ValueError(
            f"invalid options for model '{name}': {problems}. Valid options: "
            f"{sorted(f for f in cls.model_fields if f != 'name')}"
        ) from None


def config_from_dict(d: Mapping[str, Any]) -> ModelConfig:
    d = dict(d)
    if "name" not in d:
        raise ValueError(f"model config needs a 'name' (one of {available()})")
    return make_config(d.pop("name"), **d)


def hyperparameters(name: str) -> dict[str, Any]:
    """{option: FieldInfo} of a model's hyper-parameters (for CLIs and sweeps)."""
    return {k: v for k, v in get(name).model_fields.items() if k != "name"}
