"""The recipe checker: plain data (a composed Hydra config) in, frozen dataclasses out.

Every error is one ``ConfigError`` line that names the offending key by its full dotted path; an
unknown key also names the closest valid one, a wrong type names the expected type, and a number
outside its range names the range:

    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Run:
    ...     name: str = "run"
    ...     steps: PosInt = 10
    >>> parse(Run, {"nmae": "x"}, "run")
    Traceback (most recent call last):
    ...
    posttrain.schema.ConfigError: unknown key 'run.nmae' (did you mean 'run.name'?)
    >>> parse(Run, {"steps": 0}, "run")
    Traceback (most recent call last):
    ...
    posttrain.schema.ConfigError: 'run.steps' must be >= 1, got 0

Ranges are declared on the field's type (``PosInt``, ``Prob``, ``Annotated[float, Range(gt=0)]``),
so ``posttrain/config.py`` reads as the reference of every setting and its valid values. Checks that
relate several fields live in a dataclass's ``check(path)`` method, which ``parse`` calls.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from posttrain.errors import UserError

T = TypeVar("T")


class ConfigError(UserError):
    """A recipe that does not fit the schema. The message is one line that says what to fix."""


@dataclass(frozen=True)
class Range:
    """Bounds of a numeric setting (any of them may be None)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def violation(self, value: float) -> str | None:
        """The allowed range as text (``'>= 1'``, ``'in (0, 1]'``) when ``value`` is outside it, else None."""
        ok = (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )
        return None if ok else self.describe()

    def describe(self) -> str:
        low = f"[{self.ge:g}" if self.ge is not None else f"({self.gt:g}" if self.gt is not None else None
        high = f"{self.le:g}]" if self.le is not None else f"{self.lt:g})" if self.lt is not None else None
        if low and high:
            return f"in {low}, {high}"
        if low:
            return (">= " if low[0] == "[" else "> ") + low[1:]
        assert high is not None, "a Range needs at least one bound"
        return ("<= " if high[-1] == "]" else "< ") + high[:-1]


PosInt = Annotated[int, Range(ge=1)]
NonNegInt = Annotated[int, Range(ge=0)]
PosFloat = Annotated[float, Range(gt=0)]
NonNegFloat = Annotated[float, Range(ge=0)]
Prob = Annotated[float, Range(ge=0, le=1)]  # a probability or a fraction, [0, 1]


def parse(cls: type[T], data: Any, path: str) -> T:
    """Build dataclass ``cls`` from plain ``data`` (dicts/lists/scalars), checking keys, types and ranges."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"'{path}' must be a mapping of {cls.__name__} settings, got {type(data).__name__}")
    hints = get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            nested = _find_nested(cls, str(key), path)
            if close:
                hint = f" (did you mean '{_join(path, close[0])}'?)"
            elif nested:
                hint = f" (did you mean '{nested}'?)"
            else:
                hint = f" (valid: {', '.join(fields)})"
            raise ConfigError(f"unknown key '{_join(path, str(key))}'{hint}")
        base = _default(fields[key])
        if dataclasses.is_dataclass(base) and isinstance(value, dict):
            # A partial section overrides the field's own default instance, not the class defaults
            # (RL's optimizer defaults differ from OptimConfig's, for instance).
            value = _deep_merge(to_dict(base), value)
        kwargs[key] = _coerce(hints[key], value, _join(path, key))
    for name, f in fields.items():
        if (
            name not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ):
            raise ConfigError(f"missing required key '{_join(path, name)}'")
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        check(path)
    return obj


def _default(f: Any) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _find_nested(cls: type, key: str, path: str, depth: int = 2) -> str | None:
    """The dotted path of a field called ``key`` inside nested sections (``lr`` -> ``optim.lr``)."""
    if depth == 0:
        return None
    for name, tp in get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            if key in {f.name for f in dataclasses.fields(tp)}:
                return _join(_join(path, name), key)
            found = _find_nested(tp, key, _join(path, name), depth - 1)  # type: ignore[arg-type]
            if found:
                return found
    return None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Annotated:
        return _type_name(get_args(tp)[0])
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Annotated:
        inner, *marks = get_args(tp)
        out = _coerce(inner, value, path)
        for mark in marks:
            why = mark.violation(out) if isinstance(mark, Range) and not isinstance(out, bool) else None
            if why is not None:
                raise ConfigError(f"'{path}' must be {why}, got {value!r}")
        return out
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        range_error: ConfigError | None = None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, path)
            except ConfigError as e:
                if any(f"must be {w}" in str(e) for w in (">", "<", "in [", "in (")):
                    range_error = e  # the type fits, the value does not: say that, not the type
        if range_error is not None:
            raise range_error
        raise ConfigError(f"'{path}' must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"'{path}' must be one of {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        shorthand = getattr(tp, "__shorthand__", None)  # a spec written as just its name: {name: value}
        if shorthand is not None and isinstance(value, str):
            value = {shorthand: value}
        return parse(tp, value, path)  # type: ignore[arg-type]
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{path}' must be a list, got {value!r}")
        (item_tp, *_rest) = get_args(tp) or (Any,)
        return tuple(_coerce(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{path}' must be a mapping, got {value!r}")
        _k, v_tp = get_args(tp) or (str, Any)
        return {k: _coerce(v_tp, v, _join(path, str(k))) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{path}' must be bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"'{path}' must be int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value != value or value in (float("inf"), float("-inf")):
                raise ConfigError(f"'{path}' must be a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"'{path}' must be float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"'{path}' must be str, got {value!r}")
    raise ConfigError(f"'{path}': unsupported schema type {tp!r}")  # a bug in the schema, not the recipe


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain dicts/lists (for saving the resolved recipe and logging it)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def first_difference(saved: Any, wanted: Any, path: str = "") -> tuple[str, Any, Any] | None:
    """The first (dotted key, saved value, wanted value) where two plain trees differ (lists and tuples
    compare by items), or None when they are equal."""
    if isinstance(saved, dict) and isinstance(wanted, dict):
        for k in list(saved) + [k for k in wanted if k not in saved]:
            if d := first_difference(saved.get(k), wanted.get(k), f"{path}.{k}" if path else str(k)):
                return d
        return None
    if isinstance(saved, list | tuple) and isinstance(wanted, list | tuple):
        saved, wanted = list(saved), list(wanted)
    return None if saved == wanted else (path, saved, wanted)


__all__ = [
    "ConfigError",
    "NonNegFloat",
    "NonNegInt",
    "PosFloat",
    "PosInt",
    "Prob",
    "Range",
    "first_difference",
    "parse",
    "to_dict",
]
