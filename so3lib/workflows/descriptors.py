"""Symmetry-function analysis of a dataset: statistics and plots of a BPNN descriptor set
(descriptor_magnitudes.png, energy_vs_descriptors.png, descriptor_correlation.png, analysis.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from so3lib.training.run_folder import to_json, write_atomic
from so3lib.workflows.common import Options


class DescriptorOptions(Options):
    """Options of ``so3lib descriptors``."""

    path: str | None = Field(None, description="data file (default: the bundled rMD17 ethanol sample)")
    preset: Literal["auto", "fortnet", "g2g4g5", "ani"] = Field("auto", description="symmetry-function set")
    cutoff: float | None = Field(None, gt=0, description="radial cutoff (Å; default: the preset's)")
    n_radial: int = Field(12, ge=1, description="auto set: radial functions")
    n_angular: int = Field(8, ge=0, description="auto set: angular functions")
    frames: int = Field(300, ge=1, description="frames analysed (evenly spaced)")
    out: str = Field("runs/descriptors", description="output folder")


def run(opts: DescriptorOptions) -> dict:
    from so3lib import data
    from so3lib.analysis import descriptor_analysis
    from so3lib.models import make_config

    ds = data.read(opts.path or data.bundled_path(data.samples.RMD17_ETHANOL_TRAIN))
    ds = ds.subset(np.linspace(0, len(ds) - 1, min(opts.frames, len(ds))).astype(int))
    model_opts = {"preset": opts.preset, "n_radial": opts.n_radial, "n_angular": opts.n_angular, "standardize": False}
    if opts.cutoff:
        model_opts["cutoff"] = opts.cutoff
    cfg = make_config("bpnn", **model_opts).fit(ds)
    res = descriptor_analysis(cfg, ds, opts.out)
    write_atomic(Path(opts.out, "analysis.json"), to_json(res))
    return {**res, "description": cfg.describe(), "out": opts.out}
