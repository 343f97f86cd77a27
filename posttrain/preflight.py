"""Every check of a recipe that loads no model: ``posttrain validate`` and ``posttrain run`` both call
``preflight`` before anything trains, so bad input fails in a second with one line, not after the
stages before it.

    preflight(recipe)
      ├─ the expert-parallel layout against the ranks and the model's experts  (posttrain.parallel)
      ├─ model dirs: the recipe's model and every teacher                       (check_model_path)
      ├─ plugins: rewards (names, extras, kwargs); data filters (names, options,  (check_plugins)
      │           a judge: an earlier stage or a model dir)
      ├─ data sources: files exist, parse, and have the columns the stage reads (posttrain.data)
      └─ hardware: the GPUs the recipe states, and a per-GPU memory floor that must fit them

Nothing here imports torch at module level: ``validate`` stays fast (the data checks import
``datasets`` only for recipes with data files).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from posttrain.config import ModelConfig, Recipe
from posttrain.parallel import check_recipe
from posttrain.schema import ConfigError


def preflight(recipe: Recipe, hub: bool = True) -> list[str]:
    """Every check; returns the hardware lines to show. ``hub=False`` (``validate``): hub model ids are
    not looked up (a recipe for a cluster validates on a laptop without the hub)."""
    check_recipe(recipe)
    check_model_paths(recipe, hub)
    check_plugins(recipe, hub)
    check_data(recipe)
    return check_hardware(recipe)


def check_model_paths(recipe: Recipe, hub: bool = True) -> None:
    """The recipe's model and every stage's teacher, when given as a dir or hub id."""
    if recipe.model.name_or_path is not None:
        check_model_path(recipe.model.name_or_path, "model.name_or_path", hub)
    for name, cfg in recipe.stages.items():
        teacher = getattr(getattr(cfg, "codistill", None), "teacher", None)
        if teacher is not None and teacher.name_or_path is not None:
            check_model_path(teacher.name_or_path, f"stages.{name}.codistill.teacher.name_or_path", hub)


def check_model_path(source: str, key: str, hub: bool = True) -> None:
    """A model dir must exist and hold a ``config.json``; anything else must load as a hub model's config.

    A local-looking path (``/``, ``.``, ``~`` or several ``/``) that is not a dir fails at once. Another
    name (``org/name``) is fetched as a hub config — a few kB, from the cache when ``HF_HUB_OFFLINE`` is
    set — so a typo fails in a second, before any run dir is written.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise ConfigError(
                f"{key}: '{source}' has no config.json; point it at a saved HF model dir (save_pretrained)"
            )
        try:
            json.loads(config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(
                f"{key}: {config} is not valid JSON ({e}); re-export the model with save_pretrained"
            ) from None
        weights = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
        if not key.endswith("tokenizer") and not any(next(path.glob(p), None) for p in weights):
            raise ConfigError(
                f"{key}: '{source}' has a config.json but no weight files (*.safetensors, *.bin); "
                "point it at a complete saved model dir"
            )
        return
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise ConfigError(
            f"{key}: model dir '{source}' does not exist; point it at a saved HF model dir (save_pretrained)"
        )
    if not hub:
        return
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"{key}: '{source}' is no model dir here and no hub model that could be loaded ({first}); "
            "point it at a saved HF model dir or a reachable hub id"
        ) from None


def check_plugins(recipe: Recipe, hub: bool = True) -> None:
    """Every stage's rewards resolve (names, optional extras, cheap kwargs checks), and so do its data
    filters (names, options, a judge where the filter runs a model: an earlier stage or a model dir)."""
    from posttrain.plugins import resolve_filter
    from posttrain.reward_runner import bind_rewards

    names = list(recipe.stages)
    for i, (name, cfg) in enumerate(recipe.stages.items()):
        if hasattr(cfg, "rewards"):
            bind_rewards(cfg.rewards)
        for j, spec in enumerate(getattr(cfg, "data_filters", ())):
            path = f"stages.{name}.data_filters[{j}]"
            resolve_filter(spec, path)
            model = spec.judge.model if spec.judge is not None else None
            if model is None or model in names[:i]:
                continue
            if model in names:
                raise ConfigError(
                    f"'{path}.judge.model' names stage {model!r}, which does not run before stage {name!r}; "
                    f"a judge is an earlier stage ({', '.join(names[:i]) or 'none here'}) or a checkpoint dir"
                )
            check_model_path(model, f"{path}.judge.model", hub)


