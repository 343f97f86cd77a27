"""Math answers checked with Hugging Face math-verify (``pip install 'posttrain[math]'``).

math-verify bounds its parsing with ``signal.alarm``, which only works in a process's main
thread. So: called from the main thread, the reward verifies in place; called from any other
thread (the reward runner uses a worker thread for its timeout), it verifies in a small pool of
spawned processes, created on first use and kept for the rest of the run.
"""

from __future__ import annotations

import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from posttrain.plugins import require, reward

_EXTRA = "math"
_pool: ProcessPoolExecutor | None = None
_pool_lock = threading.Lock()


@reward(
    "math_verify",
    doc="1.0 if the completion's final answer is mathematically equal to the `answer` column (math-verify)",
    timeout_s=60.0,
    requires={"math_verify": _EXTRA},
)
def math_verify(
    prompts: list[str], completions: list[str], answer: list[object], workers: int = 2, **_: object
) -> list[float | None]:
    """1.0 when math-verify finds the completion's answer equal to the reference ``answer``.

    The reference may be plain (``42``, ``1/2``) or LaTeX (``\\frac{1}{2}``, with or without
    ``$``); the completion may box its answer or state it. ``None`` where ``answer`` is ``None``.

    >>> math_verify(["q"] * 4, ["so \\\\boxed{42}", "we get $\\\\frac{2}{4}$", "it is 0.5", "41"],
    ...             answer=["42", "\\\\frac{1}{2}", "1/2", "42"])
    [1.0, 1.0, 1.0, 0.0]
    >>> math_verify(["q"], ["x"], answer=[None])
    [None]
    """
    require("math_verify", _EXTRA, "reward 'math_verify'")
    pairs = [(str(a), c) for a, c in zip(answer, completions, strict=True) if a is not None]
    if threading.current_thread() is threading.main_thread():
        scores = [verify_one(a, c) for a, c in pairs]
    else:
        scores = _map_in_pool(pairs, workers)
    it = iter(scores)
    return [None if a is None else next(it) for a in answer]


def verify_one(answer: str, completion: str) -> float:
    """Score one completion (runs where ``signal.alarm`` works: a main thread)."""
    from math_verify import parse, verify

    delimited = "$" in answer or "\\boxed" in answer
    gold = parse(answer if delimited else f"${answer}$") or parse(answer)  # a bare "1+x^2" is math, not "1"
    if not any(not isinstance(g, str) for g in gold):  # only the raw text came back: no math in it
        raise ValueError(
            f"math_verify: cannot parse the reference answer {answer!r}; write it as LaTeX or a number"
        )
    return 1.0 if verify(gold, parse(completion)) else 0.0


def _verify_pair(pair: tuple[str, str]) -> float:
    return verify_one(*pair)


def _map_in_pool(pairs: list[tuple[str, str]], workers: int) -> list[float]:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
        pool = _pool
    try:
        return list(pool.map(_verify_pair, pairs, chunksize=max(1, len(pairs) // (4 * workers))))
    except BrokenProcessPool:
        with _pool_lock:
            _pool = None  # a worker died (e.g. killed for memory): start afresh next call
        raise
