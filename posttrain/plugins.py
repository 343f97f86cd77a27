"""Decorators that plugin authors use: ``@reward("name")`` and ``@data_filter("name")``.

A reward is a plain batch function::

    @reward("my_reward")
    def my_reward(prompts: list[str], completions: list[str], **columns) -> list[float | None]:
        ...

``columns`` holds the dataset's other columns (``answer``, ``capability``, ...), one list each.
``None`` means "not applicable to this sample".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from posttrain.registry import DATA_FILTERS, REWARDS


def reward(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return REWARDS.register(name)


def data_filter(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return DATA_FILTERS.register(name)
