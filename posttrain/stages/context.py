"""What a stage runner receives, and the chores every stage loop does the same way.

A stage is one function ``run_<type>(ctx: StageContext) -> None`` that reads top to bottom and writes
``ctx.checkpoint_dir``. The chores are plain calls, not callbacks::

    state = resume(ctx, total_steps)                  # restore the strategy's state; cut metrics back
    ...
    maybe_eval(ctx, tokenizer, step)                  # held-out eval every cfg.eval_every steps
    maybe_save(ctx, step, lambda: {"step": step})     # resume state every cfg.save_every steps
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.config import Recipe
from posttrain.data import load_rows
from posttrain.errors import UserError
from posttrain.evaluate import evaluate
from posttrain.models import build_model, load_checkpoint
from posttrain.strategy import Strategy
from posttrain.tracking import Tracker


@dataclass
class StageContext:
    recipe: Recipe
    name: str
    cfg: Any  # the stage's config dataclass (SFTConfig, RLConfig, …): posttrain.config.STAGES
    stage_dir: Path
    input_dir: Path | None  # previous stage's checkpoint; None: build from recipe.model
    strategy: Strategy
    tracker: Tracker
    seed: int
    _eval_rows: Any = field(default=None, repr=False)
    _closers: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def closing(self, resource: Any) -> Any:
        """``resource`` (e.g. a rollout engine), whose ``close()`` the pipeline calls when the stage ends
        — normally or by an error — so a failed stage leaves no engine behind in the process."""
        self._closers.append(resource.close)
        return resource

    def close(self) -> None:
        while self._closers:
            self._closers.pop()()

    @property
    def checkpoint_dir(self) -> Path:
        return self.stage_dir / "checkpoint"

    @property
    def state_dir(self) -> Path:
        return self.stage_dir / "state"

    def load_model(self) -> tuple[Any, Any]:
        """A fresh copy of the model this stage starts from, and its tokenizer."""
        if self.input_dir is None:
            return build_model(self.recipe.model, seed=self.seed)
        return load_checkpoint(self.input_dir, self.recipe.model.dtype)

    def eval_set(self) -> Any:
        """The recipe's held-out rows (loaded once)."""
        if self._eval_rows is None:
            assert self.recipe.eval is not None, "the recipe has no eval section"
            self._eval_rows = load_rows(self.recipe.eval.data, "eval", self.recipe.run.seed, ["prompt"])
        return self._eval_rows


def resume(ctx: StageContext, total_steps: int) -> dict[str, Any]:
    """Restore the strategy's saved state (weights, optimizer, scheduler, RNG) if there is one, drop the
    metrics rows logged after it, and start the progress bar. Returns the loop's own saved state
    (``{"step": 0}`` on a fresh start). Call after ``strategy.setup``."""
    state = ctx.strategy.load_state(ctx.state_dir) or {"step": 0}
    step = int(state.get("step", 0))
    ctx.tracker.resume_at(step)
    ctx.tracker.progress(total_steps, step, desc=f"{ctx.name} ({ctx.cfg.type})")
    return state


def maybe_eval(ctx: StageContext, tokenizer: Any, step: int) -> None:
    """Every ``cfg.eval_every`` steps (not at the last: the pipeline evaluates every finished stage):
    held-out greedy/sampled pass@1 of the current weights, logged as ``eval/*``. Every rank generates
    its share of the prompts with the training model on its device (a collective: every rank calls
    it at the same steps; a sharded model generates in lockstep)."""
    every, last = int(getattr(ctx.cfg, "eval_every", 0)), int(ctx.cfg.max_steps)
    if ctx.recipe.eval is None or not every or step % every or step >= last:
        return
    strategy = ctx.strategy
    metrics = evaluate(
        strategy.module, tokenizer, ctx.eval_set(), ctx.recipe.eval, seed=ctx.seed + step,
        strategy=strategy, synced=strategy.model_is_sharded,
    )  # fmt: skip
    ctx.tracker.log({f"eval/{k}": v for k, v in metrics.items()}, step)


class NonFiniteSteps(UserError):
    """A stage stopped after ``run.max_nonfinite_steps`` non-finite steps in a row."""


@dataclass
class NonFiniteGuard:
    """Counts optimizer steps skipped for a non-finite loss or gradient (``Strategy.last_step_skipped``)
    and stops the stage after ``run.max_nonfinite_steps`` in a row, naming the last finite values."""

    ctx: StageContext
    total: int = 0
    in_a_row: int = 0
    last_finite: str = "none yet"

    def after_step(self, step: int, loss: float, grad_norm: float | None) -> dict[str, float]:
        """Call once per optimizer step, after it; returns ``train/nonfinite_*`` metrics."""
        skipped = self.ctx.strategy.last_step_skipped or not math.isfinite(loss)
        if not skipped:
            self.in_a_row = 0
            self.last_finite = f"loss {loss:.4g} at step {step}" + (
                f", grad norm {grad_norm:.4g}" if grad_norm is not None else ""
            )
            return {"train/nonfinite_steps": float(self.total)}
        self.total += 1
        self.in_a_row += 1
        limit = self.ctx.recipe.run.max_nonfinite_steps
        if self.in_a_row >= limit:
            raise NonFiniteSteps(
                f"stage {self.ctx.name} ({self.ctx.cfg.type}): {limit} non-finite steps in a row, the last at step "
                f"{step} (loss {loss}, grad norm {grad_norm}); last finite: {self.last_finite}; the weights are "
                "those of that step (saved state untouched): lower optim.lr, check the data, or raise "
                "run.max_nonfinite_steps"
            )
        return {"train/nonfinite_steps": float(self.total), "train/skipped_nonfinite": 1.0}


def maybe_save(ctx: StageContext, step: int, client_state: Callable[[], dict[str, Any]]) -> None:
    """Every ``cfg.save_every`` steps (not at the last: the stage then exports its checkpoint), save the
    resume state: the strategy's plus ``client_state()`` (the loop's own: step, curriculum, …)."""
    every, last = int(ctx.cfg.save_every), int(ctx.cfg.max_steps)
    if every and step % every == 0 and step < last:
        ctx.strategy.save_state(ctx.state_dir, client_state())
