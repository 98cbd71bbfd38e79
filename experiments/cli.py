"""Shared CLI plumbing: every model hyper-parameter and training option becomes a flag automatically, from the
pydantic configs, so a new model or option needs no CLI code."""

from __future__ import annotations

import argparse
import logging
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any

from so3lib.models import available, hyperparameters
from so3lib.training.config import TrainingConfig

_SKIP_TRAINING = {"max_epochs", "max_steps", "max_minutes", "batch_size", "beta"}


def _flag_type(annotation):
    """(type, choices, nargs) for a config field, or None when the field is not a simple flag (lists of
    objects and fitted arrays: give those in a YAML file with --model-yaml)."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is typing.Literal:
        return str, [str(a) for a in typing.get_args(annotation)], None
    if origin in (typing.Union, types.UnionType) and args:  # Optional[X] and X | None
        return _flag_type(args[0])
    if origin in (tuple, list) and args and args[0] in (int, float):
        return args[0], None, "+"
    if annotation is bool:
        return (lambda s: s.lower() in ("1", "true", "yes")), None, None
    if annotation in (int, float, str):
        return annotation, None, None
    return None


def add_fields(parser: argparse.ArgumentParser, fields: dict, group: str, skip: set = frozenset()) -> None:
    g = parser.add_argument_group(group)
    for name, info in fields.items():
        flag = _flag_type(info.annotation)
        if name in skip or flag is None:
            continue
        typ, choices, nargs = flag
        g.add_argument(
            f"--{name.replace('_', '-')}",
            dest=f"{group}:{name}",
            type=typ,
            choices=choices,
            nargs=nargs,
            default=None,
            help=f"{info.description or ''} (default {info.default})".strip(),
        )


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
    parser.add_argument(
        "--model-yaml",
        default=None,
        help="YAML file with model options (e.g. a BPNN symmetry_functions list); flags override it",
    )
    add_fields(parser, hyperparameters(model), "model")
    add_fields(parser, TrainingConfig.model_fields, "training", skip=_SKIP_TRAINING)


def collect(args: argparse.Namespace, group: str) -> dict[str, Any]:
    out = {}
    if group == "model" and getattr(args, "model_yaml", None):
        from pathlib import Path

        import yaml

        loaded = yaml.safe_load(Path(args.model_yaml).read_text()) or {}
        if not isinstance(loaded, dict):
            raise SystemExit(f"{args.model_yaml}: expected a mapping of model options")
        loaded.pop("name", None)
        out.update(loaded)
    out.update({k.split(":", 1)[1]: v for k, v in vars(args).items() if k.startswith(f"{group}:") and v is not None})
    return out


def training_options(args: argparse.Namespace, defaults: dict | None = None) -> dict[str, Any]:
    opts = dict(defaults or {})
    for k in ("max_epochs", "max_steps", "max_minutes", "batch_size", "beta"):
        v = getattr(args, k)
        if v is not None:
            opts[k] = v
    opts.update(collect(args, "training"))
    return opts


def setup_logging(verbose: bool = True) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("absl", "jax._src", "orbax", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
