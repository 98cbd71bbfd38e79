"""Options of a command from three layers: the workflow's preset for the chosen model, a YAML config file
(``--config``), and flags, each overriding the one before. Flags are generated from the typed option models
(the command's own, the model's hyper-parameters, `TrainingConfig`), so a new option needs no CLI code."""

from __future__ import annotations

import argparse
import difflib
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

GROUPS = ("command", "model", "training")
_PATHS = {
    "train",
    "val",
    "test",
    "data",
    "out",
    "run",
    "structure",
    "store",
    "file",
    "path",
    "sweep",
    "data_dir",
    "download_dir",
    "config",
    "e0s",
    "init_from",
}


class UsageError(Exception):
    """A user error at the command line or in a config file (printed as one line, exit status 2)."""


TRUE, FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def parse_bool(text: str) -> bool:
    """true/yes/1/on or false/no/0/off (any case); anything else is an error, never a silent False."""
    s = str(text).strip().lower()
    if s in TRUE:
        return True
    if s in FALSE:
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean '{text}' (use true or false)")


def _or_none(fn):
    def parse(text: str):
        return None if str(text).strip().lower() in ("none", "null") else fn(text)

    parse.__name__ = getattr(fn, "__name__", "value")
    return parse


def _scalar(tp) -> tuple[Any, str] | None:
    if tp is bool:
        return parse_bool, "{true,false}"
    if tp is int:
        return int, "INT"
    if tp is float:
        return float, "FLOAT"
    if tp is str:
        return str, "TEXT"
    return None


class Flag(typing.NamedTuple):
    type: Any
    metavar: str | tuple | None
    choices: list | None = None
    nargs: str | int | None = None
    action: str | None = None


def flag_for(name: str, annotation) -> Flag | None:
    """How a field becomes a flag, or None for values that only a config file can hold (lists of objects,
    fitted arrays)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        real = [a for a in args if a is not type(None)]
        inner = flag_for(name, real[0]) if real else None
        if inner is None:
            return None
        if type(None) in args:
            return inner._replace(type=_or_none(inner.type))
        return inner
    if origin is typing.Literal:
        lookup = {str(a): a for a in args}

        def choice(text: str):
            if text not in lookup:
                raise argparse.ArgumentTypeError(f"invalid choice '{text}' (choose from {', '.join(lookup)})")
            return lookup[text]

        return Flag(choice, "{" + ",".join(lookup) + "}")
    if origin in (tuple, list) and args:
        elem = _scalar(args[0])
        if elem is None or elem[0] is parse_bool:
            return None
        if origin is tuple and Ellipsis not in args:
            return Flag(elem[0], elem[1], nargs=len(args))
        if elem[0] is str:
            return Flag(str, elem[1], action="append")
        return Flag(elem[0], elem[1], nargs="+")
    s = _scalar(annotation)
    if s is None:
        return None
    fn, metavar = s
    if fn is str and name == "e0s":
        metavar = "METHOD|FILE"
    elif fn is str and name in _PATHS:
        metavar = "PATH"
    if fn is parse_bool:
        return Flag(fn, metavar, nargs="?")
    return Flag(fn, metavar)


def show(value) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(show(v) for v in value) if value else "[]"
    if isinstance(value, BaseModel):
        return str(value.model_dump(exclude_none=True))
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _own_first(fields: dict, owner) -> list:
    """A command's own options first, then the shared ones (run folder, label keys, E0s)."""
    own = set(getattr(owner, "__annotations__", {})) if owner is not None else set()
    return sorted(fields.items(), key=lambda kv: kv[0] not in own)


def add_group(
    parser, title: str, group: str, fields: dict, defaults: dict, positional=(), lenient=False, owner=None
) -> None:
    """Flags ``--name-with-dashes`` for ``fields`` (pydantic FieldInfo), shown with the defaults in effect.
    ``lenient``: positionals optional (a first pass that only looks for the options presets depend on)."""
    g = parser.add_argument_group(title)
    for name, info in _own_first(fields, owner):
        flag = flag_for(name, info.annotation)
        if flag is None:
            continue
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        dflt = defaults.get(name, info.default)
        required = info.is_required() and name not in defaults
        text = (info.description or "").strip()
        suffix = "(required)" if required else f"(default: {show(dflt)})"
        if dflt is None and "default" in text:  # the description says what None means
            suffix = ""
        if name in positional:
            g.add_argument(
                name,
                type=flag.type,
                nargs=None if required and not lenient else "?",
                default=argparse.SUPPRESS,
                metavar=name.upper(),
                help=f"{text} {suffix}".strip(),
            )
            continue
        kw: dict[str, Any] = {
            "dest": f"{group}:{name}",
            "type": flag.type,
            "default": argparse.SUPPRESS,
            "metavar": extra.get("metavar", flag.metavar),
            "help": argparse.SUPPRESS if extra.get("hidden") else f"{text} {suffix}".strip(),
        }
        if flag.action:
            kw["action"] = flag.action
        if flag.nargs is not None:
            kw["nargs"] = flag.nargs
        if flag.type is parse_bool:
            kw["const"] = True
        g.add_argument(f"--{name.replace('_', '-')}", **kw)
        if flag.type is parse_bool:
            g.add_argument(
                f"--no-{name.replace('_', '-')}",
                dest=f"{group}:{name}",
                action="store_const",
                const=False,
                default=argparse.SUPPRESS,
                help=argparse.SUPPRESS,
            )


