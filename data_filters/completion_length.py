"""``completion_length``: a model-free difficulty signal — longer reference answers are harder.

The score is the row's percentile of completion length (characters of ``completion``, else ``answer``,
or the column named by ``column``): the share of rows with a shorter one, ties counting half. Free,
instant, and the baseline a judge has to beat (OpenThoughts found answer length a strong signal for
math). No cache: nothing to run.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import datasets

from posttrain.filters import FilterContext, FilterError, FilterScores
from posttrain.plugins import data_filter


@dataclass(frozen=True)
class LengthOptions:
    column: str | None = None  # None: completion, else answer


def percentiles(values: list[int]) -> list[float]:
    """Mid-rank percentile of each value.

    >>> percentiles([1, 2, 2, 3])
    [0.125, 0.5, 0.5, 0.875]
    """
    counts = Counter(values)
    below, acc = {}, 0
    for v in sorted(counts):
        below[v] = acc
        acc += counts[v]
    n = len(values)
    return [(below[v] + counts[v] / 2) / n for v in values]


@data_filter(
    "completion_length",
    doc="the percentile of the reference answer's length (longer = harder)",
    options=LengthOptions,
    columns=lambda opts: [opts.column or "completion|answer"],
)
def completion_length(rows: datasets.Dataset, ctx: FilterContext) -> FilterScores:
    column = ctx.options.column or ("completion" if "completion" in rows.column_names else "answer")
    if column not in rows.column_names:
        raise FilterError(f"completion_length: the data has no column {column!r} (has {rows.column_names})")
    lengths = [len(str(v)) for v in rows[column]]
    return FilterScores(percentiles(lengths), {"length_mean": sum(lengths) / max(1, len(lengths))})
