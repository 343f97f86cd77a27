"""Decorators that plugin authors use: ``@reward("name")`` and ``@data_filter("name")`` (see its docstring).

A reward is a plain batch function, sync or async::

    @reward("my_reward", doc="1.0 when the answer is right", timeout_s=10)
    def my_reward(prompts: list[str], completions: list[str], **columns) -> list[float | None]:
        ...

``columns`` holds the dataset's other columns (``answer``, ``capability``, ...), one list each,
plus the ``kwargs`` of the recipe's reward spec. ``None`` means "not applicable to this sample".
``doc`` (default: the first line of the docstring) is what ``posttrain rewards`` lists;
``timeout_s`` is used when the recipe's spec gives no ``timeout_s`` of its own;
``requires`` maps an optional module to the extra that installs it, checked before a run starts;
``check(kwargs)``, if given, validates the spec's kwargs cheaply (no model loads) when the run
starts, before any stage trains: raise ``posttrain.errors.UserError`` with a one-line message.
``setup(kwargs)``, if given, is called once by ``RewardRunner`` (in the thread that builds it, before
any scoring) with the spec's kwargs: load a judge model there.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from posttrain.errors import MissingDependencyError
from posttrain.registry import DATA_FILTERS, REWARDS

_INFO_ATTR = "__posttrain_reward__"


@dataclass(frozen=True)
class RewardInfo:
    name: str
    doc: str  # one line
    timeout_s: float | None  # the reward's own default; None: the recipe's
    is_async: bool
    requires: tuple[tuple[str, str], ...] = ()  # (module, extra)
    setup: Callable[[dict[str, Any]], None] | None = None  # called once with the spec's kwargs
    check: Callable[[dict[str, Any]], None] | None = None  # cheap kwargs check before the run starts


def reward(
    name: str | None = None,
    *,
    doc: str | None = None,
    timeout_s: float | None = None,
    requires: Mapping[str, str] | None = None,
    setup: Callable[[dict[str, Any]], None] | None = None,
    check: Callable[[dict[str, Any]], None] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn`` as reward ``name`` (default: the function's name) with its metadata."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        info = RewardInfo(
            name=name or fn.__name__,
            doc=doc or first_line(fn.__doc__),
            timeout_s=timeout_s,
            is_async=inspect.iscoroutinefunction(fn),
            requires=tuple((requires or {}).items()),
            setup=setup,
            check=check,
        )
        setattr(fn, _INFO_ATTR, info)
        return REWARDS.register(info.name)(fn)

    return deco


def reward_info(fn: Callable[..., Any], name: str) -> RewardInfo:
    """The decorator's metadata, or metadata derived from a plain function (entry point, import path)."""
    info = getattr(fn, _INFO_ATTR, None)
    if isinstance(info, RewardInfo):
        return info
    return RewardInfo(
        name=name, doc=first_line(fn.__doc__), timeout_s=None, is_async=inspect.iscoroutinefunction(fn)
    )


def required_columns(fn: Callable[..., Any]) -> list[str]:
    """The data columns a reward cannot do without: its parameters after ``prompts`` and ``completions``
    that have no default (``exact_match``: ``answer``). ``**columns`` takes the rest, when present."""
    params = list(inspect.signature(fn).parameters.values())[2:]
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.kind in kinds and p.default is inspect.Parameter.empty]


def first_line(doc: str | None) -> str:
    return inspect.cleandoc(doc).splitlines()[0] if doc and doc.strip() else ""


def missing_requirements(info: RewardInfo) -> list[str]:
    """One message per optional module of ``info`` that is not installed."""
    return [
        f"reward {info.name!r} needs the {module!r} package: pip install 'posttrain[{extra}]'"
        for module, extra in info.requires
        if importlib.util.find_spec(module) is None
    ]


