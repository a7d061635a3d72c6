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
import fnmatch
import inspect
import math
import os
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Callable, Mapping

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


def coerce(what: str, key: str, value: Any, hint: Any, noun: str = "config key") -> Any:
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
    raise ProtocacheError(f"{what} {noun} {key!r} expects {expected}, got {value!r}")


def build_config(cls: type, overrides: Mapping[str, Any] | None, what: str, noun: str = "config key") -> Any:
    """cls(**overrides) with every key known, every value of the field's type and every number
    in its meaning's range (`check_values`). Errors name a field as `{what} {noun} 'key'`."""
    overrides = dict(overrides or {})
    check_keys(overrides, [f.name for f in dataclasses.fields(cls)], what)
    hints = typing.get_type_hints(cls)
    config = cls(**{k: coerce(what, k, v, hints[k], noun) for k, v in overrides.items()})
    check_values(config, what, noun=noun)
    return config


# ----------------------------------------------------------------------------- values by meaning


@dataclasses.dataclass(frozen=True)
class Bound:
    """The values a numeric field may take, by what it means."""

    text: str
    """How the range reads in an error: ">= 1", "in [0, 1]"."""
    ok: Callable[[float], bool]


AT_LEAST_ONE = Bound(">= 1", lambda v: v >= 1)
NON_NEGATIVE = Bound(">= 0", lambda v: v >= 0)
POSITIVE = Bound("> 0", lambda v: v > 0)
FRACTION = Bound("in [0, 1]", lambda v: 0 <= v <= 1)
BELOW_ONE = Bound("in [0, 1)", lambda v: 0 <= v < 1)
SEED = Bound("in [0, 2**63)", lambda v: 0 <= v < 2**63)  # torch.manual_seed takes a signed 64-bit integer

# What a numeric config field may hold, read from its name: the first pattern (fnmatch) that
# matches wins. tests/test_config.py checks that every numeric field of every config has a rule.
VALUE_RULES: tuple[tuple[str, Bound], ...] = (
    # shares
    ("val_fraction", BELOW_ONE),  # at least one train image is left to fit on
    ("*_fraction", FRACTION),
    ("consistency_threshold", FRACTION),
    ("*_threshold", NON_NEGATIVE),  # a weight or a use count
    # counts of passes: the main training needs one; a stage's own epochs may be 0 (skipped)
    ("epochs", AT_LEAST_ONE),
    ("*_epochs", NON_NEGATIVE),
    # sizes and counts of things
    ("*batch_size", AT_LEAST_ONE),
    ("*_size", AT_LEAST_ONE),  # chunk, shard, codebook, reference input
    ("slots_per_class", AT_LEAST_ONE),
    ("*_per_class", NON_NEGATIVE),  # 0: every prototype with a positive weight / keep all
    ("num_workers", NON_NEGATIVE),  # 0: decode in the main process
    ("num_*", AT_LEAST_ONE),
    ("*_top_k", AT_LEAST_ONE),
    ("top_k", AT_LEAST_ONE),  # predict: classes kept per image
    ("proto_dim", AT_LEAST_ONE),
    ("kmeans_sample", AT_LEAST_ONE),
    ("kmeans_iters", AT_LEAST_ONE),
    ("prune_rounds", AT_LEAST_ONE),
    ("prune_to", NON_NEGATIVE),  # 0: no pruning
    ("shards_in_memory", AT_LEAST_ONE),
    ("feature_cache_mb", NON_NEGATIVE),
    ("threads", AT_LEAST_ONE),
    ("workers", AT_LEAST_ONE),
    ("limit", AT_LEAST_ONE),
    ("images", NON_NEGATIVE),  # explain: 0 draws the gallery only
    ("patches", AT_LEAST_ONE),
    ("top_prototypes", AT_LEAST_ONE),
    ("max_prototypes", NON_NEGATIVE),
    ("patch_px", AT_LEAST_ONE),
    ("seed", SEED),
    ("scale", AT_LEAST_ONE),  # bench --scale: images in the store
    # learning rates and loss weights
    ("lr", NON_NEGATIVE),
    ("*_lr", NON_NEGATIVE),
    ("weight_decay", NON_NEGATIVE),
    ("*_weight", NON_NEGATIVE),
    ("l1", NON_NEGATIVE),
    ("mixup", NON_NEGATIVE),  # Beta(alpha, alpha); 0 is off
    # temperatures, scales and lengths that divide or take logs
    ("tau", POSITIVE),
    ("*_tau", POSITIVE),
    ("gumbel_start", POSITIVE),
    ("gumbel_end", POSITIVE),
    ("noise_sigma", NON_NEGATIVE),
    ("patch_cells", POSITIVE),
    ("consistency_box", POSITIVE),
    ("purity_patch", POSITIVE),
)


