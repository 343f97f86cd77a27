"""``random``: a seeded uniform score per row — the random subset every judge must beat.

Same seed, same row id: same score (``posttrain.selection.tie_key``). ``drop_easiest: 0.5`` over it keeps
a random half, stratified by capability when ``per_capability`` is on.
"""

from __future__ import annotations

import datasets

from posttrain.filters import FilterContext, row_ids
from posttrain.plugins import data_filter
from posttrain.selection import tie_key


@data_filter("random", doc="baseline: a seeded uniform score per row (a random subset of the same size)")
def random_score(rows: datasets.Dataset, ctx: FilterContext) -> list[float | None]:
    return [tie_key(ctx.seed + 7919, i) / 2**64 for i in row_ids(rows)]
