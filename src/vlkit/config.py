"""Typed dataclass configs: to and from dicts, JSON and YAML files, and ``key=value`` overrides.

Types are strict (a bool is not an int, an int field refuses 1.5 and "3"; a float field takes
ints). A field's range or choices are declared on its annotation, ``steps: PositiveInt`` or
``precision: Annotated[str, OneOf(("auto", "fp32"))]``, and checked by :func:`from_dict` (naming
the key by its dotted path) and by :func:`validate`, which a config's ``__post_init__`` calls.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml

from vlkit.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Bound:
    """The range a numeric field must lie in: ``low <= v <= high`` (``<`` where open)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def allows(self, v) -> bool:
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        return self.high is None or (v < self.high if self.high_open else v <= self.high)

    def describe(self, noun: str) -> str:
        if self.high is None and self.low == 0:
            return f"a positive {noun}" if self.low_open else f"a non-negative {noun}"
        if self.high is None and self.low == 1 and not self.low_open and noun == "integer":
            return "a positive integer"
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"a {noun} in {'(' if self.low_open else '['}{lo}, {hi}{')' if self.high_open else ']'}"


@dataclass(frozen=True)
class OneOf:
    """The values a field may take."""

    choices: tuple

    def allows(self, v) -> bool:
        return v in self.choices


PositiveInt = Annotated[int, Bound(1)]
NonNegativeInt = Annotated[int, Bound(0)]
PositiveFloat = Annotated[float, Bound(0, low_open=True)]
NonNegativeFloat = Annotated[float, Bound(0)]
Fraction = Annotated[float, Bound(0, 1)]


def to_dict(cfg: Any) -> dict:
    """A plain, JSON-ready dict of a (nested) dataclass."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


@functools.cache
def field_types(cls: type) -> dict:
    """A dataclass's resolved field types, ``Annotated`` kept: resolved once per class (resolving
    string annotations costs more than the checks that use them)."""
    return typing.get_type_hints(cls, include_extras=True)


def _split(tp) -> tuple[Any, tuple]:
    """``Annotated[X, a, b]`` → ``(X, (a, b))``; any other type → ``(tp, ())``."""
    if typing.get_origin(tp) is Annotated:
        return tp.__origin__, tp.__metadata__
    return tp, ()


def _optional(tp):
    """``X | None`` → ``X``; ``None`` for any other type."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def describe(tp) -> str:
    """What a value of annotation ``tp`` must be, in words (for errors and ``--help``)."""
    if (inner := _optional(tp)) is not None:
        return f"{describe(inner)} or null"
    base, meta = _split(tp)
    origin, args = typing.get_origin(base), typing.get_args(base)
    bound = next((m for m in meta if isinstance(m, Bound)), None)
    choice = next((m for m in meta if isinstance(m, OneOf)), None)
    if choice is not None:
        return f"one of {list(choice.choices)}"
    if base is bool:
        return "true or false"
    if base in (int, float):
        noun = "integer" if base is int else "number"
        return bound.describe(noun) if bound else f"an {noun}" if base is int else "a finite number"
    if base is str:
        return "a string"
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"a list, each item {describe(args[0])}"
    if origin is tuple:
        return f"a list of {len(args)} items, each {describe(args[0])}" if len(set(args)) == 1 else f"a list of {len(args)} items"
    if origin is list:
        return f"a list, each item {describe(args[0])}"
    if _is_dataclass_type(base):
        return f"a mapping of {base.__name__} keys"
    return getattr(base, "__name__", str(base))


_EXPONENT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
"""Numbers such as ``1e-3`` that YAML 1.1 (PyYAML) reads as strings for want of a dot."""


def _convert(tp, value, path: tuple[str, ...]):
    """``value`` checked against annotation ``tp`` and normalised (ints to floats for float
    fields, lists to tuples, mappings to dataclasses); a :class:`ConfigError` naming ``path``
    (root first) when it does not fit."""
    if (inner := _optional(tp)) is not None:
        if value is None or _is_dataclass_type(_split(inner)[0]):
            return None if value is None else _convert(inner, value, path)
        return _item(inner, value, tp, value, path)
    base, meta = _split(tp)
    origin, args = typing.get_origin(base), typing.get_args(base)
    if _is_dataclass_type(base):
        if isinstance(value, base):
            return value
        if not isinstance(value, dict):
            raise _bad(tp, value, path)
        return _from_dict(base, value, path)
    if origin in (tuple, list):
        fixed = origin is tuple and not (len(args) == 2 and args[1] is Ellipsis)
        if not isinstance(value, (list, tuple)) or (fixed and len(value) != len(args)):
            raise _bad(tp, value, path)
        items = [_item(a, v, tp, value, path) for a, v in zip(args if fixed else [args[0]] * len(value), value)]
        return tuple(items) if origin is tuple else items
    checked = _scalar(base, value)
    if checked is _WRONG or not all(rule.allows(checked) for rule in meta if isinstance(rule, (Bound, OneOf))):
        raise _bad(tp, value, path)
    return checked


