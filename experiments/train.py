"""Train any registered model on any file the readers accept.

usage: python -m experiments.train --model schnet --train PATH [--val PATH] [--test PATH] --out DIR
           [--max-epochs N] [--max-steps N] [--batch-size B] [--beta B] [--cutoff R] [model options]
Without --val the training file is split 95/5 with --split-seed. Writes the run folder (config.yaml,
metrics.csv, checkpoints/, model/, results.json, plots/). --resume continues from the last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import so3lib.data as data
from experiments import cli
from so3lib.models import make_config
from so3lib.training import DataConfig, RunConfig, train


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    model = cli.model_name_from_argv(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True)
    ap.add_argument("--val", default=None)
    ap.add_argument("--test", default=None)
    ap.add_argument("--format", default=None, choices=data.FORMATS)
    ap.add_argument("--val-fraction", type=float, default=0.05)
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--energy-reference", default="lstsq", choices=["lstsq", "lstsq+intercept"])
    cli.add_common(ap, model)
    a = ap.parse_args(argv)
    cli.setup_logging(not a.no_progress)
    name = a.name or Path(a.train).stem
    out = Path(a.out or f"runs/{name}")
    train_all = data.read(a.train, a.format)
    splits = None
    if a.val:
        train_ds, val_ds = train_all, data.read(a.val, a.format)
    else:
        splits = data.random_split(len(train_all), (1 - a.val_fraction, a.val_fraction), seed=a.split_seed)
        train_ds, val_ds = train_all.subset(splits["train"]), train_all.subset(splits["val"])
    test_ds = data.read(a.test, a.format) if a.test else None
    cfg = RunConfig(
        name=name,
        model=make_config(model, **cli.collect(a, "model")),
        training=cli.training_options(a),
        data=DataConfig(
            train=a.train,
            val=a.val,
            test=a.test,
            format=a.format,
            split="file" if a.val else "random",
            val_fraction=a.val_fraction,
            split_seed=a.split_seed,
            energy_reference=a.energy_reference,
        ),
    )
    res = train(cfg, train_ds, val_ds, test_ds, out_dir=out, resume=a.resume, progress=not a.no_progress, splits=splits)
    summary = {k: res[k] for k in ("test", "val", "train_time_s", "n_parameters") if k in res}
    print(json.dumps(summary, indent=2))
    print(f"run folder: {out}")
    return res


if __name__ == "__main__":
    main()
