"""Small name -> object registries with errors that list the valid names.

A name resolves, in order, to:
  1. an object registered in-process with ``@REGISTRY.register("name")``;
  2. an object published by an installed package under the registry's entry-point group
     (``[project.entry-points."posttrain.rewards"] name = "pkg.module:fn"``);
  3. an import path ``pkg.module:attr`` written directly in a recipe.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from posttrain.errors import UserError

T = TypeVar("T")


class RegistryError(UserError, KeyError):
    """An unknown or ambiguous name; the message says what the valid names are."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class Registry(Generic[T]):
    def __init__(
        self, kind: str, entry_point_group: str | None = None, builtin_modules: tuple[str, ...] = ()
    ):
        self.kind = kind
        self.group = entry_point_group
        self._builtin_modules = builtin_modules
        self._builtins_loaded = False
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            existing = self._items.get(name)
            if existing is not None and existing is not obj:
                raise RegistryError(f"{self.kind} {name!r} is registered twice; rename one of them")
            self._items[name] = obj
            return obj

        return deco

    def _load_builtins(self) -> None:
        if not self._builtins_loaded:
            self._builtins_loaded = True
            for mod in self._builtin_modules:
                importlib.import_module(mod)

    def _entry_points(self) -> dict[str, Any]:
        if self.group is None:
            return {}
        return {ep.name: ep for ep in entry_points(group=self.group)}

    def names(self) -> list[str]:
        self._load_builtins()
        return sorted(set(self._items) | set(self._entry_points()))

    def get(self, name: str) -> T:
        self._load_builtins()
        if name in self._items:
            return self._items[name]
        eps = self._entry_points()
        if name in eps:
            obj: T = eps[name].load()
            self._items.setdefault(name, obj)
            return self._items[name]
        if ":" in name:
            found: T = _import_path(name, self.kind)
            return found
        valid = self.names()
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise RegistryError(
            f"unknown {self.kind} {name!r}.{hint} Valid: {', '.join(valid) or '(none)'}; "
            f"or give an import path 'pkg.module:name'"
        )

    def items(self) -> dict[str, T]:
        return {n: self.get(n) for n in self.names()}


def _import_path(path: str, kind: str) -> Any:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RegistryError(f"{kind} {path!r}: cannot import module {module_name!r} ({e})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise RegistryError(f"{kind} {path!r}: module {module_name!r} has no attribute {attr!r}") from None


# The registries the project uses. Built-in plugins live in the top-level `rewards` and
# `data_filters` packages, imported on first lookup.
REWARDS: Registry[Callable[..., Any]] = Registry("reward", "posttrain.rewards", ("rewards",))
DATA_FILTERS: Registry[Callable[..., Any]] = Registry(
    "data filter", "posttrain.data_filters", ("data_filters",)
)
