"""Parallel-layout checks that run before any rank starts or any model loads (no torch, no DeepSpeed).

``posttrain run`` calls ``check_recipe`` when it starts the ranks itself; the ranks check again against
the loaded model in ``posttrain.moe.apply_expert_parallel``. Each failure is one ``ConfigError`` line
that names ``parallel.ep_size`` and what to do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from posttrain.config import ModelConfig, Recipe
from posttrain.schema import ConfigError


def num_routed_experts(model_config: Any) -> int | None:
    """Routed experts per MoE layer from an HF config (``num_local_experts`` or ``num_experts``)."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    for attr in ("num_local_experts", "num_experts"):
        value = getattr(text, attr, None)
        if isinstance(value, int):
            return value
    return None


def check_ep_size(ep_size: int, world_size: int, num_experts: int | None) -> None:
    """Raise a one-line ``ConfigError`` when ``ep_size`` cannot split these ranks and experts."""
    if ep_size < 1:
        raise ConfigError(f"parallel.ep_size must be >= 1, got {ep_size}")
    if ep_size == 1:
        return
    if ep_size > world_size:
        raise ConfigError(
            f"parallel.ep_size={ep_size} is larger than the number of ranks ({world_size}); "
            f"launch at least {ep_size} ranks (launcher.nproc_per_node x launcher.nnodes) or lower parallel.ep_size"
        )
    if world_size % ep_size:
        raise ConfigError(
            f"parallel.ep_size={ep_size} does not divide the number of ranks ({world_size}); "
            "use a divisor of the rank count"
        )
    if num_experts is None:
        raise ConfigError(
            f"parallel.ep_size={ep_size} but the model has no routed experts (a dense model); set parallel.ep_size=1"
        )
    if num_experts % ep_size:
        divisors = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
        raise ConfigError(
            f"parallel.ep_size={ep_size} does not divide the model's {num_experts} routed experts; use one of {divisors}"
        )


def check_ep_zero_stage(ep_size: int, zero_stage: int, gradient_clipping: float) -> None:
    """ZeRO-0 clips with the mean of the ranks' gradient norms (DeepSpeed's ``clip_grad_norm_``); under
    expert parallelism each rank's norm covers other experts, so that is not the global norm and the
    run would not match one process. ZeRO 1-3 compute the global norm."""
    if ep_size > 1 and zero_stage == 0 and gradient_clipping > 0:
        raise ConfigError(
            f"parallel.ep_size={ep_size} with deepspeed ZeRO-0 clips with a per-rank-averaged gradient norm, not "
            "the global one; use deepspeed=zero1, zero2 or zero3, or set deepspeed.gradient_clipping=0"
        )


def check_recipe(recipe: Recipe) -> None:
    """``parallel.ep_size`` against the ranks the launcher will start and the model's experts, before any
    rank starts or any model loads (the ranks check again, against the loaded model)."""
    ep_size = recipe.parallel.ep_size
    if ep_size == 1:
        return
    check_ep_zero_stage(ep_size, recipe.deepspeed.zero_stage, recipe.deepspeed.gradient_clipping)
    world = recipe.launcher.nproc_per_node * recipe.launcher.nnodes
    experts = _recipe_experts(recipe.model)
    if experts == "unknown":  # a hub id: its config is read when the model loads
        check_ep_size(ep_size, world, num_experts=ep_size)
    else:
        check_ep_size(ep_size, world, experts)


def _recipe_experts(cfg: ModelConfig) -> int | None | Literal["unknown"]:
    """Routed experts per layer of the recipe's model, from its config, without loading it."""
    if cfg.name_or_path is not None:
        path = Path(cfg.name_or_path).expanduser() / "config.json"
        if not path.exists():
            return "unknown"
        data = json.loads(path.read_text())
        for conf in (data, data.get("text_config") or {}):
            for attr in ("num_local_experts", "num_experts"):
                if isinstance(conf.get(attr), int):
                    return int(conf[attr])
        return None
    for attr in ("num_local_experts", "num_experts"):
        if isinstance(cfg.config.get(attr), int):
            return int(cfg.config[attr])
    if cfg.arch in (None, "llama"):
        return None
    from posttrain.models import _config_class  # transformers' default for this family

    return num_routed_experts(_config_class(cfg.arch)())
