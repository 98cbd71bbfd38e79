"""Typed, validated run configuration, saved as ``config.yaml`` in every run folder and read back exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator, model_validator

from so3lib.models.registry import ModelConfig, config_from_dict


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class TrainingConfig(_Strict):
    """Optimisation. Loss L = (1 − β)·(E − Ẽ)² + β/(3N)·Σ(F − F̃)² [+ w_σ·mean (σ − σ̃)²] over real graphs/atoms."""

    batch_size: int = Field(32, ge=1)
    max_epochs: int | None = Field(2000, ge=1)
    max_steps: int | None = Field(None, ge=1)
    max_minutes: float | None = Field(None, gt=0)
    beta: float = Field(0.99, ge=0.0, le=1.0, description="force weight β")
    stress_weight: float = Field(0.0, ge=0.0, description="weight of the stress term (eV/Å³)² for periodic data")
    optimizer: Literal["adam", "amsgrad"] = "adam"
    learning_rate: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(100, ge=0, description="linear warm-up over this many steps")
    warmup_start_fraction: float = Field(
        0.01, gt=0, le=1, description="the warm-up starts at learning_rate × this fraction"
    )
    schedule: Literal["constant", "exponential", "cosine", "linear", "plateau"] = "exponential"
    schedule_over: Literal["auto", "steps", "budget"] = Field(
        "auto",
        description="what drives the decay: steps (decay_steps, decay_rate), or budget (the fraction of the run's "
        "budget spent, wall clock or steps, reaching learning_rate × final_lr_fraction at its end); auto: budget "
        "when max_minutes is set and the schedule decays (exponential, cosine, linear)",
    )
    final_lr_fraction: float = Field(
        0.01,
        gt=0,
        le=1,
        description="learning_rate × this at the end of a budget-driven schedule (and of a steps-driven cosine or "
        "linear one at decay_steps)",
    )
    decay_rate: float = Field(0.1, gt=0, le=1, description="exponential: lr × decay_rate every decay_steps")
    decay_steps: int = Field(100_000, ge=1)
    plateau_patience: int = Field(10, ge=1, description="plateau: evaluations without improvement")
    plateau_factor: float = Field(0.5, gt=0, lt=1)
    grad_clip: float | None = Field(10.0, gt=0, description="clip the gradient's global norm to this (none: no clip)")
    ema_decay: float | None = Field(
        0.99, ge=0, lt=1, description="EMA of the parameters, validated and kept as the best (none or 0: no EMA)"
    )
    output_scale_ev: float | None = Field(
        None,
        gt=0,
        description="the per-atom output scale of the potential (eV); default: fitted, the RMS force component "
        "of the training set × 1 Å",
    )
    eval_every_steps: int | None = Field(None, ge=1, description="None: after each epoch")
    checkpoint_every_steps: int = Field(500, ge=1)
    early_stopping_patience: int | None = Field(50, ge=1, description="evaluations without improvement")
    log_every_steps: int = Field(10, ge=1)
    seed: int = 0
    n_devices: int = Field(
        1,
        ge=1,
        description="data-parallel devices: a jax.sharding mesh over this many devices, "
        "the batch split across them, the parameters replicated",
    )
    eval_batch_size: int | None = Field(None, ge=1)
    init_from: str | None = Field(
        None,
        description="fine-tune: start from the weights of this trained run (its model, scale and shift; a fresh "
        "optimiser and schedule)",
    )
    init_reference: Literal["keep", "refit", "refit-new"] = Field(
        "keep",
        description="fine-tune: the energy reference: keep the run's, refit it on the new data, or refit-new "
        "(fit only the elements new to the model, keep the others)",
    )
    freeze: Literal["none", "representation"] = Field(
        "none", description="fine-tune: train only the readout (representation: embedding and interactions fixed)"
    )
    ensemble: int | None = Field(
        None,
        description="train this many members (seeds seed, seed+1, ...) one after another into members/m<k>; "
        "predictions are their mean, the spread their uncertainty (calibrated on the validation set)",
    )

    nll_weight: float | None = Field(
        None,
        ge=0,
        description="shallow ensembles (--readout-heads K): weight w of the Gaussian NLL of the heads' spread, "
        "L = L_mean + w·(NLL_E [+ NLL_F]) (default 0.01 for a shallow ensemble)",
    )
    nll_forces: bool = Field(
        False,
        description="shallow ensembles: the NLL of the per-head force spread too (K backward passes per step)",
    )

    @field_validator("ensemble")
    @classmethod
    def _ensemble(cls, v):
        if v is not None and v < 2:
            raise ValueError(f"ensemble {v}: an ensemble needs at least 2 members (leave it out for one model)")
        return v

    @model_validator(mode="after")
    def _budget(self):
        if self.max_epochs is None and self.max_steps is None and self.max_minutes is None:
            raise ValueError("set at least one of max_epochs, max_steps, max_minutes")
        if self.schedule_over == "budget" and self.schedule not in ("exponential", "cosine", "linear"):
            raise ValueError(
                f"schedule_over=budget decays an exponential, cosine or linear schedule, not schedule={self.schedule}"
            )
        if self.init_from is not None and self.output_scale_ev is not None:
            raise ValueError(
                "output_scale_ev applies to a fresh run: fine-tuning (init_from) keeps the trained run's scale"
            )
        if self.init_from is None and (self.init_reference != "keep" or self.freeze != "none"):
            raise ValueError(
                f"init_reference={self.init_reference}, freeze={self.freeze} apply to fine-tuning: give init_from "
                "(--init-from RUN)"
            )
        return self


DEFAULT_NLL_WEIGHT = 0.01


def uncertainty_conflict(model: ModelConfig, training: TrainingConfig) -> str | None:
    """What contradicts in the model's and the training's uncertainty options (None: nothing)."""
    heads = getattr(model, "readout_heads", None)
    if heads and training.ensemble:
        return (
            f"readout_heads {heads} and ensemble {training.ensemble}: choose one uncertainty, a shallow ensemble "
            "(--readout-heads K, one model) or an ensemble of models (--ensemble N)"
        )
    if not heads and (training.nll_weight is not None or training.nll_forces):
        given = "nll_weight" if training.nll_weight is not None else "nll_forces"
        return f"{given} applies to a shallow ensemble: give the model readout_heads (--readout-heads K, K >= 2)"
    return None


def nll_weight(model: ModelConfig, training: TrainingConfig) -> float:
    """The NLL weight in effect: the given one, the default for a shallow ensemble, 0 for other models."""
    if not getattr(model, "readout_heads", None):
        return 0.0
    return DEFAULT_NLL_WEIGHT if training.nll_weight is None else float(training.nll_weight)


class DataConfig(_Strict):
    """Where the data came from, its label keys, how it was split (the indices are saved in splits.npz) and the
    per-element energy reference (see `so3lib.data.fit_energy_reference`). ``train`` may be None for data given
    in memory."""

    train: str | None = None
    val: str | None = None
    test: str | None = None
    format: str | None = None
    energy_key: str | None = Field(None, description="energy label key (e.g. REF_energy); None: the format's default")
    forces_key: str | None = Field(None, description="forces label key (e.g. REF_forces); None: the format's default")
    stress_key: str | None = Field(None, description="stress label key; None: the format's default")
    split: str = "random"
    val_fraction: float = Field(0.05, gt=0, lt=1)
    split_seed: int = 0
    energy_reference: Literal["lstsq", "lstsq+intercept", "isolated_atoms", "average"] = "lstsq"
    isolated_atom_energies_ev: dict[int, float] | None = None
    allow_undetermined_reference: bool = Field(
        False,
        description="least squares on compositions that do not determine the reference: warn and take the "
        "minimum-norm solution instead of raising UndeterminedReferenceError",
    )

    @field_validator("isolated_atom_energies_ev", mode="before")
    @classmethod
    def _isolated(cls, v):
        """Keys may be atomic numbers (1, "1") or element symbols ("H"); stored as atomic numbers."""
        if v is None:
            return v
        from so3lib.data.reference import normalize_isolated_atom_energies

        return normalize_isolated_atom_energies(v, "<isolated_atom_energies_ev>")


class RunConfig(_Strict):
    name: str = "run"
    model: Any
    training: TrainingConfig = TrainingConfig()
    data: DataConfig | None = None
    command: dict[str, Any] | None = Field(
        None, description="the so3lib command and its options that made the run (so3lib <name> --config reads it)"
    )

    @field_validator("model", mode="before")
    @classmethod
    def _model(cls, v):
        if isinstance(v, ModelConfig):
            return v
        if isinstance(v, dict):
            return config_from_dict(v)
        raise ValueError(f"model must be a mapping with a 'name', got {type(v).__name__}")

    @model_validator(mode="after")
    def _uncertainty(self):
        problem = uncertainty_conflict(self.model, self.training)
        if problem:
            raise ValueError(problem)
        return self

    @field_serializer("model")
    def _ser_model(self, v):
        return v.config_view()

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @staticmethod
    def from_yaml(path_or_text: str | Path) -> RunConfig:
        p = Path(path_or_text) if not str(path_or_text).lstrip().startswith(("name:", "model:", "{")) else None
        text = p.read_text() if p is not None else str(path_or_text)
        return RunConfig.model_validate(yaml.safe_load(text))
