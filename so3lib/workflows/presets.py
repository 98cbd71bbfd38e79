"""Typed presets: the options a workflow starts from, per model name. A preset only sets defaults: a config
file and the command line override every value. Presets are validated against the model's and the training
loop's own configs (`PresetTable.check`), so a misspelt option fails in the tests, not in a user's run."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Preset(BaseModel):
    """Defaults for one model: ``model`` options (the model config's fields), ``training`` options
    (`TrainingConfig` fields) and ``options`` (the workflow's own options, e.g. ``e0s``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    options: dict[str, Any] = Field(default_factory=dict)

    def over(self, base: Preset) -> Preset:
        """This preset's values on top of ``base``'s."""
        return Preset(
            model={**base.model, **self.model},
            training={**base.training, **self.training},
            options={**base.options, **self.options},
        )


class PresetTable(BaseModel):
    """A ``default`` preset for every model, refined per model name in ``models``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str
    default: Preset = Field(default_factory=Preset)
    models: dict[str, Preset] = Field(default_factory=dict)

    def for_model(self, name: str) -> Preset:
        return self.models.get(name, Preset()).over(self.default)

    def check(self, option_names: set[str] = frozenset()) -> None:
        """Raise ValueError when a preset names an option the model, the training loop or the workflow
        (``option_names``) does not have, or gives an invalid value."""
        from so3lib.models import available, make_config
        from so3lib.training.config import TrainingConfig

        for name in available():
            p = self.for_model(name)
            make_config(name, **p.model)
            TrainingConfig(**{"max_epochs": None, "max_steps": 1, **p.training})
            unknown = set(p.options) - set(option_names)
            if unknown:
                raise ValueError(f"preset '{self.description}' ({name}): unknown workflow options {sorted(unknown)}")
