"""Exact match against the ``answer`` column (the tiny world's verifiable reward)."""

from __future__ import annotations

from posttrain.plugins import reward


@reward("exact_match")
def exact_match(
    prompts: list[str], completions: list[str], answer: list[str | None], **_: object
) -> list[float | None]:
    """1.0 when the completion, stripped of surrounding whitespace, equals the answer; else 0.0.

    ``None`` (not applicable) where the sample has no answer.

    >>> exact_match(["1+1=", "2+2=", "write a poem"], ["2", " 5", "roses"], answer=["2", "4", None])
    [1.0, 0.0, None]
    """
    return [
        None if a is None else 1.0 if c.strip() == str(a).strip() else 0.0
        for c, a in zip(completions, answer, strict=True)
    ]
