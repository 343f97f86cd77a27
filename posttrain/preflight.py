"""Every check of a recipe that loads no model: ``posttrain validate`` and ``posttrain run`` both call
``preflight`` before anything trains, so bad input fails in a second with one line, not after the
stages before it.

    preflight(recipe)
      ├─ the expert-parallel layout against the ranks and the model's experts  (posttrain.parallel)
      ├─ model dirs: the recipe's model and every teacher                       (check_model_path)
      ├─ plugins: reward names, their extras and kwargs; data-filter names      (check_plugins)
      └─ data sources: files exist, parse, and have the columns the stage reads (posttrain.data)

Nothing here imports torch at module level: ``validate`` stays fast (the data checks import
``datasets`` only for recipes with data files).
"""

from __future__ import annotations

from pathlib import Path

from posttrain.config import Recipe
from posttrain.parallel import check_recipe
from posttrain.schema import ConfigError


def preflight(recipe: Recipe) -> None:
    check_recipe(recipe)
    check_model_paths(recipe)
    check_plugins(recipe)
    check_data(recipe)


def check_model_paths(recipe: Recipe) -> None:
    """The recipe's model and every stage's teacher, when given as a dir or hub id."""
    if recipe.model.name_or_path is not None:
        check_model_path(recipe.model.name_or_path, "model.name_or_path")
    for name, cfg in recipe.stages.items():
        teacher = getattr(getattr(cfg, "codistill", None), "teacher", None)
        if teacher is not None and teacher.name_or_path is not None:
            check_model_path(teacher.name_or_path, f"stages.{name}.codistill.teacher.name_or_path")


def check_model_path(source: str, key: str) -> None:
    """A model dir must exist and hold a ``config.json``; anything else must load as a hub model's config.

    A local-looking path (``/``, ``.``, ``~`` or several ``/``) that is not a dir fails at once. Another
    name (``org/name``) is fetched as a hub config — a few kB, from the cache when ``HF_HUB_OFFLINE`` is
    set — so a typo fails in a second, before any run dir is written.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"{key}: '{source}' has no config.json; point it at a saved HF model dir (save_pretrained)"
            )
        return
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise ConfigError(
            f"{key}: model dir '{source}' does not exist; point it at a saved HF model dir (save_pretrained)"
        )
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"{key}: '{source}' is no model dir here and no hub model that could be loaded ({first}); "
            "point it at a saved HF model dir or a reachable hub id"
        ) from None


def check_plugins(recipe: Recipe) -> None:
    """Every stage's rewards resolve (names, optional extras, cheap kwargs checks) and its data filters
    exist."""
    from posttrain.registry import DATA_FILTERS
    from posttrain.reward_runner import bind_rewards

    for cfg in recipe.stages.values():
        if hasattr(cfg, "rewards"):
            bind_rewards(cfg.rewards)
        for name in getattr(cfg, "data_filters", ()):
            DATA_FILTERS.get(name)


def check_data(recipe: Recipe) -> None:
    """Every data file the recipe names: it exists, parses, and has the columns its reader needs."""
    sources = [("eval.data", recipe.eval.data, ["prompt"])]
    for name, cfg in recipe.stages.items():
        if hasattr(cfg, "data"):
            needs = ["prompt"] if cfg.type == "rl" else ["prompt", "completion|answer"]
            sources.append((f"stages.{name}.data", cfg.data, needs))
    for key, data, needs in sources:
        if data.source != "tiny":
            from posttrain.data import check_source

            check_source(data, key, needs)
