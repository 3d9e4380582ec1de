"""Config schemas: dataclass fields with their checks, filled from YAML mappings with one-line errors, and their
--help listing. core/config.py declares the run config and cnnprior/evaluate/config.py the evaluation config
with these."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from collections.abc import Callable, Iterable
from dataclasses import field
from pathlib import Path
from typing import Any

import yaml

from cnnprior.core.errors import UserError

__all__ = [
    "apply_overrides", "check_range", "coerce", "describe_keys", "fill", "opt", "parse_override", "read_yaml_mapping",
    "suggest"
]


def opt(default: Any, *, choices: tuple | None = None, lo: float | None = None, hi: float | None = None,
         help: str = "") -> Any:
    """A dataclass field with validation metadata (choices or an inclusive numeric range)."""
    meta = {"choices": choices, "lo": lo, "hi": hi, "help": help}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def suggest(key: str, options: Iterable[str], listing: str | None = "known keys", prefix: str = "") -> str:
    """The "did you mean" of every one-line error: " (did you mean '<prefix>x'?)" for the option closest to `key`;
    when none is close, " (<listing>: the options, sorted)", or '' when `listing` is None (the caller says more)."""
    options = [str(o) for o in options]
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{prefix}{close[0]}'?)"
    return f" ({listing}: {', '.join(sorted(options))})" if listing is not None else ""


def coerce(value: Any, ftype: Any, where: str) -> Any:
    """Check `value` against the field type; ints are accepted for floats."""
    origin = typing.get_origin(ftype) or ftype
    if ftype in ("bool", bool):
        if isinstance(value, bool):
            return value
        raise UserError(f"{where}: expected true/false, got {value!r}")
    if ftype in ("int", int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"{where}: expected an integer, got {value!r}")
    if ftype in ("float", float):
        number = math.nan
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # PyYAML (YAML 1.1) reads `1e-3` (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if math.isfinite(number):  # also rejects .nan/.inf, which would slip past the range checks
            return number
        raise UserError(f"{where}: expected a number, got {value!r}")
    if ftype in ("str", str):
        if isinstance(value, str):
            return value
        raise UserError(f"{where}: expected a string, got {value!r}")
    if ftype == "dict | list":  # data.class_names: {folder name: display name} or a list of display names
        if value is None:
            return {}
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        if isinstance(value, dict) and all(isinstance(k, (str, int)) and not isinstance(k, bool)
                                           and isinstance(v, str) for k, v in value.items()):
            return {str(k): v for k, v in value.items()}
        raise UserError(f"{where}: expected a mapping of folder name to display name (quote names YAML reads "
                        f"as numbers or booleans) or a list of names, got {value!r}")
    if ftype in ("list", list) or origin is list:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise UserError(f"{where}: expected a list of strings, got {value!r}")
    raise UserError(f"{where}: unsupported type {ftype!r}")  # pragma: no cover


def check_range(value: Any, meta: dict, where: str) -> None:
    """A value against its field's choices and inclusive range."""
    choices, lo, hi = meta.get("choices"), meta.get("lo"), meta.get("hi")
    if choices is not None and value not in choices:
        raise UserError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}"
                        + (suggest(str(value), list(choices)) if isinstance(value, str) else ""))
    if lo is not None and value < lo:
        raise UserError(f"{where}: {value!r} is below the minimum {lo}")
    if hi is not None and value > hi:
        raise UserError(f"{where}: {value!r} is above the maximum {hi}")


def fill(obj: Any, values: dict, where: str, prefix: str = "", blank_is_empty: bool = False,
          extra: Callable[[str, Any], bool] | None = None) -> None:
    """Set a config dataclass's fields from a mapping, checking keys, types and ranges (one-line errors).

    A field whose value is a dataclass is a section, filled from a nested mapping; a field with a `parse` entry
    in its metadata is converted by it; `blank_is_empty`: a blank string key (`lsft:`) means ''. `extra(key,
    value)` may take keys that are not fields (it returns True when it did).
    """
    fields = {f.name: f for f in dataclasses.fields(obj) if not f.metadata.get("internal")}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if extra is not None and extra(key, value):
            continue
        if key not in fields:
            raise UserError(f"{where}: unknown key '{dotted}'{suggest(str(key), list(fields))}")
        f = fields[key]
        loc = f"{where}: key '{dotted}'"
        if dataclasses.is_dataclass(getattr(obj, key)):
            if value is None:  # a section whose keys are all commented out
                value = {}
            if not isinstance(value, dict):
                raise UserError(f"{loc}: expected a mapping of keys, got {value!r}")
            fill(getattr(obj, key), value, where, f"{key}.")
            continue
        if "parse" in f.metadata:
            value = f.metadata["parse"](value, loc, where)
        else:
            if blank_is_empty and value is None and f.type in ("str", str):
                value = ""
            value = coerce(value, f.type, loc)
            check_range(value, f.metadata, loc)
        setattr(obj, key, value)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse `section.key=value` (value in YAML syntax) into a key path and a value."""
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise UserError(f"--set {text!r}: empty key")
    return path, value


def apply_overrides(raw: dict, overrides: Iterable[str],
                    check: Callable[[list[str]], str | None] | None = None) -> dict:
    """Put `--set section.key=value` overrides into a raw config mapping (in place; returned): the dotted key names
    the nested mapping to set, made where missing (a blank section, `gan:` in YAML, becomes a mapping). `check(keys)`
    may refuse a key path: it returns the reason, reported as "--set '<text>': <reason>"."""
    for text in overrides:
        keys, value = parse_override(text)
        if check is not None and (problem := check(keys)):
            raise UserError(f"--set {text!r}: {problem}")
        node = raw
        for k in keys[:-1]:
            if node.get(k) is None:
                node[k] = {}
            node = node[k]
            if not isinstance(node, dict):
                raise UserError(f"--set {text!r}: '{k}' is not a section")
        node[keys[-1]] = value
    return raw


def read_yaml_mapping(path: str | os.PathLike, examples: str, top_level: str) -> dict:
    """A YAML file whose top level is a mapping; a missing, invalid or non-mapping file is one UserError line."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: config file not found (see {examples} for examples)")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{p}: not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    except UnicodeDecodeError:
        raise UserError(f"{p}: not a UTF-8 text file") from None
    if not isinstance(raw, dict):
        raise UserError(f"{p}: the top level must be a mapping of {top_level}")
    return raw


def describe_keys(cls: type, prefix: str = "") -> str:
    """All keys of a config dataclass with their defaults (its keys first, then each section's), for --help."""
    lines, sections = [], []
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(default):
            sections.append((f.name, type(default)))
            continue
        extra = f.metadata.get("help", "")
        ch = f.metadata.get("choices")
        if ch:
            extra = (extra + "; " if extra else "") + "|".join(map(str, ch))
        lines.append(f"  {prefix}{f.name} = {default!r}" + (f"  ({extra})" if extra else ""))
    lines += [describe_keys(section_cls, f"{prefix}{name}.") for name, section_cls in sections]
    return "\n".join(lines)