def value_rule(name: str) -> Bound | None:
    """The Bound of a numeric field called `name` (None: any finite number)."""
    return next((bound for pattern, bound in VALUE_RULES if fnmatch.fnmatchcase(name, pattern)), None)


def _scalar_types(hint: Any) -> list[Any] | None:
    """[int], [float, ...] for a scalar annotation (None allowed); None for lists, dicts, dataclasses."""
    args = ([a for a in typing.get_args(hint) if a is not type(None)]
            if typing.get_origin(hint) in (typing.Union, types.UnionType) else [hint])
    return args if args and all(a in (int, float, bool, str) for a in args) else None


def _allows_none(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def check_values(config: Any, what: str, *, flags: bool = False, noun: str = "config key") -> None:
    """Every scalar field of a config dataclass has its type, and every number its meaning's range
    (VALUE_RULES; non-finite floats are refused everywhere). The error names the field as a CLI
    option (`what: --batch-size`) when `flags`, else as `what noun 'key'`, and says what would be valid."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value is None:
            hint = hints.get(f.name)
            if _scalar_types(hint) is not None and not _allows_none(hint):  # e.g. FitConfig(seed=None)
                expected = " or ".join(t.__name__ for t in _scalar_types(hint))
                raise ProtocacheError(f"{_label(what, f.name, flags, noun)} expects {expected}, got None; "
                                      f"{_suggestion(type(config), f.name, flags)}")
            continue
        types_ = _scalar_types(hints.get(f.name))
        if types_ is not None:
            try:
                coerce(what, f.name, value, hints[f.name])
            except ProtocacheError:
                expected = " or ".join(t.__name__ for t in types_)
                raise ProtocacheError(f"{_label(what, f.name, flags, noun)} expects {expected}, "
                                      f"got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        bound = value_rule(f.name)
        finite = not isinstance(value, float) or math.isfinite(value)
        if finite and (bound is None or bound.ok(value)):
            continue
        kind = "an integer" if isinstance(value, int) else "a number"
        rule = f"{kind} {bound.text}" if bound is not None else "a finite number"
        raise ProtocacheError(f"{_label(what, f.name, flags, noun)} must be {rule}, got {value!r}; "
                              f"{_suggestion(type(config), f.name, flags)}")


def _label(what: str, key: str, flags: bool, noun: str) -> str:
    return f"{what}: --{key.replace('_', '-')}" if flags else f"{what} {noun} {key!r}"


def _suggestion(cls: type, key: str, flags: bool) -> str:
    """e.g. `--batch-size 64 (the default)`, or `leave it unset` where the default is derived."""
    try:
        default = field_default(cls, key)
    except KeyError:
        default = None
    if default is None:
        return f"leave --{key.replace('_', '-')} out for the default" if flags else "leave it unset for the default"
    return f"e.g. --{key.replace('_', '-')} {default} (the default)" if flags else f"e.g. {key}={default} (the default)"


def check_writable(path: str | Path, flag: str) -> None:
    """A folder can be written at `path` through a sibling (outputs are staged next to it and renamed
    into place): it is a folder or absent, and its parent's nearest existing ancestor is a folder this
    process may write in. Checked before any work; URLs (s3://...) are left to their filesystem."""
    if "://" in str(path):
        return
    target = Path(path).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise ProtocacheError(f"{flag} {path} exists and is not a folder; choose another {flag}")
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ProtocacheError(f"{flag} {path}: {ancestor} is a file, not a folder; choose another {flag}")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ProtocacheError(f"{flag} {path}: cannot write in {ancestor} (permission denied or read-only); "
                              f"choose a folder you can write to as {flag}")


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
    if p.is_dir():
        raise ProtocacheError(f"{what} {p} is a folder; name the YAML file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ProtocacheError(f"{what} {p} is not UTF-8 text; save it as a UTF-8 YAML file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ProtocacheError(f"{what} {p} is not valid YAML{where}: {problem}") from None
    except OSError as exc:
        raise ProtocacheError(f"cannot read {what} {p} ({exc.strerror})") from None
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
