"""Train any registered model on any files the readers accept: a training file (split into train and
validation by ``val_fraction`` unless a validation file is given) and an optional test file."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from so3lib.workflows.common import DataFile, Format, LabelOptions, command_section, path_of
from so3lib.workflows.presets import PresetTable

PRESETS = PresetTable(description="train")  # the model's and the training loop's own defaults


class TrainOptions(LabelOptions):
    """Options of ``so3lib train``."""

    train: str | DataFile = Field(..., description="training data file (any format so3lib reads)")
    val: str | DataFile | None = Field(None, description="validation file (default: val_fraction of --train)")
    test: str | DataFile | None = Field(None, description="test file, evaluated with the best model")
    format: Format | None = Field(None, description="file format (default: detected)")
    val_fraction: float = Field(0.05, gt=0, lt=1, description="validation share of --train when no --val")
    split_seed: int = Field(0, description="seed of the train/validation split")


def preset(model: str, options: dict):
    return PRESETS.for_model(model)


def run(opts: TrainOptions, model, training) -> dict:
    """Read, split, train, test; returns the trainer's results with ``out``."""
    from so3lib import data
    from so3lib.training import DataConfig, RunConfig, train

    name = opts.name or Path(path_of(opts.train)).stem
    out = Path(opts.out or f"runs/{name}")
    train_all = opts.read(opts.train, opts.format)
    splits = None
    if opts.val is not None:
        train_ds, val_ds = train_all, opts.read(opts.val, opts.format)
    else:
        if len(train_all) < 2:
            raise data.DataError(
                path_of(opts.train), f"{len(train_all)} frame(s): too few to split off a validation set"
            )
        splits = data.random_split(len(train_all), (1 - opts.val_fraction, opts.val_fraction), seed=opts.split_seed)
        if len(splits["val"]) == 0:
            raise data.DataError(
                path_of(opts.train),
                f"{len(train_all)} frames × val_fraction {opts.val_fraction} leaves no validation frame: "
                "raise --val-fraction or give --val",
            )
        train_ds, val_ds = train_all.subset(splits["train"]), train_all.subset(splits["val"])
    test_ds = opts.read(opts.test, opts.format) if opts.test is not None else None
    cfg = RunConfig(
        name=name,
        model=model,
        training=training,
        data=DataConfig(
            train=path_of(opts.train),
            val=path_of(opts.val),
            test=path_of(opts.test),
            format=opts.format,
            split="file" if opts.val is not None else "random",
            val_fraction=opts.val_fraction,
            split_seed=opts.split_seed,
            **opts.reference(),
        ),
        command=command_section("train", opts),
    )
    res = train(cfg, train_ds, val_ds, test_ds, out_dir=out, resume=opts.resume, progress=opts.progress, splits=splits)
    return {**res, "out": str(out)}