def check_data(recipe: Recipe) -> None:
    """Every data source the recipe names: a file exists, parses and has rows of text; every source,
    the tiny world's too, has the columns its reader needs — the stage's, and those its rewards (or
    the eval section's reward) take without a default."""
    from posttrain.plugins import required_columns, resolve_filter
    from posttrain.registry import REWARDS

    sources = []
    if recipe.eval is not None:
        needs = ["prompt", *required_columns(REWARDS.get(recipe.eval.reward))]
        sources.append(("eval.data", recipe.eval.data, needs, f"the eval reward {recipe.eval.reward!r}"))
    for name, cfg in recipe.stages.items():
        if not hasattr(cfg, "data"):
            continue
        needs = {"rl": ["prompt"], "dpo": ["prompt"]}.get(cfg.type, ["prompt", "completion|answer"])
        dataset_pairs = cfg.type == "dpo" and cfg.pairs.source == "dataset"
        if dataset_pairs:
            needs = ["prompt", "chosen", "rejected"]
        for spec in () if dataset_pairs else getattr(getattr(cfg, "rewards", None), "specs", ()):
            needs += [c for c in required_columns(REWARDS.get(spec.name)) if c not in spec.kwargs]
        for j, spec in enumerate(getattr(cfg, "data_filters", ())):  # the columns each filter reads
            _, info, options = resolve_filter(spec, f"stages.{name}.data_filters[{j}]")
            needs += info.columns(options) if info.columns is not None else []
        sources.append(
            (f"stages.{name}.data", cfg.data, needs, f"stage {name!r}, its rewards and data filters")
        )
    for key, data, needs, reader in sources:
        if data.source == "tiny":
            missing = [c for c in dict.fromkeys(needs) if not set(c.split("|")) & set(TINY_COLUMNS)]
            if missing:
                raise ConfigError(
                    f"{key}: the tiny world has no column {', '.join(map(repr, missing))}, which {reader} reads "
                    f"(it has {', '.join(TINY_COLUMNS)})"
                )
            continue
        from posttrain.data import check_source

        check_source(data, key, list(dict.fromkeys(needs)))


TINY_COLUMNS = ("prompt", "answer", "completion", "capability", "difficulty")  # posttrain.tasks rows


# --------------------------------------------------------------------------------------------------
# hardware

GIB = 2**30


def model_params(cfg: ModelConfig) -> float | None:
    """Parameters of a model, in billions: ``num_params_b``, a local checkpoint's weight files, or a
    model built from arch + config on the meta device (no memory); None for an uncounted hub id."""
    if cfg.num_params_b is not None:
        return cfg.num_params_b
    if cfg.name_or_path is not None:
        path = Path(cfg.name_or_path).expanduser()
        files = list(path.glob("*.safetensors")) if path.is_dir() else []
        if not files:
            return None
        from safetensors import safe_open

        total = 0
        for f in files:
            with safe_open(str(f), framework="pt") as sf:
                total += sum(_numel(sf.get_slice(k).get_shape()) for k in sf.keys())  # noqa: SIM118
        return total / 1e9
    import torch

    from posttrain.models import build_tokenizer, hf_config, model_class

    with torch.device("meta"):
        model = model_class(cfg.arch or "llama")(hf_config(cfg, build_tokenizer(cfg)))
    count: int = sum(p.numel() for p in model.parameters())
    return count / 1e9


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass
class MemoryEstimate:
    """Per-GPU GiB of a recipe's biggest stage: what stays resident while its rollout engine generates."""

    train_state: float  # the student's ZeRO-partitioned weights, gradients and AdamW state
    frozen: float  # teachers / KL references, partitioned like the student
    engine_weights: float  # the rollout engine's weights (split over its tensor-parallel group)
    engine_share: float  # the GPU memory vLLM takes (gpu_memory_utilization), its weights included

    def lines(self) -> list[str]:
        return [
            f"training state {self.train_state:.1f} GiB + frozen models {self.frozen:.1f} GiB",
            f"rollout engine {self.engine_share:.1f} GiB of which weights {self.engine_weights:.1f} GiB",
        ]


