"""Typed records that cross module boundaries (rollouts -> rewards -> advantages -> training)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sample:
    """One prompt with its reference columns (``answer``, ``capability``, ``difficulty``, ...)."""

    prompt: str  # raw user text (the chat template is applied by the engine/tokenizer)
    columns: dict[str, Any] = field(default_factory=dict)
    uid: str = ""  # stable id across the run (curriculum statistics are keyed by it)


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


@dataclass
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    columns: dict[str, Any] = field(default_factory=dict)