def given(ns: argparse.Namespace, positional=()) -> dict[str, dict[str, Any]]:
    """{group: {option: value}} of the flags given on the command line."""
    out: dict[str, dict[str, Any]] = {g: {} for g in GROUPS}
    for key, value in vars(ns).items():
        if key in positional:
            out["command"][key] = value
        elif ":" in key:
            group, name = key.split(":", 1)
            out[group][name] = value
    return out


# ------------------------------------------------------------------------------------------ config files
def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{p}: no such config file")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise UsageError(f"{p}: not valid YAML ({' '.join(str(exc).split())})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UsageError(f"{p}: a config file is a mapping of option names to values, not a {type(raw).__name__}")
    return raw


def _unknown(path, key: str, command: str, known: set[str], other_models: dict[str, list[str]], model: str | None):
    if key in other_models:
        return UsageError(
            f"{path}: '{key}' is an option of model {', '.join(other_models[key])}, not of {model} "
            f"(set model: {other_models[key][0]}, or remove it)"
        )
    close = difflib.get_close_matches(key, sorted(known), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return UsageError(f"{path}: unknown option '{key}' for so3lib {command}{hint}")


def split_config(
    raw: dict[str, Any],
    path,
    command: str,
    command_fields: set[str],
    model_fields: dict[str, set[str]] | None,
    training_fields: set[str],
    model: str | None,
) -> tuple[str | None, dict[str, dict[str, Any]]]:
    """(model name, {group: values}) of a config file: flat option names (``model: schnet``, ``n_atom_basis:
    64``, ``max_steps: 100``, ...), or a run folder's own config.yaml (``model: {name: ...}``, ``training:
    {...}``, ``command: {name, options}``). ``model`` is the name given on the command line, if any."""
    raw = dict(raw)
    out: dict[str, dict[str, Any]] = {g: {} for g in GROUPS}
    section = raw.pop("command", None)
    if section is not None:
        if not isinstance(section, dict) or "name" not in section:
            raise UsageError(f"{path}: 'command' must be a mapping with the command's name and options")
        if section["name"] != command:
            raise UsageError(
                f"{path} was written by 'so3lib {section['name']}', not 'so3lib {command}': "
                f"run so3lib {section['name']} --config {path}"
            )
        out["command"].update(section.get("options") or {})
        raw.pop("data", None)  # derived from the command's options
    if model_fields is None:  # a command that trains nothing
        unknown = [k for k in raw if k not in command_fields]
        if unknown:
            raise _unknown(path, unknown[0], command, command_fields, {}, None)
        out["command"].update(raw)
        return None, out
    name_in_file = None
    m = raw.pop("model", None)
    if isinstance(m, dict):
        m = dict(m)
        name_in_file = m.pop("name", None)
        if name_in_file is None:
            raise UsageError(f"{path}: 'model' as a mapping needs a 'name' (one of {sorted(model_fields)})")
        nested_model = m
    else:
        name_in_file, nested_model = m, {}
    if name_in_file is not None and name_in_file not in model_fields:
        raise UsageError(f"{path}: unknown model '{name_in_file}'; registered models: {sorted(model_fields)}")
    chosen = model or name_in_file or "schnet"  # the default model
    if section is not None and model and name_in_file and model != name_in_file:
        raise UsageError(f"{path} holds a {name_in_file} run; --model {model} cannot reuse its model options")
    own = model_fields.get(chosen or "", set())
    other = {}
    for name, fields in model_fields.items():
        for f in fields - own:
            other.setdefault(f, []).append(name)
    for key, value in nested_model.items():
        if key not in own:
            raise _unknown(path, key, command, own, other, chosen)
        out["model"][key] = value
    t = raw.pop("training", None)
    if t is not None:
        if not isinstance(t, dict):
            raise UsageError(f"{path}: 'training' must be a mapping of training options")
        for key, value in t.items():
            if key not in training_fields:
                raise _unknown(path, key, command, training_fields, {}, chosen)
            out["training"][key] = value
    if section is not None:
        raw.pop("name", None)
    known = command_fields | own | training_fields
    for key, value in raw.items():
        if key in command_fields:
            out["command"][key] = value
        elif key in own:
            out["model"][key] = value
        elif key in training_fields:
            out["training"][key] = value
        else:
            raise _unknown(path, key, command, known, other, chosen)
    return name_in_file, out


def validation_message(exc: ValidationError, flags: bool = True) -> str:
    """One line naming each invalid option as its flag."""
    parts = []
    for e in exc.errors():
        loc = [str(x) for x in e["loc"] if not isinstance(x, int)]
        name = loc[0] if loc else ""
        where = f"--{name.replace('_', '-')}" if flags and name else name
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "missing":
            msg = "missing (give the flag, or the key in a --config file)"
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)