_WRONG = object()


def _scalar(base, value):
    """``value`` as a ``base`` (bool, int, float, str or dict; a bool is no int, a float field takes
    ints and must be finite), or ``_WRONG``. Other types pass unchecked."""
    if base is float and isinstance(value, str) and _EXPONENT_TEXT.fullmatch(value.strip()):
        value = float(value)
    if base in (bool, str, dict):
        return value if isinstance(value, base) else _WRONG
    if base not in (int, float):
        return value
    if isinstance(value, bool) or not isinstance(value, int if base is int else (int, float)):
        return _WRONG
    if base is int:
        return value
    try:
        value = float(value)
    except OverflowError:
        return _WRONG
    return value if math.isfinite(value) else _WRONG


def _item(tp, value, whole_tp, whole, path):
    """A part of a value (an item of a list, the value of an optional); a bad one is reported
    against the whole field's type."""
    try:
        return _convert(tp, value, path)
    except ConfigError:
        raise _bad(whole_tp, whole, path) from None


def _shown(value, limit: int = 100) -> str:
    """``repr(value)``, cut short when long."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _bad(tp, value, path: tuple[str, ...]) -> ConfigError:
    return ConfigError(f"{'.'.join(path)}: expected {describe(tp)}, got {_shown(value)}", (".".join(path[1:]),))


def _from_dict(cls: type[T], data: dict, path: tuple[str, ...]) -> T:
    hints = field_types(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = ".".join(path)
        keys = tuple(".".join((*path[1:], str(k))) for k in unknown)
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown, key=str)}; expected some of {sorted(names)}", keys)
    kwargs = {k: _convert(hints[k], v, (*path, k)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as err:  # a __post_init__ check: say where in the config it failed
        section = ".".join(path[1:])
        inner = getattr(err, "keys", None) or ("",)
        keys = tuple(".".join(p for p in (section, k) if p) for k in inner)
        raise ConfigError(f"{'.'.join(path)}: {err}", keys) from err


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build ``cls`` from a dict, naming unknown keys and bad values by their dotted path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} keys, got {type(data).__name__}", ("",))
    return _from_dict(cls, data, (where,))


def validate(cfg) -> None:
    """Check every field of a config dataclass against its annotation, normalising in place
    (1 → 1.0 for a float); called from ``__post_init__`` so configs built in Python are checked too."""
    hints = field_types(type(cfg))
    for f in dataclasses.fields(cfg):
        try:
            object.__setattr__(cfg, f.name, _convert(hints[f.name], getattr(cfg, f.name), (type(cfg).__name__, f.name)))
        except ConfigError as err:
            raise ConfigError(str(err), (f.name,)) from None


def read(path: str | Path) -> dict:
    """Read a JSON or YAML file into a dict, naming the file when it is malformed."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    except OSError as err:
        raise FileNotFoundError(f"{path}: cannot read config ({err.strerror})") from err
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError, ValueError, RecursionError) as err:
        raise ConfigError(f"{path}: malformed {path.suffix[1:] or 'config'} file: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """A nested dict as ``{"a.b.c": leaf}``."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def write_json(path: str | Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def parse_override(item: str, schema: type | None = None) -> tuple[list[str], Any]:
    """``--a.b=value`` → ``(["a", "b"], value)``, the value read as YAML; with a config class as
    ``schema``, the key must name one of its fields and the value fit its type."""
    text = item[2:] if item.startswith("--") else item
    key, sep, raw = text.partition("=")
    if not sep:
        raise ConfigError(f"override {_shown(item)} is not of the form --key=value (e.g. --loop.steps=100)")
    parts = key.split(".")
    if not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", p) for p in parts):
        raise ConfigError(f"override {_shown(item)}: {_shown(key)} is not a dotted key of names (e.g. --loop.steps=100)")
    try:
        value = yaml.safe_load(raw)
    except (ValueError, OverflowError):  # YAML's syntax holds, its reading fails (a date like 2024-13-45)
        value = raw
    except (yaml.YAMLError, RecursionError) as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"override {_shown(item)}: {_shown(raw)} is not a valid YAML value ({problem})") from None
    if schema is not None:
        value = _check_override(item, parts, value, raw, schema)
    return parts, value


def _check_override(item: str, parts: list[str], value, raw: str, schema: type):
    """The override's value once its key is seen in ``schema`` and the value fits the field;
    a string field takes the text as written (``--data.source=2024`` is the folder "2024")."""
    cls = schema
    for i, part in enumerate(parts):
        here = ".".join(parts[: i + 1])
        hints = field_types(cls)
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        if part not in names:
            raise ConfigError(f"override {_shown(item)}: unknown key {here!r}; expected one of {sorted(names)} there", (here,))
        tp = _split(_optional(hints[part]) or hints[part])[0]
        if i < len(parts) - 1:
            if not _is_dataclass_type(tp):
                raise ConfigError(f"override {_shown(item)}: {here!r} is a value ({describe(hints[part])}), not a section", (here,))
            cls = tp
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"override {_shown(item)}: {here!r} is a section, not a value; set its keys as --{here}.KEY=VALUE", (here,))
        return value  # checked key by key when the merged config is built
    if tp is str and value is not None and not isinstance(value, str):
        value = raw
    try:
        _convert(hints[part], value, (here,))
    except ConfigError as err:
        raise ConfigError(f"override {_shown(item)}: {err}", err.keys) from None
    return value


