"""Shared CLI plumbing: every model hyper-parameter and training option becomes a flag automatically, from the
pydantic configs, so a new model or option needs no CLI code."""
from __future__ import annotations

import argparse
import logging
import sys
import typing
from typing import Any, Sequence

from so3lib.models import available, get, hyperparameters
from so3lib.training.config import TrainingConfig

_SKIP_TRAINING = {"max_epochs", "max_steps", "max_minutes", "batch_size", "beta"}


def _flag_type(annotation):
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is typing.Literal:
        return str, list(typing.get_args(annotation))
    if origin is typing.Union and args:
        return _flag_type(args[0])
    if annotation is bool:
        return (lambda s: s.lower() in ("1", "true", "yes")), None
    if annotation in (int, float, str):
        return annotation, None
    return str, None


def add_fields(parser: argparse.ArgumentParser, fields: dict, group: str, skip: set = frozenset()) -> None:
    g = parser.add_argument_group(group)
    for name, info in fields.items():
        if name in skip:
            continue
        typ, choices = _flag_type(info.annotation)
        g.add_argument(f"--{name.replace('_', '-')}", dest=f"{group}:{name}", type=typ, choices=choices,
                       default=None, help=f"{info.description or ''} (default {info.default})".strip())


def model_name_from_argv(argv: Sequence[str] | None, default: str = "schnet") -> str:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", default=default)
    known, _ = pre.parse_known_args(argv)
    if known.model not in available():
        raise SystemExit(f"unknown model '{known.model}'; registered models: {available()}")
    return known.model


def add_common(parser: argparse.ArgumentParser, model: str) -> None:
    parser.add_argument("--model", default=model, choices=available(), help="registered model name")
    parser.add_argument("--max-epochs", type=int, default=None)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--max-minutes", type=float, default=None, help="wall-time budget for training")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--beta", type=float, default=None, help="force weight β of the loss (default 0.99)")
    parser.add_argument("--out", default=None, help="run folder (default runs/<name>)")
    parser.add_argument("--name", default=None)
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    parser.add_argument("--no-progress", action="store_true")
    add_fields(parser, hyperparameters(model), "model")
    add_fields(parser, TrainingConfig.model_fields, "training", skip=_SKIP_TRAINING)


def collect(args: argparse.Namespace, group: str) -> dict[str, Any]:
    return {k.split(":", 1)[1]: v for k, v in vars(args).items() if k.startswith(f"{group}:") and v is not None}


def training_options(args: argparse.Namespace, defaults: dict | None = None) -> dict[str, Any]:
    opts = dict(defaults or {})
    for k in ("max_epochs", "max_steps", "max_minutes", "batch_size", "beta"):
        v = getattr(args, k)
        if v is not None:
            opts[k] = v
    opts.update(collect(args, "training"))
    return opts


def setup_logging(verbose: bool = True) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "jax._src", "orbax", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
