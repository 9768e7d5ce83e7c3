"""Typed stage configs: one dataclass per stage, filled from defaults < YAML < ``key=value`` < ``--flags``.

Every field is declared once with :func:`option`, which carries its help text and unit; the CLI options,
``sepo <cmd> --help`` and ``docs/config-reference.md`` are all generated from that one declaration.

Nested dataclass fields (e.g. ``PipelineConfig.train``) are YAML sections and take dotted overrides
(``train.learning_rate=1e-5``). A stage validates its values in ``__post_init__`` by raising ConfigError.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from sepo.errors import ConfigError

T = TypeVar("T")
_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    unit: str | None = None,
    choices: tuple | list | None = None,
    positional: bool = False,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """Declare a config field with its documentation. ``positional`` fields are CLI arguments, not flags."""
    meta = {"help": help, "unit": unit, "choices": tuple(choices) if choices else None, "positional": positional}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: json.loads(json.dumps(value)), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# --------------------------------------------------------------------------- type conversion


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
        return tp, True
    return tp, False


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def convert(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value or a command-line string to the field type ``tp``; ConfigError names ``key``."""
    inner, optional = _strip_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "~")):
        if optional or inner is Any:
            return None
        raise ConfigError(f"config key '{key}' must not be empty")
    origin = typing.get_origin(inner)
    try:
        if inner is Any:
            return value
        if _is_config(inner):
            if isinstance(value, inner):
                return value
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}' must be a mapping (a YAML section), got {value!r}")
            return from_dict(inner, value, prefix=f"{key}.")
        if inner is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in _TRUE:
                return True
            if s in _FALSE:
                return False
            raise ValueError
        if inner is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                f = float(value)
                if not f.is_integer():
                    raise ValueError
                return int(f)
            return int(value)
        if inner is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if inner is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        if origin is list or inner is list:
            (item_tp,) = typing.get_args(inner) or (str,)
            if isinstance(value, str) and value.strip().startswith("[") and value.strip().endswith("]"):
                value = yaml.safe_load(value)  # `seeds=[0,1]` as YAML and the sweep's axes write it
            if isinstance(value, str):
                value = [v for v in (p.strip() for p in value.split(",")) if v] if value.strip() else []
            if not isinstance(value, (list, tuple)):
                value = [value]
            return [convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        if origin is dict or inner is dict:
            args = typing.get_args(inner)
            val_tp = args[1] if len(args) == 2 else str
            if isinstance(value, str):
                pairs = {}
                for part in (p.strip() for p in value.split(",")):
                    if not part:
                        continue
                    if "=" not in part:
                        raise ValueError
                    k, v = part.split("=", 1)
                    pairs[k.strip()] = v.strip()
                value = pairs
            if not isinstance(value, dict):
                raise ValueError
            return {str(k): convert(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    except ConfigError:
        raise
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise ConfigError(f"config key '{key}' must be of type {_type_name(tp)}, got {value!r}")


def _type_name(tp: Any) -> str:
    inner, optional = _strip_optional(tp)
    name = getattr(inner, "__name__", None) or str(inner).replace("typing.", "")
    if typing.get_origin(inner) in (list, dict):
        name = str(inner).replace("typing.", "")
    return f"{name} or none" if optional else name


def _fields(cls) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        f.type = hints.get(f.name, f.type)
        out[f.name] = f
    return out


def _unknown(key: str, known: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=3)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else f"; known keys: {', '.join(sorted(known))}"
    return ConfigError(f"unknown config key '{key}'{where}{hint}")


def from_dict(cls: type[T], data: dict, *, prefix: str = "", source: str = "") -> T:
    """Build ``cls`` from a (possibly nested) mapping, rejecting unknown keys with a suggestion."""
    fields = _fields(cls)
    where = f" in {source}" if source else ""
    kwargs = {}
    for key, value in (data or {}).items():
        if key not in fields:
            raise _unknown(prefix + str(key), [prefix + k for k in fields], where)
        kwargs[key] = convert(value, fields[key].type, prefix + key)
    try:
        return cls(**kwargs)
    except TypeError as e:
        missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"missing required config key(s){where}: {', '.join(prefix + m for m in missing)}") from None
        raise ConfigError(str(e)) from None


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys at the top level")
    return data


def apply_override(data: dict, key: str, value: Any, cls: type) -> None:
    """Set a dotted ``key`` in nested ``data``, checking every part of the key against ``cls``."""
    parts = key.split(".")
    if len(parts) == 1 and parts[0] not in _fields(cls):
        # `max_length=256` means `data_options.max_length=256` when exactly one section has that field,
        # the same rule that gives section fields their flat --flags
        owners = [name for name, f in _fields(cls).items()
                  if _is_config(_strip_optional(f.type)[0]) and parts[0] in _fields(_strip_optional(f.type)[0])]
        if len(owners) == 1:
            parts = [owners[0], parts[0]]
    node, tp = data, cls
    for i, part in enumerate(parts):
        fields = _fields(tp)
        if part not in fields:
            raise _unknown(".".join(parts[: i + 1]), [".".join([*parts[:i], f]) for f in fields], " (command line)")
        if i == len(parts) - 1:
            node[part] = value
            return
        inner, _ = _strip_optional(fields[part].type)
        if typing.get_origin(inner) is dict or inner is dict:
            # a free-form mapping field (e.g. PipelineConfig.train): the rest of the key is nested mapping keys
            for sub in parts[i + 1 : -1]:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"config key '{key}': '{part}' must be a mapping")
                part = sub
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key '{key}': '{part}' must be a mapping")
            node[parts[-1]] = value
            return
        if not _is_config(inner):
            raise ConfigError(f"config key '{'.'.join(parts[: i + 1])}' is not a section; cannot set '{key}'")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{'.'.join(parts[: i + 1])}' must be a mapping")
        tp = inner


def load(cls: type[T], path: str | Path | None = None, overrides: dict[str, Any] | list[str] | None = None) -> T:
    """defaults < YAML file < overrides (``{"a.b": v}`` or ``["a.b=v", ...]``)."""
    data = load_yaml(path) if path else {}
    if isinstance(overrides, list):
        overrides = dict(_split_override(o) for o in overrides)
    for key, value in (overrides or {}).items():
        apply_override(data, key, value, cls)
    return from_dict(cls, data, source=str(path) if path else "")


def _split_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value")
    k, v = text.split("=", 1)
    return k.strip(), v


# --------------------------------------------------------------------------- CLI


def _describe(f: dataclasses.Field) -> str:
    help_ = f.metadata.get("help", "")
    unit = f.metadata.get("unit")
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        default = "required"
    extra = f"default: {default!r}" if default != "required" else "required"
    if unit:
        extra += f"; unit: {unit}"
    choices = f.metadata.get("choices")
    if choices:
        extra += f"; one of {', '.join(map(str, choices))}"
    return f"{help_} [{extra}]".replace("%", "%%")


def override_example(cls: type) -> str:
    """A ``key=value`` that ``cls`` accepts, shown in its --help: a key of its first section (``data_options.split=
    train``) when it has one, else its first plain key, with the default as the value."""
    fields = _fields(cls)
    sections = [(n, _strip_optional(f.type)[0]) for n, f in fields.items() if _is_config(_strip_optional(f.type)[0])]
    for prefix, owner in [*((f"{n}.", s) for n, s in sections), ("", cls)]:
        for name, f in _fields(owner).items():
            if (f.metadata.get("positional") or f.default is dataclasses.MISSING or f.default is None
                    or isinstance(f.default, bool) or name in ("output", "overwrite")):
                continue
            if isinstance(f.default, (int, float, str)):
                return f"{prefix}{name}={f.default}"
    return ""


def help_epilog(cls: type, prog: str, examples: list[str] = ()) -> str:
    """The end of ``--help``: complete example command lines (each one parses: tests/unit/test_help_examples.py)
    and how keys are set."""
    example = override_example(cls)
    lines = ["examples:", *(f"  {e}" for e in examples), ""] if examples else []
    return "\n".join([*lines, "Any key can also be set as key=value, a key inside a section with a dot"
                      + (f" (e.g. {example})" if example else "") + ".",
                       "Precedence: defaults < --config YAML < key=value < --flags."])


def build_parser(cls: type, prog: str, description: str = "", examples: list[str] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=help_epilog(cls, prog, examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,  # keeps the examples one per line
    )
    parser.add_argument("--config", default=None, help="YAML file with config keys [default: none]")
    positional = [n for n, f in _fields(cls).items() if f.metadata.get("positional")]
    parser.add_argument(
        "args", nargs="*", metavar=" ".join(p.upper() for p in positional) + (" " if positional else "") + "[key=value ...]",
        help=", ".join(f"{p.upper()}: {_describe(_fields(cls)[p])}" for p in positional) or argparse.SUPPRESS,
    )
    top = _fields(cls)
    flags: list[tuple[str, str, dataclasses.Field]] = []  # (flag name, dotted key, field)
    for name, f in top.items():
        if f.metadata.get("positional"):
            continue
        inner, _ = _strip_optional(f.type)
        if _is_config(inner):
            # one level of sections gets flat flags (--max-length for data_options.max_length) when unambiguous
            for sub, sf in _fields(inner).items():
                if not _is_config(_strip_optional(sf.type)[0]) and sub not in top:
                    flags.append((sub, f"{name}.{sub}", sf))
            continue
        flags.append((name, name, f))
    seen = {}
    for flag_name, _, _ in flags:
        seen[flag_name] = seen.get(flag_name, 0) + 1
    for flag_name, key, f in flags:
        if seen[flag_name] > 1:
            continue
        inner, _ = _strip_optional(f.type)
        kw: dict[str, Any] = {"dest": "flag:" + key, "default": argparse.SUPPRESS, "help": _describe(f)}
        if inner is bool:
            kw["action"] = argparse.BooleanOptionalAction  # --flag / --no-flag
        else:
            kw["metavar"] = flag_name.upper()
        parser.add_argument("--" + flag_name.replace("_", "-"), **kw)
    return parser


def parse_cli(cls: type[T], argv: list[str], prog: str, description: str = "", examples: list[str] = ()) -> T:
    """Parse ``[--config YAML] [POSITIONAL ...] [key=value ...] [--flag value ...]`` into ``cls``."""
    parser = build_parser(cls, prog, description, examples)
    ns = parser.parse_intermixed_args(argv)
    fields = _fields(cls)
    positional = [n for n, f in fields.items() if f.metadata.get("positional")]
    config_path = ns.config
    overrides: dict[str, Any] = {}
    free = []
    for arg in ns.args:
        key = arg.split("=", 1)[0]
        if "=" in arg and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", key):
            overrides[key] = arg.split("=", 1)[1]  # unknown keys are rejected by load() with a suggestion
        elif config_path is None and arg.endswith((".yaml", ".yml")) and "config" not in fields:
            config_path = arg
        else:
            free.append(arg)
    if len(free) > len(positional):
        parser.error(f"unexpected argument(s): {' '.join(free[len(positional):])}")
    for name, value in zip(positional, free):
        overrides[name] = value
    for dest, value in vars(ns).items():
        if dest.startswith("flag:"):
            overrides[dest[len("flag:"):]] = value
    return load(cls, config_path, overrides)


def reference_markdown(cls: type, title: str | None = None, prefix: str = "") -> str:
    """A Markdown table of every field (nested sections recursively), for docs/config-reference.md."""
    lines = []
    if title:
        lines += [f"### {title}", ""]
        if cls.__doc__:
            lines += [cls.__doc__.strip().splitlines()[0], ""]
    lines += ["| key | type | default | unit | description |", "|---|---|---|---|---|"]
    nested = []
    for name, f in _fields(cls).items():
        inner, _ = _strip_optional(f.type)
        if _is_config(inner):
            nested.append((name, inner))
            lines.append(f"| `{prefix}{name}` | section | see below | | {f.metadata.get('help', '')} |")
            continue
        if f.default is not dataclasses.MISSING:
            default = f"`{f.default!r}`"
        elif f.default_factory is not dataclasses.MISSING:
            default = f"`{f.default_factory()!r}`"
        else:
            default = "required"
        help_ = f.metadata.get("help", "").replace("|", "\\|")
        choices = f.metadata.get("choices")
        if choices:
            help_ += f" One of: {', '.join(f'`{c}`' for c in choices)}."
        lines.append(f"| `{prefix}{name}` | {_type_name(f.type)} | {default} | {f.metadata.get('unit') or ''} | {help_} |")
    for name, inner in nested:
        lines += ["", reference_markdown(inner, title=f"`{prefix}{name}.*` ({inner.__name__})", prefix=f"{prefix}{name}.")]
    return "\n".join(lines)


def check_choice(cfg: Any, name: str) -> None:
    """Raise ConfigError when ``cfg.name`` is not one of the field's declared choices."""
    f = _fields(type(cfg))[name]
    choices = f.metadata.get("choices")
    value = getattr(cfg, name)
    if choices and value not in choices:
        raise ConfigError(f"config key '{name}' is {value!r}; choose one of: {', '.join(map(str, choices))}")


def validate_choices(cfg: Any) -> None:
    """Check every field that declares choices; call from ``__post_init__``."""
    for name, f in _fields(type(cfg)).items():
        if f.metadata.get("choices"):
            check_choice(cfg, name)
