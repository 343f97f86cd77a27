"""Which rows a lightweight SFT stage keeps, from the difficulty its data filters gave them.

Pure functions over lists (no model, no I/O): ``select`` turns per-row difficulties (``None``: no filter
could score the row) into kept and dropped row indices under a ``SelectionConfig``;
``selection_metrics`` counts what it did. The order is "easiest first": ascending difficulty, ties
broken by a seeded hash of the row id, so the same seed keeps the same rows on every machine.

    >>> from posttrain.config import SelectionConfig
    >>> d = [0.0, 1.0, 0.5, None, 0.5, 0.2]
    >>> caps = ["add"] * 6
    >>> ids = [str(i) for i in range(6)]
    >>> s = select(d, caps, ids, SelectionConfig(drop_easiest=0.5), seed=0)
    >>> s.kept, s.dropped   # 5 scored rows: the 2 easiest dropped (0.5 x 5, rounded down); the unscored row kept
    ([1, 2, 3, 4], [0, 5])
    >>> select(d, caps, ids, SelectionConfig(min_difficulty=0.4, unscored="drop"), seed=0).kept
    [1, 2, 4]

A capability the selection would empty keeps its hardest ``min_capability_keep`` share (at least one
row), counted in ``rescued``; a selection that keeps no row at all (``min_capability_keep: 0``) is a
``SelectionError`` whose one line says why, never an empty SFT stage.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from posttrain.config import SelectionConfig
from posttrain.errors import UserError

HIST_BINS = 10  # difficulty histogram bins over [0, 1]


class SelectionError(UserError):
    """A selection that would leave the SFT stage without data; the message says what to change."""


@dataclass
class Selection:
    kept: list[int]  # row indices, ascending
    dropped: list[int]  # row indices, ascending
    unscored: int  # rows without a difficulty (kept or dropped by ``unscored``)
    rescued: dict[str, int] = field(default_factory=dict)  # capability -> rows kept by min_capability_keep
    notes: list[str] = field(default_factory=list)  # one line each: what was counted and why


def tie_key(seed: int, row_id: str) -> int:
    """A seeded, platform-independent order among rows of equal difficulty.

    >>> tie_key(0, "7") == tie_key(0, "7"), tie_key(0, "7") == tie_key(1, "7")
    (True, False)
    """
    return int.from_bytes(hashlib.sha256(f"{seed}:{row_id}".encode()).digest()[:8], "big")


def _count(share: float, n: int) -> int:
    """``share * n`` rounded down (float noise such as 0.29 * 100 = 28.999999999999996 ignored).

    >>> _count(0.5, 5), _count(0.29, 100), _count(0.95, 100)
    (2, 29, 95)
    """
    return math.floor(share * n + 1e-9)


def select(
    difficulty: Sequence[float | None],
    capability: Sequence[str],
    ids: Sequence[str],
    cfg: SelectionConfig,
    seed: int,
) -> Selection:
    """Kept and dropped rows; raises ``SelectionError`` when no row would be kept."""
    n = len(difficulty)
    if not len(capability) == len(ids) == n:
        raise ValueError(f"select: {n} difficulties, {len(capability)} capabilities, {len(ids)} ids")
    ties = [tie_key(seed, i) for i in ids]

    def easiest_first(rows: list[int]) -> list[int]:
        return sorted(rows, key=lambda i: (difficulty[i], ties[i]))

    scored = [i for i in range(n) if difficulty[i] is not None]
    unscored = [i for i in range(n) if difficulty[i] is None]
    caps = sorted(set(capability))
    by_cap = {c: easiest_first([i for i in scored if capability[i] == c]) for c in caps}
    notes: list[str] = []
    keep: set[int] = set(unscored) if cfg.unscored == "keep" else set()
    if unscored:
        notes.append(
            f"{len(unscored)} of {n} rows have no difficulty (no filter could score them): "
            f"{'kept' if cfg.unscored == 'keep' else 'dropped'} (data_selection.unscored={cfg.unscored})"
        )

    lo = cfg.min_difficulty if cfg.min_difficulty is not None else 0.0
    hi = cfg.max_difficulty if cfg.max_difficulty is not None else 1.0
    d = cfg.drop_easiest
    if cfg.min_difficulty is not None or cfg.max_difficulty is not None:
        keep |= {i for i in scored if lo <= float(difficulty[i]) <= hi}  # type: ignore[arg-type]
    elif d is None:
        keep |= set(scored)
    elif cfg.proportions:
        missing = [c for c in caps if c not in cfg.proportions and by_cap[c]]
        if missing:
            raise SelectionError(
                f"data_selection.proportions has no share for capability {', '.join(map(repr, missing))} "
                f"(it has {', '.join(map(repr, sorted(cfg.proportions)))}); give every capability a share"
            )
        total = len(scored) - _count(d, len(scored))
        for c in caps:
            want, have = _count(cfg.proportions[c], total), len(by_cap[c])
            if want > have:
                notes.append(
                    f"capability {c!r}: its share {cfg.proportions[c]:g} asks for {want} rows, it has {have}: kept all"
                )
            keep |= set(by_cap[c][have - min(want, have) :])
    elif cfg.per_capability:
        for rows in by_cap.values():
            keep |= set(rows[_count(d, len(rows)) :])
    else:
        ordered = easiest_first(scored)
        keep |= set(ordered[_count(d, len(ordered)) :])

    rescued: dict[str, int] = {}
    for c in caps:
        rows_c = [i for i in range(n) if capability[i] == c]
        kept_c = sum(1 for i in rows_c if i in keep)
        if cfg.min_capability_keep <= 0:
            if kept_c == 0:
                notes.append(
                    f"capability {c!r}: the selection drops all {len(rows_c)} of its rows "
                    "(data_selection.min_capability_keep=0 lets it)"
                )
            continue
        floor = max(1, math.ceil(cfg.min_capability_keep * len(rows_c) - 1e-9))
        if kept_c >= floor:
            continue
        # hardest dropped rows first, then unscored ones in the seeded order
        spare = [i for i in reversed(by_cap[c]) if i not in keep]
        spare += sorted((i for i in unscored if capability[i] == c and i not in keep), key=lambda i: ties[i])
        extra = spare[: floor - kept_c]
        keep |= set(extra)
        rescued[c] = len(extra)
        notes.append(
            f"capability {c!r}: the selection kept {kept_c} of its {len(rows_c)} rows; kept its hardest "
            f"{kept_c + len(extra)} instead (data_selection.min_capability_keep={cfg.min_capability_keep:g})"
        )

    if not keep:
        why = (
            f"difficulty band [{lo:g}, {hi:g}] holds none of the {len(scored)} scored rows"
            if scored
            else f"no filter could score any of the {n} rows and data_selection.unscored=drop"
        )
        raise SelectionError(
            f"the data selection keeps none of the {n} rows ({why}) and data_selection.min_capability_keep=0; "
            "widen the band, lower drop_easiest, set unscored=keep or min_capability_keep > 0"
        )
    kept = sorted(keep)
    return Selection(
        kept=kept,
        dropped=[i for i in range(n) if i not in keep],
        unscored=len(unscored),
        rescued=rescued,
        notes=notes,
    )


def histogram(values: Sequence[float]) -> list[int]:
    """Counts in ``HIST_BINS`` equal bins over [0, 1] (1.0 falls in the last bin).

    >>> histogram([0.0, 0.05, 0.5, 1.0])
    [2, 0, 0, 0, 0, 1, 0, 0, 0, 1]
    """
    counts = [0] * HIST_BINS
    for v in values:
        counts[min(HIST_BINS - 1, max(0, int(v * HIST_BINS)))] += 1
    return counts


def selection_metrics(
    sel: Selection,
    difficulty: Sequence[float | None],
    capability: Sequence[str],
    labels: Sequence[object] | None = None,
) -> dict[str, float]:
    """``data/selection/*``: rows kept and dropped overall, per capability and per known difficulty label
    (``labels``: the data's own ``difficulty`` column, when it has one), rows rescued per capability,
    and the difficulty histogram before and after (``difficulty_before/0.0-0.1`` … bins)."""
    kept = set(sel.kept)
    n = len(difficulty)
    m: dict[str, float] = {
        "data/selection/rows": float(n),
        "data/selection/kept": float(len(sel.kept)),
        "data/selection/dropped": float(len(sel.dropped)),
        "data/selection/kept_frac": len(sel.kept) / max(1, n),
        "data/selection/unscored": float(sel.unscored),
    }
    groups: list[tuple[str, Sequence[object]]] = [("", capability)]
    if labels is not None:
        groups.append(("difficulty=", labels))
    for prefix, column in groups:
        total = Counter(str(v) for v in column)
        kept_by = Counter(str(column[i]) for i in kept)
        for value in sorted(total):
            m[f"data/selection/kept/{prefix}{value}"] = float(kept_by[value])
            m[f"data/selection/dropped/{prefix}{value}"] = float(total[value] - kept_by[value])
    for c, count in sel.rescued.items():
        m[f"data/selection/rescued/{c}"] = float(count)
    before = [float(v) for v in difficulty if v is not None]
    after = [float(v) for i, v in enumerate(difficulty) if v is not None and i in kept]
    for when, values in (("before", before), ("after", after)):  # <name>/<lo>-<hi> bins: a W&B histogram
        for b, count in enumerate(histogram(values)):
            m[f"data/selection/difficulty_{when}/{b / HIST_BINS:.1f}-{(b + 1) / HIST_BINS:.1f}"] = float(
                count
            )
    if before:
        m["data/selection/difficulty_mean_before"] = sum(before) / len(before)
    if after:
        m["data/selection/difficulty_mean_after"] = sum(after) / len(after)
    return m
