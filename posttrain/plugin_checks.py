"""Checks of a recipe's plugins that load no model and import no torch (``posttrain validate`` runs them)."""

from __future__ import annotations

from posttrain.config import Recipe


def check_plugins(recipe: Recipe) -> None:
    """Every stage's rewards resolve (names, optional extras, cheap kwargs checks) and its data filters
    exist — before any stage trains, so a typo fails now rather than after the stages before it."""
    from posttrain.registry import DATA_FILTERS
    from posttrain.reward_runner import bind_rewards

    for cfg in recipe.stages.values():
        if hasattr(cfg, "rewards"):
            bind_rewards(cfg.rewards)
        for name in getattr(cfg, "data_filters", ()):
            DATA_FILTERS.get(name)
