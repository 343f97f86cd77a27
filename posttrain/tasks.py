"""The tiny world's synthetic, verifiable tasks, generated deterministically from a seed.

Each row has ``prompt``, ``answer``, ``completion`` (= answer, the SFT target), ``capability`` (the
task's name in the recipe) and ``difficulty`` (digits for arithmetic, length for string tasks).

Held-out rows are disjoint from training rows: a prompt is held out iff a stable hash of it falls
in the held-out bucket, and training generation skips those prompts.

    >>> rows = generate_rows({"add": TinyTaskConfig(kind="add", levels=(2,))}, "train", 3, seed=0)
    >>> [sorted(r) for r in rows][0]
    ['answer', 'capability', 'completion', 'difficulty', 'prompt']
    >>> all(eval(r["prompt"][:-1]) == int(r["answer"]) for r in rows)
    True
"""

from __future__ import annotations

import random
import string
import zlib
from collections.abc import Mapping
from typing import Any

import datasets

from posttrain.config import TinyTaskConfig

HELD_OUT_BUCKETS = 10  # 1 in 10 prompts is reserved for evaluation


def is_held_out(prompt: str) -> bool:
    return zlib.crc32(prompt.encode()) % HELD_OUT_BUCKETS == 0


def _number(rng: random.Random, digits: int) -> int:
    lo = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(lo, 10**digits - 1)


def make_problem(kind: str, level: int, rng: random.Random) -> tuple[str, str]:
    if kind == "add":
        a, b = _number(rng, level), _number(rng, level)
        return f"{a}+{b}=", str(a + b)
    if kind == "mul":
        a, b = _number(rng, level), _number(rng, level)
        return f"{a}*{b}=", str(a * b)
    if kind == "reverse":
        s = "".join(rng.choice(string.ascii_lowercase) for _ in range(level))
        return f"rev {s}=", s[::-1]
    if kind == "sort":
        s = "".join(rng.choice(string.ascii_lowercase) for _ in range(level))
        return f"sort {s}=", "".join(sorted(s))
    raise ValueError(f"unknown tiny task kind {kind!r}; valid: add, mul, reverse, sort")


def generate_rows(tasks: Mapping[str, TinyTaskConfig], split: str, n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` rows mixed over ``tasks`` by weight (train) or ``n`` distinct rows per task (eval)."""
    if not tasks:
        raise ValueError("data.tasks is empty: a tiny-world data source needs at least one task")
    held_out = split != "train"
    rng = random.Random(f"{seed}:{split}")
    names = sorted(tasks)
    rows: list[dict[str, Any]] = []
    if held_out:
        for name in names:
            task = tasks[name]
            seen: set[str] = set()
            attempts = 0
            while len(seen) < n and attempts < 200 * n:
                attempts += 1
                level = rng.choice(task.levels)
                prompt, answer = make_problem(task.kind, level, rng)
                if is_held_out(prompt) and prompt not in seen:
                    seen.add(prompt)
                    rows.append(_row(prompt, answer, name, level))
        return rows
    weights = [tasks[k].weight for k in names]
    while len(rows) < n:
        name = rng.choices(names, weights=weights)[0]
        level = rng.choice(tasks[name].levels)
        prompt, answer = make_problem(tasks[name].kind, level, rng)
        if not is_held_out(prompt):
            rows.append(_row(prompt, answer, name, level))
    return rows


def _row(prompt: str, answer: str, capability: str, difficulty: int) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "answer": answer,
        "completion": answer,
        "capability": capability,
        "difficulty": difficulty,
    }


def tiny_dataset(tasks: Mapping[str, TinyTaskConfig], split: str, n: int, seed: int) -> datasets.Dataset:
    return datasets.Dataset.from_list(generate_rows(tasks, split, n, seed))