def estimate_memory(recipe: Recipe, params_b: float, gpu_gib: float, world: int) -> MemoryEstimate:
    """A floor, not a promise: bytes per parameter for bf16 training with fp32 AdamW (2 weights + 2
    gradients + 12 optimizer: fp32 master, m, v), split over ``world`` ranks by the ZeRO stage; no
    activations (they depend on sequence length and checkpointing). A recipe over this floor cannot
    run; one under it may still need smaller micro-batches."""
    n = params_b * 1e9
    zero = recipe.deepspeed.zero_stage
    weights, grads, optim = 2.0 * n, 2.0 * n, 12.0 * n
    if zero >= 1:
        optim /= world
    if zero >= 2:
        grads /= world
    if zero >= 3:
        weights /= world
    frozen = 0.0
    engine_w = engine_share = 0.0
    for cfg in recipe.stages.values():
        teacher = getattr(getattr(cfg, "codistill", None), "teacher", None)
        if teacher is not None and (tp := model_params(teacher)) is not None:
            frozen = max(frozen, 2.0 * tp * 1e9 / (world if zero == 3 else 1))
        loss = getattr(cfg, "loss", None)
        if loss is not None and (loss.kl_coef > 0 or loss.log_kl):
            frozen = max(frozen, 2.0 * n / (world if zero == 3 else 1))
        engine = getattr(cfg, "engine", None)
        if engine is not None and engine.kind == "vllm":
            engine_w = max(engine_w, 2.0 * n / engine.tensor_parallel_size)
            engine_share = max(engine_share, engine.gpu_memory_utilization * gpu_gib * GIB)
    return MemoryEstimate((weights + grads + optim) / GIB, frozen / GIB, engine_w / GIB, engine_share / GIB)


def check_hardware(recipe: Recipe) -> list[str]:
    """What the recipe needs (``hardware``) and whether its memory floor fits: one line each to print;
    a recipe that cannot fit is a ``ConfigError``."""
    hw = recipe.hardware
    if hw.gpus == 0:
        return ["hardware: any machine (no GPU requirement stated)"]
    world = recipe.launcher.nproc_per_node * recipe.launcher.nnodes
    if world != hw.gpus:
        raise ConfigError(
            f"hardware.gpus={hw.gpus} but the launcher starts {world} ranks "
            "(launcher.nproc_per_node x launcher.nnodes); one rank per GPU"
        )
    out = [f"hardware: {hw.gpus} GPUs x {hw.gpu_memory_gib:g} GiB" + (f" ({hw.notes})" if hw.notes else "")]
    params = model_params(recipe.model)
    if params is None:
        return [*out, "memory: not estimated (set model.num_params_b for a hub model)"]
    est = estimate_memory(recipe, params, hw.gpu_memory_gib, world)
    resident = est.train_state + est.frozen
    out += [f"memory per GPU ({params:.1f}B parameters): " + "; ".join(est.lines())]
    if est.engine_weights > 0.9 * est.engine_share and est.engine_share > 0:
        raise ConfigError(
            f"the rollout engine's weights ({est.engine_weights:.1f} GiB per GPU) do not fit its share of a "
            f"{hw.gpu_memory_gib:g} GiB GPU ({est.engine_share:.1f} GiB, engine.gpu_memory_utilization); raise "
            "engine.tensor_parallel_size or gpu_memory_utilization"
        )
    if resident + est.engine_share > hw.gpu_memory_gib:
        raise ConfigError(
            f"estimated {resident:.1f} GiB of training state per GPU plus the rollout engine's "
            f"{est.engine_share:.1f} GiB exceed a {hw.gpu_memory_gib:g} GiB GPU; use more GPUs, ZeRO-3, "
            "or a smaller engine.gpu_memory_utilization"
        )
    return [*out, f"fits: {resident + est.engine_share:.1f} of {hw.gpu_memory_gib:g} GiB before activations"]
