"""Typed workflow configs: dataclasses overridden by presets, a YAML file and ``--set key=value``.

A workflow declares its config as a (possibly nested) dataclass whose field names are the names
its users already know (the diving config keeps the seed's argument table). Keys are dotted paths
(``data.allow_missing``); values are parsed as YAML scalars and checked against the field's type,
so ``--set epochs=ten`` fails before anything is submitted, naming the key and the expected type.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Dict, List, Mapping, Tuple

from .errors import ConfigError


def _yaml():
    import yaml  # deferred: only needed when a value or file is parsed

    return yaml


def field_types(cls: type) -> Dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def flatten(cfg: Any, prefix: str = "") -> Dict[str, Any]:
    """Dataclass instance -> ``{"a.b": value}`` for every leaf field."""
    out: Dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, key + "."))
        else:
            out[key] = value
    return out


def leaf_types(cls: type, prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for name, tp in field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            out.update(leaf_types(tp, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = tp
    return out


def type_name(tp: Any) -> str:
    """How a config type reads in help and errors: ``int``, ``a list of float``, ``one of 'a', 'b'``."""
    return _type_name(tp)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin in (list, List):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against type ``tp`` (converting where lossless); raise ConfigError otherwise."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(key, value, arg)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"config '{key}': {value!r} is not {_type_name(tp)}")
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"config '{key}': {value!r} is not {_type_name(tp)}")
    if origin in (list, List, tuple, typing.Sequence):
        if isinstance(value, str):  # allow --set topology=512,256
            if value.strip()[:1] in ("[", "{") or value.strip()[-1:] in ("]", "}"):
                raise ConfigError(f"config '{key}': {value!r} is not {_type_name(tp)}: its brackets do not "
                                  f"balance (write e.g. [512, 256] or 512,256)")
            value = [_scalar(v) for v in value.split(",") if v.strip()]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # --set dropout=0.5: a one-element list
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config '{key}': {value!r} is not {_type_name(tp)}")
        (item_tp,) = typing.get_args(tp)[:1] or (Any,)
        return [coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config '{key}': {value!r} is not a bool (use true or false)")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config '{key}': {value!r} is not an int")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"config '{key}': {value!r} is not a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config '{key}': {value!r} is not a string")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"config '{key}': {value!r} is not {_type_name(tp)}")


def parse_assignment(text: str) -> Tuple[str, Any]:
    """``key=value`` -> (key, YAML-parsed value). ``key=`` gives an empty string."""
    if "=" not in text:
        raise ConfigError(f"--set '{text}' is not key=value (e.g. --set epochs=20)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set '{text}' has no key before '='")
    try:
        value = _yaml().safe_load(raw) if raw.strip() else ""
    except Exception:  # not a YAML scalar: keep it as the string the user typed
        value = raw
    return key, value


def flatten_mapping(data: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Nested YAML mapping -> dotted keys (a dict value for a non-dataclass field stays whole)."""
    out: Dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_mapping(v, key + "."))
        else:
            out[key] = v
    return out


def apply(cfg: Any, overrides: Mapping[str, Any], source: str = "--set") -> Any:
    """Return a copy of dataclass ``cfg`` with dotted-key ``overrides`` applied and type-checked."""
    types = leaf_types(type(cfg))
    values = flatten(cfg)
    for key, value in overrides.items():
        if key not in types:
            close = difflib.get_close_matches(key, list(types), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(
                f"{source}: unknown config key '{key}'.{hint} Valid keys: {', '.join(sorted(types))}"
            )
        values[key] = coerce(key, value, types[key])
    return build(type(cfg), values)


def build(cls: type, values: Mapping[str, Any], prefix: str = "") -> Any:
    kwargs = {}
    for name, tp in field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build(tp, values, f"{prefix}{name}.")
        elif f"{prefix}{name}" in values:
            kwargs[name] = values[f"{prefix}{name}"]
    return cls(**kwargs)


def _scalar(text: str) -> Any:
    """One YAML scalar as typed on a command line; what YAML cannot read stays the typed string
    (coercion to the field's type then names the bad value)."""
    try:
        return _yaml().safe_load(text)
    except Exception:
        return text


def load_yaml_file(path: str) -> Dict[str, Any]:
    try:
        with open(path) as fh:
            data = _yaml().safe_load(fh) or {}
    except FileNotFoundError:
        raise ConfigError(f"--config '{path}' does not exist") from None
    except Exception as exc:
        raise ConfigError(f"--config '{path}' is not valid YAML: {exc}".splitlines()[0]) from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"--config '{path}' must hold a mapping of config keys, not {type(data).__name__}")
    return flatten_mapping(data)


def to_dict(cfg: Any) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    """Rebuild a config written by :func:`to_dict` (inside a job)."""
    return apply(cls(), flatten_mapping(data), source="run config")
