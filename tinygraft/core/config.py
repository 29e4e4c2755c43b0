"""Typed configuration: dataclasses in, strict checking, TOML files and `key=value` overrides.

Every config in tinygraft is a dataclass with commented defaults. These helpers build one from a dict (a TOML file,
a saved `config.json`) and refuse anything they do not understand, naming it: an unknown key, or a value of the
wrong type, is a `TinygraftError`, never a silently ignored setting.

The settings a command line shows (a method's, a task's, a job's) are declared with `setting(default, help)`: the
default and the one-line help live on the field, and the command's flags are generated from them (tinygraft/cli/
flags.py), so no default is written twice. The flag is `--<field-name>` (underscores as dashes) unless `flag=` names
another; a boolean that defaults to True is turned off with `--no-<flag>`.
"""

import dataclasses
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from tinygraft.core.jsonfile import read_json
from tinygraft.errors import TinygraftError


def setting(default: Any, help: str, *, flag: str | None = None, factory=None, repeat: bool = False) -> Any:
    """A dataclass field that a command line shows: its default, its help, and (optionally) its flag's name;
    `repeat`: the flag may be given several times (then the value is the list of them)."""
    metadata = {"help": help, "flag": flag, "repeat": repeat}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag_name(f: dataclasses.Field) -> str:
    """The command-line flag of a `setting` field, without the leading dashes."""
    return f.metadata.get("flag") or f.name.replace("_", "-")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, where: str):
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in get_args(tp):
            return None
        errors = []
        for arg in get_args(tp):
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except TinygraftError as e:
                errors.append(e)
        raise TinygraftError(f"{where} must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            raise TinygraftError(f"{where} must be one of {choices}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise TinygraftError(f"{where} must be a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise TinygraftError(f"{where} must have {len(args)} items, got {len(value)}")
            items = [_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_tp = args[0] if args else Any
            items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return origin(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise TinygraftError(f"{where} must be a table, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise TinygraftError(f"{where} must be a table of {tp.__name__} settings, got {value!r}")
        return from_dict(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise TinygraftError(f"{where} must be true or false, got {value!r}")
    if tp is int and isinstance(value, bool):
        raise TinygraftError(f"{where} must be an integer, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise TinygraftError(f"{where} must be {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls, data: dict, where: str = "config"):
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types by name."""
    if not isinstance(data, dict):
        raise TinygraftError(f"{where} must be a table of settings, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise TinygraftError(
            f"unknown {where} key {unknown[0]!r} for {cls.__name__} (known: {', '.join(sorted(fields))})"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where != "config" else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise TinygraftError(f"invalid {where}: {e}") from None


def settings_of(cls, given, owner: str, where: str, flag_of=None):
    """`cls` from the dict `given` (an instance passes through); a key that is none of its fields is named by its flag
    (`flag_of(key)`, when another class declares it) as not applying to `owner` ("--top-k does not apply to --method
    lora (its settings: --lora-r, ...)")."""
    if dataclasses.is_dataclass(given):
        return given
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(given or {}) - set(fields))
    if unknown:
        known = ", ".join("--" + flag_name(f) for f in fields.values()) or "none"
        flag = (flag_of(unknown[0]) if flag_of else None) or unknown[0].replace("_", "-")
        raise TinygraftError(f"--{flag} does not apply to {owner} (its settings: {known})")
    return from_dict(cls, given or {}, where)


def to_dict(cfg) -> dict:
    """A JSON-able dict of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def load_toml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise TinygraftError(f"config file {str(path)!r} is a directory; give a TOML file")
    if not path.is_file():
        raise TinygraftError(f"config file {str(path)!r} does not exist")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise TinygraftError(f"config file {str(path)!r} is not valid TOML: {e}") from None


def load_config_file(path: str | Path) -> dict:
    """A --config file: TOML, or JSON (the settings section of a run's config.json has that form)."""
    if Path(path).suffix == ".json" and not Path(path).is_dir():
        return read_json(path, "config file")
    return load_toml(path)


def _parse_text(text: str, tp, where: str):
    """Turn the text of a `--set key=value` into a value of the field's type."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in get_args(tp):
            return None
        for arg in get_args(tp):
            if arg is type(None):
                continue
            try:
                return _parse_text(text, arg, where)
            except TinygraftError:
                pass
        raise TinygraftError(f"{where} must be {_type_name(tp)}, got {text!r}")
    if tp is bool:
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        raise TinygraftError(f"{where} must be true or false, got {text!r}")
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            raise TinygraftError(f"{where} must be {'an integer' if tp is int else 'a number'}, got {text!r}") from None
    if tp is str or origin is Literal:
        return _coerce(text, tp, where)
    try:  # lists, tuples, tables: JSON syntax
        return _coerce(json.loads(text), tp, where)
    except json.JSONDecodeError:
        raise TinygraftError(f"{where} must be {_type_name(tp)} written as JSON, got {text!r}") from None


def apply_overrides(cfg, overrides: list[str] | None):
    """Return a copy of `cfg` with each `key=value` (dotted keys reach nested configs) applied."""
    for item in overrides or []:
        if "=" not in item:
            raise TinygraftError(f"override {item!r} must look like key=value")
        key, text = (s.strip() for s in item.split("=", 1))
        cfg = _set_path(cfg, key.split("."), text, key)
    return cfg


def _set_path(cfg, parts: list[str], text: str, full_key: str):
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    name = parts[0]
    if name not in fields:
        raise TinygraftError(
            f"unknown config key {full_key!r} for {type(cfg).__name__} (known: {', '.join(sorted(fields))})"
        )
    tp = typing.get_type_hints(type(cfg))[name]
    if len(parts) > 1:
        child = getattr(cfg, name)
        if not dataclasses.is_dataclass(child):
            raise TinygraftError(f"config key {full_key!r}: {name!r} has no sub-keys")
        value = _set_path(child, parts[1:], text, full_key)
    else:
        value = _parse_text(text, tp, full_key)
    try:
        return dataclasses.replace(cfg, **{name: value})
    except (ValueError, TypeError) as e:
        raise TinygraftError(f"invalid value for {full_key!r}: {e}") from None
