"""The ground floor of every layer's settings: the field helper `opt`, `ConfigError`, and the checks.

Each layer declares its own settings once, as a dataclass of `opt(...)` fields (help text, bounds) in its own
package — `arpo/rollout/config.py`, `arpo/engine/config.py`, `arpo/tools/config.py`, ... — and validates itself on
construction with `check_fields`. `arpo/config.py` only composes those dataclasses into the run's tree (YAML,
`section.key=value` overrides, `--print-config`, cross-section checks). This module imports nothing from `arpo`,
so any layer can use it without pointing upwards.
"""
from __future__ import annotations

import difflib
import types
import typing
from dataclasses import field, fields, is_dataclass
from typing import Any, Literal

NULL_WORDS = ("null", "none", "~", "")


class ConfigError(ValueError):
    """A config file, override or settings object names an unknown key or holds a bad value."""


def opt(default: Any, help: str, **bounds: float) -> Any:
    """A field with help text and optional numeric bounds (ge, gt, le, lt), checked by `check_fields`."""
    meta = {"help": help, **bounds}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def suggest(name: str, valid) -> str:
    """' (did you mean X?)' for a close match of `name` among `valid`, else ''."""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown(what: str, name: str, valid) -> ConfigError:
    return ConfigError(f"unknown {what} {name!r}{suggest(name, valid)}; valid: {', '.join(valid)}")


def hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, where: str, text: str | None = None) -> Any:
    """`value` (from YAML, or parsed from the override `text`) converted to the field type `tp`, or ConfigError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if value is None or (text is not None and text.strip().lower() in NULL_WORDS):
            return None
        return coerce(value, inner[0], where, text)
    if origin is Literal:
        if not isinstance(value, str):
            value = text.strip() if text is not None else str(value)
        if value not in args:
            raise ConfigError(f"{where}={value!r}: expected one of {', '.join(args)}{suggest(value, args)}")
        return value
    if origin is list:
        if isinstance(value, str):  # `a,b` on the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if value is None:
            value = []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [coerce(v, args[0], f"{where}[{i}]", str(v) if isinstance(v, str) else None)
                for i, v in enumerate(value)]
    if tp is dict or origin is dict:  # string to string (an environment)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): coerce(v, str, f"{where}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and is_dataclass(tp):  # a nested record (`tools.mcp_servers` entries)
        return _record(value, tp, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {text if text is not None else value!r}")
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, str):
            try:
                value = int(value.replace("_", ""))
            except ValueError:
                pass
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {text if text is not None else value!r}")
    if tp is float:
        if isinstance(value, str):  # PyYAML reads `1e-6` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {text if text is not None else value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if text is not None:  # `model.path=123`, `data.prompt_key=yes`: the literal text
            return text.strip()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported field type {_type_name(tp)}")  # pragma: no cover


def _record(value: Any, tp: type, where: str) -> Any:
    """A mapping as the settings dataclass `tp` (all fields with defaults): unknown keys named, each field typed and
    bounded; what the record needs as a whole its owner checks."""
    if isinstance(value, tp):
        value = {f.name: getattr(value, f.name) for f in fields(tp)}
    valid = [f.name for f in fields(tp)]
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping with keys {', '.join(valid)}, got {value!r}")
    for key in value:
        if key not in valid:
            raise unknown(f"key in {where}:", str(key), valid)
    tps = hints(tp)
    out = {}
    for f in fields(tp):
        if f.name in value:
            out[f.name] = coerce(value[f.name], tps[f.name], f"{where}.{f.name}")
            check_bounds(out[f.name], f.metadata, f"{where}.{f.name}")
    return tp(**out)


def check_bounds(value: Any, meta, where: str) -> None:
    if value is None or isinstance(value, (list, str, bool)):
        return
    for key, ok, sign in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                          ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
        if key in meta and not ok(value, meta[key]):
            raise ConfigError(f"{where}={value!r}: must be {sign} {meta[key]}")


def check_fields(obj: Any, section: str | None = None) -> None:
    """Type and bounds of every field of the settings dataclass `obj`; errors name `section.field` (the class
    name when no section is given). Values are normalised in place (`3` → `3.0` for a float field)."""
    prefix = section or type(obj).__name__
    tps = hints(type(obj))
    for f in fields(obj):
        where = f"{prefix}.{f.name}"
        value = coerce(getattr(obj, f.name), tps[f.name], where)
        check_bounds(value, f.metadata, where)
        object.__setattr__(obj, f.name, value)


def set_field(obj: Any, section: str, key: str, value: Any, text: str | None = None) -> None:
    """`obj.key = value`, typed against the field (ConfigError for an unknown key, with a close match)."""
    valid = [f.name for f in fields(obj)]
    if key not in valid:
        raise unknown(f"key in section '{section}':", key, valid)
    setattr(obj, key, coerce(value, hints(type(obj))[key], f"{section}.{key}", text))




def check_names(where: str, names, builtin) -> None:
    """Each name is a built-in or a dotted path `pkg.module:object`; ConfigError with a close match otherwise."""
    builtin = list(builtin)
    for name in names:
        if name not in builtin and ":" not in name and "." not in name:
            raise ConfigError(f"{where}: unknown {name!r}{suggest(name, builtin)}; expected one of "
                              f"{', '.join(builtin)} or 'pkg.module:object'")


def check_files(where: str, files, extensions) -> None:
    for f in files:
        if not f.lower().endswith(tuple(extensions)):
            raise ConfigError(f"{where}: {f!r} must end with one of {', '.join(extensions)}")


__all__ = ["ConfigError", "opt", "coerce", "check_bounds", "check_fields", "check_names", "check_files", "set_field",
           "suggest", "unknown", "hints", "NULL_WORDS"]
