"""A trained run exported with `jax.export`: serialized StableHLO for cpu and cuda plus ``export.json`` (inputs,
outputs, shapes, dtypes and units, cutoff, species, model), loaded and called with jax alone, without so3lib
(see docs/export.md: a standalone loader, and how the artifact maps onto LAMMPS' ``pair_style jax/kk``)."""

from __future__ import annotations

from pydantic import Field, field_validator

from so3lib.workflows.common import Options

PLATFORMS = ("cpu", "cuda", "rocm")


class ExportOptions(Options):
    """Options of ``so3lib export``."""

    run: str = Field(..., description="a trained so3lib run folder")
    out: str = Field(..., description="export folder (new, empty, or one so3lib export wrote)")
    platforms: list[str] = Field(
        ["cpu", "cuda"],
        min_length=1,
        description="a platform to lower for: cpu, cuda or rocm (repeat the flag; no such device needed)",
    )

    @field_validator("platforms")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        bad = [p for p in v if p not in PLATFORMS]
        if bad:
            raise ValueError(f"unknown platform(s) {bad}; choose from {list(PLATFORMS)}")
        return v


def run(opts: ExportOptions) -> dict:
    from pathlib import Path

    from so3lib.potential_export import write_export
    from so3lib.training.saving import load_potential

    pot, params = load_potential(opts.run)
    meta = write_export(opts.out, pot, params, tuple(opts.platforms), source=str(Path(opts.run).resolve()))
    return {"out": opts.out, **meta}
