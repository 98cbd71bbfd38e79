"""The ``so3lib`` command: ``so3lib <command> [--config FILE.yaml] [options]``.

Each command runs one workflow of `so3lib.workflows`; its options come from the workflow's preset for the
chosen model, then the config file, then the flags. User errors print one line (``so3lib: error: ...``, exit
status 2); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from so3lib._version import __version__
from so3lib.cli.options import UsageError, add_group, given, load_yaml, split_config, validation_message


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    summary: str
    module: str  # the workflow: an Options class named `options`, run(), and preset() when it trains
    options: str
    trains: bool = False
    positional: tuple[str, ...] = ()


COMMANDS = {
    c.name: c
    for c in (
        Command("train", "train any model on your files", "so3lib.workflows.train", "TrainOptions", True),
        Command("md17", "the rMD17 / MD17 benchmark protocol", "so3lib.workflows.md17", "MD17Options", True),
        Command(
            "spice", "the SPICE benchmark (bundled sample by default)", "so3lib.workflows.spice", "SpiceOptions", True
        ),
        Command(
            "active",
            "active learning: ensemble MD, uncertain frames labelled by an oracle, retrain",
            "so3lib.workflows.active",
            "ActiveOptions",
            True,
        ),
        Command(
            "sweep",
            "hyper-parameter sweeps (ablations)",
            "so3lib.workflows.sweeps",
            "SweepOptions",
            positional=("sweep",),
        ),
        Command(
            "md",
            "molecular dynamics with a trained run, and its stability report",
            "so3lib.workflows.md_report",
            "MDOptions",
        ),
        Command(
            "predict",
            "evaluate a trained run on a file",
            "so3lib.workflows.predict",
            "PredictOptions",
            positional=("run", "file"),
        ),
        Command(
            "export",
            "export a trained run as a jax.export artifact (StableHLO) that jax alone loads",
            "so3lib.workflows.export",
            "ExportOptions",
            positional=("run",),
        ),
        Command(
            "inspect",
            "summarise a data file and its energy reference",
            "so3lib.workflows.inspect",
            "InspectOptions",
            positional=("path",),
        ),
        Command(
            "descriptors",
            "symmetry-function statistics and plots",
            "so3lib.workflows.descriptors",
            "DescriptorOptions",
            positional=("path",),
        ),
    )
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _overview() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [
        f"so3lib {__version__}: machine-learned interatomic potentials (SchNet, BPNN, SO3krates) in JAX",
        "",
        "usage: so3lib <command> [--config FILE.yaml] [options]    (so3lib <command> --help for its options)",
        "",
        "commands:",
        *(f"  {n:<{width}}  {c.summary}" for n, c in COMMANDS.items()),
        "",
        "A config file holds the command's options in snake_case (model: so3krates, max_steps: 2000, ...);",
        "flags override it, and a run folder's config.yaml given back with --config repeats the run.",
    ]
    return "\n".join(lines)


def _check_flag_names(rest: Sequence[str], own: set[str], models: dict[str, set[str]], model: str) -> None:
    """A flag that belongs to another model gets its own message, not 'unrecognized arguments'."""
    for tok in rest:
        if not tok.startswith("--") or tok == "--":
            continue
        name = tok[2:].split("=", 1)[0].replace("-", "_")
        if name.startswith("no_"):
            name = name[3:]
        if name in own:
            continue
        owners = sorted(m for m, f in models.items() if name in f and m != model)
        if owners:
            raise UsageError(f"--{name.replace('_', '-')} is an option of model {', '.join(owners)}, not of {model}")


@dataclasses.dataclass(frozen=True)
class Parsed:
    """A command line resolved: the workflow module, its options, and for training commands the model config
    and the training config."""

    command: Command
    module: Any
    options: Any
    model: Any = None
    training: Any = None


def parse(argv: Sequence[str]) -> Parsed:
    """Resolve ``so3lib ARGV`` (preset, config file, flags) without running anything."""
    name, rest = argv[0], list(argv[1:])
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UsageError(f"unknown command '{name}'{hint}; commands: {', '.join(COMMANDS)}")
    cmd = COMMANDS[name]
    module = importlib.import_module(cmd.module)
    opt_cls = getattr(module, cmd.options)
    pre = _Parser(prog=f"so3lib {cmd.name}", add_help=False)
    pre.add_argument("--config", default=None)
    if cmd.trains:
        pre.add_argument("--model", default=None)
        pre.add_argument("--init-from", dest="init_from", default=None)
    pre.add_argument("--debug", action="store_true")
    add_group(pre, "", "command", opt_cls.model_fields, {}, cmd.positional, lenient=True)
    pre_ns, _ = pre.parse_known_args(rest)
    model_fields = None
    training_fields: set[str] = set()
    if cmd.trains:
        from so3lib.models import available, hyperparameters
        from so3lib.training.config import TrainingConfig

        model_fields = {m: set(hyperparameters(m)) for m in available()}
        training_fields = set(TrainingConfig.model_fields)
    raw: dict[str, Any] = {}
    file_cmd: dict[str, Any] = {}
    if pre_ns.config and cmd.name == "sweep":  # a sweep file has its own schema (see so3lib.workflows.sweeps)
        file_cmd = {"sweep": pre_ns.config}
    elif pre_ns.config:
        raw = load_yaml(pre_ns.config)
    name_in_file, from_file = split_config(
        raw,
        pre_ns.config,
        cmd.name,
        set(opt_cls.model_fields),
        model_fields,
        training_fields,
        getattr(pre_ns, "model", None) if cmd.trains else None,
    )
    from_file["command"].update(file_cmd)
    parser = _Parser(
        prog=f"so3lib {cmd.name}",
        description=(module.__doc__ or "").strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="YAML", help="options from a YAML file (snake_case keys); flags win")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    defaults_cmd = dict(from_file["command"])
    fields = opt_cls.model_fields
    if cmd.trains:
        init_from = pre_ns.init_from or from_file["training"].get("init_from")
        init_model = None
        if init_from:  # fine-tuning: the run's model is the default; a contradicting option is refused later
            from so3lib.training.finetune import init_model as _init_model

            init_model = _init_model(init_from)
        model = pre_ns.model or name_in_file or (init_model.name if init_model else "schnet")
        if model not in model_fields:
            raise UsageError(f"unknown model '{model}'; registered models: {', '.join(sorted(model_fields))}")
        known_cmd = {**from_file["command"], **given(pre_ns, cmd.positional)["command"]}
        preset = module.preset(model, known_cmd)
        defaults_cmd = {**preset.options, **from_file["command"]}
        defaults_model = {**preset.model, **from_file["model"]}
        if init_model is not None and init_model.name == model:
            view = {k: v for k, v in init_model.config_view().items() if k != "name"}
            defaults_model = {**preset.model, **view, **from_file["model"]}
        defaults_training = {**preset.training, **from_file["training"]}
        add_group(parser, f"{cmd.name} options", "command", fields, defaults_cmd, cmd.positional, owner=opt_cls)
        parser.add_argument(
            "--model",
            metavar="{" + ",".join(sorted(model_fields)) + "}",
            choices=sorted(model_fields),
            default=model,
            help=f"the model (default: schnet). The model options below are {model}'s; "
            f"'so3lib {cmd.name} --model NAME --help' lists another model's",
        )
        add_group(parser, f"{model} options", "model", hyperparameters(model), defaults_model)
        add_group(parser, "training options", "training", TrainingConfig.model_fields, defaults_training)
        own = set(opt_cls.model_fields) | model_fields[model] | training_fields | {"config", "debug", "model", "help"}
        _check_flag_names(rest, own, model_fields, model)
    else:
        add_group(parser, f"{cmd.name} options", "command", fields, defaults_cmd, cmd.positional, owner=opt_cls)
    ns = parser.parse_args(rest)
    flags = given(ns, cmd.positional)
    from pydantic import ValidationError

    try:
        opts = opt_cls(**{**defaults_cmd, **flags["command"]})
    except ValidationError as exc:
        raise UsageError(f"so3lib {cmd.name}: {validation_message(exc)}") from None
    if not cmd.trains:
        return Parsed(cmd, module, opts)
    from so3lib.models import make_config

    try:
        training = TrainingConfig(**{**defaults_training, **flags["training"]})
    except ValidationError as exc:
        raise UsageError(f"training options: {validation_message(exc)}") from None
    model_cfg = make_config(model, **{**defaults_model, **flags["model"]})
    from so3lib.training.config import uncertainty_conflict

    problem = uncertainty_conflict(model_cfg, training)
    if problem:
        raise UsageError(problem)
    return Parsed(cmd, module, opts, model_cfg, training)


def run_parsed(p: Parsed, argv: Sequence[str]) -> dict[str, Any]:
    _logging(getattr(p.options, "progress", False))
    if p.command.trains:
        return p.module.run(p.options, p.model, p.training)
    if p.command.name == "sweep":
        return p.module.run(p.options, _without(list(argv[1:]), "--workers"))
    return p.module.run(p.options)


def _without(argv: list[str], flag: str) -> list[str]:
    """argv without ``flag VALUE`` (a sweep's workers get the rest)."""
    out, skip = [], False
    for tok in argv:
        if skip:
            skip = False
        elif tok == flag:
            skip = True
        elif not tok.startswith(flag + "="):
            out.append(tok)
    return out


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("absl", "jax._src", "orbax", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def report(name: str, res: dict) -> None:
    """What a person reads at the end of a command."""
    if name == "train":
        print(json.dumps({k: res[k] for k in ("test", "val", "train_time_s", "n_parameters") if k in res}, indent=2))
        print(f"run folder: {res['out']}")
    elif name == "md17":
        print(res["table"])
        print(f"results: {res['out']}/results.md")
    elif name in ("spice", "train") and res.get("process_id"):  # a process of a multi-process run other than 0
        print(f"process {res['process_id']}: {res['steps']} steps done; process 0 wrote the run folder (its --out)")
    elif name == "spice":
        print(res["table"])
        print(f"results: {res['out']}/results.json, {res['out']}/results.md")
    elif name == "sweep":
        print(f"sweep folder: {res['out']}")
    elif name == "active":
        for s, recs in res["history"].items():
            curve = ", ".join(f"{r['n_train']}: {1e3 * r['test']['forces_mae_ev_per_a']:.1f}" for r in recs)
            print(f"{s}: test force MAE (meV/Å) by training frames: {curve}")
        print(f"results: {res['out']}/active_learning.json")
    elif name == "md":
        verdict = {"stable": "stable", "heated": "stable structure, but heated above the target"}.get(
            res["verdict"], f"FAILED: {res['failure']}"
        )
        print(
            f"MD {res['ensemble']} {res['steps']} steps, {res['steps_per_s']:.0f} steps/s "
            f"({res['atom_steps_per_s']:.3g} atom-steps/s); {verdict}"
        )
        if res.get("nve_drift_mev_per_atom_per_ps") is not None:  # null for a run that failed
            print(f"NVE drift {res['nve_drift_mev_per_atom_per_ps']:.3f} meV/atom/ps")
        if "uncertainty" in res:
            u = res["uncertainty"]
            first = u["first_above"]
            print(
                f"ensemble force std: max {u['max_forces_std_ev_per_a']:.3g} eV/Å; "
                + (
                    "never above the threshold"
                    if first is None
                    else f"above the threshold from {first['time_fs']:g} fs"
                )
                + (" (stopped there)" if u["stopped"] else "")
            )
        print(f"results: {res['out']}/md_results.json")
    elif name == "predict":
        print(json.dumps(res["metrics"], indent=2))
        print(f"predictions: {res['predictions']}")
    elif name == "export":
        progs = ", ".join(f"{v['file']} ({v['bytes'] / 1e6:.2f} MB)" for v in res["programs"].values())
        print(
            f"exported {res['model']['family']} ({', '.join(res['elements'])}; cutoff {res['cutoff_angstrom']} Å; "
            f"{res['dtype']}) for {', '.join(res['platforms'])}: {progs}"
        )
        print(f"export folder: {res['out']} (export.json describes the inputs and outputs)")
    elif name == "inspect":
        from so3lib.workflows.inspect import text

        print(text(res))
    elif name == "descriptors":
        print(res["description"])
        print(
            "magnitude hierarchy (mean |G|): "
            + " > ".join(f"{k} ({res['per_kind'][k]['mean_abs']:.3g})" for k in res["hierarchy"])
        )
        print(f"wrote {res['out']}/")


def invoke(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run ``so3lib ARGV`` and return the workflow's result; errors are raised, not printed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_overview())
        return {}
    if argv[0] == "--version":
        print(f"so3lib {__version__}")
        return {}
    parsed = parse(argv)
    res = run_parsed(parsed, argv)
    if parsed.command.name == "inspect" and parsed.options.json_only:
        print(json.dumps(res, indent=2, default=str))
    else:
        report(parsed.command.name, res)
    return res


def _peer_failure(exc: Exception) -> Exception:
    """In a run of several processes, a collective that failed because another process went away becomes the
    one line that says so (`so3lib.training.distributed.collective_failure`); any other error stays itself."""
    if "jax" not in sys.modules:
        return exc
    from so3lib.training import distributed

    if not distributed.started():
        return exc
    return distributed.collective_failure(exc, during="while running") or exc


def _user_errors() -> tuple[type[BaseException], ...]:
    from pydantic import ValidationError

    from so3lib.data.errors import DataError
    from so3lib.training.distributed import DistributedError
    from so3lib.training.loop import NonFiniteLossError

    return (
        UsageError,
        DataError,
        DistributedError,
        ValidationError,
        FileNotFoundError,
        FileExistsError,
        ValueError,
        KeyError,
        MemoryError,
        ImportError,  # an optional dependency that is not installed (the message says how to install it)
        NonFiniteLossError,  # a run that diverged: a training outcome, the message names the step and checkpoint
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: exit status 0 on success, 2 on a user error (one line on stderr), 1 otherwise."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from so3lib.cli.host_memory import keep_freed_memory

    keep_freed_memory()  # this process's allocator: XLA's step buffers reused, not re-faulted every step
    code = _main(argv)
    if code and "jax" in sys.modules:
        from so3lib.training import distributed

        if distributed.started():  # one of several processes: stop now, so the others see it go at once
            distributed.exit_now(code)
    return code


def _main(argv: list[str]) -> int:
    debug = "--debug" in argv
    try:
        invoke(argv)
    except SystemExit as exc:  # --help, and sweep workers that failed
        if isinstance(exc.code, str):
            print(f"so3lib: error: {exc.code}", file=sys.stderr)
            return 1
        return int(exc.code or 0)
    except KeyboardInterrupt:
        print("so3lib: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        exc = _peer_failure(exc)
        msg = " ".join(str(exc).split()) or type(exc).__name__
        if isinstance(exc, _user_errors()):
            if isinstance(exc, KeyError):
                msg = msg.strip("'\"")
            print(f"so3lib: error: {msg}", file=sys.stderr)
            return 2
        print(
            f"so3lib: internal error: {type(exc).__name__}: {msg} (run with --debug for the traceback)", file=sys.stderr
        )
        return 1
    return 0
