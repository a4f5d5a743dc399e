"""Command-line flags and YAML keys generated from any config dataclasses.

Each field becomes `--field-name` (or the name in `field(metadata={"flag": ...})`), with
its docstring (or trailing `# comment`) as help; bools are `--flag/--no-flag`; `list[T]`
takes several values; `X | None` accepts `none`; a field whose type is a dataclass
contributes its own fields as flags. Two fields may share a flag if they have the same
type: one value then sets both. `--config file.yaml` sets any flag (keys with `-` or
`_`); flags given on the command line override the file; an unknown key is an error.

slime's flag names are accepted too, on the command line and in YAML (`orchestrator.slime_compat` is the
table; `compat=False` turns it off): aliases set Kiln's flag, flags meaningless in Kiln warn once, flags
Kiln cannot honour are refused with one line saying why.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Sequence

import yaml

from kiln_common.dataclass_docs import field_docs
from orchestrator import slime_compat

_NONE_WORDS = ("none", "null")


class ConfigError(ValueError):
    """A config file or value that does not fit the config dataclasses."""


@dataclasses.dataclass
class _Flag:
    name: str  # without dashes, e.g. "rollout-batch-size"
    type: Any
    fields: list[tuple[type, tuple[str, ...]]]  # (top-level dataclass, field path) it sets
    help: str
    default: Any


def _split_optional(tp: Any) -> tuple[Any, bool]:
    """(T, True) for `T | None` / Optional[T], else (tp, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
        raise TypeError(f"unsupported union type {tp}: only `T | None` is supported")
    return tp, False


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Coerce a YAML or command-line value to the field type `tp`, or raise ConfigError naming `where`."""
    inner, optional = _split_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in _NONE_WORDS):
        if optional:
            return None
        raise ConfigError(f"{where}: None is not allowed; expected {_type_name(inner)}")
    origin = typing.get_origin(inner)
    if origin is typing.Literal:
        choices = typing.get_args(inner)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (list, tuple):
        elem = (typing.get_args(inner) or (Any,))[0]
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        out = [_convert(v, elem, where) for v in value]
        return tuple(out) if origin is tuple else out
    if origin is dict or inner is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: expected a JSON object, got {value!r} ({e})") from e
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    if inner is Any:
        return value
    if isinstance(inner, type) and issubclass(inner, enum.Enum):
        try:
            return value if isinstance(value, inner) else inner(value)
        except ValueError:
            raise ConfigError(f"{where}: {value!r} is not one of {[m.value for m in inner]}") from None
    if inner is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if inner is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if inner is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if inner is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if inner is Path:
        return Path(value)
    raise TypeError(f"{where}: unsupported field type {inner}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _collect_flags(config_classes: Sequence[type]) -> dict[str, _Flag]:
    flags: dict[str, _Flag] = {}
    for cls in config_classes:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls!r} is not a dataclass")
        _add_fields(flags, cls, cls, ())
    return flags


def _add_fields(flags: dict[str, _Flag], top: type, cls: type, prefix: tuple[str, ...]) -> None:
    """Add a flag per field of `cls` (nested dataclass fields recursively) that sets top's field at prefix+name."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, path = hints[f.name], prefix + (f.name,)
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            _add_fields(flags, top, tp, path)
            continue
        name = f.metadata.get("flag", f.name.replace("_", "-"))
        where = f"{top.__name__}.{'.'.join(path)}"
        if name == "config":
            raise ValueError(f"{where}: the flag name 'config' is reserved for --config")
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        if name in flags:
            flag = flags[name]
            if flag.type != tp:
                other = ", ".join(f"{c.__name__}.{'.'.join(p)}" for c, p in flag.fields)
                raise ValueError(f"flag --{name} of {where} ({tp}) clashes with {other} ({flag.type}); "
                                 f"give one a different metadata 'flag'")
            flag.fields.append((top, path))
            continue
        flags[name] = _Flag(name, tp, [(top, path)], f.metadata.get("help", docs.get(f.name, "")), default)


class KilnArgumentParser(argparse.ArgumentParser):
    """argparse, with slime's flag names translated to Kiln's first (see `orchestrator.slime_compat`)."""

    def __init__(self, *args: Any, flags: dict[str, _Flag] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kiln_flags = flags  # None: no slime translation

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:
        if self.kiln_flags is not None:
            import sys
            try:
                args = _translate_argv(list(sys.argv[1:] if args is None else args), self.kiln_flags)
            except slime_compat.CompatError as e:
                self.error(str(e))
        return super().parse_known_args(args, namespace)


_NUMBER = re.compile(r"-\.?\d")


def _translate_argv(argv: list[str], flags: dict[str, _Flag]) -> list[str]:
    """The command line with slime's flags turned into Kiln's (or dropped with a warning, or CompatError)."""
    head: list[str] = []  # tokens before the first --flag, and single-dash options
    items: list[tuple[str, list[str]]] = []
    rest: list[str] = []
    for i, tok in enumerate(argv):
        if tok == "--":
            rest = argv[i:]
            break
        if tok.startswith("--"):
            name, eq, value = tok[2:].partition("=")
            items.append((name, [value] if eq else []))
        elif tok.startswith("-") and not _NUMBER.match(tok):
            head.append(tok)
        elif items:
            items[-1][1].append(tok)
        else:
            head.append(tok)
    out = list(head)
    for name, value in slime_compat.translate(items, flags):
        if isinstance(value, list):
            out += [f"--{name}", *value]
        elif isinstance(value, bool) and name in flags and _split_optional(flags[name].type) == (bool, False):
            out.append(f"--{name}" if value else f"--no-{name}")
        else:
            out += [f"--{name}", str(value)]
    return out + rest


def build_parser(config_classes: Sequence[type], prog: str | None = None,
                 description: str | None = None, compat: bool = True) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of the given dataclasses, plus --config.

    With `compat`, slime's names of these flags are accepted too (and listed in --help)."""
    flags = _collect_flags(config_classes)
    epilog = ("slime's flags are accepted too: aliases set the Kiln flag they are listed with; flags that mean "
              "nothing in Kiln warn once; see docs/from_slime.md") if compat else None
    parser = KilnArgumentParser(prog=prog, description=description, epilog=epilog,
                                flags=flags if compat else None)
    parser.add_argument("--config", default=None, help="YAML file setting any of the flags below")
    aliases: dict[str, list[slime_compat.Alias]] = {}
    if compat:
        for alias in slime_compat.tables(list(flags))[0].values():
            aliases.setdefault(alias.kiln, []).append(alias)
    for cls in config_classes:
        doc = (cls.__doc__ or "").strip()
        group = parser.add_argument_group(cls.__name__, doc.splitlines()[0] if doc else None)
        for flag in flags.values():
            if flag.fields[0][0] is cls:
                _add_flag(group, flag, aliases.get(flag.name, []))
    return parser


def _add_flag(group: argparse._ArgumentGroup, flag: _Flag, aliases: Sequence[slime_compat.Alias] = ()) -> None:
    inner, optional = _split_optional(flag.type)
    dest = flag.name.replace("-", "_")
    kwargs: dict[str, Any] = {"dest": dest, "help": flag.help or " ",
                              "default": argparse.SUPPRESS}
    where = f"--{flag.name}"
    names = [f"--{flag.name}"] + [f"--{a.slime}" for a in aliases if a.takes_value]
    if flag.default is dataclasses.MISSING:
        kwargs["help"] += " (required)"
    else:
        kwargs["help"] += f" (default: {flag.default!r})"
    switches = [f"--{a.slime} (= {a.const!r})" for a in aliases if not a.takes_value]
    if len(names) > 1 or switches:
        kwargs["help"] += " [slime: " + ", ".join(names[1:] + switches) + "]"
    if inner is bool and not optional:
        group.add_argument(*names, action=argparse.BooleanOptionalAction, **kwargs)
        return
    origin = typing.get_origin(inner)
    if origin in (list, tuple):
        elem = (typing.get_args(inner) or (str,))[0]
        kwargs["nargs"] = "*"
        kwargs["type"] = _argparse_type(elem, where)
        kwargs["metavar"] = _type_name(elem).upper()
    else:
        kwargs["type"] = _argparse_type(flag.type, where)
        if origin is typing.Literal:
            kwargs["metavar"] = "{" + ",".join(map(str, typing.get_args(inner))) + "}"
        else:
            kwargs["metavar"] = _type_name(inner).upper()
    group.add_argument(*names, **kwargs)


def _argparse_type(tp: Any, where: str):
    def convert(text: str) -> Any:
        try:
            return _convert(text, tp, where)
        except ConfigError as e:  # argparse names the flag itself: "argument --x: expected ..."
            raise argparse.ArgumentTypeError(str(e).removeprefix(f"{where}: ")) from None
    convert.__name__ = _type_name(tp)
    return convert


def load_yaml(path: str | Path, config_classes: Sequence[type], compat: bool = True) -> dict[str, Any]:
    """Read a YAML config file into {flag name: converted value}; unknown keys raise ConfigError.

    With `compat`, slime's names are translated as on the command line (see `orchestrator.slime_compat`)."""
    flags = _collect_flags(config_classes)
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of flag names to values, got {type(data).__name__}")
    keys = {str(key).lstrip("-").replace("_", "-"): key for key in data}
    items = [(name, data[key]) for name, key in keys.items()]
    if compat:
        try:
            items = slime_compat.translate(items, flags)
        except slime_compat.CompatError as e:
            raise ConfigError(f"config file {path}: {e}") from None
    out: dict[str, Any] = {}
    for name, value in items:
        key = keys.get(name, name.replace("-", "_"))
        if name not in flags:
            names = list(flags) + (list(slime_compat.tables(list(flags))[0]) if compat else [])   # slime's aliases
            close = difflib.get_close_matches(name, names, n=3)
            hint = f"; did you mean {', '.join(c.replace('-', '_') for c in close)}?" if close else ""
            raise ConfigError(f"config file {path}: unknown key {key!r}{hint}")
        out[name] = _convert(value, flags[name].type, f"config file {path}: key {key!r}")
    return out


def parse_configs(config_classes: Sequence[type], argv: Sequence[str] | None = None,
                  prog: str | None = None) -> tuple:
    """Parse argv (and its --config YAML) into one instance per dataclass, in the given order."""
    parser = build_parser(config_classes, prog=prog)
    namespace = parser.parse_args(argv)
    values = load_yaml(namespace.config, config_classes) if namespace.config else {}
    for name, value in vars(namespace).items():
        if name != "config":
            values[name.replace("_", "-")] = value
    return instantiate(config_classes, values)


def instantiate(config_classes: Sequence[type], values: dict[str, Any]) -> tuple:
    """Build the dataclasses from {flag name: value}; missing or invalid values raise ConfigError."""
    flags = _collect_flags(config_classes)
    kwargs: dict[type, dict[str, Any]] = {cls: {} for cls in config_classes}
    for name, value in values.items():
        if name not in flags:
            raise ConfigError(f"unknown flag --{name}")
        for cls, path in flags[name].fields:
            node = kwargs[cls]
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = value
    return tuple(_build(cls, kwargs[cls]) for cls in config_classes)


def _build(cls: type, kwargs: dict[str, Any]) -> Any:
    """cls(**kwargs), nested dataclass fields built from their sub-dicts first."""
    hints = typing.get_type_hints(cls)
    kwargs = {k: _build(hints[k], v) if isinstance(v, dict) and dataclasses.is_dataclass(hints[k]) else v
              for k, v in kwargs.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{cls.__name__}: {e}") from e
    except ValueError as e:
        raise ConfigError(str(e)) from e


def to_flag_values(configs: Sequence[Any]) -> dict[str, Any]:
    """{flag name: value} of config instances (the inverse of `instantiate`)."""
    by_type = {type(c): c for c in configs}
    out: dict[str, Any] = {}
    for name, flag in _collect_flags(list(by_type)).items():
        cls, path = flag.fields[0]
        value = by_type[cls]
        for part in path:
            value = getattr(value, part)
        out[name] = value.value if isinstance(value, enum.Enum) else value
    return out


def dump_yaml(configs: Sequence[Any]) -> str:
    """A YAML config file that `--config` reads back into the same config instances."""
    values = {name.replace("-", "_"): (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
              for name, v in to_flag_values(configs).items()}
    return yaml.safe_dump(values, sort_keys=False)
