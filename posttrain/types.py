"""Typed records that cross module boundaries (rollouts -> rewards -> advantages -> training)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DEFAULT_CAPABILITY = "default"


@dataclass
class Sample:
    """One prompt with its reference columns (``answer``, ``capability``, ``difficulty``, ...)."""

    prompt: str  # raw user text (the chat template is applied by the engine/tokenizer)
    columns: dict[str, Any] = field(default_factory=dict)
    uid: str = ""  # stable id across the run (curriculum statistics are keyed by it)

    @property
    def capability(self) -> str:
        """The ``capability`` column, or ``"default"`` for data without one (the one place that says so)."""
        return str(self.columns.get("capability", DEFAULT_CAPABILITY))


@dataclass
class Completion:
    text: str
    token_ids: list[int]  # [T_c] generated ids, EOS included when generation stopped on it
    logprobs: list[float]  # [T_c] sampling-policy log-prob of each generated token
    finish_reason: str = "stop"  # "stop" | "length"


@dataclass
class RolloutGroup:
    """``n`` completions of one prompt, plus what the loop attaches after scoring."""

    sample: Sample
    prompt_ids: list[int]  # [T_p] tokenised prompt (chat template applied)
    completions: list[Completion]
    rewards: list[float] = field(default_factory=list)  # [n], filled by the reward step
    advantages: list[float] = field(default_factory=list)  # [n], filled by advantages.py
    zero_advantage: bool = False  # every scored reward equal (posttrain.advantages): no learning signal
    policy_version: int = 0  # the weight version (syncs into the engine) that generated it

    @property
    def scored(self) -> int:
        """Completions with a reward (``None`` rewards, carried as NaN, are neither a pass nor a fail)."""
        return sum(1 for r in self.rewards if r == r)

    def correct(self, threshold: float) -> int:
        """Completions whose reward is at least ``threshold``."""
        return sum(1 for r in self.rewards if r == r and r >= threshold)


@dataclass
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    columns: dict[str, Any] = field(default_factory=dict)
