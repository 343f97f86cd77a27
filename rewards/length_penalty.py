"""Soft overlong penalty (DAPO): no penalty up to a budget, then a linear ramp down to -1."""

from __future__ import annotations

from posttrain.plugins import reward


@reward(
    "length_penalty", doc="0 up to max_len - cache_len characters, then linear down to -1 at max_len (DAPO)"
)
def length_penalty(
    prompts: list[str], completions: list[str], max_len: int = 1024, cache_len: int = 256, **_: object
) -> list[float | None]:
    """DAPO's soft overlong punishment, measured in characters of the completion.

    With ``L = len(completion)``: ``0`` when ``L <= max_len - cache_len``;
    ``(max_len - cache_len - L) / cache_len`` in between; ``-1`` when ``L > max_len``.
    Add it with a weight next to a correctness reward.

    >>> length_penalty(["q"] * 4, ["a" * 6, "a" * 8, "a" * 9, "a" * 20], max_len=10, cache_len=4)
    [0.0, -0.5, -0.75, -1.0]
    """
    if not 0 < cache_len <= max_len:
        raise ValueError(
            f"length_penalty: need 0 < cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}"
        )
    free = max_len - cache_len
    out: list[float | None] = []
    for c in completions:
        n = len(c)
        out.append(0.0 if n <= free else -1.0 if n > max_len else (free - n) / cache_len)
    return out
