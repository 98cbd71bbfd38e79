"""Options shared by the training workflows: the run folder, the label keys of the data files and the energy
reference (E0s), and how they become a `DataConfig`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

E0_METHODS = ("lstsq", "lstsq+intercept", "average")
Format = Literal["rmd17", "sgdml", "spice", "mlearn", "ase"]  # so3lib.data.FORMATS
# how a run is executed, not what it computes (the multi-process options: where and as which process it ran)
RUNTIME_OPTIONS = frozenset(
    {"out", "resume", "progress", "distributed", "coordinator", "num_processes", "process_id", "distributed_timeout_s"}
)


class Options(BaseModel):
    """Base of every command's options: strict (unknown names are errors), validated on assignment."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), validate_assignment=True)

    def saved(self) -> dict[str, Any]:
        """The options that define the result (written to the run's config.yaml under ``command``)."""
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in RUNTIME_OPTIONS}


class DataFile(BaseModel):
    """A data file with its own label keys, for a config that mixes sources:
    ``train: {path: a.extxyz, energy_key: REF_energy, forces_key: REF_forces}``."""

    model_config = ConfigDict(extra="forbid")

    path: str
    format: Format | None = None
    energy_key: str | None = None
    forces_key: str | None = None
    stress_key: str | None = None


class RunOptions(Options):
    name: str | None = Field(None, description="run name (default: from the data)")
    out: str | None = Field(None, description="run folder (default runs/<name>)")
    resume: bool = Field(False, description="continue the run in --out from its last checkpoint")
    progress: bool = Field(True, description="progress bar and log lines on stderr")


class LabelKeys(Options):
    """The names of the labels in the data files (MACE users write REF_energy / REF_forces)."""

    energy_key: str | None = Field(None, description="energy label name (e.g. REF_energy; default: the format's)")
    forces_key: str | None = Field(None, description="forces label name (e.g. REF_forces; default: the format's)")
    stress_key: str | None = Field(None, description="stress label name (default: the format's)")
    drop_nonfinite_labels: bool = Field(
        False, description="drop frames with a NaN or infinite label (counted and reported) instead of refusing"
    )

    def keys(self, spec: str | DataFile | None = None) -> dict[str, str]:
        """Label keys for reading ``spec``: the file's own keys over the command's."""
        keys = {k: getattr(self, k) for k in ("energy_key", "forces_key", "stress_key")}
        if isinstance(spec, DataFile):
            keys.update({k: getattr(spec, k) for k in keys if getattr(spec, k) is not None})
        return {k: v for k, v in keys.items() if v is not None}

    def read(self, spec: str | DataFile, format: str | None = None, **kwargs):
        """Read a data file (a path or a `DataFile`) with the label keys."""
        from so3lib import data

        path = spec.path if isinstance(spec, DataFile) else spec
        fmt = spec.format if isinstance(spec, DataFile) and spec.format else format
        nonfinite = "drop" if self.drop_nonfinite_labels else "error"
        return data.read(path, fmt, **self.keys(spec), nonfinite=nonfinite, **kwargs)


class LabelOptions(RunOptions, LabelKeys):
    """Options of every training command: the run folder, the label keys and the energy reference."""

    e0s: str = Field(
        "lstsq",
        description="per-element energy reference: lstsq (least squares on the training set), lstsq+intercept, "
        "average (one mean energy per atom for every element), or a YAML/JSON file of isolated-atom energies "
        "(element: eV)",
    )
    allow_undetermined_reference: bool = Field(
        False, description="go on (with a warning) when the training compositions do not determine the reference"
    )

    def reference(self) -> dict[str, Any]:
        """DataConfig fields of the energy reference chosen by ``e0s``."""
        out: dict[str, Any] = {
            "allow_undetermined_reference": self.allow_undetermined_reference,
            "energy_key": self.energy_key,
            "forces_key": self.forces_key,
            "stress_key": self.stress_key,
        }
        if self.e0s in E0_METHODS:
            return {**out, "energy_reference": self.e0s}
        from so3lib.data.reference import load_isolated_atom_energies

        if not Path(self.e0s).is_file():
            raise ValueError(
                f"--e0s '{self.e0s}': neither {', '.join(E0_METHODS[:-1])}, {E0_METHODS[-1]} nor an existing "
                "YAML/JSON file of isolated-atom energies"
            )
        return {
            **out,
            "energy_reference": "isolated_atoms",
            "isolated_atom_energies_ev": load_isolated_atom_energies(Path(self.e0s)),
        }


def path_of(spec: str | DataFile | None) -> str | None:
    return spec.path if isinstance(spec, DataFile) else spec


def command_section(command: str, options: Options) -> dict[str, Any]:
    """What a run folder's config.yaml records of the command that made it (``so3lib <command> --config``
    reads it back)."""
    return {"name": command, "options": options.saved()}