_UNKNOWN = object()
"""No schema says what a key is: a mapping merges into a mapping there."""


def _section(cls, key: str):
    """The config class of ``cls``'s field ``key`` when it is a section; None for a value (a
    field typed ``dict`` is one value, and so is everything inside it); :data:`_UNKNOWN` without a schema."""
    if cls is _UNKNOWN or cls is None:
        return cls
    hint = field_types(cls).get(key)
    tp = _split(_optional(hint) or hint)[0] if hint is not None else None
    return tp if _is_dataclass_type(tp) else None


def _merge(node: dict, key: str, value, cls=_UNKNOWN) -> None:
    """Set ``node[key]``; a mapping merges into a section (``cls``'s field ``key`` a config
    class) key by key, and replaces a value: ``--data.shapes.mix={vqa: 1}`` keeps no other weight."""
    section = _section(cls, key)
    if isinstance(value, dict) and isinstance(node.get(key), dict) and section is not None:
        for k, v in value.items():
            _merge(node[key], k, v, section)
    else:
        node[key] = value


def apply_overrides(data: dict, overrides: list[str], schema: type | None = None) -> dict:
    """Apply ``--a.b.c=value`` overrides (values parsed as YAML) to a copy of a nested dict; with
    ``schema`` (a config class), each is checked against it first. Errors name the override."""
    out = copy.deepcopy(data)
    for item in overrides:
        parts, value = parse_override(item, schema)
        node, cls = out, schema or _UNKNOWN
        for i, p in enumerate(parts[:-1]):
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {_shown(item)}: {'.'.join(parts[: i + 1])!r} is {_shown(child)}, not a section")
            node, cls = child, _section(cls, p)
        if isinstance(node.get(parts[-1]), dict) and not isinstance(value, dict):
            raise ConfigError(f"override {_shown(item)}: {'.'.join(parts)!r} is a section, not a value; set its keys instead")
        _merge(node, parts[-1], value, cls)
    return out


def _touches(override: str, key: str) -> bool:
    """Whether an override sets ``key`` (dotted), a key inside it, or the section holding it."""
    text = override[2:] if override.startswith("--") else override
    mine = text.partition("=")[0]
    return not key or mine == key or mine.startswith(key + ".") or key.startswith(mine + ".")


def build(cls: type[T], data: dict, overrides: list[str], where: str = "config", derived: dict[str, str] | None = None) -> T:
    """``cls`` from ``data`` with ``overrides`` applied; an error in a key an override set
    names that override too. ``derived``: keys the caller sets itself (key → from what), which an
    override may not set (it would be ignored)."""
    for key, source in (derived or {}).items():
        for o in overrides:
            mine = (o[2:] if o.startswith("--") else o).partition("=")[0]
            if mine == key or mine.startswith(key + "."):
                raise ConfigError(f"override {_shown(o)}: {key} is set by training from {source}; it cannot be overridden", (key,))
    merged = apply_overrides(data, overrides, cls)
    try:
        return from_dict(cls, merged, where)
    except ConfigError as err:
        culprits = [o for o in overrides if any(_touches(o, k) for k in err.keys)]
        if not culprits:
            raise
        raise ConfigError(f"{err} (set by {', '.join(_shown(o) for o in culprits)})", err.keys) from None


def defaults(cls: type, prefix: str = "") -> list[tuple[str, Any, str]]:
    """Every leaf key of a config class as ``(dotted key, default, what it must be)``, in order."""
    rows = []
    hints = field_types(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = _split(hints[f.name])[0]
        if _is_dataclass_type(tp):
            rows += defaults(tp, key + ".")
            continue
        value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((key, value, describe(hints[f.name])))
    return rows


def key_rows(cls: type, derived: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """``("key=default", what it must be)`` for every recipe key; a key training sets itself says from what."""
    derived = derived or {}
    return [
        (f"{key}={value if isinstance(value, str) else json.dumps(value)}",
         f"set by training from {derived[key]}" if key in derived else what)
        for key, value, what in defaults(cls)
    ]  # fmt: skip


def key_table(rows: list[tuple[str, str]]) -> list[str]:
    """:func:`key_rows` as aligned ``--key=default  type`` lines (the ``train --help`` epilogs)."""
    width = max(len(a) for a, _ in rows)
    return [f"  --{a:<{width}}  {b}" for a, b in rows]
