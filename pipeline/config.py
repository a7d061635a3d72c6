"""The one config door: YAML files and `--set key=value` into a config dataclass, checked in one place.

Config dataclasses document each field with a docstring right below it (litgpt's style):
that docstring is the field's help in the CLI and in `protocache heads`, and the field's
default is the CLI option's default, so neither is written twice.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Mapping

from protocache.stores.errors import ProtocacheError


# ----------------------------------------------------------------------------- field docstrings


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: its docstring} of a dataclass (the string literal below each field), bases included."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, following in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def field_default(cls: type, name: str) -> Any:
    """The default of dataclass field `name` (its default_factory's value where it has one)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                return f.default_factory()  # type: ignore[misc]
            raise KeyError(f"{cls.__name__}.{name} has no default")
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def describe_fields(cls: type) -> dict[str, dict[str, Any]]:
    """{field: {"default", "type", "help"}} of a config dataclass (for listings such as `protocache heads`)."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        default = None if f.default is dataclasses.MISSING else f.default
        out[f.name] = {"default": default, "type": _type_name(hints.get(f.name)), "help": docs.get(f.name, "")}
    return out


def _type_name(hint: Any) -> str:
    if hint is None:
        return ""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "None"
    return getattr(hint, "__name__", str(hint))


# ----------------------------------------------------------------------------- building configs


def _closest(key: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def check_keys(keys: Mapping[str, Any] | list[str], valid: list[str], what: str) -> None:
    """Unknown keys are an error naming the closest valid key and listing all of them."""
    unknown = sorted(set(keys) - set(valid))
    if unknown:
        hints = "".join(_closest(k, valid) for k in unknown[:1])
        raise ProtocacheError(f"unknown config key(s) {', '.join(map(repr, unknown))} for {what}{hints}; "
                              f"valid keys: {', '.join(valid)}")


def coerce(what: str, key: str, value: Any, hint: Any) -> Any:
    """Type-check a value from YAML/--set against a field's annotation (ints widen to floats)."""
    if value is None:
        return None
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # `int | None` and friends
        args = [a for a in typing.get_args(hint) if a is not type(None)]
    else:
        args = [hint]
    for want in args:
        if want is bool and isinstance(value, bool):
            return value
        if want is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if want is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if want is str and isinstance(value, str):
            return value
        if typing.get_origin(want) in (list, tuple) and isinstance(value, (list, tuple)):
            return list(value)
    expected = " or ".join(getattr(a, "__name__", str(a)) for a in args)
    raise ProtocacheError(f"{what} config key {key!r} expects {expected}, got {value!r}")


def build_config(cls: type, overrides: Mapping[str, Any] | None, what: str) -> Any:
    """cls(**overrides) with every key known and every value of the field's type."""
    overrides = dict(overrides or {})
    check_keys(overrides, [f.name for f in dataclasses.fields(cls)], what)
    hints = typing.get_type_hints(cls)
    return cls(**{k: coerce(what, k, v, hints[k]) for k, v in overrides.items()})


# ----------------------------------------------------------------------------- YAML and --set




def yaml_number(value: Any) -> Any:
    """YAML 1.1 reads `1e-4` (no dot) as a string; users mean the number."""
    if isinstance(value, str):
        try:
            return float(value) if any(ch.isdigit() for ch in value) and value.strip().lower() not in ("nan", "inf") else value
        except ValueError:
            return value
    if isinstance(value, list):
        return [yaml_number(v) for v in value]
    return value


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """`key=value` strings to a dict; values parse as YAML scalars (1, 0.5, true, [1, 2])."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ProtocacheError(f"--set expects key=value, got {item!r}")
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as exc:
            raise ProtocacheError(f"--set {item!r}: value is not valid YAML ({exc})") from None
        out[key] = yaml_number(parsed)
    return out


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A YAML file holding a mapping, with numbers like `1e-4` read as numbers."""
    import yaml

    p = Path(path).expanduser()
    if not p.exists():
        raise ProtocacheError(f"{what} {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ProtocacheError(f"{what} {p} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocacheError(f"{what} {p} must hold a mapping of config keys")
    return {k: yaml_number(v) for k, v in data.items()}


def read_config_file(path: str | Path | None, fit_class: type | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(head config, fit options) from a YAML file: head keys at the top, fit options under `fit:`.

    Fit options are checked against `fit_class`'s fields (the FitConfig) when given.
    """
    if not path:
        return {}, {}
    data = read_yaml_mapping(path)
    fit = data.pop("fit", None) or {}
    if not isinstance(fit, dict):
        raise ProtocacheError(f"config file {Path(path).expanduser()}: `fit:` must be a mapping")
    if fit_class is not None:
        valid = sorted(f.name for f in dataclasses.fields(fit_class))
        unknown = sorted(set(fit) - set(valid))
        if unknown:
            raise ProtocacheError(f"config file {Path(path).expanduser()}: unknown fit option(s) {unknown}"
                                  f"{_closest(unknown[0], valid)}; valid: {', '.join(valid)}")
    return data, fit
