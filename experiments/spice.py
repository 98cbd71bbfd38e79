"""SPICE benchmark: MACE-OFF-style preprocessing, a packed memory-mapped store, a split by molecule, streamed
training with any registered model (optionally data parallel over several devices), and errors per SPICE subset.

usage: python -m experiments.spice [--data SPICE.hdf5 | --download {1.1.4,2.0.1}] [--model schnet|so3krates|bpnn]
           [--max-force EV_PER_A|none] [--keep-charged] [--energy-reference lstsq|lstsq+intercept|isolated_atoms
           --isolated-atom-energies FILE] [--split molecule|conformation] [--n-devices N] [--distributed]
           [--beta B] [--max-steps N] [--batch-size B] [--out DIR] [--resume] [model / training options]

Without --data (or --download) it runs on the real SPICE 1.1.4 sample bundled in so3lib (two molecules, 55
conformations; a smoke test of the pipeline, not a benchmark). Both sample molecules are charged ([N+] and
[Na+]) and sodium is no MACE-OFF element, so for the bundled sample the neutral filter is switched off (said in
the output and in results.json) and, with a single molecule left, the split is by conformation.

Writes the run folder (config.yaml, metrics.csv, checkpoints/, model/, plots/) plus results.json with a
``spice`` section (data, filter report with every drop counted, split, energy reference and its residual per
atom, test errors overall and per subset: energy MAE in meV/atom, force MAE in meV/Å, counts) and results.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import yaml

import so3lib.data as data
from experiments import cli
from so3lib.data.download import SPICE, download
from so3lib.data.spice import MACE_OFF_ELEMENTS
from so3lib.data.store import convert_spice, open_store, read_manifest
from so3lib.models import make_config
from so3lib.training import DataConfig, RunConfig, evaluate, load_potential, make_loader, train

log = logging.getLogger("so3lib.spice")
# Published SPICE force MAE anchors (meV/Å), test sets of the papers named.
ANCHORS = {"So3krates (JAX, SPICE 2; Frank et al. 2024)": 29.0, "ViSNet (SPICE 2; Wang et al. 2024)": 14.0}
# Presets per model (flags override them): the bundled sample runs in a few minutes on 2 CPU cores.
SAMPLE = {
    "schnet": {"n_atom_basis": 32, "n_interactions": 2},
    "so3krates": {"features": 32, "l_max": 2, "layers": 1},
    "bpnn": {"n_radial": 8, "n_angular": 4, "cutoff": 5.0, "cutoff_angular": 4.0},
}
SAMPLE_TRAINING = {
    "batch_size": 8,
    "max_epochs": None,
    "max_steps": 600,
    "learning_rate": 2e-3,
    "eval_every_steps": 50,
    "checkpoint_every_steps": 100,
    "warmup_steps": 20,
    "schedule": "exponential",
    "decay_steps": 600,
    "decay_rate": 0.3,
    "early_stopping_patience": None,
}
FULL_TRAINING = {
    "batch_size": 64,
    "max_epochs": 200,
    "learning_rate": 1e-3,
    "eval_every_steps": 2000,
    "checkpoint_every_steps": 2000,
    "schedule": "plateau",
    "early_stopping_patience": 20,
}


def parse_isolated(path: str | None) -> dict[int, float] | None:
    """{Z: energy eV} from a YAML/JSON file mapping atomic numbers to isolated-atom energies (eV)."""
    if path is None:
        return None
    raw = yaml.safe_load(Path(path).read_text())
    if not isinstance(raw, dict):
        raise SystemExit(f"{path}: expected a mapping atomic number -> energy (eV)")
    return {int(k): float(v) for k, v in raw.items()}


def split_frames(view, how: str, val_fraction: float, test_fraction: float, seed: int) -> tuple[dict, str]:
    """{train, val, test} indices into the view, and a description. By molecule unless fewer than three
    molecules are left (then by conformation, with a warning)."""
    names = view.meta["name"].astype(str)
    n_mol = len(np.unique(names))
    fr = (round(1 - val_fraction - test_fraction, 6), val_fraction, test_fraction)
    if how == "molecule" and n_mol >= 3:
        s = data.split_by_group(names, fr, seed=seed)
        return s, f"by molecule ({n_mol} molecules; fractions {fr}), seed {seed}"
    if how == "molecule":
        log.warning("only %d molecule(s) left after filtering: splitting by conformation instead of by molecule", n_mol)
        print(
            f"note: only {n_mol} molecule(s) left after filtering, so the split is by conformation (a split by "
            "molecule needs at least 3)"
        )
    s = data.random_split(len(view), fr, seed=seed)
    return s, f"by conformation ({len(view)} conformations; fractions {fr}), seed {seed}"


def per_subset(run_dir: Path, test_view, batch_size: int) -> list[dict]:
    """Test errors of the saved best model for each SPICE subset and overall (one padding ladder and one
    jitted evaluation for all subsets, so no subset recompiles)."""
    from so3lib.training.trainer import make_eval_fn

    pot, params = load_potential(run_dir)
    eval_fn = make_eval_fn(pot)
    ladder = make_loader(test_view, pot, batch_size, False, 0, "test").ladder
    subsets = test_view.meta["subset"].astype(str)
    rows = []
    for name in [*sorted(set(subsets)), "all"]:
        idx = np.arange(len(test_view)) if name == "all" else np.nonzero(subsets == name)[0]
        loader = make_loader(test_view.subset(idx), pot, batch_size, False, 0, f"test {name}", ladder=ladder)
        m = evaluate(pot, params, loader, eval_fn)
        rows.append(
            {
                "subset": name,
                "conformations": len(idx),
                "molecules": int(len(set(test_view.meta["name"][idx]))),
                "energy_mae_mev_per_atom": 1e3 * m["energy_mae_per_atom_ev"],
                "energy_mae_mev": 1e3 * m["energy_mae_ev"],
                "forces_mae_mev_per_a": 1e3 * m["forces_mae_ev_per_a"],
                "forces_rmse_mev_per_a": 1e3 * m["forces_rmse_ev_per_a"],
            }
        )
    return rows


def results_table(rows: list[dict], model: str) -> str:
    lines = [
        f"| subset | molecules | conformations | so3lib {model} E MAE (meV/atom) | so3lib {model} F MAE (meV/Å) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['subset']} | {r['molecules']} | {r['conformations']} | "
            f"{r['energy_mae_mev_per_atom']:.2f} | {r['forces_mae_mev_per_a']:.1f} |"
        )
    lines += [
        "",
        "Published force MAE on SPICE (other test sets, for scale): "
        + "; ".join(f"{k}: {v:g} meV/Å" for k, v in ANCHORS.items())
        + ".",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    model = cli.model_name_from_argv(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--data", default=None, help="a SPICE 1.1.4 or 2.0.1 HDF5 file (default: the bundled sample)")
    src.add_argument("--download", choices=sorted(SPICE), default=None, help="fetch SPICE from Zenodo first")
    ap.add_argument("--download-dir", default="data", help="where --download puts the file")
    ap.add_argument("--store", default=None, help="packed store folder (default data/stores/<file stem>)")
    ap.add_argument("--rebuild-store", action="store_true")
    ap.add_argument(
        "--max-force", default="10.0", help="drop conformers with a force component above this (eV/Å); 'none' keeps all"
    )
    ap.add_argument("--keep-charged", action="store_true", help="keep charged molecules (MACE-OFF drops them)")
    ap.add_argument("--elements", type=int, nargs="+", default=list(MACE_OFF_ELEMENTS))
    ap.add_argument("--energy-reference", default="lstsq", choices=["lstsq", "lstsq+intercept", "isolated_atoms"])
    ap.add_argument(
        "--isolated-atom-energies", default=None, help="YAML/JSON {Z: eV} for --energy-reference isolated_atoms"
    )
    ap.add_argument("--split", default="molecule", choices=["molecule", "conformation"])
    ap.add_argument("--val-fraction", type=float, default=None, help="default 0.05 (bundled sample 0.1)")
    ap.add_argument("--test-fraction", type=float, default=None, help="default 0.05 (bundled sample 0.2)")
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument(
        "--distributed",
        action="store_true",
        help="multi-host: call jax.distributed.initialize() (SLURM/Cloud TPU environments are detected by JAX)",
    )
    cli.add_common(ap, model)
    a = ap.parse_args(argv)
    cli.setup_logging(not a.no_progress)
    if a.distributed:
        import jax

        jax.distributed.initialize()
    if a.energy_reference == "isolated_atoms" and not a.isolated_atom_energies:
        ap.error("--energy-reference isolated_atoms needs --isolated-atom-energies FILE")

    bundled = a.data is None and a.download is None
    path = (
        Path(download(SPICE[a.download], a.download_dir, progress=not a.no_progress))
        if a.download
        else Path(a.data)
        if a.data
        else data.bundled_path(data.samples.SPICE_SAMPLE)
    )
    neutral_only = not a.keep_charged
    if bundled and neutral_only:
        neutral_only = False
        print(
            "note: the bundled SPICE sample holds only charged molecules ([N+], [Na+]); the neutral-molecule "
            "filter is off for it (pass --data for a real benchmark)"
        )
    max_force = None if str(a.max_force).lower() == "none" else float(a.max_force)
    store = Path(a.store or Path("data") / "stores" / path.stem)
    convert_spice(path, store, a.elements, neutral_only, max_force, progress=not a.no_progress, rebuild=a.rebuild_store)
    manifest = read_manifest(store)
    view = open_store(store)
    print(
        f"[spice] {path}: kept {manifest['report']['conformers_kept']} of {manifest['report']['conformers_in']} "
        f"conformations ({manifest['report']['molecules_kept']} of {manifest['report']['molecules_in']} molecules); "
        f"store {store}"
    )
    val_fraction = a.val_fraction if a.val_fraction is not None else (0.1 if bundled else 0.05)
    test_fraction = a.test_fraction if a.test_fraction is not None else (0.2 if bundled else 0.05)
    splits, split_desc = split_frames(view, a.split, val_fraction, test_fraction, a.split_seed)
    tr, va, te = (view.subset(splits[k]) for k in ("train", "val", "test"))

    model_opts = {**(SAMPLE.get(model, {}) if bundled else {}), **cli.collect(a, "model")}
    train_opts = cli.training_options(a, SAMPLE_TRAINING if bundled else FULL_TRAINING)
    name = f"spice_{path.stem}_{model}"
    out = Path(a.out or f"runs/{name}")
    cfg = RunConfig(
        name=name,
        model=make_config(model, **model_opts),
        training=train_opts,
        data=DataConfig(
            train=str(path),
            test=str(path),
            split=split_desc,
            split_seed=a.split_seed,
            val_fraction=val_fraction,
            energy_reference=a.energy_reference,
            isolated_atom_energies_ev=parse_isolated(a.isolated_atom_energies),
        ),
    )
    print(f"[spice] split {split_desc}: {len(tr)} train / {len(va)} val / {len(te)} test conformations")
    res = train(cfg, tr, va, te, out_dir=out, resume=a.resume, progress=not a.no_progress, splits=splits)
    rows = per_subset(out, te, train_opts.get("eval_batch_size") or max(cfg.training.batch_size, 64))
    rep = manifest["report"]
    res["spice"] = {
        "data": str(path),
        "bundled_sample": bundled,
        "store": str(store),
        "filters": {"elements": a.elements, "neutral_only": neutral_only, "max_force_ev_per_a": max_force},
        "counts": {
            "molecules_in": rep["molecules_in"],
            "conformations_in": rep["conformers_in"],
            "molecules_kept": rep["molecules_kept"],
            "conformations_kept": rep["conformers_kept"],
            "train": len(tr),
            "val": len(va),
            "test": len(te),
        },
        "dropped": rep["dropped"],
        "split": split_desc,
        "energy_reference": {
            "method": a.energy_reference,
            "residual_std_per_atom_mev": 1e3 * res["energy_reference"]["residual_std_per_atom_ev"],
            "raw_std_per_atom_mev": 1e3 * res["energy_reference"]["raw_std_per_atom_ev"],
        },
        "test_by_subset": rows,
        "anchors_forces_mae_mev_per_a": ANCHORS,
    }
    (out / "results.json").write_text(json.dumps(res, indent=2, default=str))
    table = results_table(rows, model)
    (out / "results.md").write_text(
        f"# SPICE ({path.name}), model {model}\n\nSplit {split_desc}. Energy reference "
        f"{a.energy_reference}: residual std {res['spice']['energy_reference']['residual_std_per_atom_mev']:.1f} "
        f"meV/atom (raw {res['spice']['energy_reference']['raw_std_per_atom_mev']:.0f}).\n\n" + table
    )
    print(table)
    print(f"results: {out / 'results.json'}, {out / 'results.md'}")
    return res


if __name__ == "__main__":
    main()
