"""MD speed: steps/s and atom-steps/s of the on-device (jax-md) engine and the ASE path, for each model family,
on ethanol (9 atoms), aspirin (21 atoms) and periodic Li supercells (~430 to ~11 000 atoms; more on GPU).

Models are freshly initialised at the sizes given (speed does not depend on training); NVE, dt 0.5 fs.

usage: python benchmarks/md_speed.py [--models schnet so3krates bpnn] [--li-supercells 2 3 4 6] [--steps 200]
           [--ase-steps 20] [--out benchmarks/results/md_speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SIZES = {
    "schnet": {"n_atom_basis": 128, "n_interactions": 3},
    "so3krates": {"features": 132, "l_max": 3, "layers": 3},
    "bpnn": {"n_radial": 12, "n_angular": 8, "cutoff": 5.0, "cutoff_angular": 4.0},
}


def potential_for(model: str, ds):
    from so3lib.models import make_config
    from so3lib.training import DataConfig, RunConfig
    from so3lib.training.trainer import build_potential, make_loader

    cfg = RunConfig(
        model=make_config(model, **SIZES[model]),
        training={"batch_size": 4, "max_steps": 1},
        data=DataConfig(energy_reference="average"),  # single molecules: least squares cannot fix e_Z
    )
    sample = ds.subset(np.arange(min(len(ds), 20)))
    pot = build_potential(cfg, sample)
    g = next(make_loader(sample, pot, 4, False, 0, "bench").epoch(0))
    return pot, pot.init(jax.random.PRNGKey(0), g)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["schnet", "so3krates", "bpnn"])
    ap.add_argument("--li-supercells", type=int, nargs="+", default=[2, 3, 4, 6])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--ase-steps", type=int, default=20)
    ap.add_argument("--max-ase-atoms", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "md_speed.json")
    a = ap.parse_args(argv)
    import so3lib.data as d
    from so3lib.calculator import So3libCalculator
    from so3lib.md import MDConfig, run_md
    from so3lib.md.ase_engine import run_md_ase

    eth = d.read(d.bundled_path(d.samples.RMD17_ETHANOL_TRAIN))
    asp = d.read(SHARED / "rmd17" / "rmd17_aspirin_train_01.npz")
    li = d.read(SHARED / "materials" / "li_mlearn_training.json")
    mols = d.Dataset.concatenate([eth.subset(np.arange(20)), asp.subset(np.arange(20))])
    systems = [("ethanol", eth[0].to_ase(), mols), ("aspirin", asp[0].to_ase(), mols)]
    systems += [(f"Li {k}x{k}x{k}", li[0].to_ase().repeat((k, k, k)), li) for k in a.li_supercells]
    rows = []
    for model in a.models:
        pots = {}
        for name, atoms, train_ds in systems:
            key = id(train_ds)
            if key not in pots:
                pots[key] = potential_for(model, train_ds)
            pot, params = pots[key]
            atoms.calc = None
            cfg = MDConfig(
                ensemble="nve",
                temperature_k=300,
                steps=a.steps,
                dt_fs=0.5,
                save_every=a.steps // 4,
                skin_angstrom=0.5,
                max_temperature_k=1e12,
            )  # untrained models: measure speed, not physics
            row = {"model": model, "system": name, "atoms": len(atoms)}
            try:
                r = run_md(pot, params, atoms, cfg, progress=False)
                row.update(
                    jax_md_steps_per_s=r.steps_per_s,
                    jax_md_atom_steps_per_s=r.steps_per_s * len(atoms),
                    jax_md_ms_per_step=1e3 / r.steps_per_s,
                    jax_md_compile_s=r.compile_s,
                )
            except Exception as exc:  # noqa: BLE001 - recorded, e.g. out of memory on large cells
                row["jax_md_error"] = f"{type(exc).__name__}: {exc}"[:300]
            if len(atoms) <= a.max_ase_atoms:
                c = cfg.model_copy(update={"steps": a.ase_steps, "save_every": a.ase_steps})
                t = time.perf_counter()
                run_md_ase(So3libCalculator(pot, params, skin=0.5), atoms, c, progress=False)  # includes compiles
                r = run_md_ase(So3libCalculator(pot, params, skin=0.5), atoms, c, progress=False)
                row.update(
                    ase_steps_per_s=r.steps_per_s,
                    ase_ms_per_step=1e3 / r.steps_per_s,
                    ase_first_run_s=time.perf_counter() - t - r.wall_s,
                )
            print(json.dumps(row), flush=True)
            rows.append(row)
            write(a.out, rows, a)
    out = write(a.out, rows, a)
    print(f"wrote {a.out}")
    return out


def write(path: Path, rows: list, a) -> dict:
    """Results so far (rewritten after every row, so a long run keeps what it measured)."""
    out = {
        "device": str(jax.devices()[0]),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "jax": jax.__version__,
        "steps": a.steps,
        "models": SIZES,
        "rows": rows,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
