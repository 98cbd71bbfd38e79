"""rMD17 / MD17 benchmark: the standard protocol (1000 training configurations = 950 train + 50 validation,
tested on the split's test frames), one command per molecule or all ten, with the published anchors.

usage: python -m experiments.md17 [--molecule ethanol|...|all] [--model schnet] [--split 1..5]
           [--dataset rmd17|md17] [--data-dir DIR] [--out DIR] [--quick] [model / training options]

Data, in order: --data-dir; ../shared/data/<dataset> if it exists; ./data/<dataset>; and, for rMD17 ethanol
split 1, the sample bundled inside so3lib. rMD17 is read either as split files
(rmd17_<mol>_{train,test}_0X.npz) or as the figshare archive layout (npz_data/rmd17_<mol>.npz +
splits/index_{train,test}_0X.csv, see scripts/download_rmd17.py). Original MD17 (--dataset md17) reads sGDML
files md17_<mol>*.npz and draws 950/50 train/val and up to 1000 test frames with the split as seed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import so3lib.data as data
from experiments import cli
from so3lib.models import make_config
from so3lib.training import DataConfig, RunConfig, train

MOLECULES = (
    "aspirin",
    "azobenzene",
    "benzene",
    "ethanol",
    "malonaldehyde",
    "naphthalene",
    "paracetamol",
    "salicylic",
    "toluene",
    "uracil",
)
# Published test MAE with 1000 training configurations: (energy meV, forces meV/Å). MACE paper, Table 1.
PUBLISHED = {
    "MACE": {
        "aspirin": (2.2, 6.6),
        "azobenzene": (1.2, 3.0),
        "benzene": (0.4, 0.3),
        "ethanol": (0.4, 2.1),
        "malonaldehyde": (0.8, 4.1),
        "naphthalene": (0.5, 1.6),
        "paracetamol": (1.3, 4.8),
        "salicylic": (0.9, 3.1),
        "toluene": (0.5, 1.5),
        "uracil": (0.5, 2.1),
    },
    "NequIP": {
        "aspirin": (2.3, 8.2),
        "azobenzene": (0.7, 2.9),
        "benzene": (0.04, 0.3),
        "ethanol": (0.4, 2.8),
        "malonaldehyde": (0.8, 5.1),
        "naphthalene": (0.9, 1.3),
        "paracetamol": (1.4, 5.9),
        "salicylic": (0.7, 4.0),
        "toluene": (0.3, 1.6),
        "uracil": (0.4, 3.1),
    },
    "PaiNN": {
        "aspirin": (6.9, 16.1),
        "ethanol": (2.7, 10.0),
        "malonaldehyde": (3.9, 13.8),
        "naphthalene": (5.1, 3.6),
        "salicylic": (4.9, 9.1),
        "toluene": (4.2, 4.4),
        "uracil": (4.5, 6.1),
    },
    "ANI (BPNN)": {
        "aspirin": (16.6, 40.6),
        "azobenzene": (15.9, 35.4),
        "benzene": (3.3, 10.0),
        "ethanol": (2.5, 13.4),
        "malonaldehyde": (4.6, 24.5),
        "naphthalene": (11.3, 29.2),
        "paracetamol": (11.5, 30.4),
        "salicylic": (9.2, 29.7),
        "toluene": (7.7, 24.3),
        "uracil": (5.1, 21.4),
    },
}
# Presets: model and training options per model name (CLI flags override them).
FULL = {
    "model": {},
    "training": {
        "batch_size": 16,
        "max_epochs": 3000,
        "learning_rate": 1e-3,
        "schedule": "exponential",
        "decay_steps": 60000,
        "decay_rate": 0.1,
        "early_stopping_patience": 200,
        "warmup_steps": 200,
    },
}
QUICK = {  # finishes on 2 CPU cores in < 5 minutes
    "schnet": {"model": {"n_atom_basis": 64, "n_interactions": 3}, "training": {"max_steps": 16000}},
    "so3krates": {"model": {"features": 64, "l_max": 2, "layers": 2}, "training": {"max_steps": 5000}},
    "bpnn": {
        "model": {"n_radial": 12, "n_angular": 8, "cutoff": 5.0, "cutoff_angular": 4.0},
        "training": {"max_steps": 20000},
    },
}
QUICK_TRAINING = {
    "batch_size": 16,
    "max_epochs": None,
    "learning_rate": 2e-3,
    "schedule": "exponential",
    "decay_steps": 5300,
    "decay_rate": 0.3,
    "warmup_steps": 100,
    "eval_every_steps": 500,
    "checkpoint_every_steps": 1000,
    "early_stopping_patience": None,
}


def default_data_dir(dataset: str) -> Path:
    shared = Path("../shared/data") / dataset
    return shared if shared.exists() else Path("data") / dataset


def load_rmd17(molecule: str, split: int, data_dir: Path | None):
    """(train file dataset of 1000 frames, test dataset, description of the source)."""
    d = Path(data_dir) if data_dir else default_data_dir("rmd17")
    tag = f"{split:02d}"
    candidates = [d, d / "rmd17"]
    for base in candidates:
        tr, te = base / f"rmd17_{molecule}_train_{tag}.npz", base / f"rmd17_{molecule}_test_{tag}.npz"
        if tr.exists() and te.exists():
            return data.read(tr), data.read(te), f"{tr} / {te}"
        full = base / "npz_data" / f"rmd17_{molecule}.npz"
        itr, ite = base / "splits" / f"index_train_{tag}.csv", base / "splits" / f"index_test_{tag}.csv"
        if full.exists() and itr.exists() and ite.exists():
            i_tr = np.loadtxt(itr, dtype=np.int64).ravel()
            i_te = np.loadtxt(ite, dtype=np.int64).ravel()
            return (
                data.read(full, "rmd17", indices=i_tr),
                data.read(full, "rmd17", indices=i_te),
                f"{full} with {itr.name} / {ite.name}",
            )
    if molecule == "ethanol" and split == 1 and data_dir is None:
        tr = data.bundled_path(data.samples.RMD17_ETHANOL_TRAIN)
        te = data.bundled_path(data.samples.RMD17_ETHANOL_TEST)
        return data.read(tr), data.read(te), f"bundled sample {tr.name} / {te.name}"
    raise FileNotFoundError(
        f"rMD17 {molecule} split {split} not found under {d} (looked for split files "
        f"rmd17_{molecule}_train_{tag}.npz and the archive layout npz_data/rmd17_{molecule}.npz + "
        f"splits/index_train_{tag}.csv); get it with: python scripts/download_rmd17.py --dest data"
    )


def load_md17(molecule: str, split: int, data_dir: Path | None, n_test: int = 1000):
    d = Path(data_dir) if data_dir else default_data_dir("md17")
    files = sorted(d.glob(f"md17_{molecule}*.npz")) + sorted(d.glob(f"{molecule}*.npz"))
    if not files:
        raise FileNotFoundError(
            f"original MD17 {molecule} not found under {d} (sGDML file md17_{molecule}*.npz, from the sGDML data pages)"
        )
    ds = data.read(files[0])
    if len(ds) < 1000 + 10:
        raise data.DataError(files[0], f"only {len(ds)} frames, the protocol needs 1000 + test frames")
    s = data.count_split(len(ds), {"trainval": 1000, "test": min(n_test, len(ds) - 1000)}, seed=split)
    return ds.subset(s["trainval"]), ds.subset(s["test"]), str(files[0])


def run_molecule(
    molecule: str,
    model: str,
    split: int,
    dataset: str,
    data_dir,
    out: Path,
    model_opts: dict,
    train_opts: dict,
    resume: bool,
    progress: bool,
) -> dict:
    loader = load_rmd17 if dataset == "rmd17" else load_md17
    trainval, test, source = loader(molecule, split, data_dir)
    if len(trainval) < 1000:
        raise data.DataError(source, f"the train file has {len(trainval)} frames; the protocol needs 1000")
    sp = data.count_split(len(trainval), {"train": 950, "val": 50}, seed=split)
    cfg = RunConfig(
        name=f"{dataset}_{molecule}_{model}",
        model=make_config(model, **model_opts),
        training=train_opts,
        data=DataConfig(train=source, test=source, split=f"{dataset} protocol 950/50, seed {split}", split_seed=split),
    )
    print(f"[{dataset} {molecule}] data: {source}; 950 train / 50 val / {len(test)} test")
    res = train(
        cfg,
        trainval.subset(sp["train"]),
        trainval.subset(sp["val"]),
        test,
        out_dir=out,
        resume=resume,
        progress=progress,
        splits=sp,
    )
    res["molecule"], res["source"] = molecule, source
    return res


def results_table(rows: list[dict], model: str) -> str:
    anchors = list(PUBLISHED)
    head = (
        f"| molecule | so3lib {model} energy MAE (meV) | so3lib {model} forces MAE (meV/Å) | "
        + " | ".join(f"{a} (E / F)" for a in anchors)
        + " |"
    )
    lines = [head, "|" + "---|" * (3 + len(anchors))]
    for r in rows:
        t = r["test"]
        pub = " | ".join(
            ("{:g} / {:g}".format(*PUBLISHED[a][r["molecule"]]) if r["molecule"] in PUBLISHED[a] else "–")
            for a in anchors
        )
        lines.append(
            f"| {r['molecule']} | {1e3 * t['energy_mae_ev']:.2f} | {1e3 * t['forces_mae_ev_per_a']:.2f} | {pub} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else list(argv)
    model = cli.model_name_from_argv(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--molecule", default="ethanol", choices=MOLECULES + ("all",))
    ap.add_argument("--split", type=int, default=1, choices=range(1, 6))
    ap.add_argument("--dataset", default="rmd17", choices=["rmd17", "md17"])
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="small model, short run (< 5 min on 2 CPU cores)")
    cli.add_common(ap, model)
    a = ap.parse_args(argv)
    cli.setup_logging(not a.no_progress)
    preset = QUICK.get(model, {"model": {}, "training": {}}) if a.quick else FULL
    model_opts = {**preset["model"], **cli.collect(a, "model")}
    train_opts = cli.training_options(
        a,
        {
            **(QUICK_TRAINING if a.quick else {}),
            **FULL["training"],
            **(QUICK_TRAINING if a.quick else {}),
            **preset["training"],
        },
    )
    molecules = MOLECULES if a.molecule == "all" else (a.molecule,)
    base = Path(a.out or f"runs/{a.dataset}_{model}{'_quick' if a.quick else ''}")
    rows = []
    for mol in molecules:
        out = base / mol if len(molecules) > 1 else base
        try:
            rows.append(
                run_molecule(
                    mol, model, a.split, a.dataset, a.data_dir, out, model_opts, train_opts, a.resume, not a.no_progress
                )
            )
        except FileNotFoundError as exc:
            if len(molecules) == 1:
                raise
            print(f"skipping {mol}: {exc}")
    if not rows:
        raise SystemExit("no molecule could be run: see the messages above")
    table = results_table(rows, model)
    base.mkdir(parents=True, exist_ok=True)
    (base / "results.md").write_text(
        f"# {a.dataset} split {a.split}, model {model}{' (quick)' if a.quick else ''}\n\n"
        + table
        + "\nPublished values: MACE paper (NeurIPS 2022), Table 1.\n"
    )
    summary = [
        {
            "molecule": r["molecule"],
            "test": r["test"],
            "train_time_s": r["train_time_s"],
            "n_parameters": r["n_parameters"],
            "source": r["source"],
        }
        for r in rows
    ]
    if len(rows) > 1:
        (base / "results.json").write_text(json.dumps(summary, indent=2))
    print(table)
    print(f"results: {base / 'results.md'}")
    return rows


if __name__ == "__main__":
    main()
