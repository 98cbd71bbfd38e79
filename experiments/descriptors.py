"""Symmetry-function analysis of a dataset: statistics and plots for a BPNN descriptor set.

usage: python -m experiments.descriptors [PATH] [--preset auto|fortnet|g2g4g5|ani] [--cutoff R]
           [--n-radial N] [--n-angular N] [--frames N] [--out DIR]
Writes descriptor_magnitudes.png, energy_vs_descriptors.png, descriptor_correlation.png and analysis.json.
(with no PATH: the bundled rMD17 ethanol sample)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import so3lib.data as data
from so3lib.analysis import descriptor_analysis
from so3lib.models import make_config


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", nargs="?", default=None)
    ap.add_argument("--preset", default="auto", choices=["auto", "fortnet", "g2g4g5", "ani"])
    ap.add_argument("--cutoff", type=float, default=None)
    ap.add_argument("--n-radial", type=int, default=12)
    ap.add_argument("--n-angular", type=int, default=8)
    ap.add_argument("--frames", type=int, default=300, help="frames analysed (evenly spaced)")
    ap.add_argument("--out", default="runs/descriptors")
    a = ap.parse_args(argv)
    ds = data.read(a.path or data.bundled_path(data.samples.RMD17_ETHANOL_TRAIN))
    ds = ds.subset(np.linspace(0, len(ds) - 1, min(a.frames, len(ds))).astype(int))
    opts = {"preset": a.preset, "n_radial": a.n_radial, "n_angular": a.n_angular, "standardize": False}
    if a.cutoff:
        opts["cutoff"] = a.cutoff
    cfg = make_config("bpnn", **opts).fit(ds)
    print(cfg.describe())
    res = descriptor_analysis(cfg, ds, a.out)
    Path(a.out, "analysis.json").write_text(json.dumps(res, indent=2))
    print(
        "magnitude hierarchy (mean |G|): "
        + " > ".join(f"{k} ({res['per_kind'][k]['mean_abs']:.3g})" for k in res["hierarchy"])
    )
    print(f"wrote {a.out}/")
    return res


if __name__ == "__main__":
    main()
