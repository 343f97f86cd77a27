"""The selection of lightweight SFT (posttrain/selection.py): pure functions, expected values by hand."""

from __future__ import annotations

import pytest

from posttrain.config import SelectionConfig
from posttrain.schema import ConfigError, parse
from posttrain.selection import SelectionError, select, selection_metrics


def _ids(n: int) -> list[str]:
    return [str(i) for i in range(n)]


def test_drop_easiest_per_capability_keeps_each_capabilitys_hardest_share() -> None:
    """add: difficulties 0.0..0.9 (rows 0-9); mul: 0.0..0.3 (rows 10-13). drop_easiest 0.5 within each
    capability drops floor(0.5 x 10) = 5 of add (rows 0-4) and floor(0.5 x 4) = 2 of mul (rows 10, 11)."""
    d = [i / 10 for i in range(10)] + [0.0, 0.1, 0.2, 0.3]
    caps = ["add"] * 10 + ["mul"] * 4
    sel = select(d, caps, _ids(14), SelectionConfig(drop_easiest=0.5), seed=0)
    assert sel.dropped == [0, 1, 2, 3, 4, 10, 11]
    assert sel.kept == [5, 6, 7, 8, 9, 12, 13]
    # overall instead: the 7 easiest of all 14 (0.0, 0.0, 0.1, 0.1, 0.2, 0.2, 0.3 — ties at 0.3 by the seed)
    glob = select(d, caps, _ids(14), SelectionConfig(drop_easiest=0.5, per_capability=False), seed=0)
    assert len(glob.dropped) == 7 and {0, 1, 2, 10, 11, 12} <= set(glob.dropped)
    assert len({3, 13} & set(glob.dropped)) == 1  # one of the two rows at 0.3, picked by the seeded tie order


def test_ties_are_broken_by_the_seed_deterministically() -> None:
    d = [0.5] * 100
    caps = ["add"] * 100
    cfg = SelectionConfig(drop_easiest=0.5)
    a = select(d, caps, _ids(100), cfg, seed=0)
    assert a.kept == select(d, caps, _ids(100), cfg, seed=0).kept  # same seed: same rows
    b = select(d, caps, _ids(100), cfg, seed=1)
    assert len(a.kept) == len(b.kept) == 50 and a.kept != b.kept  # another seed: another half


def test_thresholds_and_unscored_rows() -> None:
    d = [0.1, 0.5, 0.9, None, 1.0]
    caps = ["a"] * 5
    band = SelectionConfig(min_difficulty=0.4, max_difficulty=0.95)
    assert select(d, caps, _ids(5), band, seed=0).kept == [1, 2, 3]  # the unscored row kept by default
    drop = SelectionConfig(min_difficulty=0.4, max_difficulty=0.95, unscored="drop")
    sel = select(d, caps, _ids(5), drop, seed=0)
    assert sel.kept == [1, 2] and sel.unscored == 1
    assert any("1 of 5 rows have no difficulty" in n for n in sel.notes)


def test_proportions_share_out_the_kept_rows() -> None:
    """12 scored rows, drop_easiest 0.5 keeps 6: add gets floor(2/3 x 6) = 4, mul floor(1/3 x 6) = 2, each
    its hardest."""
    d = [i / 10 for i in range(6)] + [i / 10 for i in range(6)]
    caps = ["add"] * 6 + ["mul"] * 6
    cfg = SelectionConfig(drop_easiest=0.5, proportions={"add": 2 / 3, "mul": 1 / 3})
    sel = select(d, caps, _ids(12), cfg, seed=0)
    assert sel.kept == [2, 3, 4, 5, 10, 11]
    with pytest.raises(SelectionError, match="no share for capability 'mul'"):
        select(d, caps, _ids(12), SelectionConfig(drop_easiest=0.5, proportions={"add": 1.0}), seed=0)


def test_a_selection_cannot_wipe_out_a_capability() -> None:
    """A band that only the add rows reach would empty mul: it keeps its hardest ceil(0.01 x 200) = 2 rows,
    counted and explained."""
    d = [0.9] * 100 + [i / 400 for i in range(200)]
    caps = ["add"] * 100 + ["mul"] * 200
    sel = select(d, caps, _ids(300), SelectionConfig(min_difficulty=0.8), seed=0)
    assert sel.rescued == {"mul": 2}
    assert sel.kept == list(range(100)) + [298, 299]  # mul's two hardest
    assert any("capability 'mul': the selection kept 0 of its 200 rows" in n for n in sel.notes)
    metrics = selection_metrics(sel, d, caps)
    assert metrics["data/selection/rescued/mul"] == 2 and metrics["data/selection/kept/mul"] == 2


def test_dropping_everything_is_kept_or_refused_never_empty() -> None:
    d = [0.1, 0.2, 0.3, 0.4]
    caps = ["a", "a", "b", "b"]
    # drop_easiest 1.0: each capability keeps its hardest row (min_capability_keep), counted
    sel = select(d, caps, _ids(4), SelectionConfig(drop_easiest=1.0), seed=0)
    assert sel.kept == [1, 3] and sel.rescued == {"a": 1, "b": 1}
    # with the floor off, a selection that keeps nothing is refused in one line
    with pytest.raises(SelectionError, match=r"keeps none of the 4 rows .*band \[0.9, 1\]") as e:
        select(d, caps, _ids(4), SelectionConfig(min_difficulty=0.9, min_capability_keep=0.0), seed=0)
    assert "\n" not in str(e.value)
    # a judge that scored nothing, unscored rows dropped: each capability keeps one row (the floor)
    none = select([None] * 4, caps, _ids(4), SelectionConfig(drop_easiest=0.5, unscored="drop"), seed=0)
    assert len(none.kept) == 2 and none.rescued == {"a": 1, "b": 1}
    with pytest.raises(SelectionError, match="no filter could score any of the 4 rows"):
        select([None] * 4, caps, _ids(4), SelectionConfig(unscored="drop", min_capability_keep=0.0), seed=0)


def test_metrics_count_per_capability_label_and_histogram() -> None:
    d = [0.05, 0.95, 0.55, 0.15]
    caps = ["add", "add", "mul", "mul"]
    sel = select(d, caps, _ids(4), SelectionConfig(drop_easiest=0.5), seed=0)
    m = selection_metrics(sel, d, caps, labels=[1, 2, 2, 1])
    assert m["data/selection/kept"] == 2 and m["data/selection/kept_frac"] == 0.5
    assert m["data/selection/kept/difficulty=2"] == 2 and m["data/selection/dropped/difficulty=1"] == 2
    assert (
        m["data/selection/difficulty_before/0.0-0.1"] == 1
        and m["data/selection/difficulty_after/0.9-1.0"] == 1
    )
    assert m["data/selection/difficulty_after/0.0-0.1"] == 0
    assert m["data/selection/difficulty_mean_after"] == pytest.approx(0.75)


def test_selection_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"'s.drop_easiest' must be in \[0, 1\], got 1.5"):
        parse(SelectionConfig, {"drop_easiest": 1.5}, "s")
    with pytest.raises(ConfigError, match="either drop_easiest or min_difficulty"):
        parse(SelectionConfig, {"drop_easiest": 0.5, "min_difficulty": 0.2}, "s")
    with pytest.raises(ConfigError, match="must sum to 1"):
        parse(SelectionConfig, {"drop_easiest": 0.5, "proportions": {"a": 0.5, "b": 0.4}}, "s")
    with pytest.raises(ConfigError, match="min_difficulty 0.8 is above max_difficulty 0.2"):
        parse(SelectionConfig, {"min_difficulty": 0.8, "max_difficulty": 0.2}, "s")