def require(module: str, extra: str, user: str) -> ModuleType:
    """Import optional ``module`` for ``user``, or raise an error naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(
            f"{user} needs the {module!r} package ({e}): pip install 'posttrain[{extra}]'"
        ) from None


# --------------------------------------------------------------------------------------------------
# Data filters

_FILTER_INFO_ATTR = "__posttrain_data_filter__"


@dataclass(frozen=True)
class DataFilterInfo:
    name: str
    doc: str  # one line
    judge: bool  # runs a judge model: the recipe's spec needs a ``judge`` section
    options: type | None  # frozen dataclass the spec's kwargs are checked into (schema ranges); None: a dict
    requires: tuple[tuple[str, str], ...] = ()  # (module, extra)
    # the data columns the filter reads, given its options (checked against the data by validate)
    columns: Callable[[Any], list[str]] | None = None
    # cheap check of (options, spec, key path) before the run starts (no model loads): raise UserError
    check: Callable[[Any, Any, str], None] | None = None


def data_filter(
    name: str | None = None,
    *,
    doc: str | None = None,
    judge: bool = False,
    options: type | None = None,
    requires: Mapping[str, str] | None = None,
    columns: Callable[[Any], list[str]] | None = None,
    check: Callable[[Any, Any, str], None] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn`` as data filter ``name`` (default: the function's name).

    A filter scores rows; the stage's ``data_selection`` decides which to keep::

        @data_filter("my_filter", doc="longer prompts are harder")
        def my_filter(rows: datasets.Dataset, ctx: posttrain.filters.FilterContext) -> list[float | None]:
            ...  # one difficulty in [0, 1] per row (1 = hardest); None: could not score it

    It may return a ``posttrain.filters.FilterScores`` (scores + metrics + notes) instead of the list.
    ``judge=True``: the filter runs a model (``ctx.judge``: the rollout engine on the spec's judge model,
    with the judgment cache); ``options``: a frozen dataclass the spec's ``kwargs`` are parsed into (typed,
    ranged, did-you-mean errors at validate), handed over as ``ctx.options``; ``columns(options)``: the
    data columns it reads; ``check(options, spec, path)``: a cheap cross-check run by validate.
    """

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        info = DataFilterInfo(
            name=name or fn.__name__,
            doc=doc or first_line(fn.__doc__),
            judge=judge,
            options=options,
            requires=tuple((requires or {}).items()),
            columns=columns,
            check=check,
        )
        setattr(fn, _FILTER_INFO_ATTR, info)
        return DATA_FILTERS.register(info.name)(fn)

    return deco


def data_filter_info(fn: Callable[..., Any], name: str) -> DataFilterInfo:
    """The decorator's metadata, or metadata derived from a plain function (entry point, import path)."""
    info = getattr(fn, _FILTER_INFO_ATTR, None)
    if isinstance(info, DataFilterInfo):
        return info
    return DataFilterInfo(name=name, doc=first_line(fn.__doc__), judge=False, options=None)


def resolve_filter(spec: Any, path: str) -> tuple[Callable[..., Any], DataFilterInfo, Any]:
    """A recipe's ``DataFilterSpec`` -> (function, metadata, parsed options). Loads no model: the name
    resolves, optional extras are installed, ``kwargs`` parse into the filter's options (one line naming
    ``<path>.kwargs.KEY`` otherwise), a judge section is there when the filter runs a model, and the
    filter's own ``check`` passes."""
    from posttrain.schema import ConfigError, parse

    fn = DATA_FILTERS.get(spec.name)
    if not callable(fn):
        raise ConfigError(f"{path}: data filter {spec.name!r} resolved to {fn!r}, which is not callable")
    info = data_filter_info(fn, spec.name.rsplit(":", 1)[-1])
    missing = [
        f"data filter {info.name!r} needs the {module!r} package: pip install 'posttrain[{extra}]'"
        for module, extra in info.requires
        if importlib.util.find_spec(module) is None
    ]
    if missing:
        raise MissingDependencyError("; ".join(missing))
    options = parse(info.options, spec.kwargs, f"{path}.kwargs") if info.options else dict(spec.kwargs)
    if info.judge and spec.judge is None:
        raise ConfigError(
            f"'{path}': data filter {info.name!r} runs a judge model; add judge: {{model: <an earlier stage's "
            "name or a checkpoint dir>}"
        )
    if not info.judge and spec.judge is not None:
        raise ConfigError(
            f"'{path}.judge': data filter {info.name!r} runs no model; remove its judge section"
        )
    if info.check is not None:
        info.check(options, spec, path)
    return fn, info, options
