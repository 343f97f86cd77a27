"""Format reward: does the completion match a regular expression (by default think-then-answer)?"""

from __future__ import annotations

import re
from functools import lru_cache

from posttrain.plugins import reward

THINK_THEN_ANSWER = r"<think>.*?</think>\s*<answer>.*?</answer>"


@lru_cache(maxsize=32)
def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.DOTALL)


@reward(
    "format", doc="1.0 if the whole completion matches `pattern` (default <think>…</think><answer>…</answer>)"
)
def format_reward(
    prompts: list[str], completions: list[str], pattern: str = THINK_THEN_ANSWER, **_: object
) -> list[float | None]:
    """1.0 when the completion, stripped of surrounding whitespace, matches ``pattern`` in full.

    ``pattern`` comes from the reward spec's ``kwargs``; ``.`` matches newlines too.

    >>> format_reward(["q", "q"], ["<think>2+2 is 4</think>\\n<answer>4</answer>", "<answer>4</answer>"])
    [1.0, 0.0]
    >>> format_reward(["q", "q"], ["Answer: 42", "Answer: forty-two"], pattern=r"Answer: \\d+")
    [1.0, 0.0]
    """
    rx = _compile(pattern)
    return [1.0 if rx.fullmatch(c.strip()) else 0.0 for c in completions]
